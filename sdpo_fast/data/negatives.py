"""Choosing the K negatives of a group from an example's non-target candidates.

* ``random_negatives``: K distinct non-target candidate indices, drawn from a generator seeded by
  ``(seed, epoch, example_id)`` (stateless: the same batch gives the same negatives after a resume;
  pass a fixed epoch for negatives that never change).
* ``hard_negatives``: the K non-target candidates the current policy scores highest (sequence
  log-prob, the quantity in the S-DPO loss), all examples scored in one shared-prefix
  ``candidate_logprobs`` pass without gradients. These are the negatives that carry most of the
  S-DPO gradient (weights ``s_j`` in DESIGN.md); the paper relies on the softmax to emphasise them,
  this makes the choice explicit.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from .examples import stable_seed

__all__ = ["random_negatives", "hard_negatives", "non_target_indices"]


def non_target_indices(num_candidates: int, target_index: int) -> list[int]:
    if not 0 <= target_index < num_candidates:
        raise ValueError(f"target_index {target_index} outside [0, {num_candidates})")
    return [i for i in range(num_candidates) if i != target_index]


def _check_k(k: int, available: int):
    if not 0 <= k <= available:
        raise ValueError(f"num_negatives={k}: need 0 <= K <= {available} (the non-target candidates)")


def random_negatives(num_candidates: int, target_index: int, k: int, *, seed: int = 0, epoch: int = 0, key="") -> list[int]:
    """``k`` distinct candidate indices other than ``target_index``, in draw order.

    ``key`` identifies the example (its ``example_id``); the draw depends only on ``(seed, epoch, key)``.
    """
    pool = non_target_indices(num_candidates, target_index)
    _check_k(k, len(pool))
    return random.Random(stable_seed("negatives", seed, epoch, key)).sample(pool, k)


@torch.no_grad()
def hard_negatives(
    model,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    target_indices: Sequence[int],
    k: int,
    *,
    backend: str = "auto",
    max_tokens_per_row: int | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """For each example the ``k`` non-target candidate indices with the highest policy log-prob,
    highest first.

    Args:
        model: HF causal LM (PEFT / DeepSpeed wrappers fine); scored with ``candidate_logprobs``.
        prompts: ``G`` prompt id lists; ``candidates``: ``G`` lists of candidate id lists;
        target_indices: ``G`` target columns (excluded).
        max_tokens_per_row: row budget of the scoring pass (``None``: one row); raised to the
            largest group when smaller (every non-target candidate is scored).

    Returns:
        ``G`` lists of ``k`` indices into each example's candidate list.
    """
    from .. import candidate_logprobs, pack_groups
    from ..model import unwrap_causal_lm

    if not (len(prompts) == len(candidates) == len(target_indices)):
        raise ValueError("hard_negatives: prompts, candidates and target_indices differ in length")
    pools = [non_target_indices(len(c), t) for c, t in zip(candidates, target_indices)]
    for p in pools:
        _check_k(k, len(p))
    if k == 0:
        return [[] for _ in pools]
    groups = [(p, [c[i] for i in pool]) for p, c, pool in zip(prompts, candidates, pools)]
    if max_tokens_per_row is not None:  # a training budget sized for K + 1 candidates may not hold all of them
        max_tokens_per_row = max(max_tokens_per_row, *(len(p) + sum(map(len, cs)) for p, cs in groups))
    lm = unwrap_causal_lm(model)
    batch = pack_groups(
        groups,
        max_tokens_per_row=max_tokens_per_row,
        pad_token_id=pad_token_id,
        vocab_size=lm.config.vocab_size,
        num_candidates=max(len(p) for p in pools),
    ).to(lm.get_input_embeddings().weight.device)
    was_training = lm.training
    lm.eval()  # no dropout while choosing
    try:
        scores = candidate_logprobs(model, batch, backend=backend).float()
    finally:
        lm.train(was_training)
    scores = scores.masked_fill(~batch.candidate_mask, float("-inf")).cpu()
    top = scores.topk(k, dim=1).indices.tolist()
    return [[pool[j] for j in row] for pool, row in zip(pools, top)]
