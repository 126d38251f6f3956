"""Per-candidate sequence log-probs from packed hidden states and the ``lm_head`` weight.

``sequence_logprobs`` is the public, differentiable op. Every backend (``sdpo_fast/kernels/logprobs/``) runs
through the one autograd Function here: the backend's ``forward`` gives the log-probs and a state,
its ``backward`` the gradients given dL/dlogp (the contract: ``sdpo_fast/kernels/logprobs/reference.py``).
"""

from __future__ import annotations

import torch

from . import backends
from .kernels.options import resolve as resolve_options
from .packing import PackedBatch

__all__ = ["sequence_logprobs", "backend_options"]


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``hidden`` as ``[T, D]`` after checking shapes and devices against ``weight`` and ``batch``."""
    R, L = batch.shape
    if hidden.dim() == 3:
        if tuple(hidden.shape[:2]) != (R, L):
            raise ValueError(f"hidden has shape {tuple(hidden.shape)}, batch rows are [{R}, {L}]")
        hidden = hidden.reshape(R * L, hidden.shape[-1])
    if hidden.dim() != 2 or hidden.shape[0] != R * L:
        raise ValueError(f"hidden must be [T={R * L}, D] or [{R}, {L}, D], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, D={hidden.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:  # every backend refuses a mix (torch's matmul would raise RuntimeError)
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; give both in one dtype")
    if hidden.device != weight.device or batch.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and batch ({batch.device}) must share a device"
        )
    return hidden


def backend_options(op: str, backend: str, device: torch.device | str, options: dict | None = None):
    """The resolved, validated options object of ``backend`` for ``op`` on ``device`` (``"auto"``
    resolved first). Unknown names and bad values raise ``OptionError`` (a ValueError and TypeError)."""
    device = torch.device(device)
    name = backends.resolve(op, backend, device)
    return resolve_options(backends.get(op, name, device).Options, name, op, device.type, options)


def kernel_inputs(impl, name: str, hidden: torch.Tensor, weight: torch.Tensor):
    """``(hidden, weight)`` as backend ``impl`` takes them: for a backend with ``INPUT_DTYPES`` one of
    those dtypes, the same for both, last dim contiguous (copied only when it is not)."""
    dtypes = getattr(impl, "INPUT_DTYPES", None)
    if dtypes is None:
        return hidden, weight
    if hidden.dtype not in dtypes:
        raise ValueError(f"{name} backend: hidden must be fp32/fp16/bf16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{name} backend: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    return (hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
            weight if weight.stride(-1) == 1 else weight.contiguous())


class _SequenceLogprobs(torch.autograd.Function):
    """One Function for every backend: ``impl.forward`` now, ``impl.backward`` with dL/dlogp later."""

    @staticmethod
    def forward(ctx, hidden, weight, batch, impl, opts, need_h, need_w):
        logps, state = impl.forward(hidden, weight, batch, opts, need_h, need_w, False)
        ctx.save_for_backward(hidden, weight)
        ctx.batch, ctx.impl, ctx.opts, ctx.state = batch, impl, opts, state
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh, dw = ctx.impl.backward(hidden, weight, ctx.batch, ctx.state, grad_logps, need_h, need_w, ctx.opts)
        return dh, dw, None, None, None, None, None


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: PackedBatch,
    backend: str = "auto",
    **options,
) -> torch.Tensor:
    """Sum of token log-probs of every candidate.

    Args:
        hidden: ``[T, D]`` (or ``[R, L, D]``) final hidden states of the packed batch (after the
            model's final norm), fp32/fp16/bf16.
        weight: ``[V, D]`` ``lm_head`` weight (no bias).
        batch: the ``PackedBatch`` the hidden states came from.
        backend: ``"auto"``, ``"cublas"``, ``"triton"``, ``"native"`` or ``"torch"``.
        options: the backend's tuning knobs, fields of its ``Options`` (README, "Backend options").

    Returns:
        ``[G, C]`` float32 log pi(candidate | prompt), 0 where ``batch.candidate_mask`` is False.
        Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    hidden = check_inputs(hidden, weight, batch)
    name = backends.resolve("logprobs", backend, hidden.device)
    impl = backends.get("logprobs", name, hidden.device)
    hidden, weight = kernel_inputs(impl, name, hidden, weight)
    opts = resolve_options(impl.Options, name, "logprobs", hidden.device.type, options)
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    flat = _SequenceLogprobs.apply(hidden, weight, batch, impl, opts, need_h, need_w)
    return flat.view(batch.candidate_mask.shape)
