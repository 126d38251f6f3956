"""The benchmarks' shared harness: where a run happened (commit, versions, machine, date), interleaved
wall-clock timing, the resident-memory samplers, and the JSON / markdown writers. The benchmark scripts
import it from this folder (``python benchmarks/<name>.py`` puts the folder on ``sys.path``; the tests
load the scripts the same way)."""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Short hash of the checkout's HEAD ("" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_versions(names) -> dict:
    """``{distribution: version}`` of the installed ones among ``names``."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu_name(threads: int) -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)})"


def interleaved_times(fns: dict, repeats: int, desc: str = "timing") -> dict:
    """Seconds of each callable per round: one warm-up each, then ``repeats`` round-robin passes, so load
    from other processes falls on all of them alike."""
    from tqdm import tqdm

    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc=desc):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def rss_kb() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in KiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class PeakRSS:
    """Growth of the process's resident memory while the block runs (CPU), sampled every millisecond.

    Freed heap memory is handed back first (glibc ``malloc_trim``) so the baseline is the live set;
    ``mib`` is None where /proc is missing. Approximate: allocator caching can hide some growth.
    """

    def __init__(self):
        self.mib = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        if not os.path.exists("/proc/self/statm"):
            return self
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self._base = self._peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc):
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.mib = (self._peak - self._base) / 2**20
        return False


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file, so a run killed by a time limit never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def op_counter():
    """A ``TorchDispatchMode`` that counts the aten ops dispatched inside its block: ``counts`` (op
    name -> calls) and ``total``. Each op costs the host time on a GPU step, whatever it computes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

        @property
        def total(self) -> int:
            return sum(self.counts.values())

    return OpCounter()
