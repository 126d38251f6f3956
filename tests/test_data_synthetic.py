"""Synthetic default: determinism, invariants, chronological split, and an honest, learnable metric."""

import pytest

from sdpo_fast.data import format_prompt, load_dataset, make_synthetic
from sdpo_fast.data.prompts import TEMPLATES
from sdpo_fast.eval import CooccurrenceScorer, PopularityScorer, RandomScorer, evaluate_scorer


@pytest.fixture(scope="module")
def default():
    return load_dataset("synthetic")


def test_deterministic_and_configurable():
    a = make_synthetic(num_users=40, num_items=60, seed=3)
    b = make_synthetic(num_users=40, num_items=60, seed=3)
    c = make_synthetic(num_users=40, num_items=60, seed=4)
    assert a.train == b.train and a.valid == b.valid and a.test == b.test
    assert a.train != c.train
    small = make_synthetic(num_users=10, num_items=40, min_interactions=4, max_interactions=4, num_candidates=8, max_history=2)
    exs = small.train + small.valid + small.test
    assert len(exs) == 10 * (4 - 2)  # one example per position with >= 2 history items
    assert all(len(e.candidates) == 8 and len(e.history) == 2 for e in exs)
    assert len({t for e in exs for t in e.candidates}) <= 40
    with pytest.raises(ValueError, match="too small"):
        make_synthetic(num_items=20)


def test_invariants_and_split(default):
    exs = default.train + default.valid + default.test
    assert len(default.train) > 3000 and len(default.test) > 400
    for ex in exs:
        assert 2 <= len(ex.history) <= 10
        assert len(ex.candidates) == 20 and len(set(ex.candidates)) == 20
        assert ex.candidates.count(ex.target) == 1
        assert not set(ex.history) & set(ex.candidates)
        assert all(t[0].isupper() for t in ex.candidates)  # readable titles
    assert max(e.timestamp for e in default.train) <= min(e.timestamp for e in default.valid)
    assert max(e.timestamp for e in default.valid) <= min(e.timestamp for e in default.test)
    # users appear in several splits: the split is by time, not by user
    assert {e.user_id for e in default.train} & {e.user_id for e in default.test}
    # hard negatives exist: most examples offer a negative of the target's genre
    genre = default.info["genres"]
    same = sum(any(genre[c] == genre[e.target] for c in e.candidates if c != e.target) for e in exs)
    assert same / len(exs) > 0.8


def test_baselines_learnable_and_metric_honest(default):
    co = evaluate_scorer(CooccurrenceScorer().fit(default.train), default.test)
    pop = evaluate_scorer(PopularityScorer().fit(default.train), default.test)
    everything = default.train + default.valid + default.test
    rnd = evaluate_scorer(RandomScorer(seed=0), everything)
    assert co["hr@1"] > 0.3, co  # 6x chance
    assert pop["hr@1"] > 0.12, pop
    assert abs(rnd["hr@1"] - 1 / 20) < 0.012, rnd  # n = 5166: 4 standard deviations
    # expected random MRR = mean(1/r) over r = 1..20
    assert abs(rnd["mrr"] - sum(1 / r for r in range(1, 21)) / 20) < 0.02, rnd


def test_prompts(default):
    ex = default.test[0]
    text = format_prompt(ex, template=0)
    assert text.startswith("This user has watched " + ", ".join(ex.history) + " in the previous.")
    assert "Choose the answer from the following 20 movie titles: " + ", ".join(ex.candidates) + ". Answer:" in text
    assert text.endswith("Answer:")
    # one template per example, chosen by seed, stable
    chosen = [format_prompt(e, seed=0) for e in default.test[:60]]
    assert chosen == [format_prompt(e, seed=0) for e in default.test[:60]]
    assert len({c.split(" ")[0] for c in chosen}) == len(TEMPLATES)
    assert chosen != [format_prompt(e, seed=1) for e in default.test[:60]]
    with pytest.raises(ValueError, match="template"):
        format_prompt(ex, template=len(TEMPLATES))


def test_baseline_cli(tmp_path, capsys):
    from sdpo_fast.eval import main

    assert main(["--data", "synthetic", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "co-occurrence" in out and "hr@1" in out
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) == {"random", "popularity", "co-occurrence"}
    assert res["co-occurrence"]["hr@1"] > res["popularity"]["hr@1"] > res["random"]["hr@1"]
