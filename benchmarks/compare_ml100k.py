"""The multi-negative family compared on real data: RecBole's ML-100K and SmolLM2-135M-Instruct, on CPU.

    python benchmarks/compare_ml100k.py                                   # every row (see --help)
    python benchmarks/compare_ml100k.py --sft_from runs/ml100k_smollm2/sft-merged   # reuse an SFT model
    python benchmarks/compare_ml100k.py --train 16 --test 8 --full_catalog_users 2 --rows "S-DPO K=3" --tag trial

Rows, each one ``train.py`` process from the same SFT weights (LoRA SFT on the training sample, merged
into the base, as in ``reproduce_ml100k.py``; or the folder ``--sft_from`` names), the SFT model as the
reference (its log-probs of all 20 candidates of every training example, computed once and reused):

* ``SFT``: the start, evaluated only;
* ``<loss> K=<k>`` for the losses S-DPO, DMPO, DPO-pairs and dynamic (``--loss_type``) at K = 3 and 15,
  random negatives resampled every epoch;
* ``S-DPO K=3 hard`` / ``S-DPO K=3 boundary``: the other negative strategies (``--negatives``).

Each row reports candidate ranking (HR@1, NDCG@5 over the 20 listed candidates), constrained decoding
(HitRatio@1 with answers restricted to the candidate titles) and full-catalog ranking (HR@10, NDCG@10
over every item but the user's history) on a seeded subset of ``--full_catalog_users`` test users.
Writes ``<tag>.md``, ``<tag>.json`` and ``<tag>.log`` under ``benchmarks/results/``.

``--jobs 2`` runs two rows at a time with one thread each (the first preference row, which computes
the shared reference, runs beside the SFT row): on 2 cores that finishes the table sooner than one
two-thread process per row, since a row's model load, tokenisation and decoding are mostly serial.
A row's time is then its process's wall time beside another row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reproduce_ml100k import baselines, load_config, merge_sft, run_meta, run_train, table  # noqa: E402

METRICS = (("hr@1", "HR@1"), ("ndcg@5", "NDCG@5"), ("constrained_hit_ratio@1", "constrained HitRatio@1"),
           ("full_catalog_hr@10", "catalog HR@10"), ("full_catalog_ndcg@10", "catalog NDCG@10"))
LOSSES = (("S-DPO", "sdpo"), ("DMPO", "dmpo"), ("DPO-pairs", "dpo_pairs"), ("dynamic", "dynamic"))


def all_rows() -> dict[str, dict]:
    """Row name -> the ``train.py`` settings that differ between rows."""
    rows = {}
    for k in (3, 15):
        for label, loss_type in LOSSES:
            rows[f"{label} K={k}"] = dict(loss_type=loss_type, num_negatives=k, negatives="random")
    for negatives in ("hard", "boundary"):
        rows[f"S-DPO K=3 {negatives}"] = dict(loss_type="sdpo", num_negatives=3, negatives=negatives)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ml100k_smollm2.yaml"))
    ap.add_argument("--train", type=int, default=64, help="training examples of the preference rows")
    ap.add_argument("--sft_train", type=int, default=None,
                    help="training examples of the SFT run (default: the config's); ignored with --sft_from")
    ap.add_argument("--test", type=int, default=40, help="test examples")
    ap.add_argument("--full_catalog_users", type=int, default=10, help="test users ranked over the whole catalog")
    ap.add_argument("--batch_size", type=int, default=None, help="groups per step (default: the config's)")
    ap.add_argument("--seed", type=int, default=0, help="data seed (samples, negatives) and training seed")
    ap.add_argument("--sft_from", default=None, help="a merged SFT model folder to start from instead of training one")
    ap.add_argument("--tag", default="compare_ml100k", help="name of the result files and the runs/ folder")
    ap.add_argument("--rows", default=",".join(["SFT", *all_rows()]), help="rows to run, comma-separated")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at a time, each with cores/jobs threads")
    args = ap.parse_args(argv)

    known = {"SFT", *all_rows()}
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {unknown}; known: {sorted(known)}")
    cfg = load_config(args)
    cfg.update(max_train_examples=args.train, max_eval_examples=args.test)
    runs = ROOT / "runs" / args.tag
    shutil.rmtree(runs, ignore_errors=True)  # train.py reuses a reference_logps.pt it finds
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    evaluation = dict(eval="ranking,constrained,full_catalog", full_catalog_users=args.full_catalog_users,
                      eval_untrained=False)
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    with open(results_dir / f"{args.tag}.log", "w") as log:
        if args.sft_from:
            sft_dir = Path(args.sft_from).resolve()
            sft_note = f"the SFT model in {args.sft_from} (not trained by this run)"
        else:
            sft_cfg = dict(cfg, stage="sft", eval="none", eval_untrained=False)
            if args.sft_train is not None:
                sft_cfg["max_train_examples"] = args.sft_train
            _, cost = run_train("SFT training", sft_cfg, runs / "sft", log)
            rows["SFT training"] = {"metrics": {}, **cost}
            sft_dir = runs / "sft-merged"
            merge_sft(runs / "sft", sft_dir)
            sft_note = f"LoRA SFT on {sft_cfg['max_train_examples']} training examples, trained by this run"
        start = dict(cfg, model_name_or_path=str(sft_dir), **evaluation)
        start.pop("gguf_file", None)
        jobs = max(1, args.jobs)
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        todo = []  # (name, cfg, run_dir)
        if "SFT" in wanted:
            todo.append(("SFT", dict(start, stage="eval", lora=False, eval_untrained=True), runs / "SFT"))
        for name, settings in all_rows().items():
            if name in wanted:
                todo.append((name, dict(start, stage="sdpo", **settings), runs / name.replace(" ", "_")))
        first_pref = next((i for i, (n, _, _) in enumerate(todo) if n != "SFT"), None)

        def one(item):
            name, row_cfg, run_dir = item
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "row.log", "w") as row_log:
                try:
                    return run_train(name, row_cfg, run_dir, row_log, threads)
                except SystemExit as exc:  # the row failed: the table says so, the other rows go on
                    print(f"[compare] {exc}", flush=True)
                    return None

        def record(item, out):
            name, row_cfg, run_dir = item
            log.write((run_dir / "row.log").read_text())
            log.flush()
            if out is None:
                rows[name] = {"metrics": {}, "failed": True}
                return
            res, cost = out
            metrics = res["untrained"] if name == "SFT" else next(v for key, v in res.items() if key != "untrained")
            rows[name] = {"metrics": metrics, **cost}
            if name != "SFT":
                rows[name]["settings"] = {k: row_cfg[k] for k in ("loss_type", "num_negatives", "negatives")}

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            # The first preference row computes the SFT model's log-probs of every candidate (the shared
            # reference), beside the SFT row; every later row starts from a copy of them.
            head = todo if first_pref is None else todo[: first_pref + 1]
            rest = todo[len(head):]
            for item, out in zip(head, pool.map(one, head)):
                record(item, out)
            if first_pref is not None:
                shared_ref = todo[first_pref][2] / "reference_logps.pt"
                for name, _, run_dir in rest:
                    if name != "SFT":
                        run_dir.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(shared_ref, run_dir / "reference_logps.pt")
            for item, out in zip(rest, pool.map(one, rest)):
                record(item, out)
        rows = {k: rows[k] for k in ["SFT training", *(name for name, _, _ in todo)] if k in rows}
        base, sample = baselines(cfg, args.seed)
        for name, metrics in base.items():
            rows[name] = {"metrics": metrics}
    total = time.perf_counter() - started
    meta = run_meta(cfg, args.seed, sample, total)
    meta.update(start=sft_note, full_catalog_users=args.full_catalog_users, evaluation=evaluation["eval"])
    (results_dir / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    command = " ".join(["python benchmarks/compare_ml100k.py", *(argv if argv is not None else sys.argv[1:])])
    threads_note = (f" Rows ran {args.jobs} at a time, one thread each (`--jobs {args.jobs}`)." if args.jobs > 1 else "")
    text = (f"# The multi-negative family on real ML-100K with SmolLM2-135M (CPU)\n\n"
            f"`{command}` at commit `{meta['commit'][:10]}`, {meta['date']}, {meta['machine']}, torch {meta['torch']}; "
            f"total {total / 60:.1f} min.\n\n"
            f"Start of every row: {sft_note}. Preference rows: {sample['train_sample']} training examples from "
            f"{sample['train_sample_users']} users, one epoch, batch {cfg['batch_size']}, beta {cfg['beta']}, "
            f"seed {args.seed}. Test: {sample['test_sample']} examples from {sample['test_sample_users']} users; "
            f"full-catalog ranking on {args.full_catalog_users} of them (seeded subset).{threads_note}\n\n"
            + table(rows, METRICS) + "\n\nTime and memory: the row's whole `train.py` process (model load, "
            "tokenisation, reference log-probs when not shared, training, evaluation); peak = its maximum "
            "resident set. The baselines are fit on the same training sample (and on the whole training split).\n")
    (results_dir / f"{args.tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
