"""Recommendation data for S-DPO: examples, loaders, prompts, tokenisation, negatives, collation.

Typical use (the trainer's path)::

    from sdpo_fast.data import load_dataset, build_tokenizer, tokenize_dataset, SDPOCollator

    splits = load_dataset("synthetic", seed=0)             # or "recbole", path="ml-100k/" ...
    tok = build_tokenizer(splits, vocab_size=1024)          # tiny default model only
    train = tokenize_dataset(splits.train, tok, max_prompt_tokens=512, cache_dir="cache/")
    collate = SDPOCollator(tok, num_negatives=3, token_budget=4096)
    batch = collate([train[i] for i in range(8)])           # SDPOBatch; batch.packed is a PackedBatch
"""

from .collate import SDPOBatch, SDPOCollator, TokenBudgetBatchSampler, group_token_bound
from .catalog import PLACEHOLDER_TITLES, build_catalog, clean_title
from .examples import DOMAINS, DatasetSplits, RecExample, chronological_split, sample_over_users, stable_seed
from .loaders import (
    DataFormatError,
    clean_goodreads_title,
    clean_movielens_title,
    load_dataset,
    load_goodreads,
    load_jsonl,
    load_lastfm,
    load_movielens,
    load_recbole,
    load_sdpo_json,
)
from .negatives import NEGATIVES, boundary_negatives, hard_negatives, policy_scores, random_negatives
from .prompts import TEMPLATES, completion_text, format_prompt
from .sequences import examples_from_sequences, splits_from_sequences
from .synthetic import make_synthetic
from .tokenize import TOKENIZED_COLUMNS, build_tokenizer, tokenize_dataset, tokenize_example, tokenize_examples

__all__ = [
    "DOMAINS",
    "PLACEHOLDER_TITLES",
    "DataFormatError",
    "DatasetSplits",
    "RecExample",
    "SDPOBatch",
    "SDPOCollator",
    "TEMPLATES",
    "TOKENIZED_COLUMNS",
    "TokenBudgetBatchSampler",
    "build_catalog",
    "build_tokenizer",
    "chronological_split",
    "clean_goodreads_title",
    "clean_movielens_title",
    "clean_title",
    "completion_text",
    "examples_from_sequences",
    "format_prompt",
    "group_token_bound",
    "hard_negatives",
    "boundary_negatives",
    "policy_scores",
    "NEGATIVES",
    "load_dataset",
    "load_goodreads",
    "load_jsonl",
    "load_lastfm",
    "load_movielens",
    "load_recbole",
    "load_sdpo_json",
    "make_synthetic",
    "random_negatives",
    "sample_over_users",
    "splits_from_sequences",
    "stable_seed",
    "tokenize_dataset",
    "tokenize_example",
    "tokenize_examples",
]
