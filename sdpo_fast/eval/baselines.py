"""Baseline scorers on the same ranking metrics: random, popularity, co-occurrence."""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

import numpy as np

from ..data.examples import RecExample, stable_seed
from .metrics import ranking_metrics

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


def evaluate_baselines(splits, split: str = "test", seed: int = 0) -> dict:
    """Random, popularity and co-occurrence scorers fit on ``splits.train``, evaluated on ``split``:
    the reference rows of the results table."""
    examples = splits[split]
    return {
        "random": evaluate_scorer(RandomScorer(seed).fit(splits.train), examples),
        "popularity": evaluate_scorer(PopularityScorer().fit(splits.train), examples),
        "co-occurrence": evaluate_scorer(CooccurrenceScorer().fit(splits.train), examples),
    }
