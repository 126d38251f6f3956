"""Evaluation: matching rules, ranking metrics, and generation / ranking evaluation against naive
implementations on a tiny Llama (per-candidate full forwards, unpadded token-by-token greedy decoding)."""

import json
import math

import pytest
import torch
from conftest import tiny_llama

import sdpo_fast
from sdpo_fast.data import SDPOCollator, build_tokenizer, make_synthetic, tokenize_dataset, tokenize_examples
from sdpo_fast.eval import (
    evaluate_generation,
    evaluate_ranking,
    format_table,
    generation_metrics,
    match_answer,
    normalize_title,
    ranking_metrics,
    save_results,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_matching_rules():
    cands = ["Heat", "White Heat", "Up"]
    assert normalize_title('  "White  HEAT." ') == "white heat"
    assert match_answer(" White Heat", cands, "exact") == [1]
    assert match_answer(" White Heat", cands, "substring") == [0, 1]  # the paper's rule miscounts
    assert match_answer("heat!\nmore text", cands, "exact") == [0]
    assert match_answer("I recommend Heat because", cands, "exact") == []
    assert match_answer("I recommend Heat because", cands, "substring") == [0]
    assert match_answer("", cands, "exact") == [] and match_answer("", cands, "substring") == []
    m = generation_metrics([" White Heat", "Up", "nothing"], [cands] * 3, [1, 0, 2], match="exact")
    assert m == {"hit_ratio@1": 1 / 3, "valid_ratio": 2 / 3, "num_examples": 3}
    m = generation_metrics([" White Heat", "Up", "nothing"], [cands] * 3, [1, 0, 2], match="substring")
    assert m == {"hit_ratio@1": 0.0, "valid_ratio": 1 / 3, "num_examples": 3}
    with pytest.raises(ValueError, match="match must be"):
        match_answer("x", cands, "fuzzy")


def _naive_ranking(scores, targets, k=5):
    hr = ndcg = mrr = 0.0
    for row, t in zip(scores, targets):
        rank = 1 + sum(1 for j, s in enumerate(row) if j != t and s >= row[t])
        hr += rank == 1
        ndcg += 1 / math.log2(rank + 1) if rank <= k else 0.0
        mrr += 1 / rank
    n = len(targets)
    return {"hr@1": hr / n, f"ndcg@{k}": ndcg / n, "mrr": mrr / n, "num_examples": n}


def test_ranking_metrics_naive():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200, 7), generator=g).double()  # many ties
    scores[::7, 5:] = float("-inf")  # fewer candidates on some rows
    targets = torch.randint(0, 5, (200,), generator=g)
    got = ranking_metrics(scores, targets)
    want = _naive_ranking(scores.tolist(), targets.tolist())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    assert ranking_metrics(torch.zeros(4, 20), torch.zeros(4, dtype=torch.long))["hr@1"] == 0.0  # constant scorer
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(torch.full((2, 3), float("nan")), [0, 1])


@pytest.fixture(scope="module")
def setup():
    splits = make_synthetic(num_users=40, num_items=60, seed=2)
    tok = build_tokenizer(splits, vocab_size=600)
    model = tiny_llama(len(tok), tokenizer=tok)
    return splits, tok, model


@torch.no_grad()
def _naive_scores(model, rows, mean=False):
    out = []
    for r in rows:
        scores = []
        for cand in r["candidate_ids"]:
            ids = torch.tensor([r["prompt_ids"] + cand])
            logp = model(ids).logits[0].double().log_softmax(-1)
            s = sum(logp[len(r["prompt_ids"]) + i - 1, t].item() for i, t in enumerate(cand))
            scores.append(s / len(cand) if mean else s)
        out.append(scores)
    return out


def test_ranking_eval_matches_naive(setup):
    splits, tok, model = setup
    model.eval()
    examples = splits.test[:5]
    rows = tokenize_examples(examples, tok)
    results = {}
    for score in ("sum", "mean"):
        res = evaluate_ranking(model, tok, examples, batch_size=2, max_tokens_per_row=700, backend="torch",
                               score=score, return_scores=True, progress=False)
        naive = _naive_scores(model, rows, mean=score == "mean")
        torch.testing.assert_close(torch.tensor(res["scores"], dtype=torch.float64), torch.tensor(naive, dtype=torch.float64),
                                   atol=2e-4, rtol=1e-5)
        want = _naive_ranking(naive, [r["target_index"] for r in rows])
        for key in want:
            assert res[key] == pytest.approx(want[key], abs=1e-12)
        results[score] = res
    # tokenised dataset rows, all users in one row, give the same scores
    ds = tokenize_dataset(examples, tok)
    again = evaluate_ranking(model, tok, ds, batch_size=5, backend="torch", progress=False, return_scores=True)
    torch.testing.assert_close(torch.tensor(again["scores"]), torch.tensor(results["sum"]["scores"]), atol=1e-4, rtol=1e-5)


def _sft(model, tok, examples, steps=80):
    """A few SFT steps (chosen-only groups through candidate_logprobs) so greedy answers name titles."""
    ds = tokenize_dataset(examples, tok)
    batch = SDPOCollator(tok, num_negatives=0)([ds[i] for i in range(len(ds))]).packed
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = -sdpo_fast.candidate_logprobs(model, batch, backend="torch")[:, 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def _naive_greedy(model, tok, prompt, max_new):
    ids = list(prompt)
    out = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        ids.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_generation_eval_matches_naive(setup, tmp_path):
    splits, tok, model = setup
    train = splits.train[:6]
    assert _sft(model, tok, train) < 1.0
    examples = train + splits.test[:3]  # memorised ones (hits) and unseen ones
    rows = tokenize_examples(examples, tok)
    max_new = max(len(c) for r in rows for c in r["candidate_ids"]) + 4
    naive = [_naive_greedy(model, tok, r["prompt_ids"], max_new) for r in rows]

    def norm(s):
        return " ".join(s.lower().split())

    for match in ("exact", "substring"):
        res = evaluate_generation(model, tok, examples, batch_size=4, match=match, return_answers=True, progress=False)
        assert res["answers"] == naive
        hit = valid = 0
        for a, ex in zip(naive, examples):
            named = [c for c in ex.candidates if (norm(c) == norm(a) if match == "exact" else norm(c) in norm(a))]
            valid += len(named) == 1
            hit += named == [ex.target]
        assert res["hit_ratio@1"] == hit / len(examples) and res["valid_ratio"] == valid / len(examples)
    assert res["hit_ratio@1"] >= 0.5  # the SFT'd examples are answered: the comparison is not vacuous

    ranking = evaluate_ranking(model, tok, examples, backend="torch", progress=False)
    results = {"tiny-sft": {**ranking, **{k: res[k] for k in ("hit_ratio@1", "valid_ratio")}}}
    save_results(tmp_path / "out" / "results.json", results)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    table = format_table(results)
    header, rule, line = table.splitlines()
    assert header.split() == ["model", "hr@1", "ndcg@5", "mrr", "hit_ratio@1", "valid_ratio", "num_examples"]
    assert line.split()[0] == "tiny-sft" and float(line.split()[1]) == pytest.approx(ranking["hr@1"], abs=1e-4)
