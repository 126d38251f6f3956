"""Tokenisation (truncation rules, datasets.map caching), negatives and the collator."""

import pytest
import torch
from conftest import tiny_llama

import sdpo_fast
import sdpo_fast.data.tokenize as tokmod
from sdpo_fast.data import (
    SDPOCollator,
    TokenBudgetBatchSampler,
    build_tokenizer,
    completion_text,
    format_prompt,
    make_synthetic,
    random_negatives,
    tokenize_dataset,
    tokenize_example,
)
from sdpo_fast.data.negatives import boundary_negatives, hard_negatives


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    splits = make_synthetic(num_users=40, num_items=60, seed=1)
    tok = build_tokenizer(splits, vocab_size=600)
    return splits, tok


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_roundtrip(data, tmp_path):
    splits, tok = data
    assert len(tok) <= 600 and tok.eos_token_id is not None and tok.pad_token_id is not None
    ex = splits.train[0]
    for title in ex.candidates:
        assert tok.decode(_enc(tok, completion_text(title))) == " " + title
    build_tokenizer(splits, vocab_size=600, save_dir=tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(format_prompt(ex), add_special_tokens=False)["input_ids"] == _enc(tok, format_prompt(ex))


def test_tokenize_example_layout(data):
    splits, tok = data
    ex = splits.train[3]
    row = tokenize_example(ex, tok, seed=2)
    assert row["prompt_ids"] == _enc(tok, format_prompt(ex, seed=2))
    assert row["candidate_ids"] == [_enc(tok, " " + c) + [tok.eos_token_id] for c in ex.candidates]
    assert row["target_index"] == ex.target_index
    assert row["history_used"] == len(ex.history) and row["num_truncated_candidates"] == 0
    assert row["candidate_lens"] == [len(c) for c in row["candidate_ids"]]


def test_truncation_rules(data):
    splits, tok = data
    ex = max(splits.train, key=lambda e: len(e.history))
    assert len(ex.history) >= 5
    # prompt: the oldest history items go first, never the candidates
    keep3 = _enc(tok, format_prompt(ex, history=ex.history[-3:]))
    row = tokenize_example(ex, tok, max_prompt_tokens=len(keep3))
    assert row["history_used"] == 3 and row["prompt_ids"] == keep3
    assert all(c in tok.decode(row["prompt_ids"]) for c in ex.candidates)
    one = _enc(tok, format_prompt(ex, history=ex.history[-1:]))
    with pytest.raises(ValueError, match=rf"example {ex.example_id}: the prompt needs {len(one)} tokens"):
        tokenize_example(ex, tok, max_prompt_tokens=len(one) - 1)
    # candidates: cut to max_candidate_tokens - 1 title tokens + EOS; never empty
    row = tokenize_example(ex, tok, max_candidate_tokens=2)
    full = [_enc(tok, " " + c) for c in ex.candidates]
    for ids, f in zip(row["candidate_ids"], full):
        assert ids == f[:1] + [tok.eos_token_id]
    assert row["num_truncated_candidates"] == sum(len(f) > 1 for f in full) > 0
    with pytest.raises(ValueError, match="max_candidate_tokens must be >= 2"):
        tokenize_example(ex, tok, max_candidate_tokens=1)
    with pytest.warns(UserWarning, match=r"candidate\(s\) cut to max_candidate_tokens=2"):
        ds = tokenize_dataset([ex], tok, max_candidate_tokens=2)
    assert ds[0]["num_truncated_candidates"] == row["num_truncated_candidates"]


def test_tokenize_dataset_cache(data, tmp_path, monkeypatch):
    splits, tok = data
    ds = tokenize_dataset(splits.valid, tok, cache_dir=tmp_path, max_prompt_tokens=400)
    files = list(tmp_path.glob("tokenized-*.arrow"))
    assert len(files) == 1 and len(ds) == len(splits.valid)
    for i, ex in enumerate(splits.valid):
        assert ds[i]["prompt_ids"] == tokenize_example(ex, tok, max_prompt_tokens=400)["prompt_ids"]
        assert ds[i]["idx"] == i and ds[i]["example_id"] == ex.example_id

    def boom(*a, **k):
        raise AssertionError("tokenised again instead of loading the cache")

    monkeypatch.setattr(tokmod, "tokenize_examples", boom)
    again = tokenize_dataset(splits.valid, tok, cache_dir=tmp_path, max_prompt_tokens=400)
    assert again.to_list() == ds.to_list()
    with pytest.raises(AssertionError, match="tokenised again"):  # other options: a new cache entry
        tokenize_dataset(splits.valid, tok, cache_dir=tmp_path, max_prompt_tokens=300)


def test_random_negatives():
    a = random_negatives(20, 4, 5, seed=0, epoch=0, key="u1:3")
    assert len(a) == len(set(a)) == 5 and 4 not in a and all(0 <= i < 20 for i in a)
    assert a == random_negatives(20, 4, 5, seed=0, epoch=0, key="u1:3")
    assert a != random_negatives(20, 4, 5, seed=0, epoch=1, key="u1:3")
    assert sorted(random_negatives(20, 4, 19, key="x")) == [i for i in range(20) if i != 4]
    with pytest.raises(ValueError, match="num_negatives=20"):
        random_negatives(20, 4, 20)


def test_collator_random(data):
    splits, tok = data
    ds = tokenize_dataset(splits.train[:6], tok)
    feats = [ds[i] for i in range(6)]
    col = SDPOCollator(tok, num_negatives=3, seed=5)
    batch = col(feats)
    assert batch.candidate_index.shape == (6, 4)
    groups = []
    for f, cols in zip(feats, batch.candidate_index.tolist()):
        assert cols[0] == f["target_index"] and f["target_index"] not in cols[1:] and len(set(cols)) == 4
        assert cols[1:] == random_negatives(20, f["target_index"], 3, seed=5, epoch=0, key=f["example_id"])
        groups.append((f["prompt_ids"], [f["candidate_ids"][j] for j in cols]))
    ref = sdpo_fast.pack_groups(groups, pad_token_id=tok.pad_token_id)
    assert torch.equal(batch.packed.input_ids, ref.input_ids)
    assert torch.equal(batch.packed.position_ids, ref.position_ids)
    # every candidate ends with EOS in the packed row
    eos_rows = batch.packed.input_ids.flatten()[batch.packed.group_starts[:, None] + batch.packed.prompt_lens[:, None]
                                                  + batch.packed.candidate_lens.cumsum(1) - 1]
    assert (eos_rows == tok.eos_token_id).all()
    assert batch.idx.tolist() == list(range(6)) and batch.example_ids[0] == feats[0]["example_id"]

    col.set_epoch(1)
    assert not torch.equal(col(feats).candidate_index, batch.candidate_index)
    fixed = SDPOCollator(tok, num_negatives=3, seed=5, resample_each_epoch=False)
    fixed.set_epoch(7)
    assert torch.equal(fixed(feats).candidate_index, batch.candidate_index)
    assert SDPOCollator(tok, num_negatives=None)(feats).packed.num_candidates == 20
    assert SDPOCollator(tok, num_negatives=0)(feats).packed.num_candidates == 1  # SFT batch
    with pytest.raises(ValueError, match="num_negatives=20"):
        SDPOCollator(tok, num_negatives=20)(feats)

    # token budget: rows of at most the budget; a group over it is an error naming it
    sizes = [len(g[0]) + sum(len(c) for c in g[1]) for g in groups]
    budget = max(sizes) + 10
    packed = SDPOCollator(tok, num_negatives=3, seed=5, token_budget=budget, pad_to_multiple_of=8)(feats).packed
    assert packed.shape[0] > 1 and packed.shape[1] % 8 == 0
    for r in range(packed.shape[0]):
        assert sum(e - s for row, s, e in packed.group_spans if row == r) <= budget
    with pytest.raises(ValueError, match=r"group \d+: \d+ tokens do not fit"):
        SDPOCollator(tok, num_negatives=3, seed=5, token_budget=min(sizes) - 1)(feats)


def test_token_budget_sampler(data):
    splits, tok = data
    ds = tokenize_dataset(splits.train[:40], tok)
    sampler = TokenBudgetBatchSampler(ds, num_negatives=3, max_tokens=900, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert len(batches) == len(sampler) > 1
    col = SDPOCollator(tok, num_negatives=3)
    for b in batches:
        assert col([ds[i] for i in b]).packed.num_tokens <= 900  # whatever negatives were drawn
    assert batches == list(TokenBudgetBatchSampler(ds, num_negatives=3, max_tokens=900, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="example 0: its group needs up to"):
        TokenBudgetBatchSampler(ds, num_negatives=19, max_tokens=100)


def _tiny_llama(vocab_size):
    return tiny_llama(vocab_size).eval()


def _naive_logprob(model, prompt, cand):
    ids = torch.tensor([prompt + cand])
    logp = model(ids).logits[0].double().log_softmax(-1)
    return sum(logp[len(prompt) + i - 1, t].item() for i, t in enumerate(cand))


@torch.no_grad()
def test_hard_negatives_match_naive(data):
    splits, tok = data
    ds = tokenize_dataset(splits.train[:3], tok)
    feats = [ds[i] for i in range(3)]
    model = _tiny_llama(len(tok))
    picked = hard_negatives(model, [f["prompt_ids"] for f in feats], [f["candidate_ids"] for f in feats],
                            [f["target_index"] for f in feats], 4, backend="torch", max_tokens_per_row=700)
    for f, got in zip(feats, picked):
        scores = {j: _naive_logprob(model, f["prompt_ids"], c) for j, c in enumerate(f["candidate_ids"]) if j != f["target_index"]}
        want = sorted(scores, key=scores.get, reverse=True)[:4]
        assert got == want
    # a token budget sized for K + 1 candidates: the scoring pass still scores all 19
    budget = max(len(f["prompt_ids"]) + sum(sorted(map(len, f["candidate_ids"]))[-5:]) for f in feats)
    col = SDPOCollator(tok, num_negatives=4, negatives="hard", policy=model, backend="torch", token_budget=budget)
    assert col(feats).candidate_index[:, 1:].tolist() == picked
    with pytest.raises(ValueError, match="needs a policy"):
        SDPOCollator(tok, num_negatives=4, negatives="hard")(feats)


@torch.no_grad()
def test_boundary_negatives_match_naive(data):
    """Boundary = non-target candidates whose brute-force per-candidate policy log-prob is >= the
    chosen item's; more than K: K of them; fewer: all of them plus a random top-up from the others;
    none: exactly random_negatives' draw."""
    splits, tok = data
    ds = tokenize_dataset(splits.train[:4], tok)
    feats = [dict(ds[i]) for i in range(4)]
    model = _tiny_llama(len(tok))
    naive = [[_naive_logprob(model, f["prompt_ids"], c) for c in f["candidate_ids"]] for f in feats]
    order = [sorted(range(len(s)), key=s.__getitem__, reverse=True) for s in naive]
    # targets placed to give every case: top-scored (no boundary), 2nd (1 boundary), 6th (5), last (19)
    for f, o, rank in zip(feats, order, (0, 1, 5, 19)):
        f["target_index"] = o[rank]
    k = 4
    args = ([f["prompt_ids"] for f in feats], [f["candidate_ids"] for f in feats], [f["target_index"] for f in feats], k)
    keys = [f["example_id"] for f in feats]
    got = boundary_negatives(model, *args, seed=3, epoch=2, keys=keys, backend="torch", max_tokens_per_row=700)
    for f, s, row, key in zip(feats, naive, got, keys):
        t = f["target_index"]
        boundary = {j for j in range(len(s)) if j != t and s[j] >= s[t]}
        assert len(row) == len(set(row)) == k and t not in row
        if len(boundary) >= k:
            assert set(row) <= boundary
        else:
            assert set(row[: len(boundary)]) == boundary and not set(row[len(boundary):]) & boundary
    assert got[0] == random_negatives(20, feats[0]["target_index"], k, seed=3, epoch=2, key=keys[0])
    assert [len({j for j in r if naive[g][j] >= naive[g][feats[g]["target_index"]]}) for g, r in enumerate(got)] == [0, 1, 4, 4]
    assert got == boundary_negatives(model, *args, seed=3, epoch=2, keys=keys, backend="torch")
    assert got != boundary_negatives(model, *args, seed=3, epoch=3, keys=keys, backend="torch")  # top-up redrawn

    col = SDPOCollator(tok, num_negatives=k, negatives="boundary", policy=model, backend="torch", seed=3)
    col.set_epoch(2)
    assert col(feats).candidate_index[:, 1:].tolist() == got
    with pytest.raises(ValueError, match="needs a policy"):
        SDPOCollator(tok, num_negatives=k, negatives="boundary")(feats)
    with pytest.raises(ValueError, match="negatives must be one of random, hard, boundary"):
        SDPOCollator(tok, negatives="semi-hard")


@torch.no_grad()
def test_random_negatives_are_redrawn_each_epoch_and_the_precomputed_reference_covers_them(data):
    """train.py precomputes the reference over every candidate (``score_candidates``) and gathers the
    drawn columns (``SDPOBatch.idx``, ``candidate_index``) each step: across epochs the negatives change
    and the gathered values stay the per-candidate brute-force scores of the drawn candidates."""
    from sdpo_fast.eval import score_candidates

    splits, tok = data
    ds = tokenize_dataset(splits.train[:5], tok)
    feats = [ds[i] for i in range(5)]
    model = _tiny_llama(len(tok))
    ref_all = score_candidates(model, feats, batch_size=2, backend="torch", progress=False)
    col = SDPOCollator(tok, num_negatives=3, seed=1)
    drawn = []
    for epoch in (0, 1):
        col.set_epoch(epoch)
        batch = col(feats)
        ref = ref_all[batch.idx].gather(1, batch.candidate_index)
        want = torch.tensor([[_naive_logprob(model, feats[i]["prompt_ids"], feats[i]["candidate_ids"][j]) for j in row]
                             for i, row in zip(batch.idx.tolist(), batch.candidate_index.tolist())], dtype=torch.float64)
        torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-4)
        drawn.append(batch.candidate_index)
    assert torch.equal(drawn[0][:, 0], drawn[1][:, 0]) and not torch.equal(drawn[0][:, 1:], drawn[1][:, 1:])
