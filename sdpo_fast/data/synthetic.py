"""The embedded default dataset: a synthetic catalog and users driven by a latent preference model.

Generative model (numbers are the defaults):

* ``num_genres`` (8) genres with random centroids in R^``latent_dim`` (16). Item ``i`` has a genre,
  a latent vector ``v_i = centroid[genre] + item_noise * N(0, I)`` and a log-popularity
  ``b_i ~ N(0, popularity_scale)``. Titles are readable and genre-flavoured ("The Silent Nebula",
  "Shadow of Blackmoor"), unique.
* User ``u`` likes one or two genres: ``p_u = mean(centroids) + user_noise * N(0, I)``. Their sequence
  (length uniform in [``min_interactions``, ``max_interactions``]) samples item ``t`` from
  ``softmax((preference * v.s_t + transition * v.v_{t-1} + b) / temperature)`` over unseen items,
  with a drifting state ``s_t = (1 - drift) s_{t-1} + drift v_{t-1}``, ``s_0 = p_u``.
* Times: each user starts at a random day in [0, 500) and interactions follow at exponential gaps
  (mean 40 days), so a user's sequence usually spans the split points, like the real data.

With the defaults, on the test split (517 users' next items, 20 candidates): a co-occurrence scorer
fit on train reaches HR@1 0.44, popularity 0.19, random about 0.05 (see ``eval.CooccurrenceScorer``).
So the next item is predictable from the history (same-genre, similar items are likely), items close
to the target exist among the candidates by chance (hard negatives), and popular items are more
likely: a co-occurrence or popularity scorer beats chance, a random one does not. Examples are then
built by the same preprocessing as the real loaders (``sequences.splits_from_sequences``).
"""

from __future__ import annotations

import numpy as np

from .examples import DatasetSplits
from .sequences import splits_from_sequences

__all__ = ["make_synthetic", "synthetic_catalog"]

_GENRES = {
    "space": ["Star", "Orbit", "Nebula", "Comet", "Galaxy", "Rocket", "Planet", "Eclipse", "Moon", "Void", "Signal", "Horizon"],
    "mystery": ["Secret", "Clue", "Shadow", "Cipher", "Witness", "Alibi", "Riddle", "Mask", "Key", "Letter", "Mirror", "Verdict"],
    "romance": ["Heart", "Kiss", "Promise", "Wedding", "Rose", "Summer", "Letter", "Dance", "Sweetheart", "Vow", "Garden", "Dream"],
    "western": ["Canyon", "Outlaw", "Saddle", "Sheriff", "Frontier", "Mesa", "Stallion", "Railroad", "Ranch", "Gold", "Dust", "Trail"],
    "horror": ["Crypt", "Curse", "Ghost", "Raven", "Fog", "Skull", "Asylum", "Hunger", "Coffin", "Grave", "Wolf", "Night"],
    "comedy": ["Party", "Roommate", "Holiday", "Prank", "Wedding", "Dinner", "Road Trip", "Camp", "Reunion", "Vacation", "Neighbor", "Job"],
    "war": ["Battalion", "Trench", "Siege", "Frontline", "Convoy", "Bunker", "Sniper", "Armistice", "Fleet", "Bridge", "Garrison", "Flag"],
    "fantasy": ["Dragon", "Crown", "Wizard", "Sword", "Throne", "Elf", "Kingdom", "Spell", "Tower", "Quest", "Griffin", "Rune"],
    "sports": ["Champion", "Goal", "Rookie", "Season", "Playoff", "Coach", "Stadium", "Rally", "Victory", "League", "Final", "Sprint"],
    "crime": ["Heist", "Gang", "Detective", "Racket", "Getaway", "Mob", "Informant", "Vault", "Syndicate", "Badge", "Score", "Street"],
    "musical": ["Song", "Melody", "Chorus", "Encore", "Rhythm", "Stage", "Ballad", "Tune", "Harmony", "Overture", "Duet", "Band"],
    "documentary": ["Journey", "Ocean", "Earth", "Ice", "River", "Desert", "Forest", "Machine", "City", "Voyage", "Island", "Planet"],
}
_ADJECTIVES = [
    "Silent", "Last", "Golden", "Broken", "Hidden", "Burning", "Lost", "Secret", "Crimson", "Endless", "Wild",
    "Frozen", "Little", "Dark", "Bright", "Lonely", "Final", "Savage", "Quiet", "Distant", "Electric", "Midnight",
    "Iron", "Velvet", "Scarlet", "Hollow", "Restless", "Forgotten", "Second", "Long",
]
_PLACES = [
    "Blackmoor", "Avalon", "the North", "Ravenwood", "Eldoria", "Paris", "Brooklyn", "the Valley", "Tomorrow",
    "Kingsport", "the Deep", "Marrow Creek", "Sundown", "the West", "Old Harbor", "Nowhere",
]


def synthetic_catalog(num_items: int, num_genres: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """``num_items`` unique readable titles and their genre ids ``[num_items]`` (balanced genres)."""
    if not 1 <= num_genres <= len(_GENRES):
        raise ValueError(f"num_genres must be in [1, {len(_GENRES)}], got {num_genres}")
    genres = list(_GENRES)[:num_genres]
    genre_of = rng.permutation(np.arange(num_items) % num_genres)
    pools = {}
    for g, name in enumerate(genres):
        words = _GENRES[name]
        combos = [f"The {a} {w}" for a in _ADJECTIVES for w in words]
        combos += [f"{w} of {p}" for w in words for p in _PLACES]
        combos += [f"{a} {w}" for a in _ADJECTIVES for w in words]
        pools[g] = [combos[i] for i in rng.permutation(len(combos))]
    titles, used = [], set()
    cursor = dict.fromkeys(range(num_genres), 0)
    for i in range(num_items):
        g = int(genre_of[i])
        while True:
            if cursor[g] >= len(pools[g]):
                raise ValueError(f"num_items={num_items} is too many for the title generator; use fewer items or more genres")
            title = pools[g][cursor[g]]
            cursor[g] += 1
            if title not in used:  # genres share a few words ("Letter", "Wedding", "Planet")
                break
        used.add(title)
        titles.append(title)
    return titles, genre_of


def make_synthetic(
    num_users: int = 600,
    num_items: int = 240,
    num_genres: int = 8,
    latent_dim: int = 16,
    min_interactions: int = 5,
    max_interactions: int = 16,
    item_noise: float = 0.6,
    user_noise: float = 0.3,
    popularity_scale: float = 0.7,
    preference: float = 0.8,
    transition: float = 0.4,
    drift: float = 0.2,
    temperature: float = 1.0,
    seed: int = 0,
    max_history: int = 10,
    num_candidates: int = 20,
    split_ratios=(0.8, 0.1, 0.1),
    progress: bool = False,
) -> DatasetSplits:
    """Generate the synthetic dataset (module docstring); same arguments -> identical splits.

    Users have between ``min_interactions`` and ``max_interactions`` interactions. Examples need
    sequences of at least 3 items, as for the real loaders, so a user with ``n`` interactions gives
    ``n - 2`` examples.
    """
    if num_users < 1 or latent_dim < 1:
        raise ValueError("num_users and latent_dim must be >= 1")
    if not 3 <= min_interactions <= max_interactions:
        raise ValueError(f"need 3 <= min_interactions <= max_interactions, got {min_interactions}, {max_interactions}")
    if num_items < max_interactions + num_candidates:
        raise ValueError(
            f"num_items={num_items} too small: a user with {max_interactions} items needs {num_candidates - 1} unseen ones"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rng = np.random.default_rng(seed)
    titles, genre_of = synthetic_catalog(num_items, num_genres, rng)
    centroids = rng.normal(size=(num_genres, latent_dim)) / np.sqrt(latent_dim) * 2.0
    vecs = centroids[genre_of] + item_noise * rng.normal(size=(num_items, latent_dim)) / np.sqrt(latent_dim) * 2.0
    log_pop = popularity_scale * rng.normal(size=num_items)

    sequences = {}
    for u in range(num_users):
        liked = rng.choice(num_genres, size=1 + int(rng.random() < 0.5), replace=False)
        pref = centroids[liked].mean(0) + user_noise * rng.normal(size=latent_dim) / np.sqrt(latent_dim) * 2.0
        length = int(rng.integers(min_interactions, max_interactions + 1))
        time = float(rng.uniform(0.0, 500.0))
        state, last = pref, None
        seen = np.zeros(num_items, dtype=bool)
        seq = []
        for _ in range(length):
            logits = preference * vecs @ state + log_pop
            if last is not None:
                logits = logits + transition * vecs @ vecs[last]
            logits = np.where(seen, -np.inf, logits / temperature)
            p = np.exp(logits - logits.max())
            item = int(rng.choice(num_items, p=p / p.sum()))
            seen[item] = True
            time += float(rng.exponential(40.0))
            seq.append((time, titles[item]))
            state = (1 - drift) * state + drift * vecs[item]
            last = item
        sequences[f"u{u}"] = seq
    info = {
        "source": "synthetic",
        "num_items": num_items,
        "num_genres": num_genres,
        "genres": {t: list(_GENRES)[int(g)] for t, g in zip(titles, genre_of)},
    }
    return splits_from_sequences(
        sequences,
        domain="movie",
        max_history=max_history,
        min_seq_len=3,
        num_candidates=num_candidates,
        seed=seed,
        split_ratios=split_ratios,
        catalog=titles,
        progress=progress,
        info=info,
    )
