"""A graceful stop on SIGINT / SIGTERM (what a cluster sends before preempting a job).

``GracefulStop`` records the first signal instead of dying; the training loop asks ``requested()``
after each optimizer step, writes a checkpoint and raises ``Stopped``. A second signal restores the
default behaviour and stops at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

__all__ = ["GracefulStop", "Stopped"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Training stopped on a signal after a checkpoint was written."""

    def __init__(self, signum: int, checkpoint: str, where: str):
        self.signum, self.checkpoint, self.where = signum, checkpoint, where
        super().__init__(f"stopped by {signal.Signals(signum).name} after {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a death by signal


class GracefulStop:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> int | None:
        """The signal received by this process or, under torch.distributed, by any rank (a collective:
        every rank calls it after every step)."""
        signum = self.signum or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([signum], dtype=torch.int64)
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum = int(t.item())
        return signum or None
