"""The common example type every loader produces, and the split container.

A ``RecExample`` is one next-item prediction: a user's recent history (oldest first), the candidate
titles shown in the prompt (the target exactly once, the others items the user never interacted with,
shuffled) and the target title. Titles are plain strings after the loader's cleanup.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

__all__ = ["DOMAINS", "RecExample", "DatasetSplits", "chronological_split", "sample_over_users", "stable_seed"]

# Domain -> the words prompts use: past and present verb phrases, singular and plural noun.
DOMAINS = {
    "movie": {"past": "watched", "present": "watch", "noun": "movie", "nouns": "movies"},
    "music": {"past": "listened to", "present": "listen to", "noun": "artist", "nouns": "artists"},
    "book": {"past": "read", "present": "read", "noun": "book", "nouns": "books"},
    "item": {"past": "interacted with", "present": "interact with", "noun": "item", "nouns": "items"},
}


def stable_seed(*parts) -> int:
    """A 63-bit seed derived from ``parts`` that is the same on every run and process
    (Python's ``hash`` of strings is salted per process, so it cannot be used)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class RecExample:
    """One next-item example.

    Attributes:
        user_id: the user's id in the source data (string).
        history: titles the user interacted with before the target, oldest first (at most the
            loader's ``max_history``, the most recent ones).
        candidates: the titles offered in the prompt (typically 20), distinct, the target among them
            exactly once; order is the prompt's order and the column order of ranking scores.
        target: the title the user interacted with next.
        domain: one of ``DOMAINS`` (selects the prompt wording).
        timestamp: time of the target interaction (used for the chronological split; any
            monotonically comparable number).
        example_id: unique, stable id (``"<user>:<position>"`` for the loaders).
    """

    user_id: str
    history: tuple[str, ...]
    candidates: tuple[str, ...]
    target: str
    domain: str = "item"
    timestamp: float = 0.0
    example_id: str = ""

    def __post_init__(self):
        object.__setattr__(self, "history", tuple(self.history))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        where = f"example {self.example_id or self.user_id!r}"
        if self.domain not in DOMAINS:
            raise ValueError(f"{where}: unknown domain {self.domain!r}; expected one of {sorted(DOMAINS)}")
        if not self.candidates:
            raise ValueError(f"{where}: no candidates")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"{where}: duplicate candidate titles")
        n = self.candidates.count(self.target)
        if n != 1:
            raise ValueError(f"{where}: target {self.target!r} appears {n} times among the candidates (need 1)")
        if any(not isinstance(t, str) or not t.strip() for t in self.history + self.candidates):
            raise ValueError(f"{where}: titles must be non-empty strings")

    @property
    def target_index(self) -> int:
        """Column of the target among ``candidates``."""
        return self.candidates.index(self.target)

    def to_dict(self) -> dict:
        return {
            "user_id": self.user_id,
            "history": list(self.history),
            "candidates": list(self.candidates),
            "target": self.target,
            "domain": self.domain,
            "timestamp": self.timestamp,
            "example_id": self.example_id,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RecExample":
        return cls(**{k: d[k] for k in ("user_id", "history", "candidates", "target", "domain", "timestamp", "example_id") if k in d})


@dataclass
class DatasetSplits:
    """Train / valid / test lists of ``RecExample`` (chronological: every train target precedes every
    valid target, which precedes every test target) plus free-form ``info`` about the source."""

    train: list[RecExample]
    valid: list[RecExample]
    test: list[RecExample]
    info: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[RecExample]:
        if name not in ("train", "valid", "test"):
            raise KeyError(f"unknown split {name!r}; expected train, valid or test")
        return getattr(self, name)

    def items(self) -> Iterator[tuple[str, list[RecExample]]]:
        yield from (("train", self.train), ("valid", self.valid), ("test", self.test))

    def all_titles(self) -> list[str]:
        """Every distinct title (history, candidates), sorted: the text a tokenizer is trained on."""
        titles = set()
        for _, split in self.items():
            for ex in split:
                titles.update(ex.history)
                titles.update(ex.candidates)
        return sorted(titles)

    def __repr__(self) -> str:
        return f"DatasetSplits(train={len(self.train)}, valid={len(self.valid)}, test={len(self.test)}, source={self.info.get('source')!r})"


def chronological_split(
    examples: Sequence[RecExample], ratios: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[list[RecExample], list[RecExample], list[RecExample]]:
    """Sort ``examples`` by target time (ties: original order) and cut them ``ratios`` (default 8:1:1).

    Sizes: ``n_train = floor(r0 * n)``, ``n_valid = floor((r0 + r1) * n) - n_train``, the rest test.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1, got {tuple(ratios)}")
    order = sorted(range(len(examples)), key=lambda i: (examples[i].timestamp, i))
    ordered = [examples[i] for i in order]
    n = len(ordered)
    a = int(ratios[0] * n + 1e-9)
    b = int((ratios[0] + ratios[1]) * n + 1e-9)
    return ordered[:a], ordered[a:b], ordered[b:]


def sample_over_users(examples: Sequence[RecExample], n: int | None, seed: int = 0) -> list[RecExample]:
    """A seeded subset of ``n`` examples spread over users (all of them when ``n`` is None or >= len).

    Users are visited in a seeded random order, round after round; each visit takes one more of
    that user's examples (each user's examples in a seeded random order), until ``n`` are taken. So
    ``n`` examples come from ``min(n, #users)`` users, each contributing ``floor`` or ``ceil`` of
    ``n / #users`` while it has examples left. The result keeps the input's (chronological) order.
    Depends only on ``seed`` and the examples' ``user_id`` / ``example_id``, not on process or order.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"sample size must be >= 0, got {n}")
    by_user: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_user.setdefault(ex.user_id, []).append(i)
    users = sorted(by_user, key=lambda u: (stable_seed("sample-users", seed, u), u))
    queues = {
        u: sorted(idx, key=lambda i: (stable_seed("sample-examples", seed, examples[i].example_id), i))
        for u, idx in by_user.items()
    }
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for u in users:
            if depth < len(queues[u]):
                chosen.append(queues[u][depth])
                if len(chosen) == n:
                    break
        depth += 1
    return [examples[i] for i in sorted(chosen)]
