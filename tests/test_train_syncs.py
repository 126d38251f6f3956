"""A trainer step (collated batch -> loss -> backward -> optimizer) reads the device at most once
outside logging (issue 16, item 6).

A ``TorchFunctionMode`` spy runs around real ``run_stage`` steps on a tiny model on CPU and records
every call that makes the host wait for the device on CUDA: reads of a tensor's value (``.item``,
``.tolist``, ``bool``/``int``/``float`` of a tensor, ``.numpy``, ``nonzero``, ``.cpu``) and copies to
a device that are not ``non_blocking``. On CPU every tensor is a host tensor, so the spy counts the
calls themselves, as if the training tensors lived on a GPU. Left out, by design:
- collation (host lists into host tensors; in DataLoader workers on CUDA) and the logging read
  (``_read_logged``, once per ``--log_every`` steps), which the spy pauses;
- copies to a device made outside this project (transformers moves its rotary buffers to the
  activations' device: a no-op on one device);
- calls made by torch itself: clipping moves per-device norms to the first device (a no-op on one
  device), and the DataLoader draws its seed from its own CPU generator. (The trainer's AdamW is the
  fused one, which keeps its step counters on the device.)
"""

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sdpo_fast import kernels as kernels_pkg
from sdpo_fast import train as train_mod
from sdpo_fast.data import SDPOCollator

T = torch.Tensor
READS = {T.item, T.tolist, T.cpu, T.numpy, T.nonzero, torch.nonzero, T.__bool__, T.__int__, T.__float__, T.__index__}
COPIES = {T.to, T.cuda, T.copy_}
TORCH_DIR = os.path.dirname(torch.__file__)
PROJECT_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (train_mod, kernels_pkg))
TINY = ["--tiny_layers", "1", "--tiny_hidden", "64", "--tokenizer_vocab", "400"]


def _names_device(args, kwargs) -> bool:
    if "device" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str)) for a in args[1:])


class HostSyncs(TorchFunctionMode):
    """Records ``(what, file:line)`` of every sync-inducing call made outside torch's own code."""

    def __init__(self):
        super().__init__()
        self.calls, self.paused = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and (func in READS or func in COPIES):
            caller = sys._getframe(1).f_code.co_filename, sys._getframe(1).f_lineno
            if func in COPIES:  # the project's own copies to a device; transformers' are buffer moves
                counted = (caller[0].startswith(PROJECT_DIRS) and _names_device(args, kwargs)
                           and not kwargs.get("non_blocking", False))
            else:
                counted = not caller[0].startswith(TORCH_DIR)
            if counted:
                self.calls.append((func.__name__, f"{caller[0]}:{caller[1]}"))
        return func(*args, **kwargs)

    def pausing(self, fn):
        def wrapped(*a, **k):
            self.paused += 1
            try:
                return fn(*a, **k)
            finally:
                self.paused -= 1
        return wrapped


@pytest.fixture(autouse=True)
def _quiet_threads(one_thread, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _spy_on_run_stage(monkeypatch) -> HostSyncs:
    spy = HostSyncs()
    real = train_mod.run_stage

    def spied(*args, **kwargs):
        with spy:
            return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "run_stage", spied)
    monkeypatch.setattr(SDPOCollator, "__call__", spy.pausing(SDPOCollator.__call__))
    if hasattr(train_mod, "StepBatches"):  # collation plus the host-side reference gather
        monkeypatch.setattr(train_mod.StepBatches, "__getitem__", spy.pausing(train_mod.StepBatches.__getitem__))
    if hasattr(train_mod, "_read_logged"):  # the logging read
        monkeypatch.setattr(train_mod, "_read_logged", spy.pausing(train_mod._read_logged))
    return spy


STEPS = 3


@pytest.mark.parametrize("extra", [[], ["--lora", "--reference", "live"], ["--cuda_graphs"],
                                   ["--bf16", "true", "--weight_update", "stochastic_rounding"]],
                         ids=["precomputed", "lora-live", "graph-path", "bf16-stochastic-rounding"])
def test_a_trainer_step_syncs_at_most_once_outside_logging(tmp_path, monkeypatch, extra):
    spy = _spy_on_run_stage(monkeypatch)
    backend = "torch"
    if "--cuda_graphs" in extra:  # the CPU stand-in of the graphed step: bucketed batches, StepGraphs run eagerly
        monkeypatch.setattr(train_mod, "_check_cuda_graphs", lambda train_args, device: None)
        backend = "auto"
    args = ["--output_dir", str(tmp_path / "o"), *TINY, "--stage", "sdpo", "--max_train_examples", "16",
            "--batch_size", "4", "--max_steps", str(STEPS), "--log_every", str(STEPS), "--eval", "none",
            "--num_negatives", "3", "--backend", backend, *extra]
    assert train_mod.main(args) == 0
    where = "\n".join(f"{name} at {site}" for name, site in spy.calls)
    assert len(spy.calls) <= STEPS, f"{len(spy.calls)} host syncs in {STEPS} steps:\n{where}"
    # the spy sees the one read each step makes (the loss and gradient norm, checked for finiteness)
    assert len(spy.calls) == STEPS, where


def test_the_spy_counts_every_kind_of_sync():
    from sdpo_fast import pack_groups

    spy = HostSyncs()
    x = torch.ones(3)
    packed = pack_groups([([1, 2, 3], [[4], [5, 6]])])
    n_tensors = sum(isinstance(v, torch.Tensor) for v in vars(packed).values())
    with spy:
        x[0].item(), x.tolist(), x.cpu(), x.nonzero(), x.numpy(), bool(x[0]), int(x[0]), float(x[0])
        x.to(torch.float64), packed.to("cpu", non_blocking=True)  # a cast and asynchronous copies: not syncs
        packed.to("cpu")  # synchronous copies made by the project's code
        spy.pausing(lambda: x[0].item())()
    names = [name for name, _ in spy.calls]
    assert names == ["item", "tolist", "cpu", "nonzero", "numpy", "__bool__", "__int__", "__float__"] + ["to"] * n_tensors
