"""Full-catalog ranking against brute force on a tiny catalog and a tiny random Llama: one plain forward
per item (fp64 log-softmax), the rank rule (ties against the target, history left out), chunking
invariance, and the whole evaluation against a naive loop."""

import math
import random

import pytest
import torch
from conftest import tiny_llama

from references import naive_item_scores
from sdpo_fast.data import build_tokenizer, format_prompt, make_synthetic, tokenize_examples
from sdpo_fast.eval import (
    catalog_chunks, catalog_token_ids, evaluate_full_catalog, full_catalog_metrics, full_catalog_ranks, score_catalog,
    titles_before,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    splits = make_synthetic(num_users=30, num_items=40, seed=4)
    tok = build_tokenizer(splits, vocab_size=500)
    return splits, tok, tiny_llama(len(tok), tokenizer=tok).eval()


def test_catalog_tokens_are_the_ranking_tokens(setup):
    splits, tok, _ = setup
    ex = splits.test[0]
    row = tokenize_examples([ex], tok)[0]
    assert catalog_token_ids(tok, ex.candidates) == row["candidate_ids"]
    cut = catalog_token_ids(tok, ex.candidates, max_candidate_tokens=3)
    assert cut == tokenize_examples([ex], tok, max_candidate_tokens=3)[0]["candidate_ids"]


def test_history_prompt_has_no_candidate_list(setup):
    splits, tok, _ = setup
    ex = splits.test[0]
    text = format_prompt(ex, list_candidates=False)
    assert text.endswith("Answer:") and ex.history[-1] in text
    others = [c for c in ex.candidates if c not in ex.history and c not in text]
    assert len(others) >= len(ex.candidates) - 2  # candidates are not listed (a few may be history or substrings)
    listed = tokenize_examples([ex], tok)[0]["prompt_ids"]
    bare = tokenize_examples([ex], tok, list_candidates=False)[0]["prompt_ids"]
    assert len(bare) < len(listed)


def test_chunks_cover_the_catalog_in_order():
    items = [[1] * n for n in (3, 5, 2, 9, 1, 1, 4)]
    for budget in (1, 4, 8, 10, 100):
        chunks = catalog_chunks(items, budget)
        assert [i for c in chunks for i in c] == list(range(len(items)))
        for c in chunks:
            assert len(c) == 1 or sum(len(items[i]) for i in c) <= budget
    assert len(catalog_chunks(items, 100)) == 1 and len(catalog_chunks(items, 1)) == len(items)


def test_scores_match_per_item_forwards_and_do_not_depend_on_chunking(setup):
    splits, tok, model = setup
    catalog = splits.all_titles()[:25]
    items = catalog_token_ids(tok, catalog)
    prompts = [r["prompt_ids"] for r in tokenize_examples(splits.test[:2], tok, list_candidates=False)]
    want = torch.stack([naive_item_scores(model, p, items) for p in prompts])
    results = []
    for budget in (1, 23, 10_000):  # one item per forward, a few, all of them
        got = score_catalog(model, prompts, items, max_chunk_tokens=budget, backend="torch", progress=False)
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-5)
        results.append(got)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-5, rtol=1e-6)


def _naive_rank(row, target, excluded):
    return 1 + sum(1 for j, s in enumerate(row) if j != target and j not in excluded and s >= row[target])


def test_rank_rule_ties_and_exclusion():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (50, 30), generator=g).double()  # many ties
    targets = torch.randint(0, 30, (50,), generator=g)
    rng = random.Random(0)
    exclude = [rng.sample(range(30), rng.randrange(0, 8)) + [int(t)] * (u % 2) for u, t in enumerate(targets)]
    got = full_catalog_ranks(scores, targets, exclude)
    want = [_naive_rank(scores[u].tolist(), int(targets[u]), set(exclude[u]) - {int(targets[u])}) for u in range(50)]
    assert got.tolist() == want
    assert full_catalog_ranks(torch.zeros(3, 10), torch.tensor([0, 4, 9])).tolist() == [10, 10, 10]  # constant: last
    # a history item above the target is not counted
    assert full_catalog_ranks(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([2]), [[1]]).tolist() == [1.0]
    m = full_catalog_metrics(torch.tensor([1.0, 3.0, 12.0, 30.0]))
    assert m["full_catalog_hr@1"] == 0.25 and m["full_catalog_hr@5"] == 0.5 and m["full_catalog_hr@20"] == 0.75
    assert m["full_catalog_ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["full_catalog_ndcg@20"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(13)) / 4)
    assert m["full_catalog_users"] == 4


@pytest.mark.parametrize("prompt", ["history", "listed"])
def test_evaluate_full_catalog_matches_brute_force(setup, prompt):
    splits, tok, model = setup
    examples = splits.test[:3]
    catalog = sorted(set(splits.all_titles()[:20]) | {t for ex in examples for t in ex.history + (ex.target,)})
    past = titles_before(splits)
    exclude = [past[ex.example_id] for ex in examples]
    assert all(set(ex.history) <= e and ex.target not in e for ex, e in zip(examples, exclude))
    res = evaluate_full_catalog(model, tok, examples, catalog, exclude=exclude, prompt=prompt, max_chunk_tokens=40,
                                backend="torch", progress=False, return_ranks=True)
    rows = tokenize_examples(examples, tok, list_candidates=prompt == "listed")
    items = catalog_token_ids(tok, catalog)
    want = []
    for ex, r, e in zip(examples, rows, exclude):
        s = naive_item_scores(model, r["prompt_ids"], items).tolist()
        want.append(_naive_rank(s, catalog.index(ex.target), {catalog.index(t) for t in e}))
    assert res["ranks"] == want
    assert res["full_catalog_users"] == 3 and res["full_catalog_items"] == len(catalog)
    assert res["full_catalog_hr@10"] == sum(r <= 10 for r in want) / 3
    with pytest.raises(ValueError, match="not in the catalog"):
        evaluate_full_catalog(model, tok, examples, catalog[:2], progress=False)
    with pytest.raises(ValueError, match="prompt must be"):
        evaluate_full_catalog(model, tok, examples, catalog, prompt="none", progress=False)
