"""The RecBole loader on the real MovieLens-100K (RecBole's atomic files, from the ``recbole`` wheel).

``.ci/run`` fetches the wheel and sets ``SDPO_FAST_ML100K_DIR`` to the folder holding
``ml-100k.inter`` / ``ml-100k.item``; without the variable the module is skipped. Expected values are
computed here from the raw files with plain Python, independently of the loader.
"""

import csv
import os
import re
from collections import defaultdict

import pytest

from sdpo_fast.data import load_dataset, sample_over_users

ML100K = os.environ.get("SDPO_FAST_ML100K_DIR")
pytestmark = pytest.mark.skipif(not ML100K, reason="SDPO_FAST_ML100K_DIR is not set (.ci/run sets it)")


def _raw():
    """``(items {id: (title, year)}, interactions [(user, item, time)])`` straight from the files."""
    with open(os.path.join(ML100K, "ml-100k.item"), encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0][:3] == ["item_id:token", "movie_title:token_seq", "release_year:token"]
    items = {r[0]: (r[1], r[2]) for r in rows[1:]}
    with open(os.path.join(ML100K, "ml-100k.inter"), encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    return items, [(r[0], r[1], float(r[3])) for r in rows[1:]]


@pytest.fixture(scope="module")
def ml100k():
    return load_dataset("recbole", path=ML100K, progress=False)


@pytest.fixture(scope="module")
def raw():
    return _raw()


def test_raw_files_are_ml100k(raw):
    items, inter = raw
    assert len(items) == 1682 and len(inter) == 100_000
    assert len({u for u, _, _ in inter}) == 943


def test_catalog_no_merged_items(ml100k, raw):
    items, inter = raw
    placeholders = {i for i, (t, _) in items.items() if t.lower() in ("unknown", "unkonwn")}
    assert placeholders == {"267"}
    # Same (title, year) entries are one film listed twice; everything else is distinct.
    films = {i: (t, re.search(r"\((\d{4})\)$", t).group(1) if y == "V" else y) for i, (t, y) in items.items()
             if i not in placeholders}
    distinct = set(films.values())
    assert len(distinct) == 1682 - 1 - 18  # 18 ids repeat a film already listed
    titles = set(ml100k.all_titles())
    assert len(titles) == len(distinct) == ml100k.info["catalog_titles"]
    assert {"Cape Fear (1962)", "Cape Fear (1991)", "That Darn Cat! (1965)", "That Darn Cat! (1997)",
            "The Usual Suspects", "Chasing Amy", "Body Snatchers",
            "Land Before Time III: The Time of the Great Giving"} <= titles
    assert not titles & {"unknown", "unkonwn", "Cape Fear", "That Darn Cat!"}
    assert not [t for t in titles if re.search(r"\((V|TV)\)$|\(\d{4}\) \(", t)]
    assert ml100k.info["placeholder_interactions_dropped"] == sum(1 for _, i, _ in inter if i in placeholders)


def test_users_examples_and_every_invariant(ml100k, raw):
    items, inter = raw
    key = {i: (t, y) for i, (t, y) in items.items() if i != "267"}
    per_user = defaultdict(list)
    for user, item, time in inter:
        if item in key:
            per_user[user].append((time, key[item]))
    sequences = {}
    for user, seq in per_user.items():
        seen, order = set(), []
        for _, k in sorted(seq, key=lambda x: x[0]):
            if k not in seen:
                seen.add(k)
                order.append(k)
        sequences[user] = order
    n = sum(max(0, len(s) - 2) for s in sequences.values())
    assert ml100k.info["num_users"] == 943
    assert (len(ml100k.train), len(ml100k.valid), len(ml100k.test)) == (int(0.8 * n), int(0.9 * n) - int(0.8 * n),
                                                                         n - int(0.9 * n))
    examples = ml100k.train + ml100k.valid + ml100k.test
    assert len({ex.example_id for ex in examples}) == n
    catalog = set(ml100k.all_titles())
    user_titles = defaultdict(set)
    for ex in examples:
        user_titles[ex.user_id].update(ex.history)
        user_titles[ex.user_id].add(ex.target)
    for ex in examples:
        assert len(ex.candidates) == 20 and len(set(ex.candidates)) == 20
        assert ex.candidates.count(ex.target) == 1
        assert ex.target not in ex.history and len(ex.history) <= 10
        assert set(ex.candidates) <= catalog
        negatives = set(ex.candidates) - {ex.target}
        assert not negatives & user_titles[ex.user_id], ex.example_id
    # a user's examples walk their raw sequence: history = the (up to) 10 items before position t
    by_user = defaultdict(list)
    for ex in examples:
        by_user[ex.user_id].append(ex)
    assert len(by_user) == sum(1 for s in sequences.values() if len(s) >= 3)
    for user, mine in by_user.items():
        mine.sort(key=lambda e: int(e.example_id.split(":")[1]))
        assert [int(e.example_id.split(":")[1]) for e in mine] == list(range(2, len(sequences[user])))
        walk = list(mine[0].history) + [e.target for e in mine]  # the user's whole sequence as titles
        assert len(set(walk)) == len(walk) == len(sequences[user])  # one title per distinct film
        for t, ex in enumerate(mine, 2):
            assert ex.history == tuple(walk[max(0, t - 10) : t])
    # chronological: every train target before every valid one, before every test one
    assert max(e.timestamp for e in ml100k.train) <= min(e.timestamp for e in ml100k.valid)
    assert max(e.timestamp for e in ml100k.valid) <= min(e.timestamp for e in ml100k.test)
    times = [e.timestamp for e in examples]
    assert times == sorted(times)


def test_sample_over_users_on_ml100k(ml100k):
    train = sample_over_users(ml100k.train, 500, seed=0)
    users = {ex.user_id for ex in ml100k.train}
    assert len(train) == 500 and len({ex.user_id for ex in train}) == 500 <= len(users)
    test = sample_over_users(ml100k.test, 300, seed=0)
    test_users = {ex.user_id for ex in ml100k.test}
    assert len({ex.user_id for ex in test}) == len(test_users)  # 300 examples reach every test user
    assert [e.timestamp for e in test] == sorted(e.timestamp for e in test)
