"""Shared-prefix packing of S-DPO groups.

A *group* is one prompt followed by K+1 candidate completions (column 0 is the chosen item, columns
1..K the negatives). Packing lays every group out once as ``[prompt | c_0 | c_1 | ... | c_K]``, several
groups back to back in a row, so the prompt's keys and values are computed once for all candidates.

Token layout inside a group (``P`` = prompt length, ``n_j`` = length of candidate j)::

    flat offset   s ........ s+P-1 | s+P ... s+P+n_0-1 | ... | ...
    position id   0 ........ P-1   | P   ... P+n_0-1   | P ... P+n_1-1 | ...
    candidate id  -1 ....... -1    | 0   ... 0         | 1 ... 1       | ...

Attention rule (what the attention backends implement): query token q may attend key token k iff both
belong to the same group, k is not after q in the packed order, and k is a prompt token or belongs to
the same candidate as q.

Log-prob layout. Only candidate tokens are targets. Token i of candidate j is predicted by the hidden
state of the previous token of that candidate, except token 0 of every candidate, which is predicted by
the prompt's last token: that row is shared by the group's K+1 candidates and appears once in
``logit_rows``. The targets are stored sorted by row (CSR ``row_ptr``), so a kernel can compute one
logsumexp per row and read all of that row's target logits. The logit rows come group by group in
group order (each group: its prompt's last row, then its candidates' rows in candidate order), so a
range of groups is a range of logit rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .kernels.attention.reference import group_attention_mask  # the rule's mask, beside the reference

Group = tuple  # (prompt_ids, [chosen_ids, neg_1_ids, ...]); ids are int sequences or 1-D tensors


@dataclass(frozen=True)
class PackedBatch:
    """A packed batch of ``G`` groups in ``R`` rows of ``L`` tokens (``T = R * L`` flat tokens).

    Per token, ``[R, L]`` int64 (padding: group -1, candidate -1, position 0, id ``pad_token_id``):
        input_ids, position_ids, group_ids, candidate_ids (-1 on prompt tokens, j on candidate j)

    Per group / candidate:
        candidate_mask  ``[G, C]`` bool, ``C = Kmax + 1``; column 0 is the chosen candidate
        candidate_lens  ``[G, C]`` int64 token counts (0 where masked)
        prompt_lens     ``[G]`` int64
        group_starts    ``[G]`` int64 flat offset (into ``T``) of the group's first prompt token
        group_lens      ``[G]`` int64 tokens of the group (prompt + all candidates)
        (device copies of what ``group_layout`` / ``group_spans`` hold on the host, made once at
        packing: the attention launcher builds its tile tables from them on the device, where
        rebuilding them per call would cost a host-to-device copy that waits for the stream)

    Log-prob layout (``Nr`` rows needing logits, ``N`` targets = candidate tokens, ``Nr < N``):
        logit_rows        ``[Nr]`` int64 flat token index whose hidden state predicts targets
        row_ptr           ``[Nr + 1]`` int64 CSR offsets: row r owns targets row_ptr[r]:row_ptr[r+1]
        target_rows       ``[N]`` int64 index into ``logit_rows`` (non-decreasing)
        target_ids        ``[N]`` int64 token id to score
        target_candidates ``[N]`` int64 flat candidate index ``g * C + j`` (segment-sum key)

    Host metadata (Python ints, never synced from device):
        group_spans  ``((row, start, end), ...)`` per group, start/end within the row
        group_layout ``((prompt_len, (len_0, ..., len_K)), ...)`` per group
        group_rows   ``((r0, r1, t0, t1), ...)`` per group: its logit rows ``[r0, r1)`` and targets
                     ``[t0, t1)``, consecutive ranges in group order (what the kernels' whole-group
                     chunks and tiles are cut from)
        max_span     (property) largest prompt + candidate length of a real group: positions used
                     (sliding-window checks)

    Shape buckets (``sdpo_fast.buckets.pack_bucketed``; defaults for ``pack_groups``):
        bucket          None, or the bucket's key ``(L, G, C, Nr, N)``: every batch of one bucket has
                        these sizes, and the CUDA kernels then plan their launches from tensor shapes
                        alone (never from the host layout), so one CUDA graph replays any of them
                        that has the same ``padding_groups`` (the mean divides by the real groups)
        padding_groups  trailing groups that only fill the bucket (loss and gradient 0; the mean
                        and the metrics cover the ``num_real_groups`` before them)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group_ids: torch.Tensor
    candidate_ids: torch.Tensor
    candidate_mask: torch.Tensor
    candidate_lens: torch.Tensor
    prompt_lens: torch.Tensor
    group_starts: torch.Tensor
    group_lens: torch.Tensor
    logit_rows: torch.Tensor
    row_ptr: torch.Tensor
    target_rows: torch.Tensor
    target_ids: torch.Tensor
    target_candidates: torch.Tensor
    group_spans: tuple
    group_layout: tuple
    group_rows: tuple
    bucket: tuple | None = None
    padding_groups: int = 0

    @property
    def num_groups(self) -> int:
        return self.candidate_mask.shape[0]

    @property
    def num_real_groups(self) -> int:
        """Groups that are not bucket padding (``num_groups - padding_groups``)."""
        return self.candidate_mask.shape[0] - self.padding_groups

    @property
    def num_candidates(self) -> int:
        """``C = Kmax + 1``: columns of ``candidate_mask`` (chosen + negatives)."""
        return self.candidate_mask.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, L)``: packed rows and row length."""
        return tuple(self.input_ids.shape)

    @property
    def num_tokens(self) -> int:
        """Real tokens: neither padding slots nor padding groups."""
        return sum(end - start for _, start, end in self.group_spans[: self.num_real_groups])

    @property
    def max_span(self) -> int:
        """Positions the real groups use (a padding group's attention values are never used)."""
        return max(p + max(lens) for p, lens in self.group_layout[: self.num_real_groups])

    @property
    def num_targets(self) -> int:
        return self.target_ids.shape[0]

    @property
    def group_row_ptr(self) -> torch.Tensor:
        """``[G + 1]`` int64 CPU tensor: group g owns logit rows ``[group_row_ptr[g], group_row_ptr[g + 1])``
        (from the host ``group_rows``; no device sync)."""
        return torch.tensor([0] + [r1 for _, r1, _, _ in self.group_rows], dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (the rest are host-side sizes and tuples)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def _map(self, fn) -> "PackedBatch":
        return dataclasses.replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """A copy with every tensor in page-locked host memory (what a DataLoader with ``pin_memory=True``
        calls), so that ``to(cuda, non_blocking=True)`` does not wait."""
        return self._map(torch.Tensor.pin_memory)

    def clone(self) -> "PackedBatch":
        """A copy with every tensor cloned (a new object: nothing cached for this one applies to it)."""
        return self._map(torch.Tensor.clone)

    def attention_mask(self) -> torch.Tensor:
        """Dense boolean shared-prefix mask ``[R, 1, L, L]`` (True = may attend).

        For tests and small batches only: O(L^2) memory. Padding tokens attend to themselves so
        that no softmax row is empty.
        """
        R, L = self.shape
        mask = torch.eye(L, dtype=torch.bool, device=self.device).repeat(R, 1, 1)
        for row, start, end in self.group_spans:
            mask[row, start:end, start:end] = group_attention_mask(self.candidate_ids[row, start:end])
        return mask[:, None]


def _as_id_list(ids, what: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{what}: expected a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
        return ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what}: expected token ids, got a string (tokenise first)")
    try:
        out = [int(t) for t in ids]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected a sequence of integer token ids ({exc})") from None
    if any(o != t for o, t in zip(out, ids)):
        raise ValueError(f"{what}: token ids must be integers")
    return out


def _validate(groups, vocab_size, max_positions, num_candidates):
    """Turn user groups into lists of ints, raising ``ValueError`` naming the offending group."""
    if len(groups) == 0:
        raise ValueError("pack_groups: no groups given")
    parsed = []
    for gi, group in enumerate(groups):
        try:
            prompt, cands = group
        except (TypeError, ValueError):
            raise ValueError(f"group {gi}: expected (prompt_ids, [chosen_ids, neg_1_ids, ...])") from None
        prompt = _as_id_list(prompt, f"group {gi}: prompt")
        if len(prompt) == 0:
            raise ValueError(f"group {gi}: empty prompt")
        if isinstance(cands, (torch.Tensor, str)) or len(cands) == 0:
            raise ValueError(f"group {gi}: no candidates (need a list: chosen first, then negatives)")
        cands = [_as_id_list(c, f"group {gi}, candidate {j}") for j, c in enumerate(cands)]
        for j, c in enumerate(cands):
            if len(c) == 0:
                raise ValueError(f"group {gi}, candidate {j}: empty candidate")
        if num_candidates is not None and len(cands) > num_candidates:
            raise ValueError(f"group {gi}: {len(cands)} candidates, more than num_candidates={num_candidates}")
        if vocab_size is not None:
            for what, ids in [("prompt", prompt)] + [(f"candidate {j}", c) for j, c in enumerate(cands)]:
                bad = [t for t in ids if t < 0 or t >= vocab_size]
                if bad:
                    raise ValueError(
                        f"group {gi}, {what}: token id {bad[0]} outside the vocabulary [0, {vocab_size})"
                    )
        if max_positions is not None:
            span = len(prompt) + max(len(c) for c in cands)
            if span > max_positions:
                raise ValueError(
                    f"group {gi}: prompt ({len(prompt)}) + longest candidate needs {span} positions, "
                    f"more than the model's maximum of {max_positions}"
                )
        parsed.append((prompt, cands))
    return parsed


def pack_groups(
    groups: Sequence[Group],
    *,
    max_tokens_per_row: int | None = None,
    pad_to_multiple_of: int = 1,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    num_candidates: int | None = None,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Pack S-DPO groups into shared-prefix rows.

    Args:
        groups: sequence of ``(prompt_ids, [chosen_ids, neg_1_ids, ...])``; ids are int sequences or
            1-D integer tensors. Groups may have different numbers of negatives.
        max_tokens_per_row: groups are placed in order, a new row starting when the next group would
            exceed this many tokens. ``None``: all groups in one row (batch dimension 1, the varlen
            layout the kernels prefer). A group longer than the limit is an error.
        pad_to_multiple_of: the row length ``L`` is rounded up to a multiple of this.
        pad_token_id: id written into padding slots.
        vocab_size: when given, every id must lie in ``[0, vocab_size)``.
        max_positions: when given (the model's ``max_position_embeddings``), prompt plus the longest
            candidate of each group must fit, since positions restart after the prompt.
        num_candidates: pad the candidate axis to this many columns (e.g. a global maximum across
            ranks); default the largest group's count.
        device: where the tensors are created (built on CPU, then moved once).

    Returns:
        PackedBatch. Raises ``ValueError`` naming the group for bad input; nothing is built then.
    """
    parsed = _validate(groups, vocab_size, max_positions, num_candidates)
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    C = num_candidates if num_candidates is not None else max(len(c) for _, c in parsed)
    G = len(parsed)
    group_tokens = [len(p) + sum(len(c) for c in cs) for p, cs in parsed]
    if max_tokens_per_row is not None:
        for gi, n in enumerate(group_tokens):
            if n > max_tokens_per_row:
                raise ValueError(f"group {gi}: {n} tokens do not fit max_tokens_per_row={max_tokens_per_row}")

    # Assign groups to rows greedily in order (keeps groups contiguous and the order stable).
    rows: list[list[int]] = [[]]
    fill = 0
    for gi, n in enumerate(group_tokens):
        if max_tokens_per_row is not None and rows[-1] and fill + n > max_tokens_per_row:
            rows.append([])
            fill = 0
        rows[-1].append(gi)
        fill += n
    longest = max(sum(group_tokens[g] for g in r) for r in rows)
    L = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    R = len(rows)

    # Built as flat Python lists and turned into tensors once: per-group tensor slicing costs
    # several small torch calls per candidate (the collation cost of large K).
    T = R * L
    ids_flat = [pad_token_id] * T
    pos_flat = [0] * T
    gid_flat = [-1] * T
    cid_flat = [-1] * T
    cand_mask = [[False] * C for _ in range(G)]
    cand_lens = [[0] * C for _ in range(G)]
    prompt_lens = [0] * G
    group_starts = [0] * G
    spans = [None] * G
    logit_rows: list[int] = []
    row_ptr: list[int] = [0]
    target_ids: list[int] = []
    target_cands: list[int] = []
    group_rows: list = [None] * G

    for r, members in enumerate(rows):
        off = 0
        for gi in members:
            prompt, cands = parsed[gi]
            P = len(prompt)
            base = r * L + off
            spans[gi] = (r, off, off + group_tokens[gi])
            group_starts[gi] = base
            prompt_lens[gi] = P
            ids_flat[base : base + P] = prompt
            pos_flat[base : base + P] = range(P)
            gid_flat[base : base + group_tokens[gi]] = [gi] * group_tokens[gi]
            r0, t0 = len(logit_rows), len(target_ids)
            # The prompt's last row predicts token 0 of every candidate.
            logit_rows.append(base + P - 1)
            target_ids.extend(c[0] for c in cands)
            target_cands.extend(gi * C + j for j in range(len(cands)))
            row_ptr.append(len(target_ids))
            pos = base + P
            for j, c in enumerate(cands):
                n = len(c)
                ids_flat[pos : pos + n] = c
                pos_flat[pos : pos + n] = range(P, P + n)
                cid_flat[pos : pos + n] = [j] * n
                cand_mask[gi][j] = True
                cand_lens[gi][j] = n
                # token i (>= 1) is predicted by the row of token i - 1, one target per row
                logit_rows.extend(range(pos, pos + n - 1))
                t = len(target_ids)
                target_ids.extend(c[1:])
                target_cands.extend([gi * C + j] * (n - 1))
                row_ptr.extend(range(t + 1, t + n))
                pos += n
            group_rows[gi] = (r0, len(logit_rows), t0, len(target_ids))
            off += group_tokens[gi]

    def long(values, shape=None):
        out = torch.tensor(values, dtype=torch.long)
        return out.view(shape) if shape is not None else out

    input_ids = long(ids_flat, (R, L))
    position_ids = long(pos_flat, (R, L))
    group_ids = long(gid_flat, (R, L))
    candidate_ids = long(cid_flat, (R, L))
    candidate_mask = torch.tensor(cand_mask, dtype=torch.bool).view(G, C)
    candidate_lens = long(cand_lens).view(G, C)
    prompt_lens = long(prompt_lens)
    group_starts = long(group_starts)
    group_lens = long(group_tokens)
    row_ptr_t = torch.tensor(row_ptr, dtype=torch.long)
    counts = row_ptr_t[1:] - row_ptr_t[:-1]
    batch = PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        group_ids=group_ids,
        candidate_ids=candidate_ids,
        candidate_mask=candidate_mask,
        candidate_lens=candidate_lens,
        prompt_lens=prompt_lens,
        group_starts=group_starts,
        group_lens=group_lens,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        row_ptr=row_ptr_t,
        target_rows=torch.repeat_interleave(torch.arange(len(logit_rows)), counts),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_candidates=torch.tensor(target_cands, dtype=torch.long),
        group_spans=tuple(spans),
        group_layout=tuple((len(p), tuple(len(c) for c in cs)) for p, cs in parsed),
        group_rows=tuple(group_rows),
    )
    return batch.to(device) if device is not None else batch
