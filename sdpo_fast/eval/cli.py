"""Reporting: the fixed-width results table, JSON results, and ``python -m sdpo_fast.eval``."""

from __future__ import annotations

import os

from .baselines import evaluate_baselines

_ORDER = ("hr@1", "ndcg@5", "mrr", "hit_ratio@1", "valid_ratio", "paper_hit_ratio@1", "paper_valid_ratio",
          "llara_hit_ratio@1", "llara_valid_ratio", "constrained_hit_ratio@1", "constrained_valid_ratio",
          "full_catalog_hr@1", "full_catalog_hr@5", "full_catalog_hr@10", "full_catalog_hr@20", "full_catalog_ndcg@5",
          "full_catalog_ndcg@10", "full_catalog_ndcg@20", "full_catalog_users", "num_examples")


def format_table(results: dict) -> str:
    """A fixed-width text table: one row per entry of ``results`` (name -> metrics dict), one column
    per numeric metric (known metrics first)."""
    if not results:
        return "(no results)"
    keys = []
    for metrics in results.values():
        for k, v in metrics.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    keys.sort(key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))
    width = max(len("model"), *(len(n) for n in results))
    cols = [max(len(k), 8) for k in keys]
    lines = ["  ".join([f"{'model':<{width}}"] + [f"{k:>{c}}" for k, c in zip(keys, cols)])]
    lines.append("-" * len(lines[0]))
    for name, metrics in results.items():
        cells = []
        for k, c in zip(keys, cols):
            v = metrics.get(k)
            cells.append(f"{'-':>{c}}" if v is None else f"{v:>{c}d}" if isinstance(v, int) else f"{v:>{c}.4f}")
        lines.append("  ".join([f"{name:<{width}}"] + cells))
    return "\n".join(lines)


def save_results(path: str | os.PathLike, results: dict) -> None:
    """Write ``results`` (name -> metrics) as indented strict JSON (non-finite numbers become null),
    atomically (``sdpo_fast.outputs.write_json_atomic``)."""
    from ..outputs import write_json_atomic

    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    write_json_atomic(os.fspath(path), results)


def main(argv=None) -> int:
    """``python -m sdpo_fast.eval [--data NAME_OR_PATH] [--titles FILE] [--split test] [--json OUT]``:
    the baseline table of a dataset."""
    import argparse

    from ..data import load_dataset

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data", default="synthetic", help="synthetic | movielens | lastfm | goodreads | jsonl | a path")
    ap.add_argument("--path", default=None, help="data directory or file (for a named dataset)")
    ap.add_argument("--titles", default=None, help="Goodreads titles file")
    ap.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    kwargs = {"seed": args.seed}
    if args.path is not None:
        kwargs["path"] = args.path
    if args.titles is not None:
        kwargs["titles"] = args.titles
    splits = load_dataset(args.data, **kwargs)
    results = evaluate_baselines(splits, args.split, args.seed)
    print(f"{splits!r}, split={args.split}")
    print(format_table(results))
    if args.json:
        save_results(args.json, results)
    return 0

