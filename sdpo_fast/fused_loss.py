"""``fused_sdpo_loss``: hidden states in, S-DPO loss out, with the backward computed in the forward.

Once a group's sequence log-probs exist, dL/dlogp is closed form (``group_loss_and_grad``), so a
backend computes log-probs, the loss and the gradients w.r.t. ``hidden`` and ``weight`` in one op;
autograd's backward only scales them by ``grad_output``.

Backend op ``"sdpo_loss"``: ``impl(hidden [T, D], weight [V, D], batch, ref_logps [G, C] fp32, beta,
sft_weight, need_h, need_w, **options) -> (loss_g [G] fp32, logps [G, C] fp32, dhidden [T, D] | None,
dweight [V, D] | None)``, gradients of ``sum_g loss_g``.
"""

from __future__ import annotations

import torch

from . import backends
from .logprobs import _check_inputs, chunk_rows_for, sequence_logprobs, torch_logprobs_backward, torch_logprobs_forward
from .loss import sdpo_metrics
from .packing import PackedBatch

__all__ = ["fused_sdpo_loss", "group_loss_and_grad"]


def group_loss_and_grad(logps, ref_logps, candidate_mask, candidate_lens, beta: float, sft_weight: float):
    """Per-group loss and its closed-form gradient w.r.t. the log-probs.

    Args:
        logps, ref_logps: ``[G, C]`` fp32 (column 0 chosen). candidate_mask ``[G, C]`` bool,
        candidate_lens ``[G, C]`` int (column 0 >= 1).

    Returns:
        ``loss_g [G]`` = softplus(logsumexp_j z_j) + sft_weight * (-logp_w / len_w), and
        ``grad [G, C]`` = dloss_g/dlogp: ``beta * s_j`` for negatives, ``-beta * sum_j s_j -
        sft_weight / len_w`` for the chosen, 0 where masked.
    """
    r = logps.float() - ref_logps.float()
    z = (beta * (r[:, 1:] - r[:, :1])).masked_fill(~candidate_mask[:, 1:], float("-inf"))
    lse = torch.logsumexp(torch.cat([z.new_zeros(z.shape[0], 1), z], dim=1), dim=1)
    s = torch.exp(z - lse[:, None])
    len_w = candidate_lens[:, 0].float()
    loss_g = lse - sft_weight * logps[:, 0].float() / len_w
    grad = torch.cat([(-beta * s.sum(1) - sft_weight / len_w)[:, None], beta * s], dim=1)
    return loss_g, grad


def _torch_fused(hidden, weight, batch: PackedBatch, ref_logps, beta, sft_weight, need_h, need_w, chunk_rows=None):
    """Reference: forward log-probs, closed-form dL/dlogp, then the recomputing backward."""
    chunk = chunk_rows_for(weight.shape[0], chunk_rows)
    h, _, logps = torch_logprobs_forward(hidden, weight, batch, chunk)
    logps = logps.view(batch.candidate_mask.shape)
    loss_g, grad = group_loss_and_grad(logps, ref_logps, batch.candidate_mask, batch.candidate_lens, beta, sft_weight)
    dh, dw = torch_logprobs_backward(hidden, h, weight, batch, grad.flatten(), chunk, need_h, need_w)
    return loss_g, logps, dh, dw


class _FusedSDPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, batch, ref_logps, beta, sft_weight, scale, impl, options):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_g, logps, dh, dw = impl(hidden, weight, batch, ref_logps, beta, sft_weight, need_h, need_w, **options)
        ctx.save_for_backward(dh if need_h else None, dw if need_w else None)
        ctx.scale, ctx.used = scale, False
        ctx.mark_non_differentiable(logps)
        return loss_g.sum() * scale, logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps):
        if ctx.used:
            raise RuntimeError("fused_sdpo_loss: backward can run once per forward (gradients are scaled in place)")
        ctx.used = True
        dh, dw = ctx.saved_tensors
        g = grad_loss * ctx.scale
        # In place: a second [V, D] buffer would be +1 GB at V = 128k, D = 4096 in fp16.
        return (
            None if dh is None else dh.mul_(g.to(dh.dtype)),
            None if dw is None else dw.mul_(g.to(dw.dtype)),
            *([None] * 7),
        )


def fused_sdpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: PackedBatch,
    ref_logps: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    beta: float = 1.0,
    sft_weight: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    **options,
):
    """S-DPO loss straight from packed hidden states, gradients computed in the forward.

    Args:
        hidden: ``[T, D]`` or ``[R, L, D]`` policy final hidden states of ``batch``.
        weight: ``[V, D]`` ``lm_head`` weight; its gradient is skipped when it does not require grad.
        batch: the ``PackedBatch``.
        ref_logps: ``[G, C]`` reference log-probs (precomputed), or None to compute them without grad
            from ``ref_hidden`` (and ``ref_weight``, default ``weight``) with the same backend.
        beta: S-DPO temperature. sft_weight: weight of the chosen candidate's mean token NLL.
        reduction: ``"mean"`` or ``"sum"`` over groups (per-group losses cannot share one fused dW).
        backend: ``"auto"``, ``"cublas"``, ``"triton"``, ``"native"`` or ``"torch"``.

    Returns:
        ``(loss, metrics)``: fp32 scalar, and ``sdpo_metrics`` plus ``logps`` ``[G, C]`` (detached).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_sdpo_loss supports reduction 'mean' or 'sum', got {reduction!r}")
    hidden = _check_inputs(hidden, weight, batch)
    if ref_logps is None:
        if ref_hidden is None:
            raise ValueError("give ref_logps, or ref_hidden to compute them")
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_hidden, weight if ref_weight is None else ref_weight, batch, backend)
    if tuple(ref_logps.shape) != tuple(batch.candidate_mask.shape):
        raise ValueError(f"ref_logps must be [G, C] = {tuple(batch.candidate_mask.shape)}, got {tuple(ref_logps.shape)}")
    ref_logps = ref_logps.detach().float()
    impl = backends.get("sdpo_loss", backend, hidden.device)
    scale = 1.0 / batch.num_groups if reduction == "mean" else 1.0
    loss, logps = _FusedSDPOLoss.apply(hidden, weight, batch, ref_logps, beta, sft_weight, scale, impl, options)
    mask = batch.candidate_mask
    metrics = sdpo_metrics(logps[:, 0], logps[:, 1:], ref_logps[:, 0], ref_logps[:, 1:], beta, mask[:, 1:])
    metrics["logps"] = logps
    return loss, metrics


backends.register("sdpo_loss", "torch", _torch_fused)
