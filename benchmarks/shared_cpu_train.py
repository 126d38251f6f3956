"""``python train.py`` on a shared CPU: wall-clock and CPU time alone and beside one competing process.

The competitor is one process running a torch matmul loop on every core (torch's default intra-op
threads), i.e. one full-CPU process. Each configuration runs ``--repeats`` times; the table gives the
median and the range of wall seconds and the CPU seconds (user + sys) of the training process, with
the 1-minute load average before each run (the machine may be shared with other work).

    python benchmarks/shared_cpu_train.py --label after --out benchmarks/results/shared_cpu_train.json -- --max_steps 5

Extra arguments after ``--`` go to train.py. ``--env KEY=VALUE`` sets a variable for train.py
(e.g. ``OMP_WAIT_POLICY=ACTIVE`` to see spinning threads).

``--root DIR`` runs ``DIR/train.py`` (cwd DIR, ``PYTHONPATH=DIR``; default: this checkout) so one
harness measures another checkout (e.g. a ``git worktree`` of an older commit). DIR needs its own
``python setup.py build_ext --inplace`` (and, for a commit before ``kernels/`` moved into
``sdpo_fast/``, a symlink ``sdpo_fast/kernels -> ../kernels``, or an editable install elsewhere wins);
the harness checks before measuring that ``sdpo_fast``, ``sdpo_fast.kernels`` and the native
extension all import from DIR, and stops otherwise.
``--competing no|yes|both`` picks the cells (default both, alone first). ``--timeout S`` caps each run
at S wall seconds: a capped run is killed (its process group), kept with ``timed_out`` true and its
wall time as the cap, so a median over it reads as "> cap". ``--log DIR`` keeps each run's stdout and
stderr in DIR, every line (tqdm's ``\\r`` updates included) prefixed with seconds since the start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPETITOR = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"
IMPORT_CHECK = ("import json, sdpo_fast, sdpo_fast.kernels, sdpo_fast.kernels._native as n; print(json.dumps("
                "[sdpo_fast.__file__, sdpo_fast.kernels.__file__, n.__file__]))")


def check_imports(root: Path, env) -> list:
    """The files ``sdpo_fast``, ``sdpo_fast.kernels`` and its ``_native`` extension import from, run
    with ``env`` from a neutral directory; exits unless all of them lie under ``root``."""
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"importing sdpo_fast from {root} failed:\n{out.stderr[-2000:]}")
    files = json.loads(out.stdout.strip().splitlines()[-1])
    outside = [f for f in files if not Path(f).resolve().is_relative_to(root.resolve())]
    if outside:
        raise SystemExit(f"with PYTHONPATH={root}, these import from elsewhere: {outside}")
    return files


def _copy_stamped(stream, path: Path, t0: float) -> None:
    """Writes ``stream`` (binary) to ``path``, each line (split at ``\\n`` and ``\\r``) stamped."""
    with open(path, "w", encoding="utf-8", errors="replace") as log:
        buf = b""
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            stamp = time.perf_counter() - t0
            for line in lines:
                if line:
                    log.write(f"[{stamp:8.1f}] {line.decode('utf-8', 'replace')}\n")
            log.flush()
        if buf:
            log.write(f"[{time.perf_counter() - t0:8.1f}] {buf.decode('utf-8', 'replace')}\n")


def run_once(train_args, env, competing: bool, root: Path = ROOT, timeout: float | None = None,
             log: Path | None = None) -> dict:
    """One ``train.py`` run: its wall seconds, its own CPU seconds (user + sys, from ``wait4``: the
    process and the children it waited for) and the 1-minute load average just before it started."""
    rival = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if competing else None
    try:
        if rival is not None:
            time.sleep(2.0)  # let it reach its loop
        load = os.getloadavg()[0]
        start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, str(root / "train.py"), "--output_dir", out, "--overwrite_output_dir", *train_args]
            t0 = time.perf_counter()
            sink = subprocess.PIPE if log is not None else subprocess.DEVNULL
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT if log else sink,
                                    start_new_session=True)
            copier = None
            if log is not None:
                copier = threading.Thread(target=_copy_stamped, args=(proc.stdout, log, t0), daemon=True)
                copier.start()
            timed_out = threading.Event()

            def _cap():
                timed_out.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

            timer = threading.Timer(timeout, _cap) if timeout else None
            if timer is not None:
                timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            if timer is not None:
                timer.cancel()
            if copier is not None:
                copier.join(timeout=10)
            code = os.waitstatus_to_exitcode(status)
            if timed_out.is_set():
                wall = float(timeout)
            elif code != 0:
                raise SystemExit(f"train.py {' '.join(train_args)} failed with exit status {code}"
                                 + (f" (log: {log})" if log else ""))
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "load1": load,
            "timed_out": timed_out.is_set(), "start": start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--out", default=None, help="JSON file; rows are appended")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose train.py runs (PYTHONPATH=ROOT)")
    ap.add_argument("--competing", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--timeout", type=float, default=None, help="wall-clock cap per run, seconds")
    ap.add_argument("--log", type=Path, default=None, help="folder for each run's stamped stdout/stderr")
    ap.add_argument("train_args", nargs="*")
    args = ap.parse_args()
    root = args.root.resolve()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    files = check_imports(root, env)
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if args.log is not None:
        args.log.mkdir(parents=True, exist_ok=True)
    rows = []
    cells = {"no": (False,), "yes": (True,), "both": (False, True)}[args.competing]
    for competing in cells:
        runs = []
        for i in range(args.repeats):
            log = None
            if args.log is not None:
                stamp = time.strftime("%H%M%S", time.gmtime())
                log = args.log / f"{args.label}_{'competing' if competing else 'alone'}_{stamp}_{i}.log"
            runs.append(run_once(args.train_args, env, competing, root, args.timeout, log))
            print(json.dumps({"label": args.label, "competing": competing, **runs[-1]}), flush=True)
        walls = [r["wall_s"] for r in runs]
        rows.append({"label": args.label, "root": str(root), "commit": commit, "imports": files,
                     "env": args.env, "train_args": args.train_args, "competing": competing,
                     "timeout_s": args.timeout, "wall_s": walls, "median_wall_s": statistics.median(walls),
                     "timed_out": [r["timed_out"] for r in runs],
                     "cpu_s": [r["cpu_s"] for r in runs], "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
                     "load1": [r["load1"] for r in runs], "start": [r["start"] for r in runs],
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
