"""``python train.py`` on a shared CPU: wall-clock and CPU time alone and beside one competing process.

The competitor is one process running a torch matmul loop on every core (torch's default intra-op
threads), i.e. one full-CPU process. Each configuration runs ``--repeats`` times; the table gives the
median and the range of wall seconds and the CPU seconds (user + sys) of the training process, with
the 1-minute load average before each run (the machine may be shared with other work).

    python benchmarks/shared_cpu_train.py --label after --out benchmarks/results/shared_cpu_train.json -- --max_steps 5

Extra arguments after ``--`` go to train.py. ``--env KEY=VALUE`` sets a variable for train.py
(e.g. ``OMP_WAIT_POLICY=ACTIVE`` to see spinning threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPETITOR = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def run_once(train_args, env, competing: bool) -> dict:
    """One ``train.py`` run: its wall seconds, its own CPU seconds (user + sys, from ``wait4``) and
    the 1-minute load average just before it started."""
    rival = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if competing else None
    try:
        if rival is not None:
            time.sleep(2.0)  # let it reach its loop
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, str(ROOT / "train.py"), "--output_dir", out, "--overwrite_output_dir", *train_args]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                raise SystemExit(f"train.py {' '.join(train_args)} failed with exit status {code}")
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "load1": load}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--out", default=None, help="JSON file; rows are appended")
    ap.add_argument("train_args", nargs="*")
    args = ap.parse_args()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    rows = []
    for competing in (False, True):
        runs = [run_once(args.train_args, env, competing) for _ in range(args.repeats)]
        walls = [r["wall_s"] for r in runs]
        rows.append({"label": args.label, "env": args.env, "train_args": args.train_args, "competing": competing,
                     "wall_s": walls, "median_wall_s": statistics.median(walls),
                     "cpu_s": [r["cpu_s"] for r in runs], "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
                     "load1": [r["load1"] for r in runs], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
