"""Constrained decoding (the token trie, greedy and beam search against naive loops on a tiny random
Llama) and the named free-decoding rules on hand-made answers."""

import math

import pytest
import torch
from conftest import tiny_llama

from references import naive_constrained_greedy, naive_item_scores
from sdpo_fast.data import build_tokenizer, make_synthetic, tokenize_examples
from sdpo_fast.eval import TokenTrie, constrained_generate, evaluate_constrained, generation_metrics, match_answer

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2


def _paths(trie, prefix=()):
    """Every EOS-terminated path from ``prefix`` through ``trie.allowed``."""
    out = []
    for tok in trie.allowed(prefix):
        seq = prefix + (tok,)
        out += [seq] if tok == EOS else _paths(trie, seq)
    return out


def test_trie_holds_exactly_the_candidates():
    seqs = [[5, 6, EOS], [5, 7, EOS], [5, 6, 8, EOS], [9, EOS], [5, 6, EOS]]  # shared prefixes, a prefix title, a repeat
    trie = TokenTrie(seqs, EOS)
    assert trie.allowed([]) == [5, 9]
    assert trie.allowed([5]) == [6, 7]
    assert trie.allowed([5, 6]) == [EOS, 8]  # " Heat" ends here or goes on
    assert trie.allowed([5, 6, EOS]) == [] and trie.allowed([4]) == []
    assert sorted(_paths(trie)) == sorted({tuple(s) for s in seqs})
    assert [trie.candidate(s) for s in seqs] == [0, 1, 2, 3, 0]  # a repeated sequence is its first candidate
    assert trie.candidate([5, 6]) is None and trie.candidate([5, 6, 8]) is None
    with pytest.raises(ValueError, match="must end with EOS"):
        TokenTrie([[5, 6]], EOS)
    with pytest.raises(ValueError, match="must end with EOS"):
        TokenTrie([[5, EOS, 6, EOS]], EOS)


@pytest.fixture(scope="module")
def setup():
    splits = make_synthetic(num_users=30, num_items=50, seed=3)
    tok = build_tokenizer(splits, vocab_size=500)
    model = tiny_llama(len(tok), tokenizer=tok).eval()
    # Only a few candidates each (cheap beams); prompts of different lengths (left padding is exercised).
    rows = tokenize_examples(splits.test[:6], tok)
    feats = []
    for r in rows:
        keep = sorted({r["target_index"], 0, 1, 2, 3})
        feats.append({"prompt_ids": r["prompt_ids"], "candidate_ids": [r["candidate_ids"][j] for j in keep],
                      "target_index": keep.index(r["target_index"])})
    assert len({len(f["prompt_ids"]) for f in feats}) > 1
    return splits, tok, model, feats


def test_constrained_greedy_matches_naive_loop(setup):
    _, tok, model, feats = setup
    got = constrained_generate(model, tok, feats, num_beams=1, batch_size=4, progress=False)
    want = [naive_constrained_greedy(model, f["prompt_ids"], f["candidate_ids"]) for f in feats]
    assert got == want


def test_beam_search_finds_the_best_candidate(setup):
    _, tok, model, feats = setup
    beams = max(len(f["candidate_ids"]) for f in feats)
    got = constrained_generate(model, tok, feats, num_beams=beams, batch_size=3, progress=False)
    for f, j in zip(feats, got):
        scores = naive_item_scores(model, f["prompt_ids"], f["candidate_ids"])
        best = int(scores.argmax())
        assert j == best or scores[best] - scores[j] < 1e-5  # only a numerical near-tie may differ
    assert len(set(got)) > 1 or len(feats) < 3  # not one fixed column


def test_evaluate_constrained_is_always_valid(setup):
    splits, tok, model, _ = setup
    examples = splits.test[:5]
    res = evaluate_constrained(model, tok, examples, batch_size=2, progress=False, return_answers=True)
    assert res["constrained_valid_ratio"] == 1.0 and res["num_examples"] == 5
    hits = sum(a == ex.target_index for a, ex in zip(res["answers"], examples))
    assert res["constrained_hit_ratio@1"] == hits / 5
    rows = tokenize_examples(examples, tok)
    assert res["answers"] == [naive_constrained_greedy(model, r["prompt_ids"], r["candidate_ids"]) for r in rows]


def test_free_decoding_rules():
    cands = ["Heat", "White Heat", "Up"]
    # "White Heat": exact names one; every substring rule names both (the short title inside the long one).
    assert match_answer(" White Heat", cands, "exact") == [1]
    assert match_answer(" White Heat", cands, "paper") == [0, 1]
    assert match_answer(" White Heat", cands, "llara") == [0, 1]
    # case: the paper's rule is case-sensitive, LLaRA's and the normalised rules are not
    assert match_answer(" heat", cands, "paper") == []
    assert match_answer(" heat", cands, "llara") == [0]
    assert match_answer(" heat", cands, "substring") == [0]
    # chatty answers: the substring rules find the title, exact does not
    chatty = "I think the user will watch Up next, because"
    assert match_answer(chatty, cands, "paper") == [2] and match_answer(chatty, cands, "llara") == [2]
    assert match_answer(chatty, cands, "exact") == []
    answers = [" White Heat", " Up", " up", "nothing", " Heat"]
    targets = [1, 2, 2, 0, 1]
    paper = generation_metrics(answers, [cands] * 5, targets, match="paper")
    assert paper["valid_ratio"] == 2 / 5 and paper["hit_ratio@1"] == 1 / 5  # " Up" hit, " Heat" valid miss
    llara = generation_metrics(answers, [cands] * 5, targets, match="llara")
    assert llara["valid_ratio"] == 3 / 5 and llara["hit_ratio@1"] == 2 / 3  # over the 3 valid rows
    exact = generation_metrics(answers, [cands] * 5, targets, match="exact")
    assert exact["valid_ratio"] == 4 / 5 and exact["hit_ratio@1"] == 3 / 5
    none = generation_metrics(["x", "y"], [cands] * 2, [0, 1], match="llara")
    assert none["valid_ratio"] == 0 and math.isnan(none["hit_ratio@1"])
    with pytest.raises(ValueError, match="match must be one of"):
        generation_metrics(["x"], [cands], [0], match="fuzzy")
