"""Model evaluation: candidate scoring through the shared-prefix path, greedy generation, the ranking
and generation evaluations, and the ``Sharding`` hook ``protocols.evaluate_features`` and
``full_catalog`` take (each rank scores its shard, the hook gathers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.examples import RecExample
from ..data.tokenize import tokenize_examples
from ..model import candidate_logprobs, unwrap_causal_lm
from ..packing import pack_groups
from .metrics import generation_metrics, ranking_metrics

# Generation budget beyond the longest candidate (EOS included): room for a little formatting.
_EXTRA_NEW_TOKENS = 4


def default_max_new_tokens(features: Sequence[dict]) -> int:
    """The one rule for the generation budget: the longest candidate (with EOS) + 4 tokens."""
    return max(len(c) for f in features for c in f["candidate_ids"]) + _EXTRA_NEW_TOKENS


def _candidates_of(example):
    return example.candidates if isinstance(example, RecExample) else example["candidate_ids"]


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


def _device(model) -> torch.device:
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
        max_new_tokens: default ``default_max_new_tokens`` (the longest candidate with EOS + 4 tokens).
        match: ``"exact"`` or ``"substring"`` (the paper's rule).
        return_answers: add ``"answers"`` (list of strings) to the result.
    """
    if match not in ("exact", "substring"):
        raise ValueError(f"match must be 'exact' or 'substring', got {match!r}")
    feats = _features(examples, tokenizer, tokenize_kwargs)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(feats)
    answers = greedy_generate(model, tokenizer, [f["prompt_ids"] for f in feats], max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress, **(generate_kwargs or {}))
    result = generation_metrics(answers, [f["candidates"] for f in feats], [int(f["target_index"]) for f in feats], match)
    result["match"] = match
    if return_answers:
        result["answers"] = answers
    return result


@dataclass(frozen=True)
class Sharding:
    """How ``evaluate_features`` splits work over processes: ``indices(n)`` the rows this process
    scores, ``gather_rows(tensor [n_mine, ...], n)`` the ``[n, ...]`` rows of all processes in order,
    ``gather_objects(list)`` likewise for Python objects; ``progress`` whether this process shows bars.
    The default is one process."""

    indices: Callable[[int], Sequence[int]] = range
    gather_rows: Callable[[torch.Tensor, int], torch.Tensor] = lambda t, n: t
    gather_objects: Callable[[list], list] = lambda xs: xs
    progress: bool = True
