"""Collation of tokenised examples into shared-prefix ``PackedBatch``es, and a token-budget sampler.

A feature is one row of ``tokenize_dataset``'s output (a dict with ``prompt_ids``, ``candidate_ids``,
``target_index``, ``example_id``, ``idx``). Each becomes one group ``(prompt, [chosen, neg_1..neg_K])``
packed by ``sdpo_fast.pack_groups``; candidates already end with EOS (``tokenize_example``).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..buckets import pack_bucketed
from ..packing import PackedBatch, pack_groups
from .examples import stable_seed
from .negatives import NEGATIVES, boundary_negatives, hard_negatives, random_negatives

__all__ = ["SDPOBatch", "SDPOCollator", "TokenBudgetBatchSampler"]


@dataclass(frozen=True)
class SDPOBatch:
    """What the collator emits.

    Attributes:
        packed: the ``PackedBatch`` (``G`` groups, ``C = K + 1`` candidate columns, column 0 chosen).
        candidate_index: ``[G, C]`` int64, which of the example's candidates each column holds
            (column 0 = the target's index); -1 where ``packed.candidate_mask`` is False.
        idx: ``[G]`` int64 row of each example in the tokenised dataset.
        example_ids: ``G`` example ids.
    """

    packed: PackedBatch
    candidate_index: torch.Tensor
    idx: torch.Tensor
    example_ids: tuple

    @property
    def num_groups(self) -> int:
        return self.packed.num_groups

    def to(self, device, non_blocking: bool = False) -> "SDPOBatch":
        return dataclasses.replace(
            self,
            packed=self.packed.to(device, non_blocking=non_blocking),
            candidate_index=self.candidate_index.to(device, non_blocking=non_blocking),
            idx=self.idx.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "SDPOBatch":
        """A copy in page-locked host memory: the DataLoader's pin-memory thread calls this method on
        any object it does not know (every torch version; a tuple subclass is rebuilt as a tuple by some)."""
        return dataclasses.replace(self, packed=self.packed.pin_memory(),
                                   candidate_index=self.candidate_index.pin_memory(), idx=self.idx.pin_memory())


class SDPOCollator:
    """Turn tokenised features into an ``SDPOBatch`` of S-DPO groups.

    Args:
        tokenizer: supplies ``pad_token_id`` (else ``eos_token_id``) for padding slots.
        num_negatives: K negatives per group from the non-target candidates (0: chosen only, the SFT
            batch; ``None``: all of them).
        negatives: ``"random"`` (``random_negatives``), ``"hard"`` (``hard_negatives``) or ``"boundary"``
            (``boundary_negatives``); hard and boundary need ``policy``, scored in one pass per batch.
        policy: the model used for hard / boundary negatives (``set_policy`` to change it).
        seed: seed of the random negatives (and of boundary's random top-up).
        resample_each_epoch: random negatives (and boundary's top-up) depend on ``set_epoch``'s value
            (else fixed forever).
        token_budget: ``max_tokens_per_row`` of ``pack_groups``: groups fill rows of at most this many
            tokens (``None``: all groups in one row). A group over the budget is a ``ValueError``.
        pad_to_multiple_of: row length rounding.
        vocab_size, max_positions: checks passed to ``pack_groups`` (the model's config values).
        backend: log-prob backend for hard / boundary negatives.
        bucketed: pack with ``sdpo_fast.buckets.pack_bucketed`` (one row padded to a shape bucket, with
            trailing padding groups) instead of ``pack_groups``: the batches a CUDA graph replays.
            ``candidate_index`` and ``idx`` then cover the real groups only.

    Every batch has ``C = K + 1`` candidate columns, whatever the batch (ranks stay in step).
    Hard and boundary negatives run the policy inside the collator: use it in the main process
    (``DataLoader(num_workers=0)``) or call ``choose`` yourself.
    """

    def __init__(
        self,
        tokenizer=None,
        num_negatives: int | None = 3,
        *,
        negatives: str = "random",
        policy=None,
        seed: int = 0,
        resample_each_epoch: bool = True,
        token_budget: int | None = None,
        pad_to_multiple_of: int = 1,
        vocab_size: int | None = None,
        max_positions: int | None = None,
        backend: str = "auto",
        pad_token_id: int | None = None,
        bucketed: bool = False,
    ):
        if bucketed and (token_budget is not None or pad_to_multiple_of != 1):
            raise ValueError("a bucketed SDPOCollator packs one row of its bucket's length: no token_budget or "
                             "pad_to_multiple_of")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if pad_token_id is None:
            if tokenizer is None:
                raise ValueError("SDPOCollator needs a tokenizer or pad_token_id")
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad_token_id or 0)
        self.num_negatives = num_negatives
        self.negatives = negatives
        self.policy = policy
        self.seed = seed
        self.resample_each_epoch = resample_each_epoch
        self.token_budget = token_budget
        self.pad_to_multiple_of = pad_to_multiple_of
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.backend = backend
        self.bucketed = bucketed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_policy(self, model) -> None:
        self.policy = model

    def _k(self, features) -> int:
        available = min(len(f["candidate_ids"]) for f in features) - 1
        k = available if self.num_negatives is None else self.num_negatives
        if k > available:
            raise ValueError(f"num_negatives={k} but an example has only {available} non-target candidates")
        return k

    def choose(self, features: Sequence[dict]) -> list[list[int]]:
        """Candidate indices per feature: ``[target, neg_1, ..., neg_K]``."""
        k = self._k(features)
        targets = [int(f["target_index"]) for f in features]
        epoch = self.epoch if self.resample_each_epoch else 0
        if self.negatives in ("hard", "boundary") and k > 0:
            if self.policy is None:
                raise ValueError(f"negatives={self.negatives!r} needs a policy model (SDPOCollator(policy=...) or "
                                 "set_policy)")
            scored = dict(backend=self.backend, max_tokens_per_row=self.token_budget, pad_token_id=self.pad_token_id)
            prompts = [f["prompt_ids"] for f in features]
            cands = [f["candidate_ids"] for f in features]
            if self.negatives == "hard":
                negs = hard_negatives(self.policy, prompts, cands, targets, k, **scored)
            else:
                negs = boundary_negatives(self.policy, prompts, cands, targets, k, seed=self.seed, epoch=epoch,
                                          keys=[_key(f, i) for i, f in enumerate(features)], **scored)
        else:
            negs = [
                random_negatives(len(f["candidate_ids"]), t, k, seed=self.seed, epoch=epoch, key=_key(f, i))
                for i, (f, t) in enumerate(zip(features, targets))
            ]
        return [[t] + n for t, n in zip(targets, negs)]

    def __call__(self, features: Sequence[dict]) -> SDPOBatch:
        if len(features) == 0:
            raise ValueError("SDPOCollator: empty batch")
        chosen = self.choose(features)
        C = len(chosen[0])
        groups = [(f["prompt_ids"], [f["candidate_ids"][j] for j in cols]) for f, cols in zip(features, chosen)]
        checks = dict(pad_token_id=self.pad_token_id, vocab_size=self.vocab_size, max_positions=self.max_positions,
                      num_candidates=C)
        if self.bucketed:
            packed = pack_bucketed(groups, **checks)
        else:
            packed = pack_groups(groups, max_tokens_per_row=self.token_budget,
                                 pad_to_multiple_of=self.pad_to_multiple_of, **checks)
        return SDPOBatch(
            packed=packed,
            candidate_index=torch.tensor(chosen, dtype=torch.long),
            idx=torch.tensor([int(f.get("idx", i)) for i, f in enumerate(features)], dtype=torch.long),
            example_ids=tuple(_key(f, i) for i, f in enumerate(features)),
        )


def _key(feature: dict, i: int) -> str:
    key = feature.get("example_id")
    return str(key) if key else str(feature.get("idx", i))


def group_token_bound(prompt_len: int, candidate_lens: Sequence[int], target_index: int, k: int) -> int:
    """Upper bound of a group's tokens whatever K negatives are picked: prompt + chosen + the K longest others."""
    others = sorted((n for j, n in enumerate(candidate_lens) if j != target_index), reverse=True)
    return prompt_len + candidate_lens[target_index] + sum(others[:k])


class TokenBudgetBatchSampler:
    """Batches of dataset indices whose groups fit ``max_tokens`` in total (a ``batch_sampler`` for
    ``torch.utils.data.DataLoader``), using ``group_token_bound`` so any negatives fit.

    Args:
        dataset: tokenised dataset (``prompt_len``, ``candidate_lens``, ``target_index`` columns).
        num_negatives: K, as given to the collator (``None``: all non-target candidates).
        max_tokens: token budget per batch; ``max_groups`` optionally caps groups per batch.
        shuffle, seed: order reshuffled by ``set_epoch`` (deterministic per ``(seed, epoch)``).

    A single group above ``max_tokens`` raises ``ValueError`` naming it.
    """

    def __init__(self, dataset, num_negatives: int | None, max_tokens: int, *, max_groups: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.sizes = []
        for i, (p, lens, t) in enumerate(zip(dataset["prompt_len"], dataset["candidate_lens"], dataset["target_index"])):
            k = len(lens) - 1 if num_negatives is None else num_negatives
            n = group_token_bound(p, lens, t, k)
            if n > max_tokens:
                raise ValueError(f"example {i}: its group needs up to {n} tokens, more than max_tokens={max_tokens}")
            self.sizes.append(n)
        self.max_tokens = max_tokens
        self.max_groups = max_groups
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.sizes)))
        if self.shuffle:
            random.Random(stable_seed("sampler", self.seed, self.epoch)).shuffle(order)
        batches, cur, fill = [], [], 0
        for i in order:
            full = self.max_groups is not None and len(cur) >= self.max_groups
            if cur and (fill + self.sizes[i] > self.max_tokens or full):
                batches.append(cur)
                cur, fill = [], 0
            cur.append(i)
            fill += self.sizes[i]
        if cur and not self.drop_last:
            batches.append(cur)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
