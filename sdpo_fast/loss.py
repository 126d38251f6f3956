"""The Softmax-DPO loss (arXiv 2406.09215) on sequence log-probs.

For a group with chosen item w and negatives j = 1..K, with r(c) = log pi(c|x) - log pi_ref(c|x):

    z_j = beta * (r(j) - r(w))
    L   = softplus(logsumexp_j z_j) = log(1 + sum_j exp z_j) = logsumexp([0, z_1, ..., z_K])

The last form is what we compute: the constant 0 keeps the logsumexp finite when every negative is
masked (L = 0) and no exp overflows for any reward gap. K = 1 gives the DPO sigmoid loss.

Gradients: dL/dlogp(j) = beta * s_j and dL/dlogp(w) = -beta * sum_j s_j with
s_j = exp(z_j - L), the per-negative softmax ("hard negative") weights.

The multi-negative family (``loss_type``; K = the group's real negatives, sums over them; every type
has dL/dlogp(j) = beta * w_j, dL/dlogp(w) = -beta * sum_j w_j, and a group with K = 0 gives 0):

* ``"sdpo"`` (default): the loss above; w_j = s_j.
* ``"dmpo"`` (DMPO, Bai et al., "Finetuning Large Language Model for Personalized Ranking",
  arXiv 2405.16127): u = beta * (r(w) - (1/K) sum_j r(j)), L = -log sigmoid(u), w_j = sigmoid(-u) / K.
* ``"dpo_pairs"``: the mean of the K pairwise DPO losses, d_j = beta * (r(w) - r(j)),
  L = (1/K) sum_j -log sigmoid(d_j), w_j = sigmoid(-d_j) / K.
* ``"dynamic"`` (DynamicPO, "DynamicPO: Dynamic Preference Optimization for Recommendation", public code
  github.com/xingyuHuxingyu/DynamicPO, its ``DynamicPO_DMPO`` loss, read in trainer/dynamicpo_trainer.py):
  DMPO over the *boundary* negatives B with a per-negative beta. With p the POLICY sequence log-probs:
  B = {j : p(j) >= p(w)}; when B is empty DynamicPO takes the top cluster of a 3-means clustering of
  the p(j), here the negatives tied at the highest p(j) (the same set for K <= 3 with distinct scores;
  its top member otherwise). The rest D = the other real negatives (D = B when none), m = mean of p over D;
  for j in B: d1 = p(w) - p(j), d2 = p(j) - m, f_j = 1 + tanh((d1 - d2 - 6) / (|d1| + |d2|)) / 2
  (f_j = 1/2 when |d1| + |d2| = 0; 6 = DynamicPO's fixed margin, ``DYNAMIC_MARGIN``), beta_j = beta * f_j,
  k = |B|, u = (1/k) sum_{j in B} beta_j (r(w) - r(j)), L = -log sigmoid(u), w_j = sigmoid(-u) f_j / k on B
  and 0 elsewhere. beta_j is a stop-gradient, as in DynamicPO (it takes each beta as a Python float).

K = 1 gives DPO for sdpo, dmpo and dpo_pairs; dynamic at K = 1 is DPO with beta_1 = beta * f_1
(f_1 from d2 = 0: a beta between beta/2 and 3 beta/2 set by the chosen-vs-negative gap).

This module is the one home of that math (the per-type table ``_LOSSES``, entered through
``preference_loss``): ``sdpo_loss`` / ``sdpo_metrics`` on sequence log-probs,
``group_loss_and_grad`` (the per-group loss and its closed-form dL/dlogp that every fused backend
applies; its C++ mirror is ``group_loss_grad`` in ``csrc/sdpo_loss.cpp``), and the loss driver
``fused_sdpo_loss``: hidden states in, loss out, the backward computed in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import backends
from .kernels.options import resolve as resolve_options
from .logprobs import check_inputs, kernel_inputs, sequence_logprobs
from .packing import PackedBatch

__all__ = [
    "LOSS_TYPES", "sdpo_loss", "sdpo_metrics", "fused_sdpo_loss", "group_loss_and_grad", "GroupLoss", "loss_and_grads",
    "dynamic_betas", "loss_code", "preference_loss",
]


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


LOSS_TYPES = ("sdpo", "dmpo", "dpo_pairs", "dynamic")  # position = the code csrc/sdpo_loss.cpp takes
DYNAMIC_MARGIN = 6.0  # DynamicPO's fixed margin (FIXED_MARGIN in its trainer), in sequence log-prob units


def loss_code(loss_type: str) -> int:
    """The integer the C++ mirror takes for ``loss_type`` (its position in ``LOSS_TYPES``)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return LOSS_TYPES.index(loss_type)


# Each loss type: (r_w [G], r_j [G, K], mask [G, K], beta, p_w [G], p_j [G, K]) -> (loss [G], w [G, K]),
# r = logp - ref_logp in fp32 (r_j is 0 where masked), p the policy log-probs. The loss is differentiable
# in r (sdpo_loss takes its autograd); w is its closed form, detached: dL/dlogp_j = beta * w_j and
# dL/dlogp_w = -beta * sum_j w_j (each loss depends on the rewards only through r_w - r_j), 0 where
# masked. A group with no real negative has loss 0 and w = 0.


def _sdpo(r_w, r_j, mask, beta, p_w, p_j):
    z = (beta * (r_j - r_w[:, None])).masked_fill(~mask, float("-inf"))
    loss = torch.logsumexp(torch.cat([z.new_zeros(z.shape[0], 1), z], dim=1), dim=1)
    return loss, torch.exp(z - loss[:, None]).detach()


def _dmpo(r_w, r_j, mask, beta, p_w, p_j):
    k = mask.sum(1)
    u = beta * (r_w - r_j.sum(1) / k.clamp(min=1))
    loss = torch.where(k > 0, -F.logsigmoid(u), torch.zeros_like(u))
    w = torch.sigmoid(-u.detach())[:, None] / k.clamp(min=1)[:, None] * mask
    return loss, w


def _dpo_pairs(r_w, r_j, mask, beta, p_w, p_j):
    k = mask.sum(1).clamp(min=1)
    d = beta * (r_w[:, None] - r_j)
    loss = torch.where(mask, -F.logsigmoid(d), torch.zeros_like(d)).sum(1) / k
    w = torch.sigmoid(-d.detach()) / k[:, None] * mask
    return loss, w


@torch.no_grad()
def dynamic_betas(p_w, p_j, mask):
    """DynamicPO's per-negative beta factors ``f [G, K]`` (beta_j = beta * f_j; 0 off the boundary set)
    from policy sequence log-probs ``p_w [G]``, ``p_j [G, K]`` (the formula: module docstring)."""
    if p_j.shape[1] == 0:
        return p_j.new_zeros(p_j.shape)
    p_j = p_j.masked_fill(~mask, float("-inf"))
    boundary = mask & (p_j >= p_w[:, None])
    top = mask & (p_j == p_j.amax(1, keepdim=True))
    boundary = torch.where(boundary.any(1, keepdim=True), boundary, top)
    rest = mask & ~boundary
    rest = torch.where(rest.any(1, keepdim=True), rest, boundary)
    m_rest = torch.where(rest, p_j, 0.0).sum(1) / rest.sum(1).clamp(min=1)
    d1 = p_w[:, None] - p_j
    d2 = p_j - m_rest[:, None]
    den = d1.abs() + d2.abs()
    t = torch.where(den > 0, torch.tanh((d1 - d2 - DYNAMIC_MARGIN) / den.clamp(min=1e-30)), -1.0)
    return torch.where(boundary, 1.0 + 0.5 * t, 0.0)


def _dynamic(r_w, r_j, mask, beta, p_w, p_j):
    f = dynamic_betas(p_w, p_j, mask)
    k = (f > 0).sum(1)
    u = beta * (f * (r_w[:, None] - r_j)).sum(1) / k.clamp(min=1)
    loss = torch.where(k > 0, -F.logsigmoid(u), torch.zeros_like(u))
    w = torch.sigmoid(-u.detach())[:, None] * f / k.clamp(min=1)[:, None]
    return loss, w


_LOSSES = {"sdpo": _sdpo, "dmpo": _dmpo, "dpo_pairs": _dpo_pairs, "dynamic": _dynamic}


def preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, rejected_mask, loss_type="sdpo"):
    """``(loss [G], weights [G, K])`` of ``loss_type`` from policy and reference log-probs (``[G]`` chosen,
    ``[G, K]`` negatives, mask None = all real): the one entry to the per-type table above."""
    loss_code(loss_type)
    mask = torch.ones_like(rejected, dtype=torch.bool) if rejected_mask is None else rejected_mask
    r_w = chosen.float() - ref_chosen.float()
    r_j = (rejected.float() - ref_rejected.float()).masked_fill(~mask, 0.0)
    return _LOSSES[loss_type](r_w, r_j, mask, beta, chosen.detach().float(), rejected.detach().float())


def sdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 1.0,
    rejected_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    loss_type: str = "sdpo",
) -> torch.Tensor:
    """S-DPO loss, or another member of the multi-negative family (``loss_type``, module docstring).

    Args:
        chosen_logps: ``[G]`` policy sequence log-probs of the chosen candidates.
        rejected_logps: ``[G, K]`` policy sequence log-probs of the negatives.
        ref_chosen_logps, ref_rejected_logps: the same under the reference model (no grad needed).
        beta: temperature of the implicit reward.
        rejected_mask: ``[G, K]`` bool, True for real negatives (variable K per group). A group with
            no real negative contributes 0.
        reduction: ``"mean"`` over groups, ``"sum"``, or ``"none"`` (``[G]``).
        loss_type: ``"sdpo"``, ``"dmpo"``, ``"dpo_pairs"`` or ``"dynamic"``.

    Returns:
        fp32 loss (scalar, or ``[G]`` with ``reduction="none"``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, rejected_mask)
    losses, _ = preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                                rejected_mask, loss_type)
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
    loss_type: str = "sdpo",
) -> dict[str, torch.Tensor]:
    """Per-group diagnostics of an S-DPO batch (no grad); ``loss_type`` as for ``sdpo_loss``.

    Returns a dict of fp32 tensors:
        chosen_rewards    ``[G]``     beta * (logp - ref_logp) of the chosen candidate
        rejected_rewards  ``[G, K]``  the same for negatives (NaN where masked)
        reward_margins    ``[G]``     chosen reward minus the best negative's reward (NaN for a
                                      group without real negatives)
        accuracy          ``[G]``     1.0 where the chosen reward beats every real negative, NaN
                                      for a group without real negatives (average with nanmean)
        weights           ``[G, K]``  the per-negative gradient weights w_j of ``loss_type``: the
                                      gradient on negative j is beta * w_j (on the chosen
                                      -beta * sum_j w_j), 0 where masked. sdpo: the softmax
                                      s_j = exp(z_j) / (1 + sum_k exp z_k); dmpo: sigmoid(-u) / K;
                                      dpo_pairs: sigmoid(-beta (r_w - r_j)) / K; dynamic:
                                      sigmoid(-u) f_j / k on the boundary set (module docstring)
    """
    _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, rejected_mask)
    _, weights = preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                                 rejected_mask, loss_type)
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


def group_loss_and_grad(logps, ref_logps, candidate_mask, candidate_lens, beta: float, sft_weight: float,
                        loss_type: str = "sdpo"):
    """Per-group loss and its closed-form gradient w.r.t. the log-probs.

    Args:
        logps, ref_logps: ``[G, C]`` fp32 (column 0 chosen). candidate_mask ``[G, C]`` bool,
        candidate_lens ``[G, C]`` int (column 0 >= 1). loss_type: one of ``LOSS_TYPES``.

    Returns:
        ``loss_g [G]`` = L_type + sft_weight * (-logp_w / len_w), and ``grad [G, C]`` = dloss_g/dlogp:
        ``beta * w_j`` for negatives, ``-beta * sum_j w_j - sft_weight / len_w`` for the chosen, 0 where
        masked (w_j: the type's weights, ``sdpo_metrics``; for sdpo the softmax s_j).
    """
    loss, w = preference_loss(logps[:, 0], logps[:, 1:], ref_logps[:, 0], ref_logps[:, 1:], beta,
                              candidate_mask[:, 1:], loss_type)
    len_w = candidate_lens[:, 0].float()
    loss_g = loss - sft_weight * logps[:, 0].float() / len_w
    grad = torch.cat([(-beta * w.sum(1) - sft_weight / len_w)[:, None], beta * w], dim=1)
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
    loss_type: str = "sdpo"
    padding_groups: int = 0  # trailing bucket-padding groups: loss and gradient 0 (sdpo_fast.buckets)

    @property
    def loss_code(self) -> int:
        """``loss_type`` as the integer the C++ mirror takes."""
        return loss_code(self.loss_type)

    def __call__(self, logps: torch.Tensor, groups: slice = slice(None)):
        loss_g, grad = group_loss_and_grad(logps, self.ref_logps[groups], self.candidate_mask[groups],
                                           self.candidate_lens[groups], self.beta, self.sft_weight, self.loss_type)
        if self.padding_groups:
            G = self.candidate_mask.shape[0]
            index = torch.arange(G, device=logps.device)[groups]
            real = index < G - self.padding_groups
            loss_g, grad = torch.where(real, loss_g, 0.0), torch.where(real[:, None], grad, 0.0)
        return loss_g, grad


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
    loss_type: str = "sdpo",
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
        loss_type: ``"sdpo"`` (default), ``"dmpo"``, ``"dpo_pairs"`` or ``"dynamic"`` (``sdpo_loss``).
        options: the backend's tuning knobs, fields of its ``Options`` (README, "Backend options").

    Returns:
        ``(loss, metrics)``: fp32 scalar, and ``sdpo_metrics`` plus ``logps`` ``[G, C]`` (detached), over
        the batch's real groups (``batch.num_real_groups``: bucket-padding groups are left out, and a
        mean divides by the real groups).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_sdpo_loss supports reduction 'mean' or 'sum', got {reduction!r}")
    loss_code(loss_type)
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
    loss = GroupLoss(ref_logps, batch.candidate_mask, batch.candidate_lens, beta, sft_weight, loss_type,
                     batch.padding_groups)
    scale = 1.0 / batch.num_real_groups if reduction == "mean" else 1.0
    out, logps = _FusedSDPOLoss.apply(hidden, weight, batch, loss, scale, impl, opts)
    real = batch.num_real_groups  # the metrics leave bucket-padding groups out
    logps, ref_logps, mask = logps[:real], ref_logps[:real], batch.candidate_mask[:real]
    metrics = sdpo_metrics(logps[:, 0], logps[:, 1:], ref_logps[:, 0], ref_logps[:, 1:], beta, mask[:, 1:],
                           loss_type)
    metrics["logps"] = logps
    return out, metrics
