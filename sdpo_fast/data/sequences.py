"""From per-user interaction sequences to ``RecExample`` splits: the paper's preprocessing, shared by
every loader and the synthetic generator.

Rules (S-DPO / LLaRA preprocessing, made explicit):

* Each user's interactions are ordered by time (ties keep the source order). A repeated interaction
  with an already-seen title is dropped (the first one counts), so a target never appears in its own
  history and "items the user has not interacted with" is well defined.
* One example per position ``t`` whose sequence ``items[:t+1]`` has at least ``min_seq_len`` (3)
  items: history = the ``max_history`` (10) items before ``t`` (oldest first), target = ``items[t]``.
* Candidates: the target plus ``num_candidates - 1`` (19) distinct titles drawn uniformly from the
  catalog titles the user never interacted with (over the whole timeline, not just the prefix),
  shuffled. The catalog is every title that occurs in the interactions.
* Split: all examples sorted by target time, cut 8:1:1 (``chronological_split``).
* Randomness comes from ``stable_seed(seed, user, t)``, so an example does not depend on which other
  users were loaded, and every run is identical.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from .examples import DatasetSplits, RecExample, chronological_split, stable_seed

__all__ = ["examples_from_sequences", "splits_from_sequences"]


def examples_from_sequences(
    sequences: Mapping[str, Sequence[tuple[float, str]]],
    *,
    domain: str,
    max_history: int = 10,
    min_seq_len: int = 3,
    num_candidates: int = 20,
    seed: int = 0,
    catalog: Sequence[str] | None = None,
    progress: bool = False,
) -> list[RecExample]:
    """Turn ``{user: [(time, title), ...]}`` into examples (see the module docstring).

    Args:
        sequences: interactions per user, any order (sorted here by time, stable).
        domain: prompt domain of every example.
        catalog: titles negatives are drawn from; default every title in ``sequences``.
        progress: show a tqdm bar over users.

    Raises:
        ValueError: bad sizes, or a user who interacted with so much of the catalog that fewer than
            ``num_candidates - 1`` titles remain to draw negatives from.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if min_seq_len < 2:
        raise ValueError(f"min_seq_len must be >= 2 (a history and a target), got {min_seq_len}")
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
    if catalog is None:
        catalog = sorted({title for seq in sequences.values() for _, title in seq})
    else:
        catalog = sorted(set(catalog))
    n_neg = num_candidates - 1
    examples = []
    for user in tqdm(sorted(sequences), desc="building examples", disable=not progress, leave=False):
        seq = sorted(sequences[user], key=lambda x: x[0])  # stable: ties keep source order
        seen, items = set(), []
        for time, title in seq:
            if title not in seen:
                seen.add(title)
                items.append((time, title))
        if len(items) < min_seq_len:
            continue
        if len(catalog) - len(seen) < n_neg:
            raise ValueError(
                f"user {user!r} interacted with {len(seen)} of {len(catalog)} catalog titles: fewer than "
                f"{n_neg} remain for negatives (lower num_candidates or use a larger catalog)"
            )
        # Rejection sampling is cheap while the user has seen a small part of the catalog.
        pool = None if len(seen) * 2 <= len(catalog) else [t for t in catalog if t not in seen]
        for t in range(min_seq_len - 1, len(items)):
            time, target = items[t]
            rng = random.Random(stable_seed(seed, user, t))
            if pool is None:
                negs, chosen = [], set()
                while len(negs) < n_neg:
                    title = catalog[rng.randrange(len(catalog))]
                    if title not in seen and title not in chosen:
                        chosen.add(title)
                        negs.append(title)
            else:
                negs = rng.sample(pool, n_neg)
            cands = negs + [target]
            rng.shuffle(cands)
            examples.append(
                RecExample(
                    user_id=str(user),
                    history=tuple(title for _, title in items[max(0, t - max_history) : t]),
                    candidates=tuple(cands),
                    target=target,
                    domain=domain,
                    timestamp=float(time),
                    example_id=f"{user}:{t}",
                )
            )
    return examples


def splits_from_sequences(
    sequences: Mapping[str, Sequence[tuple[float, str]]],
    *,
    domain: str,
    max_history: int = 10,
    min_seq_len: int = 3,
    num_candidates: int = 20,
    seed: int = 0,
    split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
    catalog: Sequence[str] | None = None,
    progress: bool = True,
    info: dict | None = None,
) -> DatasetSplits:
    """``examples_from_sequences`` (a progress bar over users unless ``progress=False``) followed by
    the chronological 8:1:1 split."""
    examples = examples_from_sequences(
        sequences,
        domain=domain,
        max_history=max_history,
        min_seq_len=min_seq_len,
        num_candidates=num_candidates,
        seed=seed,
        catalog=catalog,
        progress=progress,
    )
    if not examples:
        raise ValueError(f"no user has a sequence of at least {min_seq_len} interactions: no examples")
    train, valid, test = chronological_split(examples, split_ratios)
    meta = {
        "domain": domain,
        "num_users": len(sequences),
        "num_examples": len(examples),
        "max_history": max_history,
        "min_seq_len": min_seq_len,
        "num_candidates": num_candidates,
        "seed": seed,
    }
    meta.update(info or {})
    return DatasetSplits(train, valid, test, meta)
