"""One optimizer step through micro-batches and gradient accumulation; running out of memory; the
search for the largest micro-batch that fits.

Every method trains the same ``N`` groups per optimizer step: micro-batches of ``m`` groups, each
loss (a mean over its groups) scaled by ``groups / N`` before its backward, one AdamW step at the end.
The micro-batch is found by trying: ``m = N, N/2, ...`` until one micro-batch's forward + backward runs
(CUDA: without OOM; CPU: with its resident-memory growth under ``--cpu-mem-cap-mib`` when given).
"""

from __future__ import annotations

import contextlib
import copy
import gc

import torch

from harness import PeakRSS  # noqa: E402  (benchmarks/)

from . import shapes


class Reference:
    """The reference log-probs of a step: ``"precomputed"`` (a ``[N, C]`` table computed once from the
    initial weights, outside the timed steps: the trainer's default) or ``"live"`` (inside the step,
    no grad: LoRA with the adapters switched off as the trainer does, ``AdapterSwitch``; full
    fine-tuning through a frozen copy of the model)."""

    def __init__(self, kind: str, model, lora: bool, table: torch.Tensor | None = None):
        from sdpo_fast.adapters import AdapterSwitch

        self.kind, self.lora, self.table = kind, lora, table
        self.ref_model = self.switch = None
        if kind == "live" and not lora:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if kind == "live" and lora:
            self.switch = AdapterSwitch(model)

    def __call__(self, method, model, mb: shapes.MicroBatch) -> torch.Tensor:
        if self.kind == "precomputed":
            return self.table[mb.start : mb.start + mb.groups]
        with torch.no_grad():
            if self.lora:
                with self.switch.off():
                    return method.logprobs(model, mb).float()
            return method.logprobs(self.ref_model, mb).float()

    def release(self):
        self.ref_model = None


def precomputed_table(method, model, micro_batches, lora: bool) -> torch.Tensor:
    """``[N, C]`` float32 reference log-probs of every group of the step from the current weights."""
    from sdpo_fast.adapters import AdapterSwitch

    ctx = AdapterSwitch(model).off() if lora else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return torch.cat([method.logprobs(model, mb).float() for mb in micro_batches])


def micro_step(method, model, mb, ref: Reference, n_groups: int):
    """Forward + backward of one micro-batch, its loss weighted by its share of the step's groups."""
    loss, logps = method.loss(model, mb, ref(method, model, mb))
    (loss * (mb.groups / n_groups)).backward()
    return loss.detach(), logps.detach()


def optimizer_step(method, model, opt, micro_batches, ref: Reference, n_groups: int, graphs=None):
    """Zero the gradients, every micro-batch's forward + backward (or its CUDA graph), one AdamW step."""
    if graphs is not None:
        graphs.run(micro_batches)
    else:
        opt.zero_grad(set_to_none=True)
        for mb in micro_batches:
            micro_step(method, model, mb, ref, n_groups)
    opt.step()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    # cuBLAS reports a workspace it cannot allocate under memory pressure as its own status, not as an OOM
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED"))


def release(opt, device):
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(fn, opt, device):
    """``(result, None)``, or ``(None, "OOM")`` after releasing what the failed step held."""
    try:
        return fn(), None
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
    # outside the except block: the traceback (and the tensors its frames hold) is gone
    release(opt, device)
    return None, "OOM"


def halvings(n: int, cap: int | None) -> list[int]:
    """Micro-batch sizes to try, largest first: ``min(n, cap)``, then halved down to 1."""
    m = min(n, cap) if cap else n
    out = []
    while m >= 1:
        out.append(m)
        m //= 2
    return out


def find_micro_batch(method, model, opt, groups, k, vocab, device, ref_kind, lora, cap=None,
                     cpu_mem_cap_mib=None):
    """``(m, tried)``: the largest micro-batch (groups) whose forward + backward fits, and
    ``[(m, "ok" | "OOM" | "over cap (X MiB)", CPU RSS growth in MiB or None)]`` for every size tried;
    ``m`` is None when even 1 fails."""
    tried = []
    for m in halvings(len(groups), cap):
        mb = shapes.micro_batch(groups[:m], 0, k, vocab, device)

        def probe():
            ref = Reference(ref_kind, model, lora, table=None)
            if ref_kind == "precomputed":  # any [m, C] table: only its shape matters here
                ref.table = torch.zeros(m, k + 1, device=device)
            try:
                with PeakRSS() if device.type == "cpu" else contextlib.nullcontext() as rss:
                    micro_step(method, model, mb, ref, m)
            finally:
                ref.release()
            return rss.mib if device.type == "cpu" else None

        mib, status = attempt(probe, opt, device)
        release(opt, device)
        if status is None and cpu_mem_cap_mib is not None and mib is not None and mib > cpu_mem_cap_mib:
            status = f"over cap ({mib:.0f} MiB)"
        tried.append((m, status or "ok", mib))
        if status is None:
            return m, tried
    return None, tried
