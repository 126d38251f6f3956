"""``train.py`` once per ``--weight_update``, in turns: peak resident memory, wall time and the losses.

The defaults are a full-parameter bf16 S-DPO run of SmolLM2-135M on ML-100K (the real material of
``configs/ml100k_smollm2.yaml``, fetched as ``.ci/run`` does), a few steps; arguments after ``--``
replace the train.py flags. Each run is a fresh process; its peak resident set comes from the kernel's
accounting of that child (``os.wait4``), so it includes the model, activations and the optimizer.

    python benchmarks/train_weight_update.py --out benchmarks/results/train_weight_update_cpu
    python benchmarks/train_weight_update.py -- --tiny_layers 2 --bf16 true --max_steps 5 --eval none
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

MODES = ("fp32_masters", "stochastic_rounding")
DEFAULT = ["--config", "configs/ml100k_smollm2.yaml", "--lora", "false", "--bf16", "true", "--stage", "sdpo",
           "--max_train_examples", "48", "--max_steps", "6", "--sdpo_learning_rate", "1e-5", "--eval", "none"]


def run(mode: str, train_args: list[str], folder: str) -> dict:
    out = os.path.join(folder, mode)
    cmd = [sys.executable, str(harness.REPO / "train.py"), *train_args, "--weight_update", mode,
           "--output_dir", out, "--overwrite_output_dir"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=harness.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py --weight_update {mode} failed ({proc.returncode}):\n{err[-2000:]}")
    rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "stage" in r]
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "loss": [r["loss"] for r in steps], "grad_norm": [r["grad_norm"] for r in steps],
            "reward_accuracy": [r["reward_accuracy"] for r in steps]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else None
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="runs of each mode, in turns")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args(own)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    train_args = DEFAULT if extra is None else extra
    from tqdm import tqdm

    load = [os.getloadavg()[0]]
    runs = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as folder:
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for m in MODES:
                runs[m].append(run(m, train_args, folder))
    load.append(os.getloadavg()[0])
    result = {"commit": harness.commit(), "date": harness.utc_now(), "device": harness.cpu_name(os.cpu_count()),
              "train_args": train_args, "load_1min": load, "versions": harness.package_versions(["torch"]),
              "runs": runs}
    base = runs["fp32_masters"][0]
    lines = [f"# train.py per --weight_update", "", f"{result['device']}; commit {result['commit']}, {result['date']}; "
             f"1-minute load {load[0]:.1f} before, {load[1]:.1f} after; {args.rounds} round(s), in turns.", "",
             f"`python train.py {' '.join(train_args)} --weight_update MODE`", "",
             "| --weight_update | peak RSS (MiB) | vs masters | wall (s) | CPU (s) | losses by step | grad norms |",
             "|---|---|---|---|---|---|---|"]
    for m in MODES:
        for r in runs[m]:
            lines.append(f"| {m} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x "
                         f"| {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {', '.join(f'{x:.4f}' for x in r['loss'])} "
                         f"| {', '.join(f'{x:.3g}' for x in r['grad_norm'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        harness.write_json(Path(args.out + ".json"), result)
        harness.write_text(Path(args.out + ".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
