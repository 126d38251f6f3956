"""pack_groups: layout, log-prob triples, masks and input validation."""

import pytest
import torch

import sdpo_fast
from sdpo_fast.packing import group_attention_mask

GROUPS = [
    ([5, 6, 7], [[1, 2], [3], [4, 4, 4]]),
    ([8], [[9], [10, 11]]),
    ([12, 13], [[14, 15, 16, 17]]),
]


def test_layout_single_row():
    b = sdpo_fast.pack_groups(GROUPS)
    assert b.shape == (1, 3 + 6 + 1 + 3 + 2 + 4)
    assert b.input_ids[0].tolist() == [5, 6, 7, 1, 2, 3, 4, 4, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 1, 2, 0, 1, 2, 3, 4, 5]
    assert b.group_ids[0].tolist() == [0] * 9 + [1] * 4 + [2] * 6
    assert b.candidate_ids[0].tolist() == [-1, -1, -1, 0, 0, 1, 2, 2, 2, -1, 0, 1, 1, -1, -1, 0, 0, 0, 0]
    assert b.candidate_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert b.candidate_lens.tolist() == [[2, 1, 3], [1, 2, 0], [4, 0, 0]]
    assert b.prompt_lens.tolist() == [3, 1, 2]
    assert b.group_starts.tolist() == [0, 9, 13]
    assert b.group_spans == ((0, 0, 9), (0, 9, 13), (0, 13, 19))
    assert b.num_tokens == 19 and b.max_span == 6 and b.num_candidates == 3


def test_logprob_triples_reconstruct_every_candidate():
    b = sdpo_fast.pack_groups(GROUPS)
    flat = b.input_ids.flatten()
    # Unique rows: one shared last-prompt row per group plus (len - 1) per candidate.
    assert b.logit_rows.numel() == sum(1 + sum(len(c) - 1 for c in cs) for _, cs in GROUPS)
    assert b.logit_rows.unique().numel() == b.logit_rows.numel()
    assert b.num_targets == sum(len(c) for _, cs in GROUPS for c in cs)
    assert (b.target_rows[1:] >= b.target_rows[:-1]).all()
    counts = torch.bincount(b.target_rows, minlength=b.logit_rows.numel())
    assert (b.row_ptr[1:] - b.row_ptr[:-1]).tolist() == counts.tolist()
    C = b.num_candidates
    for gi, (prompt, cands) in enumerate(GROUPS):
        last_prompt = b.group_starts[gi].item() + len(prompt) - 1
        for j, c in enumerate(cands):
            sel = (b.target_candidates == gi * C + j).nonzero().flatten()
            assert b.target_ids[sel].tolist() == c
            rows = b.logit_rows[b.target_rows[sel]].tolist()
            assert rows[0] == last_prompt  # token 0 predicted by the shared prompt row
            # token i predicted by candidate token i-1, which holds c[i-1]
            assert [flat[r].item() for r in rows[1:]] == c[:-1]
            assert b.candidate_ids.flatten()[rows[1:]].tolist() == [j] * (len(c) - 1)


def test_rows_padding_and_candidate_columns():
    b = sdpo_fast.pack_groups(GROUPS, max_tokens_per_row=12, pad_to_multiple_of=8, pad_token_id=99, num_candidates=5)
    assert b.shape == (2, 16)  # 9 | 4 + 6 tokens, padded to 16
    assert b.candidate_mask.shape == (3, 5) and not b.candidate_mask[:, 3:].any()
    assert b.input_ids[0, 9:].tolist() == [99] * 7
    assert (b.group_ids[0, 9:] == -1).all() and (b.candidate_ids[0, 9:] == -1).all()
    assert b.group_starts.tolist() == [0, 16, 20]
    assert b.target_candidates.max().item() < 3 * 5
    b2 = sdpo_fast.pack_groups(GROUPS, max_tokens_per_row=13)
    assert b2.shape == (2, 13) and b2.group_spans == ((0, 0, 9), (0, 9, 13), (1, 0, 6))


def test_attention_mask_rule():
    b = sdpo_fast.pack_groups(GROUPS, pad_to_multiple_of=8)
    mask = b.attention_mask()[0, 0]
    g, c = b.group_ids[0], b.candidate_ids[0]
    L = g.shape[0]
    for q in range(L):
        for k in range(L):
            if g[q] < 0:
                expected = q == k
            else:
                expected = g[q] == g[k] and k <= q and (c[k] == -1 or c[k] == c[q])
            assert bool(mask[q, k]) == bool(expected), (q, k)
    torch.testing.assert_close(group_attention_mask(c[:9]), mask[:9, :9])


def test_tensor_inputs_and_to():
    groups = [(torch.tensor([1, 2]), [torch.tensor([3]), [4, 5]])]
    b = sdpo_fast.pack_groups(groups, device="cpu")
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    b2 = b.to("cpu")
    assert b2.group_spans == b.group_spans and torch.equal(b2.logit_rows, b.logit_rows)


@pytest.mark.parametrize(
    "groups, kwargs, message",
    [
        ([([1], [[2]]), ([], [[2]])], {}, "group 1: empty prompt"),
        ([([1], [])], {}, "group 0: no candidates"),
        ([([1], [[2], []])], {}, "group 0, candidate 1: empty candidate"),
        ([([1], [[2], [7]])], {"vocab_size": 5}, "group 0, candidate 1: token id 7 outside"),
        ([([1], [[2]]), ([-1], [[2]])], {"vocab_size": 5}, "group 1, prompt: token id -1"),
        ([([1, 2, 3], [[2, 2]])], {"max_positions": 4}, "group 0: .* 5 positions"),
        ([([1, 2, 3], [[2, 2]])], {"max_tokens_per_row": 4}, "group 0: 5 tokens"),
        ([([1], [[2], [3]])], {"num_candidates": 1}, "group 0: 2 candidates"),
        ([([1.5], [[2]])], {}, "group 0: prompt"),
        ([("abc", [[2]])], {}, "group 0: prompt: .*string"),
        ([([1],)], {}, "group 0: expected"),
        ([], {}, "no groups"),
    ],
)
def test_bad_input_names_the_group(groups, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sdpo_fast.pack_groups(groups, **kwargs)


@pytest.mark.parametrize("max_tokens", [None, 12])
def test_group_rows_are_the_groups_logit_row_and_target_ranges(max_tokens):
    """pack_groups' host ranges agree with the device layout: group g's logit rows [r0, r1) are the
    rows whose targets belong to g, its targets [t0, t1) are theirs (row_ptr), ranges are consecutive."""
    groups = [([1, 2, 3], [[4, 5], [6], [7, 8, 9]]), ([10], [[11]]), ([12, 13], [[14, 15, 16], [17, 18]])]
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=max_tokens)
    C = batch.num_candidates
    group_of_target = (batch.target_candidates // C).tolist()
    group_of_row = [group_of_target[int(batch.row_ptr[r])] for r in range(batch.logit_rows.numel())]
    ends = [0]
    for g, (r0, r1, t0, t1) in enumerate(batch.group_rows):
        assert r0 == ends[-1] and r1 > r0
        assert group_of_row[r0:r1] == [g] * (r1 - r0)
        assert (int(batch.row_ptr[r0]), int(batch.row_ptr[r1])) == (t0, t1)
        assert group_of_target[t0:t1] == [g] * (t1 - t0)
        ends.append(r1)
    assert ends[-1] == batch.logit_rows.numel()
    assert batch.group_row_ptr.tolist() == ends
