"""Shape buckets: packed batches whose every size is one of a few, so one CUDA graph serves many batches.

A CUDA graph fixes every tensor shape and every size the host computes for a launch. ``pack_groups``
gives each batch its own sizes: the row length ``L``, the group count ``G``, the logit rows ``Nr`` and
the targets ``N`` (candidate tokens). ``pack_bucketed`` rounds them up to a bucket, with trailing
*padding groups*: a one-token prompt and a chosen candidate only, no negative, so every loss type gives
them loss 0 and weight 0; ``GroupLoss`` zeroes their SFT term and gradient, the mean divides by the
real groups and the metrics leave them out (``PackedBatch.padding_groups``). A padding group with a
chosen candidate of ``n`` tokens adds ``n`` logit rows and ``n`` targets, so the padding groups' lengths
make ``Nr`` exactly the bucket's; ``N - Nr`` (one per negative) is fixed by the real groups.

Bucket sizes are 25% apart (``bucket_size``): ``q, 1.25q, 1.5q, 1.75q, 2q, 2.5q, ...``. The key
``(L, G, C, Nr, N)`` is stored on the batch (``PackedBatch.bucket``); the CUDA kernels then derive
their launches from tensor shapes alone (``sdpo_fast/kernels/logprobs/cublas.py`` plans its chunks from ``Nr``,
the attention kernel zero-fills as for a padded batch), so two batches with one key run the same
launches on different data: what a graph replay needs (``sdpo_fast.graphs``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .packing import Group, PackedBatch, _validate, pack_groups

__all__ = ["bucket_size", "pack_bucketed", "padded_reference", "ROW_QUANTUM", "ROWS_QUANTUM"]

ROW_QUANTUM = 256  # packed tokens
ROWS_QUANTUM = 64  # logit rows


def bucket_size(n: int, quantum: int = 1) -> int:
    """The smallest ``quantum * 2**i * (4 + j) / 4`` (j = 0..3, rounded down) that is >= ``n``."""
    if n < 1:
        raise ValueError(f"a bucket holds a positive size, got {n}")
    if quantum < 1:
        raise ValueError(f"quantum must be >= 1, got {quantum}")
    size = quantum
    while True:
        for j in range(4):
            b = size * (4 + j) // 4
            if b >= n:
                return b
        size *= 2


def pack_bucketed(
    groups: Sequence[Group],
    *,
    num_candidates: int | None = None,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    row_quantum: int = ROW_QUANTUM,
    rows_quantum: int = ROWS_QUANTUM,
    device=None,
) -> PackedBatch:
    """``groups`` packed into one row, padded to their shape bucket (module docstring).

    Args:
        groups, num_candidates, pad_token_id, vocab_size, max_positions, device: as for ``pack_groups``
            (all groups go into one row: the varlen layout).
        row_quantum, rows_quantum: the smallest row length and logit-row count of a bucket.

    Returns:
        a ``PackedBatch`` with ``bucket = (L, G, C, Nr, N)`` and ``padding_groups >= 1`` trailing
        padding groups. Raises ``ValueError`` for bad groups (as ``pack_groups``), for a
        ``pad_token_id`` outside ``[0, vocab_size)`` (the padding groups' tokens are scored), or when a
        padding group would need more positions than ``max_positions``.
    """
    parsed = _validate(groups, vocab_size, max_positions, num_candidates)
    if pad_token_id < 0 or (vocab_size is not None and pad_token_id >= vocab_size):
        # the padding groups' candidate tokens are scored: the pad id must be a real token
        raise ValueError(f"pad_token_id {pad_token_id} outside the vocabulary [0, {vocab_size})")
    C = num_candidates if num_candidates is not None else max(len(c) for _, c in parsed)
    G = len(parsed)
    tokens = sum(len(p) + sum(len(c) for c in cs) for p, cs in parsed)
    rows = sum(1 + sum(len(c) - 1 for c in cs) for _, cs in parsed)  # logit rows (module docstring of packing)
    G_b = bucket_size(G + 1)
    pad = G_b - G
    Nr_b = bucket_size(rows + pad, rows_quantum)
    extra = Nr_b - rows  # the padding groups' candidate tokens: one logit row and one target each
    lens = [extra // pad + (i < extra % pad) for i in range(pad)]
    if max_positions is not None and 1 + max(lens) > max_positions:
        raise ValueError(f"a padding group of {max(lens)} tokens does not fit {max_positions} positions: "
                         "use a smaller rows_quantum")
    L_b = bucket_size(tokens + pad + extra, row_quantum)
    fill = [([pad_token_id], [[pad_token_id] * n]) for n in lens]
    batch = pack_groups(list(parsed) + fill, pad_to_multiple_of=L_b, pad_token_id=pad_token_id, num_candidates=C,
                        device=device)
    key = (L_b, G_b, C, Nr_b, batch.num_targets)
    return dataclasses.replace(batch, bucket=key, padding_groups=pad)


def padded_reference(ref: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``ref`` ``[G_real, C]`` (the real groups' reference log-probs) with 0 rows for ``batch``'s padding
    groups: ``[G, C]``, what the loss takes with a bucketed batch."""
    if ref.shape[0] != batch.num_real_groups:
        raise ValueError(f"ref has {ref.shape[0]} rows, the batch {batch.num_real_groups} real groups")
    if not batch.padding_groups:
        return ref
    return torch.cat([ref, ref.new_zeros(batch.padding_groups, ref.shape[1])])
