"""The trainer's evaluation: the ranking, free-generation and constrained-decoding protocols on
tokenised features, each process on its shard (``Sharding``), the metrics gathered."""

from __future__ import annotations

from typing import Sequence

import torch

from .constrained import constrained_generate, constrained_metrics
from .metrics import generation_metrics, ranking_metrics
from .scoring import Sharding, default_max_new_tokens, greedy_generate, score_candidates

__all__ = ["evaluate_features"]


def evaluate_features(model, tokenizer, features: Sequence[dict], *, ranking: bool = True, generation: bool = True,
                      constrained: bool = False, num_beams: int = 1, batch_size: int = 16, backend: str = "auto",
                      sharding: Sharding = Sharding(), generate_kwargs: dict | None = None, generation_model=None) -> dict:
    """Ranking, free generation and/or constrained decoding metrics of ``model`` on tokenised
    ``features``, each process scoring its shard of them through ``sharding``; every process returns
    the metrics of all of them. ``generation_model``: what ``generate`` is called on (default
    ``model``; the trainer gives the unwrapped module of a DeepSpeed engine).

    Free generation is reported under three rules from the same answers: ``hit_ratio@1`` /
    ``valid_ratio`` (``"exact"``), ``paper_hit_ratio@1`` / ``paper_valid_ratio`` (``"paper"``) and
    ``llara_hit_ratio@1`` / ``llara_valid_ratio`` (``"llara"``). Constrained decoding adds
    ``constrained_hit_ratio@1``, ``constrained_valid_ratio`` and ``constrained_num_beams``."""
    n = len(features)
    mine = [features[i] for i in sharding.indices(n)]
    targets = [int(f["target_index"]) for f in features]
    gen_model = generation_model if generation_model is not None else model
    result = {}
    if ranking:
        scores = score_candidates(model, mine, batch_size=batch_size, backend=backend,
                                  pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
                                  progress=sharding.progress)
        width = max(len(f["candidate_ids"]) for f in features)  # same shape on every process for the gather
        scores = torch.nn.functional.pad(scores, (0, width - scores.shape[1]), value=float("-inf"))
        result.update(ranking_metrics(sharding.gather_rows(scores, n), targets))
    if generation:
        answers = greedy_generate(gen_model, tokenizer, [f["prompt_ids"] for f in mine],
                                  max_new_tokens=default_max_new_tokens(features), batch_size=batch_size,
                                  progress=sharding.progress, **(generate_kwargs or {}))
        answers = sharding.gather_objects(answers)[:n]
        cands = [f["candidates"] for f in features]
        gen = generation_metrics(answers, cands, targets, "exact")
        result.update({k: v for k, v in gen.items() if k != "num_examples"}, match="exact")
        for rule in ("paper", "llara"):
            gen = generation_metrics(answers, cands, targets, rule)
            result.update({f"{rule}_hit_ratio@1": gen["hit_ratio@1"], f"{rule}_valid_ratio": gen["valid_ratio"]})
    if constrained:
        chosen = constrained_generate(gen_model, tokenizer, mine, num_beams=num_beams, batch_size=batch_size,
                                      progress=sharding.progress, **(generate_kwargs or {}))
        chosen = sharding.gather_objects(chosen)[:n]
        result.update({k: v for k, v in constrained_metrics(chosen, targets).items() if k != "num_examples"},
                      constrained_num_beams=num_beams)
    return result
