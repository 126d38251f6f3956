"""Loaders for the paper's three datasets (from local files), RecBole atomic files, the S-DPO paper's
own JSON files and a generic JSONL format.

Every loader returns ``DatasetSplits`` of ``RecExample`` built by ``sequences.splits_from_sequences``
(history <= 10, sequences >= 3, 20 shuffled candidates, chronological 8:1:1 split). Missing files raise
``FileNotFoundError`` naming the file; malformed lines raise ``DataFormatError`` (a ``ValueError``)
naming the file and the 1-based line number.

Formats:

* MovieLens-100K (directory with ``u.data`` and ``u.item``): ``u.data`` is ``user \\t item \\t rating
  \\t timestamp``; ``u.item`` is ``id|title|release date|video date|url|genre flags...`` in latin-1.
  Every rating counts as an interaction. Titles follow the catalog rule of ``catalog`` (video
  marker and trailing ``(year)`` removed, trailing article moved to the front: ``"Usual Suspects, The
  (1995)"`` -> ``"The Usual Suspects"``; placeholders such as ``"unknown"`` dropped; titles shared by
  items of different years get the year back: ``"Cape Fear (1962)"``, ``"Cape Fear (1991)"``).
* RecBole atomic files (``load_recbole``: ``<name>.inter`` + ``<name>.item`` with ``name:type``
  headers), e.g. RecBole's ML-100K; the same catalog rule.
* The S-DPO paper's files (``load_sdpo_json``: ``<name>-train.json`` / ``-val.json`` / ``-test.json``,
  JSON lists of ``historyList`` / ``itemList`` / ``trueSelection`` records); malformed records are
  named by their 0-based index in the list.
* LastFM hetrec-2011 (directory with ``user_artists.dat``, ``artists.dat``,
  ``user_taggedartists-timestamps.dat``, tab-separated with a header line): an interaction is a
  (user, artist) pair of ``user_artists.dat``; its time is the first time the user tagged that
  artist (``user_taggedartists-timestamps.dat``, milliseconds). Pairs the user never tagged have no
  time and are left out (the sequence order would be unknown).
* Goodreads: an interactions file (``.json``/``.jsonl``: one object per line with ``user_id``,
  ``book_id`` and a time among ``timestamp``, ``date_added``, ``date_updated``, ``read_at``,
  ``started_at``; or ``.csv`` with a header containing ``user_id``, ``book_id`` and optionally one of
  those time columns, else file order) plus a titles file (``.json``/``.jsonl`` objects or ``.csv``
  with ``book_id`` and ``title``). Titles are cut at the first ``"("`` (series info).
* Generic JSONL: one object per line, ``{"history": [...], "candidates": [...], "target": ...}`` plus
  optional ``user_id``, ``domain``, ``timestamp``, ``split`` (train/valid/test). Without ``split`` on
  every line, lines are split 8:1:1 in order of ``timestamp`` (file order where absent). Candidates
  are used as given (the target must be among them once).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .catalog import build_catalog, clean_title, split_title_year
from .examples import DatasetSplits, RecExample, chronological_split
from .sequences import splits_from_sequences

__all__ = [
    "DataFormatError",
    "load_dataset",
    "load_movielens",
    "load_lastfm",
    "load_goodreads",
    "load_jsonl",
    "load_recbole",
    "load_sdpo_json",
    "clean_movielens_title",
    "clean_goodreads_title",
]


class DataFormatError(ValueError):
    """A malformed line in a data file; the message names the file and the 1-based line."""

    def __init__(self, path, line: int | None, message: str):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    return path


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` without the newline, skipping blank lines."""
    n = 0
    with open(path, encoding=encoding, errors="strict", newline="") as f:
        try:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield n, line
        except UnicodeDecodeError as exc:
            raise DataFormatError(
                path, n + 1, f"not valid {encoding} text ({exc.reason}; at or after this line); is it another encoding?"
            ) from None


def _int(path, n, value, what):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataFormatError(path, n, f"{what} must be an integer, got {value!r}") from None


def _float(path, n, value, what):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataFormatError(path, n, f"{what} must be a number, got {value!r}") from None


# ----------------------------------------------------------------------------------------------- titles

def clean_movielens_title(title: str) -> str:
    """A MovieLens title cleaned by ``catalog.clean_title`` (video marker and trailing year removed,
    trailing article moved to the front): ``"Usual Suspects, The (1995)"`` -> ``"The Usual Suspects"``."""
    return clean_title(title)


def clean_goodreads_title(title: str) -> str:
    """Cut at the first ``"("`` (series information): ``"Dune (Dune, #1)"`` -> ``"Dune"``."""
    return " ".join(title.split("(", 1)[0].split())


# ----------------------------------------------------------------------------------------------- MovieLens


def load_movielens(path, **kwargs) -> DatasetSplits:
    """MovieLens-100K from the directory holding ``u.data`` and ``u.item``.

    ``kwargs`` go to ``splits_from_sequences`` (``max_history``, ``min_seq_len``, ``num_candidates``,
    ``seed``, ``split_ratios``, ``progress``).
    """
    root = Path(path)
    items_path = _require(root / "u.item", "MovieLens-100K item titles")
    data_path = _require(root / "u.data", "MovieLens-100K ratings")
    records = []
    for n, line in _lines(items_path, encoding="latin-1"):
        fields = line.split("|")
        if len(fields) < 2:
            raise DataFormatError(items_path, n, f"expected 'id|title|...' fields separated by '|', got {line[:80]!r}")
        date = fields[2].strip() if len(fields) > 2 else ""  # "01-Jan-1995": a fallback when the title has no year
        year = None if split_title_year(fields[1])[1] else (date[-4:] or None)
        records.append((_int(items_path, n, fields[0], "movie id"), fields[1], year))
    catalog = build_catalog(records)
    sequences: dict[str, list] = {}
    skipped = 0
    for n, line in _lines(data_path):
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataFormatError(
                data_path, n, f"expected 4 tab-separated fields (user, item, rating, timestamp), got {len(fields)}"
            )
        user = _int(data_path, n, fields[0], "user id")
        item = _int(data_path, n, fields[1], "item id")
        time = _float(data_path, n, fields[3], "timestamp")
        if item not in catalog.titles:
            if item in catalog.dropped:
                skipped += 1
                continue
            raise DataFormatError(data_path, n, f"item {item} has no title in {items_path}")
        sequences.setdefault(str(user), []).append((time, catalog.titles[item]))
    info = {"source": "movielens-100k", "path": str(root), "placeholder_interactions_dropped": skipped, **catalog.summary()}
    return splits_from_sequences(sequences, domain="movie", info=info, **kwargs)


# ----------------------------------------------------------------------------------------------- LastFM


def _tsv_with_header(path: Path, columns: tuple[str, ...], encoding="utf-8") -> Iterator[tuple[int, list[str]]]:
    it = _lines(path, encoding)
    try:
        n, header = next(it)
    except StopIteration:
        raise DataFormatError(path, None, "empty file (expected a header line)") from None
    names = header.split("\t")
    if tuple(h.strip() for h in names[: len(columns)]) != columns:
        raise DataFormatError(path, n, f"expected a header starting with {' '.join(columns)}, got {header[:80]!r}")
    for n, line in it:
        fields = line.split("\t")
        if len(fields) < len(columns):
            raise DataFormatError(path, n, f"expected {len(columns)} tab-separated fields ({', '.join(columns)}), got {len(fields)}")
        yield n, fields


def load_lastfm(path, *, encoding: str = "utf-8", **kwargs) -> DatasetSplits:
    """LastFM hetrec-2011 from its directory (see the module docstring for the time rule).

    ``encoding`` of ``artists.dat`` (a copy re-saved in another encoding: e.g. ``"latin-1"``).
    """
    root = Path(path)
    artists_path = _require(root / "artists.dat", "LastFM artist names")
    pairs_path = _require(root / "user_artists.dat", "LastFM user-artist listening counts")
    tags_path = _require(root / "user_taggedartists-timestamps.dat", "LastFM tag timestamps")
    names = {}
    for n, fields in _tsv_with_header(artists_path, ("id", "name"), encoding):
        name = " ".join(fields[1].split())
        if not name:
            raise DataFormatError(artists_path, n, "empty artist name")
        names[_int(artists_path, n, fields[0], "artist id")] = name
    first_tag: dict[tuple[int, int], float] = {}
    for n, fields in _tsv_with_header(tags_path, ("userID", "artistID", "tagID", "timestamp")):
        key = (_int(tags_path, n, fields[0], "userID"), _int(tags_path, n, fields[1], "artistID"))
        time = _float(tags_path, n, fields[3], "timestamp")
        if key not in first_tag or time < first_tag[key]:
            first_tag[key] = time
    sequences: dict[str, list] = {}
    untimed = 0
    for n, fields in _tsv_with_header(pairs_path, ("userID", "artistID", "weight")):
        user = _int(pairs_path, n, fields[0], "userID")
        artist = _int(pairs_path, n, fields[1], "artistID")
        if artist not in names:
            raise DataFormatError(pairs_path, n, f"artist {artist} has no name in {artists_path}")
        time = first_tag.get((user, artist))
        if time is None:
            untimed += 1
            continue
        sequences.setdefault(str(user), []).append((time, names[artist]))
    info = {"source": "lastfm-hetrec-2011", "path": str(root), "untimed_pairs_dropped": untimed}
    return splits_from_sequences(sequences, domain="music", info=info, **kwargs)


# ----------------------------------------------------------------------------------------------- Goodreads

_TIME_FIELDS = ("timestamp", "date_added", "date_updated", "read_at", "started_at")
_DATE_FORMATS = ("%a %b %d %H:%M:%S %z %Y", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def _parse_time(path, n, value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    for fmt in _DATE_FORMATS:
        try:
            dt = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return dt.timestamp() if dt.tzinfo is not None else dt.replace(tzinfo=None).timestamp()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise DataFormatError(path, n, f"unreadable time {value!r}") from None


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line, record)`` from a JSON-lines or CSV (header) file, chosen by the suffix."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        for n, line in _lines(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, n, f"invalid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataFormatError(path, n, "expected a JSON object per line")
            yield n, rec
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataFormatError(path, None, "empty file (expected a header line)")
            for rec in reader:
                if None in rec:
                    raise DataFormatError(path, reader.line_num, "more fields than the header names")
                yield reader.line_num, rec
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl or .csv)")


def _field(path, n, rec, name):
    value = rec.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataFormatError(path, n, f"missing field {name!r}")
    return value


def load_goodreads(interactions, titles, **kwargs) -> DatasetSplits:
    """Goodreads from an interactions file and a titles file (json/jsonl or csv; module docstring)."""
    inter_path = _require(Path(interactions), "Goodreads interactions")
    titles_path = _require(Path(titles), "Goodreads book titles")
    names = {}
    for n, rec in _records(titles_path):
        book = str(_field(titles_path, n, rec, "book_id")).strip()
        title = clean_goodreads_title(str(_field(titles_path, n, rec, "title")))
        if not title:
            raise DataFormatError(titles_path, n, "title is empty after cutting at '('")
        names[book] = title
    sequences: dict[str, list] = {}
    time_field = None
    for i, (n, rec) in enumerate(_records(inter_path)):
        if i == 0:
            time_field = next((f for f in _TIME_FIELDS if f in rec), None)
        user = str(_field(inter_path, n, rec, "user_id")).strip()
        book = str(_field(inter_path, n, rec, "book_id")).strip()
        if book not in names:
            raise DataFormatError(inter_path, n, f"book {book} has no title in {titles_path}")
        time = float(i) if time_field is None else _parse_time(inter_path, n, _field(inter_path, n, rec, time_field))
        sequences.setdefault(user, []).append((time, names[book]))
    info = {"source": "goodreads", "path": str(inter_path), "time_field": time_field or "file order"}
    return splits_from_sequences(sequences, domain="book", info=info, **kwargs)


# ----------------------------------------------------------------------------------------------- JSONL


def load_jsonl(path, *, split_ratios=(0.8, 0.1, 0.1), domain: str = "item", seed: int = 0, progress: bool = False) -> DatasetSplits:
    """Generic JSONL examples (module docstring). ``domain`` is the default for lines without one.

    ``seed`` and ``progress`` are accepted for a uniform ``load_dataset`` call and unused: the
    examples are taken as written, nothing is drawn at random.
    """
    path = _require(Path(path), "JSONL examples")
    examples, splits = [], []
    for i, (n, rec) in enumerate(_records(path)):
        for key in ("history", "candidates", "target"):
            if key not in rec:
                raise DataFormatError(path, n, f"missing field {key!r}")
        if not isinstance(rec["history"], list) or not isinstance(rec["candidates"], list):
            raise DataFormatError(path, n, "'history' and 'candidates' must be lists of titles")
        if not isinstance(rec["target"], str):
            raise DataFormatError(path, n, "'target' must be a title string")
        split = rec.get("split")
        if split is not None and split not in ("train", "valid", "test"):
            raise DataFormatError(path, n, f"'split' must be train, valid or test, got {split!r}")
        try:
            ex = RecExample(
                user_id=str(rec.get("user_id", i)),
                history=tuple(rec["history"]),
                candidates=tuple(rec["candidates"]),
                target=rec["target"],
                domain=rec.get("domain", domain),
                timestamp=_parse_time(path, n, rec["timestamp"]) if "timestamp" in rec else float(i),
                example_id=str(rec.get("example_id", f"line{n}")),
            )
        except ValueError as exc:
            raise DataFormatError(path, n, str(exc)) from None
        examples.append(ex)
        splits.append(split)
    if not examples:
        raise DataFormatError(path, None, "no examples")
    info = {"source": "jsonl", "path": str(path)}
    if all(s is not None for s in splits):
        parts = {name: [e for e, s in zip(examples, splits) if s == name] for name in ("train", "valid", "test")}
        return DatasetSplits(parts["train"], parts["valid"], parts["test"], info)
    if any(s is not None for s in splits):
        raise DataFormatError(path, None, "'split' is given on some lines but not all")
    return DatasetSplits(*chronological_split(examples, split_ratios), info)


# ----------------------------------------------------------------------------------------------- RecBole


def _atomic(path: Path) -> tuple[dict[str, int], Iterator[tuple[int, list[str]]]]:
    """RecBole atomic file: ``({column name: index}, (line, fields) rows)``; the header is
    ``name:type`` tab-separated (``user_id:token  item_id:token  timestamp:float``)."""
    it = _lines(path)
    try:
        n, header = next(it)
    except StopIteration:
        raise DataFormatError(path, None, "empty file (expected a 'name:type' header line)") from None
    columns = {}
    for i, cell in enumerate(header.split("\t")):
        name, sep, kind = cell.strip().partition(":")
        if not sep or not name:
            raise DataFormatError(path, n, f"header cell {cell!r} is not 'name:type' (a RecBole atomic file)")
        columns[name] = i
    width = len(columns)

    def rows():
        for n, line in it:
            fields = line.split("\t")
            if len(fields) != width:
                raise DataFormatError(path, n, f"expected {width} tab-separated fields as the header, got {len(fields)}")
            yield n, fields

    return columns, rows()


def _pick(columns: dict, names: tuple[str, ...], path, what: str, required: bool = True) -> int | None:
    for name in names:
        if name in columns:
            return columns[name]
    if required:
        raise DataFormatError(path, 1, f"no {what} column (looked for {', '.join(names)}; header has {', '.join(columns)})")
    return None


def _one_file(root: Path, suffix: str, name: str | None, what: str) -> Path:
    if name is not None:
        return _require(root / f"{name}{suffix}", what)
    found = sorted(root.glob(f"*{suffix}"))
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) or "none"
        raise FileNotFoundError(f"{what}: expected one *{suffix} file in {root} (found {listing}); pass name=")
    return found[0]


def _domain_of(name: str) -> str:
    low = name.lower()
    if low.startswith("ml-") or "movie" in low or "netflix" in low:
        return "movie"
    if "lastfm" in low or "music" in low:
        return "music"
    if "book" in low or "goodreads" in low:
        return "book"
    return "item"


def load_recbole(path, *, name: str | None = None, domain: str | None = None, **kwargs) -> DatasetSplits:
    """A RecBole atomic dataset: the folder holding ``<name>.inter`` and ``<name>.item``.

    ``.inter`` needs ``user_id`` and ``item_id`` columns and orders by ``timestamp`` when present
    (else file order); every row is an interaction. ``.item`` needs ``item_id`` and a title column
    (the first of ``movie_title``, ``title``, ``name``, ``item_name``, ``artist_name``, ``book_title``);
    an optional ``release_year``/``year`` column disambiguates colliding titles. Titles follow the
    catalog rule of ``sdpo_fast.data.catalog`` (also used for MovieLens' ``u.item``). ``name``: the
    file stem when the folder holds several datasets; ``domain``: prompt wording (default from the
    name: ``ml-*`` -> movie). ``kwargs`` go to ``splits_from_sequences``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"RecBole dataset: folder not found: {root}")
    inter_path = _one_file(root, ".inter", name, "RecBole interactions")
    name = inter_path.stem
    item_path = _require(root / f"{name}.item", "RecBole item titles")
    cols, rows = _atomic(item_path)
    id_col = _pick(cols, ("item_id",), item_path, "item id")
    title_col = _pick(cols, ("movie_title", "title", "name", "item_name", "artist_name", "book_title"), item_path, "title")
    year_col = _pick(cols, ("release_year", "year"), item_path, "year", required=False)
    records, ids = [], set()
    for n, fields in rows:
        item = fields[id_col].strip()
        if not item:
            raise DataFormatError(item_path, n, "empty item_id")
        if item in ids:
            raise DataFormatError(item_path, n, f"item_id {item} listed twice")
        ids.add(item)
        records.append((item, fields[title_col], fields[year_col] if year_col is not None else None))
    catalog = build_catalog(records)
    cols, rows = _atomic(inter_path)
    user_col = _pick(cols, ("user_id",), inter_path, "user id")
    item_col = _pick(cols, ("item_id",), inter_path, "item id")
    time_col = _pick(cols, ("timestamp",), inter_path, "timestamp", required=False)
    sequences: dict[str, list] = {}
    skipped = 0
    for i, (n, fields) in enumerate(rows):
        user, item = fields[user_col].strip(), fields[item_col].strip()
        if not user:
            raise DataFormatError(inter_path, n, "empty user_id")
        time = float(i) if time_col is None else _float(inter_path, n, fields[time_col], "timestamp")
        title = catalog.titles.get(item)
        if title is None:
            if item in catalog.dropped:
                skipped += 1
                continue
            raise DataFormatError(inter_path, n, f"item {item} has no title in {item_path}")
        sequences.setdefault(user, []).append((time, title))
    if not sequences:
        raise DataFormatError(inter_path, None, "no interactions")
    info = {"source": f"recbole:{name}", "path": str(root), "time_field": "timestamp" if time_col is not None else "file order",
            "num_interactions": sum(len(s) for s in sequences.values()), "placeholder_interactions_dropped": skipped,
            **catalog.summary()}
    return splits_from_sequences(sequences, domain=domain or _domain_of(name), info=info, **kwargs)


# ----------------------------------------------------------------------------------------------- S-DPO JSON

SDPO_SPLIT_FILES = (("train", "train"), ("valid", "val"), ("test", "test"))


def _sdpo_records(path: Path, split: str, domain: str) -> list[RecExample]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"not valid utf-8 text ({exc.reason})") from None
    if not isinstance(data, list):
        raise DataFormatError(path, None, "expected a JSON list of records")
    out = []
    for r, rec in enumerate(data):
        where = f"record {r} (0-based)"
        if not isinstance(rec, dict):
            raise DataFormatError(path, None, f"{where}: expected an object, got {type(rec).__name__}")
        for key in ("historyList", "itemList", "trueSelection"):
            if key not in rec:
                raise DataFormatError(path, None, f"{where}: missing field {key!r}")
        history = rec["historyList"]
        if isinstance(history, str):
            history = [h for h in history.split("::")] if history.strip() else []
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise DataFormatError(path, None, f"{where}: 'historyList' must be a '::'-joined string or a list of titles")
        items, target = rec["itemList"], rec["trueSelection"]
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise DataFormatError(path, None, f"{where}: 'itemList' must be a list of titles")
        if not isinstance(target, str):
            raise DataFormatError(path, None, f"{where}: 'trueSelection' must be a title string")
        try:
            out.append(RecExample(
                user_id=str(rec.get("user_id", f"{split}{r}")),
                history=tuple(" ".join(h.split()) for h in history if h.strip()),
                candidates=tuple(" ".join(t.split()) for t in items),
                target=" ".join(target.split()),
                domain=domain,
                timestamp=float(r),
                example_id=f"{split}:{r}",
            ))
        except ValueError as exc:
            raise DataFormatError(path, None, f"{where}: {exc}") from None
    return out


def load_sdpo_json(path, *, name: str | None = None, domain: str | None = None, seed: int = 0,
                   progress: bool = False, verbose: bool = True) -> DatasetSplits:
    """The S-DPO paper's own data files: ``<name>-train.json``, ``<name>-val.json``, ``<name>-test.json``.

    Each is a JSON list of ``{"historyList": "A::B::C" (or a list), "itemList": [titles],
    "trueSelection": title}``; the target must be among ``itemList`` exactly once. Only the files
    present are read (at least one); ``info["files"]`` names them and, with ``verbose``, a line on
    stderr says which splits were found. Examples keep the file's order (their timestamp is the record
    index; the split is the file). ``name``: the common prefix when the folder holds several
    datasets; ``domain``: prompt wording (default from the name: ``lastfm`` -> music). ``seed`` and
    ``progress`` are accepted for a uniform ``load_dataset`` call and unused (nothing is drawn).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"S-DPO JSON dataset: folder not found: {root}")
    if name is None:
        stems = sorted({p.name.rsplit("-", 1)[0] for suffix in ("train", "val", "test") for p in root.glob(f"*-{suffix}.json")})
        if len(stems) != 1:
            raise FileNotFoundError(
                f"S-DPO JSON dataset: expected <name>-train/-val/-test.json files of one name in {root} "
                f"(found {', '.join(stems) or 'none'}); pass name="
            )
        name = stems[0]
    domain = domain or _domain_of(name)
    parts, files = {}, {}
    for split, suffix in SDPO_SPLIT_FILES:
        p = root / f"{name}-{suffix}.json"
        parts[split] = _sdpo_records(p, split, domain) if p.is_file() else []
        if p.is_file():
            files[split] = str(p)
    if not files:
        raise FileNotFoundError(f"S-DPO JSON dataset: none of {name}-train.json, -val.json, -test.json in {root}")
    missing = [s for s, _ in SDPO_SPLIT_FILES if s not in files]
    if verbose:
        print(f"[data] {root}: read {', '.join(Path(f).name for f in files.values())}"
              + (f"; no {', '.join(missing)} split" if missing else ""), file=sys.stderr)
    info = {"source": f"sdpo-json:{name}", "path": str(root), "files": files, "missing_splits": missing}
    return DatasetSplits(parts["train"], parts["valid"], parts["test"], info)


# ----------------------------------------------------------------------------------------------- dispatch

_ALIASES = {
    "synthetic": "synthetic",
    "movielens": "movielens",
    "ml-100k": "movielens",
    "movielens-100k": "movielens",
    "lastfm": "lastfm",
    "hetrec-2011": "lastfm",
    "goodreads": "goodreads",
    "jsonl": "jsonl",
    "recbole": "recbole",
    "sdpo": "sdpo",
    "sdpo-json": "sdpo",
}


def load_dataset(name_or_path: str | os.PathLike = "synthetic", *, path=None, titles=None, **kwargs) -> DatasetSplits:
    """Load a recommendation dataset as chronological ``DatasetSplits`` of ``RecExample``.

    Args:
        name_or_path: ``"synthetic"`` (the default, generated, no files; ``kwargs`` go to
            ``make_synthetic``), ``"movielens"`` / ``"lastfm"`` (then ``path`` = the directory),
            ``"goodreads"`` (``path`` = interactions file, ``titles`` = titles file), ``"jsonl"``
            (``path`` = the file), ``"recbole"`` (``path`` = folder of ``<name>.inter`` and
            ``<name>.item``), ``"sdpo"`` (``path`` = folder of the paper's ``<name>-train/-val/-test.json``);
            or directly a path: a ``.jsonl``/``.json`` file, or a directory recognised by its files
            (``u.data`` -> MovieLens, ``user_artists.dat`` -> LastFM, ``*.inter`` -> RecBole,
            ``*-train.json`` -> S-DPO).
        kwargs: preprocessing options (``max_history=10``, ``min_seq_len=3``, ``num_candidates=20``,
            ``seed=0``, ``split_ratios=(0.8, 0.1, 0.1)``, ``progress``), or ``make_synthetic``'s.

    Raises:
        ValueError for an unknown name, FileNotFoundError / DataFormatError for bad files.
    """
    key = _ALIASES.get(str(name_or_path).lower())
    if key is None:
        p = Path(name_or_path)
        path = p
        if p.is_file() and p.suffix.lower() in (".jsonl", ".json"):
            key = "jsonl"
        elif (p / "u.data").is_file():
            key = "movielens"
        elif (p / "user_artists.dat").is_file():
            key = "lastfm"
        elif p.is_dir() and any(p.glob("*.inter")):
            key = "recbole"
        elif p.is_dir() and (any(p.glob("*-train.json")) or any(p.glob("*-test.json"))):
            key = "sdpo"
        elif p.exists():
            raise ValueError(
                f"{p}: cannot tell the dataset format (expected a .jsonl file, or a directory with "
                "u.data (MovieLens-100K), user_artists.dat (LastFM hetrec-2011), <name>.inter (RecBole) or "
                "<name>-train.json (S-DPO))"
            )
        else:
            raise ValueError(
                f"unknown dataset {str(name_or_path)!r}: not one of {sorted(set(_ALIASES))} and no such file or directory"
            )
    if key == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(**kwargs)
    if path is None:
        raise ValueError(f"dataset {key!r} needs path=...")
    if key == "movielens":
        return load_movielens(path, **kwargs)
    if key == "lastfm":
        return load_lastfm(path, **kwargs)
    if key == "recbole":
        return load_recbole(path, **kwargs)
    if key == "sdpo":
        return load_sdpo_json(path, **kwargs)
    if key == "goodreads":
        if titles is None:
            raise ValueError("goodreads needs path=<interactions file> and titles=<titles file>")
        return load_goodreads(path, titles, **kwargs)
    return load_jsonl(path, **kwargs)
