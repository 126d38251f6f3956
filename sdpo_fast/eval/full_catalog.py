"""Full-catalog ranking: every catalog title scored against a user's prompt; HR@{1,5,10,20} and
NDCG@{5,10,20} of the target's rank among all of them (the full-ranking protocol of SPRec and of
sequential recommenders generally, instead of 20 sampled candidates).

Protocol:

* Catalog: the dataset's distinct titles (``DatasetSplits.all_titles()``: for the loaders, every title
  that occurs in the interactions, which is the pool candidates are drawn from). Item ``i`` is scored
  as its sequence log-prob ``log p(" " + title + EOS | prompt)``, the same tokens and score as
  ``evaluate_ranking`` (``score="sum"``).
* Prompt (``prompt=``): ``"history"`` (default) is the example's prompt wording without the candidate
  list (``sdpo_fast.data.prompts.HISTORY_TEMPLATES``): SPRec and BIGRec-style full ranking prompt with
  the history only, and a prompt that lists 20 candidates, the target among them, would tell the
  model where to look. ``"listed"`` is the ranking prompt itself (with its 20 candidates): what a
  model trained on those prompts sees, scoring the whole catalog beyond the listed titles.
* Left out: the titles each user interacted with before the target (``exclude``; default the
  example's history, the trainer gives every earlier interaction, ``titles_before``). The target is
  never left out (the loaders drop repeated interactions, so it is never among them anyway).
* Rank = 1 + #(other scored items with score >= the target's): ties count against the target, as in
  ``evaluate_ranking``. HR@k = mean(rank <= k); NDCG@k = mean(1/log2(rank + 1) if rank <= k else 0)
  (one relevant item, so the ideal DCG is 1).

Cost: per user, one shared-prefix forward per chunk of the catalog. Chunks are consecutive catalog
items holding at most ``max_chunk_tokens`` item tokens (an item longer than that is a chunk of its
own), so the chunking, and the number of forwards, is the same for every user: under ZeRO-3 every
rank runs the same forwards. Every item is scored (left-out ones are masked afterwards). The prompt
is computed once per chunk; scores do not depend on the chunk size.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.examples import RecExample
from ..data.prompts import completion_text
from ..data.tokenize import tokenize_examples
from ..model import candidate_logprobs
from ..packing import pack_groups
from .scoring import Sharding, _device, _EvalMode

__all__ = [
    "HR_KS", "NDCG_KS", "PROMPTS", "catalog_chunks", "catalog_token_ids", "evaluate_full_catalog", "full_catalog_metrics",
    "full_catalog_ranks", "score_catalog", "titles_before",
]

HR_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
PROMPTS = ("history", "listed")


def catalog_token_ids(tokenizer, titles: Sequence[str], max_candidate_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each title as a candidate: ``tokens(" " + title)`` (cut to ``max_candidate_tokens - 1``)
    then EOS, exactly as ``tokenize_examples`` builds ``candidate_ids``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id (candidates end with EOS)")
    encoded = tokenizer([completion_text(t) for t in titles], add_special_tokens=False)["input_ids"]
    out = []
    for title, ids in zip(titles, encoded):
        if not ids:
            raise ValueError(f"catalog title {title!r} encodes to no tokens")
        if max_candidate_tokens is not None and len(ids) + 1 > max_candidate_tokens:
            ids = ids[: max_candidate_tokens - 1]
        out.append(list(ids) + [eos])
    return out


def catalog_chunks(item_ids: Sequence[Sequence[int]], max_chunk_tokens: int) -> list[range]:
    """Consecutive item ranges of at most ``max_chunk_tokens`` tokens each (one longer item alone)."""
    if max_chunk_tokens < 1:
        raise ValueError(f"max_chunk_tokens must be >= 1, got {max_chunk_tokens}")
    chunks, start, fill = [], 0, 0
    for i, ids in enumerate(item_ids):
        if i > start and fill + len(ids) > max_chunk_tokens:
            chunks.append(range(start, i))
            start, fill = i, 0
        fill += len(ids)
    if len(item_ids):
        chunks.append(range(start, len(item_ids)))
    return chunks


@torch.no_grad()
def score_catalog(model, prompts: Sequence[Sequence[int]], item_ids: Sequence[Sequence[int]], *,
                  max_chunk_tokens: int = 4096, backend: str = "auto", pad_token_id: int = 0, progress: bool = True,
                  desc: str = "full-catalog ranking") -> torch.Tensor:
    """``[U, N]`` float32 sequence log-probs of the ``N`` items after each of the ``U`` prompts: per
    prompt, one shared-prefix forward (``pack_groups`` + ``candidate_logprobs``) per chunk of items
    (``catalog_chunks``)."""
    chunks = catalog_chunks(item_ids, max_chunk_tokens)
    out = torch.empty(len(prompts), len(item_ids))
    device = _device(model)
    with _EvalMode(model):
        for u, prompt in enumerate(tqdm(prompts, desc=desc, disable=not progress, leave=False)):
            for chunk in chunks:
                batch = pack_groups([(list(prompt), [item_ids[i] for i in chunk])], pad_token_id=pad_token_id).to(device)
                out[u, chunk.start : chunk.stop] = candidate_logprobs(model, batch, backend=backend)[0].float().cpu()
    return out


def full_catalog_ranks(scores, target_index, exclude: Sequence[Iterable[int]] | None = None) -> torch.Tensor:
    """``[U]`` float64 rank of each target among the items of ``scores`` ``[U, N]`` (higher = better)
    that are not in ``exclude[u]`` (item indices; the target is never left out). Ties count against
    the target."""
    s = torch.as_tensor(scores, dtype=torch.float64).clone()
    t = torch.as_tensor(target_index, dtype=torch.long)
    if s.dim() != 2 or t.shape != (s.shape[0],):
        raise ValueError(f"full_catalog_ranks: expected scores [U, N] and targets [U], got {tuple(s.shape)}, {tuple(t.shape)}")
    if torch.isnan(s).any():
        raise ValueError("full_catalog_ranks: NaN scores")
    target = s.gather(1, t[:, None])
    counted = torch.ones_like(s, dtype=torch.bool).scatter_(1, t[:, None], False)
    for u, items in enumerate(exclude or ()):
        items = [i for i in items if i != int(t[u])]
        if items:
            counted[u, items] = False
    return 1.0 + ((s >= target) & counted).sum(1).double()


def full_catalog_metrics(ranks) -> dict:
    """``full_catalog_hr@{1,5,10,20}``, ``full_catalog_ndcg@{5,10,20}`` and ``full_catalog_users`` of ``[U]`` ranks."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError("full_catalog_metrics: need a non-empty [U] tensor of ranks")
    out = {f"full_catalog_hr@{k}": (r <= k).double().mean().item() for k in HR_KS}
    for k in NDCG_KS:
        out[f"full_catalog_ndcg@{k}"] = torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).mean().item()
    out["full_catalog_users"] = int(r.numel())
    return out


def titles_before(splits) -> dict:
    """``{example_id: frozenset of titles}``: every title the example's user interacted with before its
    target (histories and targets of the user's earlier examples, in train, valid, test order, which
    is time order, plus its own history). For ``exclude`` of ``evaluate_full_catalog``."""
    seen: dict[str, set] = {}
    out = {}
    for _, split in splits.items():
        for ex in split:
            past = seen.setdefault(ex.user_id, set())
            past.update(ex.history)
            out[ex.example_id] = frozenset(past - {ex.target})
            past.add(ex.target)
    return out


def evaluate_full_catalog(model, tokenizer, examples: Sequence[RecExample], catalog: Sequence[str], *,
                          exclude: Sequence[Iterable[str]] | None = None, prompt: str = "history",
                          max_chunk_tokens: int = 4096, backend: str = "auto", max_prompt_tokens: int | None = None,
                          max_candidate_tokens: int | None = None, seed: int = 0, template: int | None = None,
                          sharding: Sharding = Sharding(), progress: bool = True, return_ranks: bool = False) -> dict:
    """Full-catalog HR@{1,5,10,20} / NDCG@{5,10,20} of ``model`` on ``examples`` (module docstring).

    Args:
        examples: ``RecExample``s; each target must be in ``catalog``.
        catalog: the distinct titles to rank (e.g. ``splits.all_titles()``).
        exclude: per example, titles to leave out (default: its history; ``titles_before`` gives
            every earlier interaction).
        prompt: ``"history"`` (no candidate list) or ``"listed"`` (the ranking prompt).
        max_chunk_tokens: item tokens per shared-prefix forward (memory bound; scores do not depend on it).
        max_prompt_tokens, seed, template: as in ``tokenize_examples``.
        sharding: each process scores ``sharding.indices(U)`` of the users; ranks are gathered.
        return_ranks: add ``"ranks"`` (``[U]`` list).

    Returns ``{"full_catalog_hr@1", ..., "full_catalog_ndcg@20", "full_catalog_users",
    "full_catalog_items", "full_catalog_prompt"}``, the same on every process.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    if not examples:
        raise ValueError("evaluate_full_catalog: no examples")
    if exclude is not None and len(exclude) != len(examples):
        raise ValueError(f"evaluate_full_catalog: {len(exclude)} exclusion lists for {len(examples)} examples")
    index = {t: i for i, t in enumerate(catalog)}
    if len(index) != len(catalog):
        raise ValueError("evaluate_full_catalog: the catalog has duplicate titles")
    missing = next((ex for ex in examples if ex.target not in index), None)
    if missing is not None:
        raise ValueError(f"example {missing.example_id or missing.user_id}: target {missing.target!r} is not in the catalog")
    n = len(examples)
    mine = [examples[i] for i in sharding.indices(n)]
    rows = tokenize_examples(mine, tokenizer, max_prompt_tokens=max_prompt_tokens, seed=seed, template=template,
                             list_candidates=prompt == "listed")
    items = catalog_token_ids(tokenizer, list(catalog), max_candidate_tokens)
    scores = score_catalog(model, [r["prompt_ids"] for r in rows], items, max_chunk_tokens=max_chunk_tokens,
                           backend=backend, pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
                           progress=sharding.progress)
    left_out = [ex.history for ex in examples] if exclude is None else exclude
    mine_left_out = [[index[t] for t in left_out[i] if t in index] for i in sharding.indices(n)]
    ranks = full_catalog_ranks(scores, [index[ex.target] for ex in mine], mine_left_out)
    ranks = sharding.gather_rows(ranks.float()[:, None], n)[:, 0].double()
    result = full_catalog_metrics(ranks)
    result.update(full_catalog_items=len(catalog), full_catalog_prompt=prompt)
    if return_ranks:
        result["ranks"] = ranks.tolist()
    return result

