"""The Softmax-DPO loss (arXiv 2406.09215) on sequence log-probs.

For a group with chosen item w and negatives j = 1..K, with r(c) = log pi(c|x) - log pi_ref(c|x):

    z_j = beta * (r(j) - r(w))
    L   = softplus(logsumexp_j z_j) = log(1 + sum_j exp z_j) = logsumexp([0, z_1, ..., z_K])

The last form is what we compute: the constant 0 keeps the logsumexp finite when every negative is
masked (L = 0) and no exp overflows for any reward gap. K = 1 gives the DPO sigmoid loss.

Gradients: dL/dlogp(j) = beta * s_j and dL/dlogp(w) = -beta * sum_j s_j with
s_j = exp(z_j - L), the per-negative softmax ("hard negative") weights.
"""

from __future__ import annotations

import torch

__all__ = ["sdpo_loss", "sdpo_metrics", "fused_sdpo_loss"]


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


from .fused_loss import fused_sdpo_loss  # noqa: E402  (fused_loss imports sdpo_metrics from here)
