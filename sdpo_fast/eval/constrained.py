"""Constrained generation: greedy or beam decoding that can only spell one of the example's candidates.

The answer space is a token trie over the candidates' token ids exactly as ranking scores them
(``" " + title`` tokens then EOS: the ``candidate_ids`` of ``tokenize_examples``). At every step the
decoder may emit only a token that continues some candidate from the tokens generated so far; a
sequence ends with its candidate's EOS. So every answer is a candidate and ValidRatio is 1 by
construction; HitRatio@1 = answers equal to the target / examples.

Decoding runs through ``model.generate`` (KV cache, left-padded batches) with a
``prefix_allowed_tokens_fn`` that reads the trie. The mask is applied to the log-softmax over the
whole vocabulary, so a beam's score is its sequence log-prob under the model (what
``evaluate_ranking`` calls ``score="sum"``); beams use ``length_penalty=0`` and
``early_stopping="never"`` (plain beam search on that sum), so with ``num_beams`` >= the number of
candidates, beam search returns the candidate of highest sequence log-prob. Greedy (``num_beams=1``)
takes the best allowed token at each step.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .scoring import _EvalMode, _device, _features

__all__ = ["TokenTrie", "constrained_generate", "evaluate_constrained"]


class TokenTrie:
    """A prefix tree over token sequences that each end with ``eos`` (and hold no other ``eos``).

    ``allowed(prefix)``: the tokens that continue some sequence after ``prefix`` (in first-seen
    order; ``[]`` when ``prefix`` is no proper prefix). ``candidate(seq)``: the index of the first
    sequence equal to ``seq``, else None. Stored flat: each proper prefix (a tuple) maps to its
    children, each whole sequence to its index.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], eos_token_id: int):
        if not sequences:
            raise ValueError("TokenTrie: no sequences")
        self.eos_token_id = eos_token_id
        self._children: dict[tuple, list[int]] = {}
        self._leaves: dict[tuple, int] = {}
        for idx, seq in enumerate(sequences):
            seq = tuple(int(t) for t in seq)
            if not seq or seq[-1] != eos_token_id or eos_token_id in seq[:-1]:
                raise ValueError(f"TokenTrie: sequence {idx} must end with EOS ({eos_token_id}) and hold it only there")
            for i, tok in enumerate(seq):
                kids = self._children.setdefault(seq[:i], [])
                if tok not in kids:
                    kids.append(tok)
            self._leaves.setdefault(seq, idx)

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        return self._children.get(tuple(prefix), [])

    def candidate(self, seq: Sequence[int]) -> int | None:
        return self._leaves.get(tuple(seq))


def _answer_index(trie: TokenTrie, generated: list[int]) -> int:
    """The candidate ``generated`` spells (cut after its first EOS), or -1."""
    eos = trie.eos_token_id
    if eos not in generated:
        return -1
    found = trie.candidate(generated[: generated.index(eos) + 1])
    return -1 if found is None else found


@torch.no_grad()
def constrained_generate(model, tokenizer, features: Sequence[dict], *, num_beams: int = 1, batch_size: int = 16,
                         progress: bool = True, desc: str = "constrained decoding", **generate_kwargs) -> list[int]:
    """For each feature (``prompt_ids``, ``candidate_ids``), the index of the candidate that
    trie-constrained greedy (``num_beams=1``) or beam decoding produces after the prompt.

    Users go ``batch_size`` at a time through one left-padded ``generate`` call; ``max_new_tokens``
    is the batch's longest candidate, so every path reaches its EOS. ``generate_kwargs`` go to
    ``generate`` (e.g. ``synced_gpus=True`` under ZeRO-3). -1 would mean no candidate was reached,
    which the trie rules out.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id (candidates end with EOS)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = _device(model)
    beam_kwargs = dict(length_penalty=0.0, early_stopping="never") if num_beams > 1 else {}
    chosen: list[int] = []
    with _EvalMode(model):
        for start in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = features[start : start + batch_size]
            tries = [TokenTrie(f["candidate_ids"], eos) for f in chunk]
            prompts = [list(f["prompt_ids"]) for f in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

            def allowed(batch_id, input_ids, tries=tries, width=width):
                # Finished rows (after EOS) and dead beams are off the trie: any one token will do,
                # their score is final (finished) or -inf (dead) already.
                return tries[batch_id].allowed(input_ids[width:].tolist()) or [eos]

            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams, num_return_sequences=1,
                max_new_tokens=max(len(c) for f in chunk for c in f["candidate_ids"]), prefix_allowed_tokens_fn=allowed,
                eos_token_id=eos, pad_token_id=pad, **beam_kwargs, **generate_kwargs,
            )
            chosen += [_answer_index(t, row) for t, row in zip(tries, out[:, width:].tolist())]
    return chosen


def evaluate_constrained(model, tokenizer, examples, *, num_beams: int = 1, batch_size: int = 16, progress: bool = True,
                         return_answers: bool = False, generate_kwargs: dict | None = None, **tokenize_kwargs) -> dict:
    """``{"constrained_hit_ratio@1", "constrained_valid_ratio", "constrained_num_beams", "num_examples"}``
    of trie-constrained decoding on ``examples`` (``RecExample``s, tokenised with ``tokenize_kwargs``,
    or ``tokenize_dataset`` rows). ``return_answers`` adds ``"answers"`` (chosen candidate indices)."""
    feats = _features(examples, tokenizer, tokenize_kwargs)
    chosen = constrained_generate(model, tokenizer, feats, num_beams=num_beams, batch_size=batch_size,
                                  progress=progress, **(generate_kwargs or {}))
    result = constrained_metrics(chosen, [int(f["target_index"]) for f in feats])
    result["constrained_num_beams"] = num_beams
    if return_answers:
        result["answers"] = chosen
    return result


def constrained_metrics(chosen: Sequence[int], target_indices: Sequence[int]) -> dict:
    """HitRatio@1 and ValidRatio of chosen candidate indices (-1: none)."""
    if len(chosen) != len(target_indices) or not chosen:
        raise ValueError("constrained_metrics: chosen and target_indices must be non-empty and of equal length")
    n = len(chosen)
    return {
        "constrained_hit_ratio@1": sum(int(c) == int(t) for c, t in zip(chosen, target_indices)) / n,
        "constrained_valid_ratio": sum(int(c) >= 0 for c in chosen) / n,
        "num_examples": n,
    }
