"""Evaluation of LM recommenders: generation (HitRatio@1, ValidRatio) and ranking (HR@1, NDCG@5, MRR).

Generation (the paper's protocol): greedy decoding after the prompt; the answer is matched to the
example's candidates.

* ``match="exact"`` (default): the answer's first line, normalised (``normalize_title``: Unicode
  NFKC, lower case, whitespace collapsed, surrounding quotes and punctuation stripped), must equal
  exactly one normalised candidate title.
* ``match="substring"`` (the paper's code): every candidate whose normalised title occurs inside the
  normalised answer counts as named. Difference: a short title inside a longer one miscounts, e.g.
  candidates "Heat" and "White Heat" with the answer "White Heat" name two candidates, so the
  answer is invalid under the substring rule and a hit under the exact one; a chatty answer
  ("I recommend Heat because ...") is valid only under the substring rule.

ValidRatio = answers naming exactly one candidate / examples; HitRatio@1 = answers naming exactly
one candidate which is the target / examples.

Ranking: each user's candidates (typically 20) are scored in one shared-prefix forward
(``sdpo_fast.candidate_logprobs``: one group, column order = candidate order). Score = sequence
log-prob of ``" " + title + EOS`` (``score="sum"``) or its per-token mean (``score="mean"``). The
target's rank counts ties against it (rank = 1 + #other candidates scoring >= the target), so a
constant scorer gets HR@1 = 0, not 1. HR@1 = mean(rank == 1), NDCG@5 = mean(1/log2(rank + 1) if
rank <= 5 else 0), MRR = mean(1/rank).

Also: baseline scorers (random, popularity, co-occurrence) on the same metrics, and JSON results
plus a printed table.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.examples import RecExample, stable_seed
from .data.tokenize import tokenize_examples

__all__ = [
    "normalize_title",
    "match_answer",
    "generation_metrics",
    "ranking_metrics",
    "score_candidates",
    "evaluate_ranking",
    "greedy_generate",
    "evaluate_generation",
    "RandomScorer",
    "PopularityScorer",
    "CooccurrenceScorer",
    "evaluate_scorer",
    "evaluate_baselines",
    "format_table",
    "save_results",
]

# ------------------------------------------------------------------------------------------ matching

_STRIP = " \t\r\n\"'`.,;:!?\u201c\u201d\u2018\u2019"


def normalize_title(text: str) -> str:
    """NFKC, lower case, curly quotes made straight, whitespace collapsed, surrounding quotes and
    punctuation stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", text).strip(_STRIP)


def match_answer(answer: str, candidates: Sequence[str], match: str = "exact") -> list[int]:
    """Indices of the candidates ``answer`` names (see the module docstring for the two rules)."""
    if match == "exact":
        lines = answer.strip().splitlines()
        norm = normalize_title(lines[0]) if lines else ""
        return [i for i, c in enumerate(candidates) if normalize_title(c) == norm] if norm else []
    if match == "substring":
        norm = normalize_title(answer)
        return [i for i, c in enumerate(candidates) if normalize_title(c) and normalize_title(c) in norm]
    raise ValueError(f"match must be 'exact' or 'substring', got {match!r}")


def generation_metrics(answers: Sequence[str], candidates: Sequence[Sequence[str]], target_indices: Sequence[int],
                       match: str = "exact") -> dict:
    """``{"hit_ratio@1", "valid_ratio", "num_examples"}`` of generated answers."""
    if not (len(answers) == len(candidates) == len(target_indices)):
        raise ValueError("generation_metrics: answers, candidates and target_indices differ in length")
    if not answers:
        raise ValueError("generation_metrics: no answers")
    few = next((i for i, c in enumerate(candidates) if len(c) < 2), None)
    if few is not None:
        raise ValueError(f"generation_metrics: example {few} has fewer than 2 candidates (need >= 2)")
    valid = hit = 0
    for a, c, t in zip(answers, candidates, target_indices):
        named = match_answer(a, c, match)
        if len(named) == 1:
            valid += 1
            hit += named[0] == t
    n = len(answers)
    return {"hit_ratio@1": hit / n, "valid_ratio": valid / n, "num_examples": n}


def ranking_metrics(scores, target_index, k: int = 5) -> dict:
    """HR@1, NDCG@k and MRR from ``scores`` ``[N, C]`` (higher = better; ``-inf`` = not a candidate)
    and ``target_index`` ``[N]``. Ties count against the target (module docstring)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    t = torch.as_tensor(target_index, dtype=torch.long)
    if s.dim() != 2 or t.shape != (s.shape[0],):
        raise ValueError(f"ranking_metrics: expected scores [N, C] and targets [N], got {tuple(s.shape)}, {tuple(t.shape)}")
    if s.shape[0] == 0:
        raise ValueError("ranking_metrics: no examples")
    if torch.isnan(s).any():
        raise ValueError("ranking_metrics: NaN scores")
    few = (torch.isfinite(s).sum(1) < 2).nonzero()
    if few.numel():  # one candidate is always "ranked first": a hit that measures nothing
        raise ValueError(f"ranking_metrics: example {int(few[0])} has fewer than 2 scored candidates (need >= 2)")
    target = s.gather(1, t[:, None])
    others = torch.ones_like(s, dtype=torch.bool).scatter_(1, t[:, None], False)
    rank = 1 + ((s >= target) & others).sum(1).double()
    ndcg = torch.where(rank <= k, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))
    return {
        "hr@1": (rank == 1).double().mean().item(),
        f"ndcg@{k}": ndcg.mean().item(),
        "mrr": (1.0 / rank).mean().item(),
        "num_examples": int(s.shape[0]),
    }


# ------------------------------------------------------------------------------------------ model helpers


def _features(examples, tokenizer, tokenize_kwargs) -> list[dict]:
    """Rows with prompt_ids / candidate_ids / target_index / candidates: tokenises RecExamples,
    passes tokenised rows (``tokenize_dataset`` output) through. Examples with fewer than 2
    candidates are refused."""
    if len(examples) == 0:
        raise ValueError("no examples to evaluate")
    few = next((i for i in range(len(examples)) if len(_candidates_of(examples[i])) < 2), None)
    if few is not None:
        raise ValueError(f"example {few} has fewer than 2 candidates: evaluation needs at least 2 per example")
    first = examples[0]
    if isinstance(first, RecExample):
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to evaluate RecExamples")
        rows = tokenize_examples(list(examples), tokenizer, **tokenize_kwargs)
        for row, ex in zip(rows, examples):
            row["candidates"] = list(ex.candidates)
            row["example_id"] = ex.example_id
        return rows
    if isinstance(first, dict) and "prompt_ids" in first:
        return list(examples)
    if hasattr(examples, "column_names") and "prompt_ids" in examples.column_names:  # datasets.Dataset
        return [examples[i] for i in range(len(examples))]
    raise ValueError("examples must be RecExamples or tokenised rows (tokenize_dataset output)")


def _candidates_of(example):
    return example.candidates if isinstance(example, RecExample) else example["candidate_ids"]


def _device(model) -> torch.device:
    from .model import unwrap_causal_lm

    return unwrap_causal_lm(model).get_input_embeddings().weight.device


class _EvalMode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def score_candidates(model, features: Sequence[dict], *, batch_size: int = 16, max_tokens_per_row: int | None = None,
                     backend: str = "auto", score: str = "sum", pad_token_id: int = 0, progress: bool = True,
                     desc: str = "ranking") -> torch.Tensor:
    """``[N, Cmax]`` float32 scores of every candidate of every feature (``-inf`` past a feature's
    candidates), ``batch_size`` users per shared-prefix forward."""
    from . import candidate_logprobs, pack_groups

    if score not in ("sum", "mean"):
        raise ValueError(f"score must be 'sum' or 'mean', got {score!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    C = max(len(f["candidate_ids"]) for f in features)
    out = torch.full((len(features), C), float("-inf"))
    device = _device(model)
    with _EvalMode(model):
        for start in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = features[start : start + batch_size]
            batch = pack_groups(
                [(f["prompt_ids"], f["candidate_ids"]) for f in chunk],
                max_tokens_per_row=max_tokens_per_row,
                pad_token_id=pad_token_id,
                num_candidates=C,
            ).to(device)
            logps = candidate_logprobs(model, batch, backend=backend).float()
            if score == "mean":
                logps = logps / batch.candidate_lens.clamp(min=1)
            logps = logps.masked_fill(~batch.candidate_mask, float("-inf"))
            out[start : start + len(chunk)] = logps.cpu()
    return out


def evaluate_ranking(model, tokenizer, examples, *, batch_size: int = 16, max_tokens_per_row: int | None = None,
                     backend: str = "auto", score: str = "sum", k: int = 5, progress: bool = True,
                     return_scores: bool = False, **tokenize_kwargs) -> dict:
    """Ranking metrics (HR@1, NDCG@k, MRR) of ``model`` on ``examples``.

    Args:
        examples: ``RecExample``s (tokenised here with ``tokenize_kwargs``: ``max_prompt_tokens``,
            ``max_candidate_tokens``, ``seed``, ``template``) or ``tokenize_dataset`` rows.
        batch_size: users per forward; ``max_tokens_per_row`` splits them into rows.
        score: ``"sum"`` (sequence log-prob) or ``"mean"`` (per token).
        return_scores: add ``"scores"`` (``[N, C]`` list) to the result.
    """
    feats = _features(examples, tokenizer, tokenize_kwargs)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    scores = score_candidates(model, feats, batch_size=batch_size, max_tokens_per_row=max_tokens_per_row,
                              backend=backend, score=score, pad_token_id=pad, progress=progress)
    result = ranking_metrics(scores, [int(f["target_index"]) for f in feats], k=k)
    if return_scores:
        result["scores"] = scores.tolist()
    return result


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                    batch_size: int = 16, progress: bool = True, **generate_kwargs) -> list[str]:
    """Greedy answers to token-id ``prompts``: left-padded batches through ``model.generate``, each
    answer cut at its first EOS and decoded without special tokens. ``generate_kwargs`` go to
    ``generate`` (e.g. ``synced_gpus=True`` under ZeRO-3)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = _device(model)
    answers = []
    with _EvalMode(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, eos_token_id=eos, pad_token_id=pad, **generate_kwargs)
            for row in out[:, width:].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def evaluate_generation(model, tokenizer, examples, *, batch_size: int = 16, max_new_tokens: int | None = None,
                        match: str = "exact", progress: bool = True, return_answers: bool = False,
                        generate_kwargs: dict | None = None, **tokenize_kwargs) -> dict:
    """HitRatio@1 and ValidRatio of greedy answers (module docstring).

    Args:
        max_new_tokens: default = the longest candidate (with EOS) + 4 tokens.
        match: ``"exact"`` or ``"substring"`` (the paper's rule).
        return_answers: add ``"answers"`` (list of strings) to the result.
    """
    if match not in ("exact", "substring"):
        raise ValueError(f"match must be 'exact' or 'substring', got {match!r}")
    feats = _features(examples, tokenizer, tokenize_kwargs)
    if max_new_tokens is None:
        max_new_tokens = max(len(c) for f in feats for c in f["candidate_ids"]) + 4
    answers = greedy_generate(model, tokenizer, [f["prompt_ids"] for f in feats], max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress, **(generate_kwargs or {}))
    result = generation_metrics(answers, [f["candidates"] for f in feats], [int(f["target_index"]) for f in feats], match)
    result["match"] = match
    if return_answers:
        result["answers"] = answers
    return result


# ------------------------------------------------------------------------------------------ baselines


class RandomScorer:
    """Uniform random scores (the honest-metric check: HR@1 about 1/C)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, train: Sequence[RecExample]) -> "RandomScorer":
        return self

    def scores(self, examples: Sequence[RecExample]) -> np.ndarray:
        rng = random.Random(stable_seed("random-scorer", self.seed))
        return np.array([[rng.random() for _ in ex.candidates] for ex in examples])


class PopularityScorer:
    """Score = how often the title is a target in the training examples (+ a tiny history-count term
    to break ties)."""

    def fit(self, train: Sequence[RecExample]) -> "PopularityScorer":
        self.targets = Counter(ex.target for ex in train)
        self.seen = Counter(t for ex in train for t in ex.history)
        return self

    def scores(self, examples: Sequence[RecExample]) -> np.ndarray:
        return np.array([[self.targets[c] + 1e-6 * self.seen[c] for c in ex.candidates] for ex in examples], dtype=np.float64)


class CooccurrenceScorer:
    """Score(c) = sum over the history items h of how often c was the target after h in the training
    examples (h anywhere in the history), plus ``1e-3 *`` popularity to break ties."""

    def fit(self, train: Sequence[RecExample]) -> "CooccurrenceScorer":
        self.pairs = Counter((h, ex.target) for ex in train for h in set(ex.history))
        self.pop = Counter(ex.target for ex in train)
        return self

    def scores(self, examples: Sequence[RecExample]) -> np.ndarray:
        return np.array(
            [[sum(self.pairs[(h, c)] for h in set(ex.history)) + 1e-3 * self.pop[c] for c in ex.candidates] for ex in examples],
            dtype=np.float64,
        )


def evaluate_scorer(scorer, examples: Sequence[RecExample], k: int = 5) -> dict:
    """Ranking metrics of a fitted baseline scorer (``RandomScorer`` etc.)."""
    if len({len(ex.candidates) for ex in examples}) != 1:
        raise ValueError("evaluate_scorer: examples have different candidate counts")
    return ranking_metrics(scorer.scores(examples), [ex.target_index for ex in examples], k=k)


# ------------------------------------------------------------------------------------------ reporting

_ORDER = ("hr@1", "ndcg@5", "mrr", "hit_ratio@1", "valid_ratio", "num_examples")


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
    """Write ``results`` (name -> metrics) as indented JSON (non-finite numbers become null)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(results), f, indent=2, sort_keys=False)
        f.write("\n")


def evaluate_baselines(splits, split: str = "test", seed: int = 0) -> dict:
    """Random, popularity and co-occurrence scorers fit on ``splits.train``, evaluated on ``split``:
    the reference rows of the results table."""
    examples = splits[split]
    return {
        "random": evaluate_scorer(RandomScorer(seed).fit(splits.train), examples),
        "popularity": evaluate_scorer(PopularityScorer().fit(splits.train), examples),
        "co-occurrence": evaluate_scorer(CooccurrenceScorer().fit(splits.train), examples),
    }


def main(argv=None) -> int:
    """``python -m sdpo_fast.eval [--data NAME_OR_PATH] [--titles FILE] [--split test] [--json OUT]``:
    the baseline table of a dataset."""
    import argparse

    from .data import load_dataset

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


if __name__ == "__main__":
    raise SystemExit(main())
