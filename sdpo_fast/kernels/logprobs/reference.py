"""The ``"torch"`` backend of the log-prob ops: the readable reference the kernels are tested
against. It never holds ``[rows, vocab]``: logits exist one chunk of rows at a time, in the forward and
again (recomputed) in the backward.

Backend contract (every module of this folder that is a backend has the same four names; the shared
autograd Function of ``sequence_logprobs`` and the loss driver of ``fused_sdpo_loss`` call them):

    Options                 frozen dataclass of the backend's tuning knobs (``sdpo_fast/kernels/options.py``)
    DW_PRECISION            how dW is accumulated (one line, listed in the README's backend table)
    forward(hidden, weight, batch, opts, need_h, need_w, fused) -> (logps [G * C] fp32, state)
    backward(hidden, weight, batch, state, grad_logps [G * C], need_h, need_w, opts)
        -> (dhidden [T, D] | None, dweight [V, D] | None), gradients of sum(grad_logps * logps)

``fused`` says the gradient pass follows at once (inside ``fused_sdpo_loss``), so a backend may keep
more of the forward in ``state``. A backend may also define ``fused_loss(hidden, weight, batch, loss,
need_h, need_w, opts)`` for a whole-group path; it returns ``(loss_g [G], logps [G, C], dhidden, dweight)``
or None to take the generic forward -> ``loss`` -> backward sequence. ``loss`` is the driver's
``GroupLoss``: ``loss(logps [g, C], groups=slice) -> (loss_g [g], dloss/dlogp [g, C])`` plus its fields
``ref_logps``, ``candidate_mask``, ``candidate_lens``, ``beta``, ``sft_weight``, ``loss_type`` and
``loss_code`` (the loss type as the int the C++ mirror takes).

``batch`` is a ``PackedBatch`` (read for its log-prob layout: ``logit_rows``, ``row_ptr``,
``target_rows``, ``target_ids``, ``target_candidates``, ``candidate_mask``, ``group_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option

__all__ = ["Options", "DW_PRECISION", "forward", "backward", "chunk_rows_for", "logprobs_forward", "logprobs_backward"]

# fp32 logits per chunk: 2**25 elements = 128 MiB, e.g. 1024 rows at V = 32000.
_CHUNK_ELEMENTS = 1 << 25
DW_PRECISION = "fp32 accumulator over all chunks, cast to the weight's dtype once"


@dataclass(frozen=True)
class Options:
    chunk_rows: int | None = option(None, check="int>=1|None",
                                    doc="logit rows per chunk (default: about 128 MiB of fp32 logits)")


def chunk_rows_for(vocab: int, chunk_rows: int | None = None) -> int:
    """Rows per logits chunk of the torch reference (about 128 MiB of fp32 logits by default)."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, _CHUNK_ELEMENTS // vocab)


def logprobs_forward(hidden, weight, batch, chunk: int):
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


def logprobs_backward(hidden, h, weight, batch, grad_logps, chunk: int, need_h=True, need_w=True):
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


def forward(hidden, weight, batch, opts: Options, need_h: bool, need_w: bool, fused: bool = False):
    """Contract ``forward``: state is the gathered logit rows ``h [Nr, D]``."""
    h, _, logps = logprobs_forward(hidden, weight, batch, chunk_rows_for(weight.shape[0], opts.chunk_rows))
    return logps, h


def backward(hidden, weight, batch, state, grad_logps, need_h: bool, need_w: bool, opts: Options):
    """Contract ``backward``: recomputes each chunk's logits from the gathered rows."""
    return logprobs_backward(hidden, state, weight, batch, grad_logps, chunk_rows_for(weight.shape[0], opts.chunk_rows),
                             need_h, need_w)
