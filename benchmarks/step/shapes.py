"""Model configurations, data shapes and presets of the step benchmark, and the groups of one optimizer
step laid out for each method.

Model configurations are explicit dicts (``transformers.LlamaConfig`` fields), so nothing is fetched:
Llama-2-7B (the paper's backbone) and Llama-3.2-1B (its rope scaling left out: it changes no cost),
plus tiny CPU stand-ins that keep each one's vocabulary-to-hidden proportion.

A shape is either the paper's ("paper": prompts of 150-190 tokens, mean 170, titles of 3-8 tokens,
each drawn per group / candidate) or fixed lengths ("PxN": prompts of P tokens, titles of N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sdpo_fast
from sdpo_fast.buckets import pack_bucketed
from sdpo_fast.packing import PackedBatch

MODEL_CONFIGS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                      rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
    # CPU stand-ins: 2 layers, hidden 64; vocabulary / hidden as in the real one (7.8 and 62.6)
    "tiny-7b": dict(vocab_size=500, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                    rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "tiny-1b": dict(vocab_size=4000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096),
}

PAPER_PROMPT = (150, 190)
PAPER_TITLE = (3, 8)
ML100K_GROUPS = 78_000  # groups of one ML-100K-sized epoch (the epoch wall-clock column)

# Settings a preset fixes; every one can be overridden on the command line.
PRESETS = {
    # the default: a quick CPU look at the paper's shape
    "quick": dict(runs=["tiny-1b:full"], shapes=["paper"], ks=[1, 3, 7, 15], groups_per_step=[8], refs=["precomputed"],
                  dtype="float32", repeats=3, warmup=1, budget_s=None),
    # tiny configurations of the realistic sweep on 2 cores: 8 groups per step (the GPU sweep's 32 and
    # 128 take (a) minutes per step here), a 1 GiB cap on a micro-batch's RSS growth
    "cpu": dict(runs=["tiny-7b:lora", "tiny-1b:lora", "tiny-1b:full"], shapes=["paper"], ks=[1, 3, 7, 15, 19],
                groups_per_step=[8], refs=["precomputed", "live"], dtype="float32", repeats=3, warmup=0,
                budget_s=4.0, cpu_mem_cap_mib=1024.0),
    # the older CPU series: P = 256 and 1024, titles of 16, K up to 63
    "cpu-long": dict(runs=["tiny-1b:full", "tiny-1b:lora"], shapes=["256x16", "1024x16"], ks=[1, 3, 7, 15, 31, 63],
                     groups_per_step=[1], refs=["precomputed"], dtype="float32", repeats=3, warmup=0, budget_s=10.0),
    # the realistic sweep on one H100/H200, bf16
    "gpu": dict(runs=["llama2-7b:lora", "llama3.2-1b:lora", "llama3.2-1b:full"], shapes=["paper", "1024x16"],
                ks=[1, 3, 7, 15, 19], groups_per_step=[32, 128], refs=["precomputed", "live"], dtype="bfloat16",
                repeats=3, warmup=1, budget_s=None),
}


@dataclass(frozen=True)
class Shape:
    """Prompt and title lengths: inclusive ``(lo, hi)`` ranges, drawn uniformly per group / title."""

    name: str
    prompt: tuple
    title: tuple

    @property
    def max_span(self) -> int:
        return self.prompt[1] + self.title[1]


def parse_shape(text: str) -> Shape:
    """``"paper"`` or ``"PxN"`` (fixed prompt and title lengths); ValueError otherwise."""
    if text == "paper":
        return Shape("paper", PAPER_PROMPT, PAPER_TITLE)
    try:
        p, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must be 'paper' or 'PxN' (e.g. 1024x16), got {text!r}") from None
    if p < 1 or n < 1:
        raise ValueError(f"shape {text!r}: lengths must be positive")
    return Shape(f"{p}x{n}", (p, p), (n, n))


def model_config(name: str, overrides: dict) -> dict:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}")
    cfg = dict(MODEL_CONFIGS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["hidden_size"] % cfg["num_attention_heads"] or cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError(f"{name}: hidden ({cfg['hidden_size']}) must divide by heads ({cfg['num_attention_heads']}), "
                         f"heads by kv heads ({cfg['num_key_value_heads']})")
    return cfg


def make_groups(n_groups: int, shape: Shape, k: int, vocab: int, seed: int) -> list:
    """``n_groups`` random groups ``(prompt, [chosen, neg_1, ..., neg_K])`` of the shape (ids in [1, vocab))."""
    gen = torch.Generator().manual_seed(seed)

    def length(lo, hi):
        return lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=gen).tolist()

    return [(ids(length(*shape.prompt)), [ids(length(*shape.title)) for _ in range(k + 1)]) for _ in range(n_groups)]


@dataclass
class MicroBatch:
    """Groups ``[start, start + groups)`` of an optimizer step in both layouts.

    ids, attention_mask, target_mask: ``[G*(K+1), S]`` the paper's layout (candidate j of group g in row
    ``g*(K+1)+j``, prompt + candidate, right-padded); target_mask marks the candidate tokens.
    batch: the same groups packed with a shared prefix (one row).
    """

    start: int
    groups: int
    k: int
    data_tokens: int
    ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    batch: PackedBatch

    @property
    def naive_tokens(self) -> int:
        return self.ids.numel()


def micro_batch(groups: list, start: int, k: int, vocab: int, device, bucketed: bool = False) -> MicroBatch:
    """Both layouts of ``groups`` (the step's groups from ``start``); ``bucketed``: the packed one padded to
    its shape bucket (``sdpo_fast.buckets.pack_bucketed``, for CUDA graphs)."""
    rows = [(p, c) for p, cs in groups for c in cs]
    S = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    attn = torch.zeros(len(rows), S, dtype=torch.long)
    tmask = torch.zeros(len(rows), S, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        tmask[i, len(p) : n] = True
    pack = pack_bucketed if bucketed else sdpo_fast.pack_groups
    batch = pack(groups, vocab_size=vocab)
    data_tokens = sum(len(p) + sum(len(c) for c in cs) for p, cs in groups)
    return MicroBatch(start, len(groups), k, data_tokens, ids.to(device), attn.to(device), tmask.to(device),
                      batch.to(device))


def split(groups: list, size: int, k: int, vocab: int, device, bucketed: bool = False) -> list[MicroBatch]:
    """The step's groups in micro-batches of ``size`` groups (the last one may be smaller)."""
    return [micro_batch(groups[s : s + size], s, k, vocab, device, bucketed) for s in range(0, len(groups), size)]
