"""A graceful stop on SIGINT / SIGTERM (what a cluster sends before preempting a job).

``GracefulStop`` records the first signal instead of dying; the training loop asks ``requested()``
after each optimizer step, writes a checkpoint and raises ``Stopped``. A SIGINT more than
``FORWARD_WINDOW_S`` after the first signal (Ctrl-C again) restores the default behaviour and stops
at once (``KeyboardInterrupt``); any other repeat is absorbed. Launchers forward the signal that
their process group already got: Ctrl-C and Slurm reach every process, then ``torchrun`` sends its
ranks the same signal and the ``deepspeed`` launcher a SIGTERM, so each rank sees it twice within
milliseconds. The sender's SIGKILL stays the hard stop.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import torch

from .runtime import all_max_tensor, is_distributed, rank

__all__ = ["GracefulStop", "Stopped", "ignore_in_worker"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORWARD_WINDOW_S = 2.0  # a repeat this soon after the first signal is a launcher's copy, not a second Ctrl-C


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
        self._first_at = 0.0
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
        if self.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > FORWARD_WINDOW_S:
                self.__exit__()  # Ctrl-C again: stop now
                raise KeyboardInterrupt
            return  # a forwarded copy (see the module docstring)
        self.signum, self._first_at = signum, time.monotonic()
        if rank() != 0:  # every rank gets the signal; rank 0 speaks for them (and prints where it stopped)
            return
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              f"(Ctrl-C again, after {FORWARD_WINDOW_S:g} s, stops at once)", file=sys.stderr, flush=True)

    def requested(self, agreed: int | None = None) -> int | None:
        """The signal received by this process or, under torch.distributed, by any rank.

        ``agreed``: under torch.distributed, the ranks' maximum of ``signum`` already read with the
        step (``Runtime.backward_and_step(stop_signal=...)``), so no collective runs here; without it
        this is a collective, which every rank must call at the same point. In one process ``agreed``
        is ignored: a signal that arrived after the step's read still counts.
        """
        signum = self.signum or 0
        if is_distributed():
            if agreed is not None:
                return agreed or None
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            signum = int(all_max_tensor(torch.tensor([signum], dtype=torch.int64, device=device)).item())
        return signum or None


def ignore_in_worker(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of the DataLoader workers: they ignore SIGINT and SIGTERM, which a terminal,
    Slurm or the ``deepspeed`` launcher sends to every process of the job; the training process
    finishes its step, writes the checkpoint and shuts them down. (A forked worker would otherwise run
    the inherited ``GracefulStop`` handler and print the notice again; a spawned one would die, and
    the training process with it, before the checkpoint.)"""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
