"""Catalog hygiene, the RecBole and S-DPO JSON loaders, and the user-spread sample: small files
written here in each format, loaded and checked exactly."""

import json
from collections import Counter

import pytest

from sdpo_fast.data import (
    DataFormatError,
    RecExample,
    build_catalog,
    clean_title,
    load_dataset,
    load_movielens,
    load_recbole,
    load_sdpo_json,
    sample_over_users,
)

# ------------------------------------------------------------------------------------------ catalog


def test_clean_title_markers_years_articles():
    assert clean_title("Land Before Time III: The Time of the Great Giving (1995) (V)") == (
        "Land Before Time III: The Time of the Great Giving"
    )
    assert clean_title("Some Show (1990) (TV)") == "Some Show"
    assert clean_title("Good, The Bad and The Ugly, The (1966)") == "The Good, The Bad and The Ugly"
    assert clean_title("Blue Angel, The (Blaue Engel, Der)") == "The Blue Angel (Blaue Engel, Der)"
    assert clean_title("  Seven   (Se7en) ") == "Seven (Se7en)"


def test_build_catalog_rule():
    cat = build_catalog([
        (1, "Cape Fear (1962)", None),
        (2, "Cape Fear (1991)", None),
        (3, "unknown", None),
        (4, "Chasing Amy (1997)", None),
        (5, "Chasing Amy (1997)", None),  # the same film listed twice
        (6, "Toy Story", "1995"),
        (7, "That Darn Cat!", "1965"),
        (8, "That Darn Cat!", "1997"),
        (9, "That Darn Cat!", "1997"),
        (10, "Land Before Time III: The Time of the Great Giving (1995)", "V"),
        (11, "Unkonwn", "unkonwn"),
        (12, "Heat", None),
        (13, "Heat", None),  # no year to tell them apart: the id
        (14, "Usual Suspects, The", "1995"),
    ])
    assert cat.titles == {
        1: "Cape Fear (1962)",
        2: "Cape Fear (1991)",
        4: "Chasing Amy",
        5: "Chasing Amy",
        6: "Toy Story",
        7: "That Darn Cat! (1965)",
        8: "That Darn Cat! (1997)",
        9: "That Darn Cat! (1997)",
        10: "Land Before Time III: The Time of the Great Giving",
        12: "Heat [id 12]",
        13: "Heat [id 13]",
        14: "The Usual Suspects",
    }
    assert cat.dropped == [3, 11]
    assert cat.duplicates == {5: 4, 9: 8}
    summary = cat.summary()
    assert summary["catalog_titles"] == 10 and summary["titles_disambiguated"] == 6


def test_build_catalog_second_collision():
    # "X (1995)" is a real title and also what disambiguation would make of X from 1995
    cat = build_catalog([(1, "X", "1995"), (2, "X", "1996"), (3, "X (1995) (V)", "2000")])
    assert len(set(cat.titles.values())) == 3
    assert cat.titles[2] == "X (1996)"


def test_movielens_u_item_uses_the_rule(tmp_path):
    root = tmp_path / "ml"
    root.mkdir()
    movies = ["Cape Fear (1962)", "Cape Fear (1991)", "unknown", "Chasing Amy (1997)", "Chasing Amy (1997)",
              "Land Before Time III: The Time of the Great Giving (1995) (V)"] + [f"Film {i} (1980)" for i in range(60)]
    with open(root / "u.item", "w", encoding="latin-1") as f:
        for i, t in enumerate(movies, 1):
            date = "" if t == "unknown" else "01-Jan-1995"
            f.write(f"{i}|{t}|{date}||http://x|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
    lines = [(1, i, 10 * i) for i in range(1, 7)] + [(2, i, i) for i in range(7, 27)] + [(4, i, i) for i in range(27, 67)]
    (root / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in lines))
    splits = load_movielens(root)
    by_id = {ex.example_id: ex for _, part in splits.items() for ex in part}
    # user 1: 1, 2, (3 unknown dropped), 4, (5 = 4 again, dropped), 6
    assert by_id["1:2"].history == ("Cape Fear (1962)", "Cape Fear (1991)")
    assert by_id["1:2"].target == "Chasing Amy"
    assert by_id["1:3"].target == "Land Before Time III: The Time of the Great Giving"
    assert "1:4" not in by_id
    assert splits.info["placeholder_interactions_dropped"] == 1
    assert splits.info["duplicate_items_merged"] == {"5": "4"}
    titles = splits.all_titles()
    assert "unknown" not in titles and "Cape Fear" not in titles


# ------------------------------------------------------------------------------------------ RecBole


def _write_recbole(root, items, inter, name="toy"):
    root.mkdir(exist_ok=True)
    (root / f"{name}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{t}\t{y}\tDrama\n" for i, t, y in items), encoding="utf-8")
    (root / f"{name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in inter))


TOY_ITEMS = [(1, "Cape Fear", 1962), (2, "Cape Fear", 1991), (3, "unkonwn", "unkonwn"), (4, "Usual Suspects, The", 1995)] + [
    (i, f"Film {i}", 1990) for i in range(5, 65)
]


def test_recbole_loader_exact(tmp_path):
    # user a: 4, 1, 3 (placeholder), 2 by time, lines out of order; b: 20 films, d: 40; c: 2 items
    inter = [("a", 1, 20), ("a", 4, 10), ("a", 2, 40), ("a", 3, 30)]
    inter += [("b", i, 100 + i) for i in range(5, 25)] + [("d", i, 200 + i) for i in range(25, 65)] + [("c", 5, 1), ("c", 6, 2)]
    _write_recbole(tmp_path / "rb", TOY_ITEMS, inter)
    splits = load_dataset("recbole", path=tmp_path / "rb")
    again = load_dataset(tmp_path / "rb")  # recognised by the .inter file
    examples = splits.train + splits.valid + splits.test
    assert examples == again.train + again.valid + again.test
    assert splits.info["source"] == "recbole:toy" and splits.info["placeholder_interactions_dropped"] == 1
    by_id = {ex.example_id: ex for ex in examples}
    assert by_id["a:2"].history == ("The Usual Suspects", "Cape Fear (1962)")
    assert by_id["a:2"].target == "Cape Fear (1991)"
    assert len(examples) == 1 + 18 + 38  # a: one example, b: 20 - 2, d: 40 - 2, c: none
    assert {ex.domain for ex in examples} == {"item"}
    for ex in examples:
        assert len(ex.candidates) == 20 and len(set(ex.candidates)) == 20 and ex.candidates.count(ex.target) == 1
        assert ex.target not in ex.history
    assert load_recbole(tmp_path / "rb", domain="movie").train[0].domain == "movie"


@pytest.mark.parametrize(
    "item_text, inter_text, match",
    [
        (None, "user_id\titem_id\n", r"toy\.inter, line 1: header cell 'user_id' is not 'name:type'"),
        (None, "user_id:token\titem_id:token\ttimestamp:float\na\t1\t5\nb\t2\n",
         r"toy\.inter, line 3: expected 3 tab-separated fields"),
        (None, "user_id:token\titem_id:token\ttimestamp:float\na\t1\tlater\n", r"toy\.inter, line 2: timestamp must be a number"),
        (None, "user_id:token\titem_id:token\ttimestamp:float\na\t99\t5\n", r"toy\.inter, line 2: item 99 has no title"),
        (None, "user:token\titem_id:token\n", r"toy\.inter, line 1: no user id column"),
        ("item_id:token\tgenre:token\n1\tDrama\n", None, r"toy\.item, line 1: no title column"),
        ("item_id:token\ttitle:token_seq\n1\tA\n1\tB\n", None, r"toy\.item, line 3: item_id 1 listed twice"),
    ],
)
def test_recbole_errors_name_file_and_line(tmp_path, item_text, inter_text, match):
    root = tmp_path / "rb"
    _write_recbole(root, TOY_ITEMS, [("a", 1, 1)])
    if item_text is not None:
        (root / "toy.item").write_text(item_text)
    if inter_text is not None:
        (root / "toy.inter").write_text(inter_text)
    with pytest.raises(DataFormatError, match=match):
        load_recbole(root)


def test_recbole_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_recbole(tmp_path / "nowhere")
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\n")
    with pytest.raises(FileNotFoundError, match=r"x\.item"):
        load_recbole(tmp_path)
    (tmp_path / "y.inter").write_text("user_id:token\titem_id:token\n")
    with pytest.raises(FileNotFoundError, match="expected one"):
        load_recbole(tmp_path)


# ------------------------------------------------------------------------------------------ S-DPO JSON


def _paper_record(rng_titles, history, target):
    items = [t for t in rng_titles if t != target][:19] + [target]
    return {"historyList": "::".join(history), "itemList": items, "trueSelection": target}


def test_sdpo_json_loader_exact(tmp_path, capsys):
    titles = [f"Artist {i}" for i in range(25)]
    train = [_paper_record(titles, ["Artist 1", "Artist 2"], "Artist 3"), _paper_record(titles, ["Artist 4"], "Artist 0")]
    train[1]["historyList"] = ["Artist 4", "Artist 5"]  # a list is accepted too
    test = [_paper_record(titles, ["Artist 7", "Artist 8", "Artist 9"], "Artist 24")]
    (tmp_path / "lastfm-train.json").write_text(json.dumps(train, indent=4))
    (tmp_path / "lastfm-test.json").write_text(json.dumps(test))
    splits = load_dataset("sdpo", path=tmp_path)
    assert "read lastfm-train.json, lastfm-test.json; no valid split" in capsys.readouterr().err
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (2, 0, 1)
    assert splits.info["missing_splits"] == ["valid"]
    assert splits.train[0].history == ("Artist 1", "Artist 2") and splits.train[0].target == "Artist 3"
    assert splits.train[1].history == ("Artist 4", "Artist 5")
    assert splits.train[0].candidates == tuple(train[0]["itemList"])
    assert splits.test[0].domain == "music"
    assert splits.test[0].target_index == 19
    (tmp_path / "lastfm-val.json").write_text(json.dumps(test))
    assert len(load_dataset(tmp_path).valid) == 1  # recognised by the file names


@pytest.mark.parametrize(
    "content, match",
    [
        ("[{\"historyList\": \"A\"", r"lastfm-train\.json, line 1: invalid JSON"),
        ("{}", r"lastfm-train\.json: expected a JSON list"),
        ('[{"historyList": "A", "itemList": ["B", "C"], "trueSelection": "B"}, {"historyList": "A", "itemList": ["B"]}]',
         r"lastfm-train\.json: record 1 \(0-based\): missing field 'trueSelection'"),
        ('[{"historyList": "A", "itemList": ["B", "C"], "trueSelection": "D"}]',
         r"record 0 \(0-based\): .*target 'D' appears 0 times"),
        ('[{"historyList": 5, "itemList": ["B"], "trueSelection": "B"}]', r"record 0 \(0-based\): 'historyList' must be"),
        ('[{"historyList": "A", "itemList": ["B", "B"], "trueSelection": "B"}]', r"record 0 \(0-based\): .*duplicate"),
    ],
)
def test_sdpo_json_errors_name_file_and_record(tmp_path, content, match):
    (tmp_path / "lastfm-train.json").write_text(content)
    with pytest.raises(DataFormatError, match=match):
        load_sdpo_json(tmp_path, verbose=False)


def test_sdpo_json_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="none"):
        load_sdpo_json(tmp_path)
    (tmp_path / "a-train.json").write_text("[]")
    (tmp_path / "b-test.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="a, b"):
        load_sdpo_json(tmp_path)
    assert len(load_sdpo_json(tmp_path, name="a", verbose=False).train) == 0


# ------------------------------------------------------------------------------------------ sampling


def _examples(per_user):
    out = []
    t = 0
    for user, n in per_user.items():
        for k in range(n):
            out.append(RecExample(user, ("h",), ("x", f"t{user}{k}"), f"t{user}{k}", timestamp=float(t), example_id=f"{user}:{k}"))
            t += 1
    return sorted(out, key=lambda e: e.timestamp)


def test_sample_over_users_spreads_and_is_seeded():
    examples = _examples({"a": 50, "b": 3, "c": 10, "d": 1, "e": 20})
    got = sample_over_users(examples, 12, seed=0)
    counts = Counter(ex.user_id for ex in got)
    assert len(got) == 12 and len(set(ex.example_id for ex in got)) == 12
    # 5 users: one each, then rounds over those with examples left (d has one): 3 or 2 per user
    assert counts["d"] == 1 and all(counts[u] in (2, 3) for u in "abce") and sum(counts.values()) == 12
    assert [ex.timestamp for ex in got] == sorted(ex.timestamp for ex in got)
    # depends on the examples, not on their order in the input (the input order is kept)
    assert sample_over_users(list(reversed(examples)), 12, seed=0) == got[::-1]
    assert sample_over_users(examples, 12, seed=1) != got
    assert len({ex.user_id for ex in sample_over_users(examples, 3, seed=0)}) == 3
    assert sample_over_users(examples, None) == examples and sample_over_users(examples, 1000) == examples
    with pytest.raises(ValueError):
        sample_over_users(examples, -1)
