"""Choosing the K negatives of a group from an example's non-target candidates.

* ``random_negatives``: K distinct non-target candidate indices, drawn from a generator seeded by
  ``(seed, epoch, example_id)`` (stateless: the same batch gives the same negatives after a resume;
  pass a fixed epoch for negatives that never change).
* ``hard_negatives``: the K non-target candidates the current policy scores highest (sequence
  log-prob, the quantity in the S-DPO loss), all examples scored in one shared-prefix
  ``candidate_logprobs`` pass without gradients. These are the negatives that carry most of the
  S-DPO gradient (weights ``s_j`` in DESIGN.md); the paper relies on the softmax to emphasise them,
  this makes the choice explicit.
* ``boundary_negatives``: the non-target candidates the current policy scores at least as high as
  the chosen item (DynamicPO's boundary samples; the same scoring pass as ``hard_negatives``), topped
  up at random (``random_negatives``' generator) when fewer than K qualify.

Extra cost per training step: random none; hard and boundary one no-grad shared-prefix scoring pass
over all C candidates of each of the batch's examples (README, "Negatives").
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from .examples import stable_seed

__all__ = ["NEGATIVES", "random_negatives", "hard_negatives", "boundary_negatives", "policy_scores", "non_target_indices"]

NEGATIVES = ("random", "hard", "boundary")  # the strategies SDPOCollator(negatives=...) and --negatives take


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
def policy_scores(
    model,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    target_indices: Sequence[int],
    *,
    backend: str = "auto",
    max_tokens_per_row: int | None = None,
    pad_token_id: int = 0,
) -> tuple[list[list[int]], list[float], torch.Tensor]:
    """The policy's sequence log-prob of every candidate of every example: one shared-prefix
    ``candidate_logprobs`` pass without gradients (eval mode), the scoring pass of ``hard_negatives``
    and ``boundary_negatives``.

    Args:
        model: HF causal LM (PEFT / DeepSpeed wrappers fine).
        prompts: ``G`` prompt id lists; ``candidates``: ``G`` lists of candidate id lists;
        target_indices: ``G`` target columns.
        max_tokens_per_row: row budget of the pass (``None``: one row); raised to the largest group when
            smaller (every candidate is scored).

    Returns:
        ``(pools, target_scores, scores)``: per example its non-target candidate indices, the target's
        log-prob (``G`` floats), and ``scores [G, max pool]`` fp32 CPU, ``scores[g, j]`` the log-prob of
        candidate ``pools[g][j]``, -inf past the pool.
    """
    from .. import candidate_logprobs, pack_groups
    from ..model import unwrap_causal_lm

    if not (len(prompts) == len(candidates) == len(target_indices)):
        raise ValueError("policy_scores: prompts, candidates and target_indices differ in length")
    pools = [non_target_indices(len(c), t) for c, t in zip(candidates, target_indices)]
    groups = [(p, [c[t]] + [c[i] for i in pool]) for p, c, t, pool in zip(prompts, candidates, target_indices, pools)]
    if max_tokens_per_row is not None:  # a training budget sized for K + 1 candidates may not hold all of them
        max_tokens_per_row = max(max_tokens_per_row, *(len(p) + sum(map(len, cs)) for p, cs in groups))
    lm = unwrap_causal_lm(model)
    batch = pack_groups(
        groups,
        max_tokens_per_row=max_tokens_per_row,
        pad_token_id=pad_token_id,
        vocab_size=lm.config.vocab_size,
        num_candidates=1 + max(len(p) for p in pools),
    ).to(lm.get_input_embeddings().weight.device)
    was_training = lm.training
    lm.eval()  # no dropout while choosing
    try:
        scores = candidate_logprobs(model, batch, backend=backend, check_ids=False).float()  # pack_groups checked them
    finally:
        lm.train(was_training)
    scores = scores.masked_fill(~batch.candidate_mask, float("-inf")).cpu()
    return pools, scores[:, 0].tolist(), scores[:, 1:]


def _check_choice(name: str, prompts, candidates, target_indices, k: int) -> None:
    """The checks shared by the policy-scored choices: aligned inputs, and K within every example's pool."""
    if not (len(prompts) == len(candidates) == len(target_indices)):
        raise ValueError(f"{name}: prompts, candidates and target_indices differ in length")
    for c, t in zip(candidates, target_indices):
        _check_k(k, len(non_target_indices(len(c), t)))


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
    highest first (arguments as ``policy_scores``).

    Returns:
        ``G`` lists of ``k`` indices into each example's candidate list.
    """
    _check_choice("hard_negatives", prompts, candidates, target_indices, k)
    if k == 0:
        return [[] for _ in prompts]
    pools, _, scores = policy_scores(model, prompts, candidates, target_indices, backend=backend,
                                     max_tokens_per_row=max_tokens_per_row, pad_token_id=pad_token_id)
    top = scores.topk(k, dim=1).indices.tolist()
    return [[pool[j] for j in row] for pool, row in zip(pools, top)]


def boundary_negatives(
    model,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    target_indices: Sequence[int],
    k: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    keys: Sequence | None = None,
    backend: str = "auto",
    max_tokens_per_row: int | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """For each example ``k`` "boundary" negatives (DynamicPO): non-target candidates the policy scores
    at least as high as the chosen item (sequence log-prob, the ``policy_scores`` pass of
    ``hard_negatives``), topped up at random from the others when fewer than ``k`` qualify.

    The draw uses the generator of ``random_negatives`` (seeded by ``(seed, epoch, key)``, ``keys[g]``
    the example id, default its position): with more than ``k`` boundary candidates, ``k`` of them at
    random; the top-up is a random sample of the rest. With no boundary candidate the result is
    ``random_negatives``' draw exactly. Boundary negatives come first in the returned list.

    Returns:
        ``G`` lists of ``k`` indices into each example's candidate list.
    """
    _check_choice("boundary_negatives", prompts, candidates, target_indices, k)
    keys = [str(i) for i in range(len(prompts))] if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError("boundary_negatives: keys and prompts differ in length")
    if k == 0:
        return [[] for _ in prompts]
    pools, target_scores, scores = policy_scores(model, prompts, candidates, target_indices, backend=backend,
                                                 max_tokens_per_row=max_tokens_per_row, pad_token_id=pad_token_id)
    out = []
    for pool, s_t, row, key in zip(pools, target_scores, scores.tolist(), keys):
        rng = random.Random(stable_seed("negatives", seed, epoch, key))
        hit = [i for i, s in zip(pool, row) if s >= s_t]
        if len(hit) >= k:
            out.append(rng.sample(hit, k))
            continue
        taken = set(hit)
        rest = [i for i in pool if i not in taken]
        out.append(hit + rng.sample(rest, k - len(hit)))
    return out
