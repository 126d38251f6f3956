"""The graceful stop's plumbing: DataLoader workers leave the signals to the training process, and
under torch.distributed the stop decision is the ranks' maximum read with the step.

The end-to-end stops (a signal during a step, a checkpoint, an exact resume) are in
``tests/test_train.py``; this file holds what those runs cannot isolate.
"""

import os
import signal
import time

import pytest
import torch

from sdpo_fast.stopping import SIGNALS, GracefulStop
from sdpo_fast.train import step_loader


class _WorkerFacts(torch.utils.data.Dataset):
    """Item ``i``: ``(pid, [handler of each signal is SIG_IGN])`` of the process that built it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 2:
            time.sleep(0.3)  # the test signals the worker meanwhile; it must live on
        return os.getpid(), [signal.getsignal(s) == signal.SIG_IGN for s in SIGNALS]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_loader_workers_ignore_the_stop_signals(num_workers):
    """Inside a ``GracefulStop`` the workers of the trainer's loader ignore SIGINT and SIGTERM (a
    forked worker would run the inherited handler, a spawned one would die); a SIGTERM sent to a
    worker leaves it producing batches and leaves the training process's stop unset."""
    with GracefulStop() as stop:
        loader = iter(step_loader(_WorkerFacts(), 0, 8, num_workers, torch.device("cpu")))
        pid, ignored = next(loader)
        assert pid != os.getpid()
        assert ignored == [True] * len(SIGNALS)
        os.kill(pid, signal.SIGTERM)
        rest = list(loader)
        assert len(rest) == 7 and all(flags == [True] * len(SIGNALS) for _, flags in rest)
        assert pid in {p for p, _ in rest}  # the signalled worker went on
        assert stop.signum is None
        # the training process keeps its own handler
        assert signal.getsignal(signal.SIGTERM) == stop._handle


def test_requested_takes_the_agreed_signal_under_distributed(tmp_path):
    """One process: ``requested`` is this process's signal whatever ``agreed`` says (a signal after the
    step's read counts). Under torch.distributed (one gloo rank here) ``agreed`` is the answer, with no
    collective, and without it the all-reduce gives the signal."""
    with GracefulStop() as stop:
        assert stop.requested() is None and stop.requested(agreed=15) is None
        stop.signum = signal.SIGINT
        assert stop.requested(agreed=0) == signal.SIGINT
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with GracefulStop() as stop:
            calls = []
            real = torch.distributed.all_reduce
            torch.distributed.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
            try:
                stop.signum = signal.SIGINT
                assert stop.requested(agreed=0) is None and stop.requested(agreed=15) == 15
                assert calls == []
                assert stop.requested() == signal.SIGINT and calls == [1]
            finally:
                torch.distributed.all_reduce = real
    finally:
        torch.distributed.destroy_process_group()


def _deliver(sig):
    """Send ``sig`` to this process and let its Python handler run."""
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the handler runs between bytecodes of the main thread
        time.sleep(0.001)


def test_a_repeated_sigterm_is_absorbed(capsys):
    """SIGTERM twice (a launcher forwarding what the group already got): one notice, the first signal
    kept, no ``KeyboardInterrupt``; the handlers stay the run's until it leaves the context."""
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        _deliver(signal.SIGTERM)
        _deliver(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.requested() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGTERM) == before
    assert capsys.readouterr().err.count("received SIGTERM") == 1


def test_only_rank_zero_prints_the_notice(capsys, monkeypatch):
    """Under torch.distributed every rank receives the signal and records it; only rank 0 prints the
    notice, so a job of N ranks shows it once, not N times."""
    from sdpo_fast import stopping

    monkeypatch.setattr(stopping, "rank", lambda: 1)
    with GracefulStop() as stop:
        _deliver(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    assert "received SIGTERM" not in capsys.readouterr().err


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_ctrl_c_soon_after_a_signal_is_absorbed_later_it_stops_at_once(first, monkeypatch):
    """A SIGINT within the forwarding window of the first signal (``torchrun`` forwarding Ctrl-C's
    SIGINT to ranks the group signal reached) is absorbed; one after the window raises
    ``KeyboardInterrupt`` and restores the previous handlers."""
    from sdpo_fast import stopping

    monkeypatch.setattr(stopping, "FORWARD_WINDOW_S", 0.3)
    before = [signal.getsignal(s) for s in SIGNALS]
    with pytest.raises(KeyboardInterrupt):
        with GracefulStop() as stop:
            _deliver(first)
            _deliver(signal.SIGINT)  # ~0.1 s later: a copy
            assert stop.signum == first
            time.sleep(0.3)
            _deliver(signal.SIGINT)
            raise AssertionError("Ctrl-C after the window did not stop the run")
    assert [signal.getsignal(s) for s in SIGNALS] == before
