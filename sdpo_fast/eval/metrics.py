"""Matching rules and metrics (the rules are in the package docstring): ``normalize_title``,
``match_answer``, ``generation_metrics`` (HitRatio@1, ValidRatio), ``ranking_metrics`` (HR@1, NDCG@k, MRR)."""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import torch

_STRIP = " \t\r\n\"'`.,;:!?\u201c\u201d\u2018\u2019"


def normalize_title(text: str) -> str:
    """NFKC, lower case, curly quotes made straight, whitespace collapsed, surrounding quotes and
    punctuation stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", text).strip(_STRIP)


MATCH_RULES = ("exact", "substring", "paper", "llara")


def match_answer(answer: str, candidates: Sequence[str], match: str = "exact") -> list[int]:
    """Indices of the candidates ``answer`` names under rule ``match`` (``MATCH_RULES``; the rules are
    in the package docstring): ``"exact"`` normalised first line equals the title; ``"substring"``
    normalised title inside the normalised answer; ``"paper"`` raw title inside the raw answer
    (case-sensitive); ``"llara"`` lower-cased title inside the lower-cased answer."""
    if match == "exact":
        lines = answer.strip().splitlines()
        norm = normalize_title(lines[0]) if lines else ""
        return [i for i, c in enumerate(candidates) if normalize_title(c) == norm] if norm else []
    if match == "substring":
        norm = normalize_title(answer)
        return [i for i, c in enumerate(candidates) if normalize_title(c) and normalize_title(c) in norm]
    if match == "paper":
        return [i for i, c in enumerate(candidates) if c and c in answer]
    if match == "llara":
        low = answer.lower()
        return [i for i, c in enumerate(candidates) if c.strip() and c.strip().lower() in low]
    raise ValueError(f"match must be one of {', '.join(MATCH_RULES)}, got {match!r}")


def generation_metrics(answers: Sequence[str], candidates: Sequence[Sequence[str]], target_indices: Sequence[int],
                       match: str = "exact") -> dict:
    """``{"hit_ratio@1", "valid_ratio", "num_examples"}`` of generated answers under rule ``match``.

    ValidRatio = answers naming exactly one candidate / all answers. HitRatio@1 = answers naming
    exactly the target / all answers, except under ``"llara"``, where it is divided by the valid
    answers only (LLaRA's definition; NaN when no answer is valid)."""
    if not (len(answers) == len(candidates) == len(target_indices)):
        raise ValueError("generation_metrics: answers, candidates and target_indices differ in length")
    if not answers:
        raise ValueError("generation_metrics: no answers")
    few = next((i for i, c in enumerate(candidates) if len(c) < 2), None)
    if few is not None:
        raise ValueError(f"generation_metrics: example {few} has fewer than 2 candidates (need >= 2)")
    if match not in MATCH_RULES:
        raise ValueError(f"match must be one of {', '.join(MATCH_RULES)}, got {match!r}")
    valid = hit = 0
    for a, c, t in zip(answers, candidates, target_indices):
        named = match_answer(a, c, match)
        if len(named) == 1:
            valid += 1
            hit += named[0] == t
    n = len(answers)
    if match == "llara":
        return {"hit_ratio@1": hit / valid if valid else float("nan"), "valid_ratio": valid / n, "num_examples": n}
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
