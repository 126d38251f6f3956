"""Tokenizer for the tiny default model, and example tokenisation (``datasets.map`` with caching).

Truncation rules (``tokenize_example``):

* Candidates: each is ``tokens(" " + title) + [eos]``. A candidate longer than
  ``max_candidate_tokens`` keeps its first ``max_candidate_tokens - 1`` title tokens and the EOS
  (``max_candidate_tokens >= 2``), so it is never cut to nothing and always ends with EOS; the number
  of cut candidates is recorded per example (``num_truncated_candidates``).
* Prompt: built with the whole history; while it has more than ``max_prompt_tokens`` tokens, the
  OLDEST history item is dropped and the prompt rebuilt. The candidate list is never cut (it is the
  choice set). If even one history item does not fit, ``ValueError`` names the example and sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Iterable, Sequence

from .examples import DatasetSplits, RecExample
from .prompts import TEMPLATES, completion_text, format_prompt

__all__ = ["build_tokenizer", "tokenize_example", "tokenize_examples", "tokenize_dataset", "TOKENIZED_COLUMNS"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Columns added by ``tokenize_dataset`` (beside the RecExample fields).
TOKENIZED_COLUMNS = (
    "prompt_ids",  # list[int]
    "candidate_ids",  # list[list[int]], candidate order, each ending with eos
    "target_index",  # int, column of the target
    "prompt_len",  # int
    "candidate_lens",  # list[int]
    "history_used",  # int, history items kept in the prompt (after truncation)
    "num_truncated_candidates",  # int
)


def _training_texts(data) -> Iterable[str]:
    if isinstance(data, DatasetSplits):
        titles = data.all_titles()
        examples = [ex for _, split in data.items() for ex in split[:200]]
    else:
        examples = [x for x in data if isinstance(x, RecExample)]
        titles = [x for x in data if isinstance(x, str)]
        titles += sorted({t for ex in examples for t in ex.history + ex.candidates})
    for title in titles:
        yield completion_text(title)
    for ex in examples:  # the templates' words, in every domain seen
        for k in range(len(TEMPLATES)):
            yield format_prompt(ex, template=k)


def build_tokenizer(data, *, vocab_size: int = 1024, min_frequency: int = 2, save_dir: str | None = None):
    """Train a small byte-level BPE tokenizer on the data's text for the tiny default model.

    Args:
        data: ``DatasetSplits``, or an iterable of ``RecExample`` and/or strings.
        vocab_size: target vocabulary size including the 4 special tokens (``<pad> <s> </s> <unk>``).
        save_dir: when given, the tokenizer is saved there (``from_pretrained`` reloads it).

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos set. Byte-level, so any text
        encodes; ``len(tokenizer)`` may be a little under ``vocab_size`` on small data.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(data), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "left"  # generation pads on the left
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_example(
    example: RecExample,
    tokenizer,
    *,
    max_prompt_tokens: int | None = None,
    max_candidate_tokens: int | None = None,
    seed: int = 0,
    template: int | None = None,
    title_cache: dict | None = None,
) -> dict:
    """Token ids of one example (module docstring for the truncation rules).

    Returns a dict with the ``TOKENIZED_COLUMNS`` keys.
    """
    return tokenize_examples(
        [example],
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_candidate_tokens=max_candidate_tokens,
        seed=seed,
        template=template,
        title_cache=title_cache,
    )[0]


def tokenize_examples(
    examples: Sequence[RecExample],
    tokenizer,
    *,
    max_prompt_tokens: int | None = None,
    max_candidate_tokens: int | None = None,
    seed: int = 0,
    template: int | None = None,
    title_cache: dict | None = None,
    list_candidates: bool = True,
) -> list[dict]:
    """``tokenize_example`` for many examples, encoding the prompts in one batched call.

    ``list_candidates=False``: prompts without the candidate list (``prompts.HISTORY_TEMPLATES``,
    the full-catalog prompt); the candidates are still tokenised.

    ``title_cache`` (title -> ids of ``" " + title``), when given, is read and filled: catalogs repeat
    the same titles in every example.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id (candidates end with EOS)")
    if max_candidate_tokens is not None and max_candidate_tokens < 2:
        raise ValueError(f"max_candidate_tokens must be >= 2 (one title token + EOS), got {max_candidate_tokens}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    title_cache = {} if title_cache is None else title_cache
    missing = sorted({c for ex in examples for c in ex.candidates if c not in title_cache})
    if missing:
        title_cache.update(zip(missing, _encode(tokenizer, [completion_text(c) for c in missing])))
    prompts = _encode(tokenizer, [format_prompt(ex, seed=seed, template=template, list_candidates=list_candidates)
                                  for ex in examples])
    results = []
    for ex, prompt in zip(examples, prompts):
        cut = 0
        cands = []
        for title in ex.candidates:
            ids = title_cache[title]
            if not ids:
                raise ValueError(f"example {ex.example_id}: candidate {title!r} encodes to no tokens")
            if max_candidate_tokens is not None and len(ids) + 1 > max_candidate_tokens:
                ids = ids[: max_candidate_tokens - 1]
                cut += 1
            cands.append(list(ids) + [eos])
        history = list(ex.history)
        while max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
            if len(history) <= 1:
                raise ValueError(
                    f"example {ex.example_id}: the prompt needs {len(prompt)} tokens with "
                    f"{len(history)} history item(s) and all {len(ex.candidates)} candidates, more than "
                    f"max_prompt_tokens={max_prompt_tokens}"
                )
            history = history[1:]  # drop the oldest
            prompt = _encode(tokenizer, [format_prompt(ex, seed=seed, template=template, history=history,
                                                       list_candidates=list_candidates)])[0]
        results.append(
            {
                "prompt_ids": prompt,
                "candidate_ids": cands,
                "target_index": ex.target_index,
                "prompt_len": len(prompt),
                "candidate_lens": [len(c) for c in cands],
                "history_used": len(history),
                "num_truncated_candidates": cut,
            }
        )
    return results


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.blake2b((text + repr(tokenizer.eos_token_id)).encode(), digest_size=16).hexdigest()


def _examples_hash(examples: Sequence[RecExample]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        h.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def tokenize_dataset(
    examples: Sequence[RecExample],
    tokenizer,
    *,
    max_prompt_tokens: int | None = None,
    max_candidate_tokens: int | None = None,
    seed: int = 0,
    template: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    desc: str = "tokenizing",
    max_positions: int | None = None,
):
    """A ``datasets.Dataset`` of ``examples`` with the ``TOKENIZED_COLUMNS`` added, via ``datasets.map``.

    Caching: with ``cache_dir``, the result is written to
    ``cache_dir/tokenized-<key>.arrow`` where the key hashes the examples, the tokenizer and every
    option; a later call with the same inputs loads that file instead of tokenising again.
    Without ``cache_dir`` nothing is written. A warning reports how many candidates were cut and
    history items dropped by the truncation rules.

    The dataset also has an ``idx`` column (position in ``examples``), which the collator reports.

    ``max_positions`` (the model's ``max_position_embeddings``): every example's prompt plus its
    longest candidate must fit, else ``ValueError`` names the first example that does not (checked
    on cached results too, before any training step).
    """
    import datasets

    rows = [dict(ex.to_dict(), idx=i) for i, ex in enumerate(examples)]
    if not rows:
        raise ValueError("tokenize_dataset: no examples")
    options = dict(max_prompt_tokens=max_prompt_tokens, max_candidate_tokens=max_candidate_tokens, seed=seed, template=template)
    key = hashlib.blake2b(
        json.dumps([_examples_hash(examples), _tokenizer_hash(tokenizer), options, 1], sort_keys=True).encode(),
        digest_size=16,
    ).hexdigest()
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(os.fspath(cache_dir), f"tokenized-{key}.arrow")
        if os.path.exists(cache_file):
            return _check_positions(datasets.Dataset.from_file(cache_file), examples, max_positions)
    ds = datasets.Dataset.from_list(rows)

    title_cache: dict = {}

    def fn(batch):
        cols = {c: [] for c in TOKENIZED_COLUMNS}
        exs = [RecExample.from_dict({k: batch[k][i] for k in batch}) for i in range(len(batch["idx"]))]
        for row in tokenize_examples(exs, tokenizer, title_cache=title_cache, **options):
            for c, v in row.items():
                cols[c].append(v)
        return cols

    out = ds.map(
        fn,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        cache_file_name=cache_file,
        load_from_cache_file=True,
        new_fingerprint=key,
        desc=desc,
    )
    cut = sum(out["num_truncated_candidates"])
    cut_history = sum(len(h) - u for h, u in zip(out["history"], out["history_used"]))
    if cut or cut_history:
        warnings.warn(
            f"tokenize_dataset: {cut} candidate(s) cut to max_candidate_tokens={max_candidate_tokens} and "
            f"{cut_history} history item(s) dropped for max_prompt_tokens={max_prompt_tokens}",
            stacklevel=2,
        )
    return _check_positions(out, examples, max_positions)


def _check_positions(ds, examples: Sequence[RecExample], max_positions: int | None):
    """``ds``, after checking that prompt + longest candidate fits ``max_positions`` for every row."""
    if max_positions is None:
        return ds
    for i, (p, lens) in enumerate(zip(ds["prompt_len"], ds["candidate_lens"])):
        longest = max(lens)
        if p + longest > max_positions:
            ex = examples[i]
            title = ex.candidates[lens.index(longest)]
            raise ValueError(
                f"example {ex.example_id or i} (user {ex.user_id}): its prompt ({p} tokens) and longest candidate "
                f"({longest} tokens, {title[:40]!r}) need {p + longest} positions, more than the model's "
                f"{max_positions}; shorten the titles or lower --max_prompt_tokens"
            )
    return ds
