"""The Softmax-DPO loss (arXiv 2406.09215) on sequence log-probs.

For a group with chosen item w and negatives j = 1..K, with r(c) = log pi(c|x) - log pi_ref(c|x):

    z_j = beta * (r(j) - r(w))
    L   = softplus(logsumexp_j z_j) = log(1 + sum_j exp z_j) = logsumexp([0, z_1, ..., z_K])

The last form is what we compute: the constant 0 keeps the logsumexp finite when every negative is
masked (L = 0) and no exp overflows for any reward gap. K = 1 gives the DPO sigmoid loss.

Gradients: dL/dlogp(j) = beta * s_j and dL/dlogp(w) = -beta * sum_j s_j with
s_j = exp(z_j - L), the per-negative softmax ("hard negative") weights.

This module is the one home of that math: ``sdpo_loss`` / ``sdpo_metrics`` on sequence log-probs,
``group_loss_and_grad`` (the per-group loss and its closed-form dL/dlogp that every fused backend
applies; its C++ mirror is ``group_loss_grad`` in ``csrc/sdpo_loss.cpp``), and the loss driver
``fused_sdpo_loss``: hidden states in, loss out, the backward computed in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends
from .kernels.options import resolve as resolve_options
from .logprobs import check_inputs, kernel_inputs, sequence_logprobs
from .packing import PackedBatch

__all__ = ["sdpo_loss", "sdpo_metrics", "fused_sdpo_loss", "group_loss_and_grad", "GroupLoss", "loss_and_grads"]


def _check(chosen, rejected, ref_chosen, ref_rejected, rejected_mask):
    if chosen.dim() != 1:
        raise ValueError(f"chosen_logps must be [G], got shape {tuple(chosen.shape)}")
    G = chosen.shape[0]
    if G == 0:
        raise ValueError("empty batch: chosen_logps has no groups (need G >= 1)")
    if rejected.dim() != 2 or rejected.shape[0] != G:
        raise ValueError(f"rejected_logps must be [G, K] with G={G}, got shape {tuple(rejected.shape)}")
    if ref_chosen.shape != chosen.shape:
        raise ValueError(f"ref_chosen_logps shape {tuple(ref_chosen.shape)} != chosen_logps {tuple(chosen.shape)}")
    if ref_rejected.shape != rejected.shape:
        raise ValueError(
            f"ref_rejected_logps shape {tuple(ref_rejected.shape)} != rejected_logps {tuple(rejected.shape)}"
        )
    if rejected_mask is not None:
        if rejected_mask.shape != rejected.shape or rejected_mask.dtype != torch.bool:
            raise ValueError(
                f"rejected_mask must be a bool tensor of shape {tuple(rejected.shape)}, "
                f"got {tuple(rejected_mask.shape)} {rejected_mask.dtype}"
            )


def _logits(chosen, rejected, ref_chosen, ref_rejected, beta, rejected_mask):
    """z [G, K] in fp32, -inf where masked."""
    r_w = chosen.float() - ref_chosen.float()
    r_j = rejected.float() - ref_rejected.float()
    z = beta * (r_j - r_w[:, None])
    if rejected_mask is not None:
        z = z.masked_fill(~rejected_mask, float("-inf"))
    return z


def sdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 1.0,
    rejected_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """S-DPO loss.

    Args:
        chosen_logps: ``[G]`` policy sequence log-probs of the chosen candidates.
        rejected_logps: ``[G, K]`` policy sequence log-probs of the negatives.
        ref_chosen_logps, ref_rejected_logps: the same under the reference model (no grad needed).
        beta: temperature of the implicit reward.
        rejected_mask: ``[G, K]`` bool, True for real negatives (variable K per group). A group with
            no real negative contributes 0.
        reduction: ``"mean"`` over groups, ``"sum"``, or ``"none"`` (``[G]``).

    Returns:
        fp32 loss (scalar, or ``[G]`` with ``reduction="none"``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, rejected_mask)
    z = _logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask)
    losses = torch.logsumexp(torch.cat([z.new_zeros(z.shape[0], 1), z], dim=1), dim=1)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


@torch.no_grad()
def sdpo_metrics(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 1.0,
    rejected_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-group diagnostics of an S-DPO batch (no grad).

    Returns a dict of fp32 tensors:
        chosen_rewards    ``[G]``     beta * (logp - ref_logp) of the chosen candidate
        rejected_rewards  ``[G, K]``  the same for negatives (NaN where masked)
        reward_margins    ``[G]``     chosen reward minus the best negative's reward (NaN for a
                                      group without real negatives)
        accuracy          ``[G]``     1.0 where the chosen reward beats every real negative, NaN
                                      for a group without real negatives (average with nanmean)
        weights           ``[G, K]``  s_j = exp(z_j) / (1 + sum_k exp z_k), 0 where masked; the
                                      gradient on negative j is beta * s_j
    """
    _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, rejected_mask)
    z = _logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask)
    loss = torch.logsumexp(torch.cat([z.new_zeros(z.shape[0], 1), z], dim=1), dim=1)
    weights = torch.exp(z - loss[:, None])
    chosen_rewards = beta * (chosen_logps.float() - ref_chosen_logps.float())
    rejected_rewards = beta * (rejected_logps.float() - ref_rejected_logps.float())
    valid = torch.ones_like(rejected_rewards, dtype=torch.bool) if rejected_mask is None else rejected_mask
    masked = rejected_rewards.masked_fill(~valid, float("-inf"))
    best_negative = masked.amax(dim=1) if masked.shape[1] else masked.new_full(masked.shape[:1], float("-inf"))
    none = ~valid.any(dim=1)  # nothing to beat: neither a perfect accuracy nor an infinite margin
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards.masked_fill(~valid, float("nan")),
        "reward_margins": (chosen_rewards - best_negative).masked_fill(none, float("nan")),
        "accuracy": (chosen_rewards > best_negative).float().masked_fill(none, float("nan")),
        "weights": weights,
    }


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


@dataclass(frozen=True)
class GroupLoss:
    """``group_loss_and_grad`` bound to a batch: what the loss driver hands a backend's ``fused_loss``.
    ``loss(logps [g, C], groups=slice) -> (loss_g [g], grad [g, C])`` for the groups ``groups``."""

    ref_logps: torch.Tensor  # [G, C] fp32
    candidate_mask: torch.Tensor
    candidate_lens: torch.Tensor
    beta: float
    sft_weight: float

    def __call__(self, logps: torch.Tensor, groups: slice = slice(None)):
        return group_loss_and_grad(logps, self.ref_logps[groups], self.candidate_mask[groups],
                                   self.candidate_lens[groups], self.beta, self.sft_weight)


def loss_and_grads(impl, hidden, weight, batch: PackedBatch, loss: GroupLoss, need_h, need_w, opts):
    """The one loss driver: the backend's whole-group path when it has one for this call, else its
    forward, the closed-form dL/dlogp, and its backward. Returns ``(loss_g, logps [G, C], dh, dw)``."""
    fused = getattr(impl, "fused_loss", None)
    out = fused(hidden, weight, batch, loss, need_h, need_w, opts) if fused is not None else None
    if out is not None:
        return out
    logps, state = impl.forward(hidden, weight, batch, opts, need_h, need_w, True)
    logps = logps.view(batch.candidate_mask.shape)
    loss_g, grad = loss(logps)
    if not (need_h or need_w):
        return loss_g, logps, None, None
    dh, dw = impl.backward(hidden, weight, batch, state, grad.flatten(), need_h, need_w, opts)
    return loss_g, logps, dh, dw


class _FusedSDPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, batch, loss, scale, impl, opts):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_g, logps, dh, dw = loss_and_grads(impl, hidden, weight, batch, loss, need_h, need_w, opts)
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
            *([None] * 5),
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
        options: the backend's tuning knobs, fields of its ``Options`` (README, "Backend options").

    Returns:
        ``(loss, metrics)``: fp32 scalar, and ``sdpo_metrics`` plus ``logps`` ``[G, C]`` (detached).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_sdpo_loss supports reduction 'mean' or 'sum', got {reduction!r}")
    hidden = check_inputs(hidden, weight, batch)
    if ref_logps is None:
        if ref_hidden is None:
            raise ValueError("give ref_logps, or ref_hidden to compute them")
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_hidden, weight if ref_weight is None else ref_weight, batch, backend)
    if tuple(ref_logps.shape) != tuple(batch.candidate_mask.shape):
        raise ValueError(f"ref_logps must be [G, C] = {tuple(batch.candidate_mask.shape)}, got {tuple(ref_logps.shape)}")
    ref_logps = ref_logps.detach().float()
    name = backends.resolve("sdpo_loss", backend, hidden.device)
    impl = backends.get("sdpo_loss", name, hidden.device)
    hidden, weight = kernel_inputs(impl, name, hidden, weight)
    opts = resolve_options(impl.Options, name, "sdpo_loss", hidden.device.type, options)
    loss = GroupLoss(ref_logps, batch.candidate_mask, batch.candidate_lens, beta, sft_weight)
    scale = 1.0 / batch.num_groups if reduction == "mean" else 1.0
    out, logps = _FusedSDPOLoss.apply(hidden, weight, batch, loss, scale, impl, opts)
    mask = batch.candidate_mask
    metrics = sdpo_metrics(logps[:, 0], logps[:, 1:], ref_logps[:, 0], ref_logps[:, 1:], beta, mask[:, 1:])
    metrics["logps"] = logps
    return out, metrics
