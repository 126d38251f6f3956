"""Per-candidate sequence log-probs from packed hidden states and the ``lm_head`` weight.

``sequence_logprobs`` is the public, differentiable op; the ``"torch"`` implementation here is the
readable reference the kernels are tested against. It never holds ``[rows, vocab]``: logits exist one
chunk of rows at a time, in the forward and again (recomputed) in the backward.
"""

from __future__ import annotations

import torch

from . import backends
from .packing import PackedBatch

__all__ = ["sequence_logprobs"]

# fp32 logits per chunk: 2**25 elements = 128 MiB, e.g. 1024 rows at V = 32000.
_CHUNK_ELEMENTS = 1 << 25


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
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


def backend_options(backend: str, device: torch.device, options: dict, known: set, cuda_defaults: dict,
                    cpu_defaults: dict) -> dict:
    """A kernel backend's options: its defaults for the device, updated with the given ones that are
    not None; unknown names raise ValueError. Value checks stay with each backend."""
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown {backend} option(s) {sorted(unknown)}; known: {sorted(known)}")
    opts = dict(cuda_defaults if device.type == "cuda" else cpu_defaults)
    opts.update({k: v for k, v in options.items() if v is not None})
    return opts


def kernel_inputs(hidden: torch.Tensor, weight: torch.Tensor, backend: str):
    """``(hidden, weight)`` as the kernel backends take them: fp32/fp16/bf16, one dtype, last dim
    contiguous (copied only when it is not)."""
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{backend} backend: hidden must be fp32/fp16/bf16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{backend} backend: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    return (hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
            weight if weight.stride(-1) == 1 else weight.contiguous())


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
        options: backend-specific tuning, documented with each backend's function: ``chunk_rows``
            (torch), ``chunk_bytes``, ``chunk_rows``, ``block`` (cublas), tile shapes (triton),
            ``keep_elements``, ``keep_in_grad``, ``block``, ``chunk_rows`` (native).

    Returns:
        ``[G, C]`` float32 log pi(candidate | prompt), 0 where ``batch.candidate_mask`` is False.
        Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    hidden = _check_inputs(hidden, weight, batch)
    impl = backends.get("logprobs", backend, hidden.device)
    return impl(hidden, weight, batch, **options)


def torch_logprobs_forward(hidden, weight, batch: PackedBatch, chunk: int):
    """Forward of the torch reference.

    Returns ``(h [Nr, D] gathered logit rows, lse [Nr] fp32, logps [G * C] fp32)``.
    """
    h = hidden.index_select(0, batch.logit_rows)
    Nr = h.shape[0]
    lse = torch.empty(Nr, dtype=torch.float32, device=h.device)
    for a in range(0, Nr, chunk):
        lse[a : a + chunk] = torch.logsumexp((h[a : a + chunk] @ weight.t()).float(), dim=-1)
    # Target logits as row-wise dots in fp32: N * D work, no [N, V] gather, no host sync.
    tgt = (h.index_select(0, batch.target_rows).float() * weight.index_select(0, batch.target_ids).float()).sum(-1)
    token_logps = tgt - lse.index_select(0, batch.target_rows)
    G, C = batch.candidate_mask.shape
    logps = torch.zeros(G * C, dtype=torch.float32, device=h.device).index_add_(0, batch.target_candidates, token_logps)
    return h, lse, logps


def torch_logprobs_backward(hidden, h, weight, batch: PackedBatch, grad_logps, chunk: int, need_h=True, need_w=True):
    """Backward of the torch reference, recomputing each chunk's logits.

    ``grad_logps`` ``[G * C]``: dL/dlogp per candidate. dL/dlogits of row r is
    ``sum_t g_t * onehot(target_t) - g_row * softmax(logits_r)`` with ``g_row = sum_t g_t`` over the
    row's targets t; it is formed in fp32 before the two matmuls, so (p - 1) never cancels in low
    precision. Returns ``(dhidden [T, D] or None, dweight [V, D] or None)``; dW is accumulated in fp32.
    """
    target_rows, target_ids = batch.target_rows, batch.target_ids
    g_t = grad_logps.float().index_select(0, batch.target_candidates)
    Nr = h.shape[0]
    g_row = torch.zeros(Nr, dtype=torch.float32, device=h.device).index_add_(0, target_rows, g_t)
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    for a in range(0, Nr, chunk):
        hc = h[a : a + chunk]
        n = hc.shape[0]
        dlogits = torch.softmax((hc @ weight.t()).float(), dim=-1).mul_(-g_row[a : a + n, None])
        # Scatter +g_t at (row, target) for this chunk's targets; out-of-chunk targets add 0.
        local = target_rows - a
        inside = (local >= 0) & (local < n)
        dlogits.index_put_((local.clamp(0, n - 1), target_ids), torch.where(inside, g_t, 0.0), accumulate=True)
        if need_h:
            dh[a : a + n] = dlogits @ weight.float()
        if need_w:
            dw.addmm_(dlogits.t(), hc.float())
    dhidden = torch.zeros_like(hidden).index_copy_(0, batch.logit_rows, dh.to(hidden.dtype)) if need_h else None
    return dhidden, (dw.to(weight.dtype) if need_w else None)


class _TorchSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, batch, chunk):
        h, _, logps = torch_logprobs_forward(hidden, weight, batch, chunk)
        ctx.save_for_backward(hidden, h, weight)
        ctx.batch, ctx.chunk = batch, chunk
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, h, weight = ctx.saved_tensors
        dh, dw = torch_logprobs_backward(
            hidden, h, weight, ctx.batch, grad_logps, ctx.chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return dh, dw, None, None


def chunk_rows_for(vocab: int, chunk_rows: int | None = None) -> int:
    """Rows per logits chunk of the torch reference (about 128 MiB of fp32 logits by default)."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, _CHUNK_ELEMENTS // vocab)


def _torch_sequence_logprobs(hidden, weight, batch: PackedBatch, chunk_rows: int | None = None):
    flat = _TorchSequenceLogprobs.apply(hidden, weight, batch, chunk_rows_for(weight.shape[0], chunk_rows))
    return flat.view(batch.candidate_mask.shape)


backends.register("logprobs", "torch", _torch_sequence_logprobs)
