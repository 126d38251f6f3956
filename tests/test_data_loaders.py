"""Loaders: small files in each real format, written here, loaded and checked exactly."""

import json

import pytest

from sdpo_fast.data import (
    DataFormatError,
    RecExample,
    clean_goodreads_title,
    clean_movielens_title,
    load_dataset,
    load_goodreads,
    load_jsonl,
    load_lastfm,
    load_movielens,
)


def _all(splits):
    return splits.train + splits.valid + splits.test


def _check_common(splits, sequences, catalog, num_candidates=20, max_history=10, min_seq_len=3):
    """Every example against the expected per-user sequences (title lists in time order)."""
    examples = _all(splits)
    expected = {}
    for user, seq in sequences.items():
        for t in range(min_seq_len - 1, len(seq)):
            expected[f"{user}:{t}"] = (tuple(seq[max(0, t - max_history) : t]), seq[t])
    assert {ex.example_id for ex in examples} == set(expected)
    for ex in examples:
        history, target = expected[ex.example_id]
        assert ex.history == history
        assert ex.target == target
        assert len(ex.candidates) == num_candidates
        assert len(set(ex.candidates)) == num_candidates
        assert ex.candidates.count(ex.target) == 1
        seen = set(sequences[ex.user_id])
        assert not (set(ex.candidates) - {ex.target}) & seen, "a negative the user interacted with"
        assert set(ex.candidates) <= set(catalog)
    # chronological 8:1:1 split by target time
    n = len(examples)
    assert (len(splits.train), len(splits.valid)) == (int(0.8 * n + 1e-9), int(0.9 * n + 1e-9) - int(0.8 * n + 1e-9))
    times = [ex.timestamp for ex in splits.train + splits.valid + splits.test]
    assert times == sorted(times)
    # shuffled, not in catalog order
    assert any(list(ex.candidates) != sorted(ex.candidates) for ex in examples)


# ----------------------------------------------------------------------------------- MovieLens

MOVIES = [
    "Toy Story (1995)",
    "Usual Suspects, The (1995)",
    "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
    "Clockwork Orange, A (1971)",
] + [f"Film Number {i} (19{50 + i})" for i in range(4, 34)]
MOVIE_TITLES = [clean_movielens_title(t) for t in MOVIES]


def _write_movielens(root, data_lines):
    root.mkdir(exist_ok=True)
    with open(root / "u.item", "w", encoding="latin-1") as f:
        for i, t in enumerate(MOVIES, 1):
            f.write(f"{i}|{t}|01-Jan-1995||http://x|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
    (root / "u.data").write_text("".join(data_lines))


def _movielens_lines():
    # user 1: items 2, 1, 3, 4 by time (lines out of order); user 2: 13 items; user 7: 2 items (dropped);
    # users 50+: two ratings each, so every title is in the catalog.
    lines = {}
    lines[1] = [(3, 300), (2, 100), (4, 400), (1, 200)]
    lines[2] = [(i, 1000 + 10 * i) for i in range(5, 18)]
    lines[7] = [(20, 50), (21, 60)]
    for k, item in enumerate(range(1, len(MOVIES) + 1, 2)):
        lines[50 + k] = [(item, 5), (item + 1 if item < len(MOVIES) else 1, 6)]
    out = []
    for user, pairs in lines.items():
        for item, ts in pairs:
            out.append(f"{user}\t{item}\t4\t{ts}\n")
    seqs = {str(u): [MOVIE_TITLES[i - 1] for i, _ in sorted(p, key=lambda x: x[1])] for u, p in lines.items()}
    return out, seqs


def test_movielens_titles():
    assert clean_movielens_title("Usual Suspects, The (1995)") == "The Usual Suspects"
    assert clean_movielens_title("Toy Story (1995)") == "Toy Story"
    assert clean_movielens_title("Clockwork Orange, A (1971)") == "A Clockwork Orange"
    assert (
        clean_movielens_title("City of Lost Children, The (Cité des enfants perdus, La) (1995)")
        == "The City of Lost Children (Cité des enfants perdus, La)"
    )
    assert clean_movielens_title("Theory of Flight, The (1998)") == "The Theory of Flight"
    assert clean_movielens_title("unknown") == "unknown"


def test_movielens_load_exact(tmp_path):
    lines, seqs = _movielens_lines()
    _write_movielens(tmp_path / "ml", lines)
    splits = load_movielens(tmp_path / "ml")
    assert {ex.domain for ex in _all(splits)} == {"movie"}
    _check_common(splits, {u: s for u, s in seqs.items() if len(s) >= 3}, MOVIE_TITLES)
    by_id = {ex.example_id: ex for ex in _all(splits)}
    assert by_id["1:2"].history == ("The Usual Suspects", "Toy Story")
    assert by_id["1:2"].target == "The City of Lost Children (Cité des enfants perdus, La)"
    assert by_id["1:3"].target == "A Clockwork Orange"
    assert len(by_id["2:12"].history) == 10 and by_id["2:12"].history[0] == MOVIE_TITLES[6]
    assert not any(ex.user_id == "7" for ex in _all(splits))
    # deterministic; the seed changes the candidates
    again = load_dataset(tmp_path / "ml")  # dispatch by directory contents
    assert _all(again) == _all(splits)
    other = load_movielens(tmp_path / "ml", seed=1)
    assert [ex.candidates for ex in _all(other)] != [ex.candidates for ex in _all(splits)]
    small = load_dataset("movielens", path=tmp_path / "ml", max_history=2, num_candidates=5)
    assert all(len(ex.history) <= 2 and len(ex.candidates) == 5 for ex in _all(small))


def test_movielens_errors(tmp_path):
    lines, _ = _movielens_lines()
    root = tmp_path / "ml"
    _write_movielens(root, lines)
    (root / "u.item").unlink()
    with pytest.raises(FileNotFoundError, match="u.item"):
        load_movielens(root)
    _write_movielens(root, lines[:2] + ["1\t5\t3\n"] + lines[2:])
    with pytest.raises(DataFormatError, match=r"u\.data, line 3: expected 4 tab-separated"):
        load_movielens(root)
    _write_movielens(root, lines[:4] + ["1\t5\t3\tyesterday\n"])
    with pytest.raises(DataFormatError, match=r"u\.data, line 5: timestamp must be a number"):
        load_movielens(root)
    _write_movielens(root, ["1\t999\t3\t5\n"])
    with pytest.raises(DataFormatError, match=r"line 1: item 999 has no title"):
        load_movielens(root)


# ----------------------------------------------------------------------------------- LastFM


def _write_lastfm(root, names, pairs, tags):
    root.mkdir(exist_ok=True)
    (root / "artists.dat").write_text(
        "id\tname\turl\tpictureURL\n" + "".join(f"{i}\t{n}\thttp://a\thttp://p\n" for i, n in names.items()), encoding="utf-8"
    )
    (root / "user_artists.dat").write_text("userID\tartistID\tweight\n" + "".join(f"{u}\t{a}\t{w}\n" for u, a, w in pairs))
    (root / "user_taggedartists-timestamps.dat").write_text(
        "userID\tartistID\ttagID\ttimestamp\n" + "".join(f"{u}\t{a}\t{t}\t{ts}\n" for u, a, t, ts in tags)
    )


def test_lastfm_load_exact(tmp_path):
    names = {i: f"Artist {i}" for i in range(1, 31)}
    names[3] = "Björk"
    pairs, tags = [], []
    # user 2: artists 3, 1, 5, 9 by first tag time; artist 7 listened but never tagged (dropped)
    order = {3: 1000, 1: 2000, 5: 3000, 9: 4000}
    for a, ts in order.items():
        pairs.append((2, a, 100))
        tags.append((2, a, 11, ts + 5000))  # a later tag: the first one counts
        tags.append((2, a, 12, ts))
    pairs.append((2, 7, 50))
    # filler users put every artist in the catalog (sequences of 2: no examples)
    for k, a in enumerate(range(1, 31, 2)):
        for b, ts in ((a, 10), (a + 1, 20)):
            pairs.append((100 + k, b, 1))
            tags.append((100 + k, b, 1, ts))
    _write_lastfm(tmp_path / "fm", names, pairs, tags)
    splits = load_dataset(tmp_path / "fm")
    seq = ["Björk", "Artist 1", "Artist 5", "Artist 9"]
    _check_common(splits, {"2": seq}, list(names.values()))
    assert splits.info["untimed_pairs_dropped"] == 1
    assert {ex.domain for ex in _all(splits)} == {"music"}
    ex = {e.example_id: e for e in _all(splits)}["2:3"]
    assert ex.history == ("Björk", "Artist 1", "Artist 5") and ex.target == "Artist 9"
    assert ex.timestamp == 4000.0


def test_lastfm_errors(tmp_path):
    root = tmp_path / "fm"
    _write_lastfm(root, {1: "A"}, [(1, 1, 3)], [(1, 1, 1, 5)])
    (root / "user_taggedartists-timestamps.dat").write_text("userID\tartistID\ttagID\ttimestamp\n1\t1\t1\n")
    with pytest.raises(DataFormatError, match=r"user_taggedartists-timestamps\.dat, line 2: expected 4"):
        load_lastfm(root)
    (root / "artists.dat").write_text("name\tid\n")
    with pytest.raises(DataFormatError, match=r"artists\.dat, line 1: expected a header"):
        load_lastfm(root)
    (root / "user_artists.dat").unlink()
    with pytest.raises(FileNotFoundError, match="user_artists.dat"):
        load_lastfm(root)


# ----------------------------------------------------------------------------------- Goodreads

BOOKS = {str(100 + i): f"Book {i} (Series, #{i})" for i in range(25)}
BOOKS["100"] = "Harry Potter and the Sorcerer's Stone (Harry Potter, #1)"
BOOKS["101"] = "Dune"


def test_goodreads_titles():
    assert clean_goodreads_title("Harry Potter and the Sorcerer's Stone (Harry Potter, #1)") == "Harry Potter and the Sorcerer's Stone"
    assert clean_goodreads_title("Dune") == "Dune"
    assert clean_goodreads_title("The  Hobbit (Middle-earth)") == "The Hobbit"


def _goodreads_rows():
    dates = ["Thu Mar 24 08:23:37 -0700 2016", "Mon Jan 04 10:00:00 -0800 2016", "Sat Jun 11 12:00:00 -0700 2016"]
    rows = [{"user_id": "u1", "book_id": b, "date_added": d, "rating": 4} for b, d in zip(["100", "101", "102"], dates)]
    for k, b in enumerate(BOOKS):  # filler, one book each
        rows.append({"user_id": f"f{k}", "book_id": b, "date_added": dates[0], "rating": 3})
    # u1 in time order: 101 (Jan), 100 (Mar), 102 (Jun)
    return rows, ["Dune", "Harry Potter and the Sorcerer's Stone", "Book 2"]


def test_goodreads_json_and_csv(tmp_path):
    rows, seq = _goodreads_rows()
    inter = tmp_path / "interactions.json"
    inter.write_text("".join(json.dumps(r) + "\n" for r in rows))
    titles = tmp_path / "books.json"
    titles.write_text("".join(json.dumps({"book_id": b, "title": t, "authors": []}) + "\n" for b, t in BOOKS.items()))
    catalog = [clean_goodreads_title(t) for t in BOOKS.values()]
    splits = load_dataset("goodreads", path=inter, titles=titles)
    _check_common(splits, {"u1": seq}, catalog)
    (ex,) = _all(splits)
    assert ex.history == ("Dune", "Harry Potter and the Sorcerer's Stone") and ex.domain == "book"

    # CSV: numeric timestamps, titles with commas quoted
    inter_csv = tmp_path / "interactions.csv"
    lines = ["user_id,book_id,is_read,timestamp"]
    lines += [f"u1,{b},1,{ts}" for b, ts in [("102", 30), ("100", 20), ("101", 10)]]
    lines += [f"f{k},{b},1,5" for k, b in enumerate(BOOKS)]
    inter_csv.write_text("\n".join(lines) + "\n")
    titles_csv = tmp_path / "books.csv"
    titles_csv.write_text("book_id,title\n" + "".join(f'{b},"{t}"\n' for b, t in BOOKS.items()))
    splits_csv = load_goodreads(inter_csv, titles_csv)
    _check_common(splits_csv, {"u1": seq}, catalog)


def test_goodreads_errors(tmp_path):
    rows, _ = _goodreads_rows()
    titles = tmp_path / "books.json"
    titles.write_text("".join(json.dumps({"book_id": b, "title": t}) + "\n" for b, t in BOOKS.items()))
    inter = tmp_path / "interactions.json"
    inter.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"interactions\.json, line 2: invalid JSON"):
        load_goodreads(inter, titles)
    inter.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"user_id": "u1", "date_added": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"line 2: missing field 'book_id'"):
        load_goodreads(inter, titles)
    inter.write_text(json.dumps(dict(rows[0], date_added="someday")) + "\n")
    with pytest.raises(DataFormatError, match=r"line 1: unreadable time"):
        load_goodreads(inter, titles)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_goodreads(inter, tmp_path / "nope.json")


# ----------------------------------------------------------------------------------- JSONL


def test_jsonl_generic(tmp_path):
    cands = [f"Item {i}" for i in range(5)]
    recs = [{"history": ["a", "b"], "candidates": cands, "target": cands[i % 5], "timestamp": 10 - i} for i in range(10)]
    path = tmp_path / "ex.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    splits = load_dataset(path)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (8, 1, 1)
    # sorted by timestamp: the last line (timestamp 1) comes first
    assert splits.train[0].target == cands[9 % 5] and splits.test[0].target == cands[0]
    assert splits.train[0] == RecExample("9", ("a", "b"), tuple(cands), cands[4], "item", 1.0, "line10")

    with_split = [dict(r, split=s, domain="book") for r, s in zip(recs, ["test", "train"] * 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in with_split))
    splits = load_jsonl(path)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (5, 0, 5)
    assert splits.test[0].domain == "book"

    bad = dict(recs[0], target="missing")
    path.write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match=r"ex\.jsonl, line 3: .*target 'missing' appears 0 times"):
        load_jsonl(path)
    path.write_text(json.dumps({"history": [], "candidates": cands}) + "\n")
    with pytest.raises(DataFormatError, match=r"line 1: missing field 'target'"):
        load_jsonl(path)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nosuch'"):
        load_dataset("nosuch")
    with pytest.raises(ValueError, match="cannot tell the dataset format"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="needs path"):
        load_dataset("movielens")
