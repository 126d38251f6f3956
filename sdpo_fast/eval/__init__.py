"""Evaluation of LM recommenders: generation (HitRatio@1, ValidRatio) and ranking (HR@1, NDCG@5, MRR).

Generation (the paper's protocol): greedy decoding after the prompt; the answer is matched to the
example's candidates.

* ``match="exact"`` (default): the answer's first line, normalised (``normalize_title``: Unicode
  NFKC, lower case, whitespace collapsed, surrounding quotes and punctuation stripped), must equal
  exactly one normalised candidate title.
* ``match="substring"`` (a normalised approximation of the paper's rule): every candidate whose
  normalised title occurs inside the normalised answer counts as named. Difference: a short title inside a longer one miscounts, e.g.
  candidates "Heat" and "White Heat" with the answer "White Heat" name two candidates, so the
  answer is invalid under the substring rule and a hit under the exact one; a chatty answer
  ("I recommend Heat because ...") is valid only under the substring rules.
* ``match="paper"`` (S-DPO's code as written): the raw title is a case-sensitive substring of the
  raw answer.
* ``match="llara"`` (LLaRA's): lower-cased substring, and HitRatio@1 is divided by the valid answers
  only (not by all examples).

ValidRatio = answers naming exactly one candidate / examples; HitRatio@1 = answers naming exactly
one candidate which is the target / examples (``"llara"``: / valid answers).

Constrained decoding (``constrained``): greedy or beam search restricted to a token trie of the
candidates, so every answer is a candidate. Full-catalog ranking (``full_catalog``): every catalog
title scored against the user's prompt in shared-prefix chunks, HR@{1,5,10,20} and NDCG@{5,10,20}.

Ranking: each user's candidates (typically 20) are scored in one shared-prefix forward
(``sdpo_fast.candidate_logprobs``: one group, column order = candidate order). Score = sequence
log-prob of ``" " + title + EOS`` (``score="sum"``) or its per-token mean (``score="mean"``). The
target's rank counts ties against it (rank = 1 + #other candidates scoring >= the target), so a
constant scorer gets HR@1 = 0, not 1. HR@1 = mean(rank == 1), NDCG@5 = mean(1/log2(rank + 1) if
rank <= 5 else 0), MRR = mean(1/rank).

Also: baseline scorers (random, popularity, co-occurrence) on the same metrics, and JSON results
plus a printed table.

The package: ``metrics`` (matching rules, generation and ranking metrics), ``scoring`` (model scoring,
greedy generation, the evaluations, the shard-and-gather hook the trainer uses), ``constrained``
(the token trie and constrained decoding), ``full_catalog`` (full-catalog ranking), ``protocols``
(``evaluate_features``: the trainer's ranking / generation / constrained evaluation), ``baselines``
(random, popularity, co-occurrence scorers), ``cli`` (results table, JSON, ``python -m sdpo_fast.eval``).
"""

from .baselines import CooccurrenceScorer, PopularityScorer, RandomScorer, evaluate_baselines, evaluate_scorer
from .cli import format_table, main, save_results
from .constrained import TokenTrie, constrained_generate, constrained_metrics, evaluate_constrained
from .full_catalog import (
    catalog_chunks, catalog_token_ids, evaluate_full_catalog, full_catalog_metrics, full_catalog_ranks, score_catalog,
    titles_before,
)
from .metrics import MATCH_RULES, generation_metrics, match_answer, normalize_title, ranking_metrics
from .protocols import evaluate_features
from .scoring import (
    Sharding, default_max_new_tokens, evaluate_generation, evaluate_ranking, greedy_generate, score_candidates,
)

__all__ = [
    "normalize_title",
    "MATCH_RULES",
    "match_answer",
    "generation_metrics",
    "ranking_metrics",
    "score_candidates",
    "evaluate_ranking",
    "greedy_generate",
    "evaluate_generation",
    "evaluate_features",
    "default_max_new_tokens",
    "Sharding",
    "TokenTrie",
    "catalog_chunks",
    "catalog_token_ids",
    "evaluate_full_catalog",
    "full_catalog_metrics",
    "full_catalog_ranks",
    "score_catalog",
    "titles_before",
    "constrained_generate",
    "constrained_metrics",
    "evaluate_constrained",
    "RandomScorer",
    "PopularityScorer",
    "CooccurrenceScorer",
    "evaluate_scorer",
    "evaluate_baselines",
    "format_table",
    "save_results",
    "main",
]
