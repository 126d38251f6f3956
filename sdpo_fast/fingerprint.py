"""Content fingerprints: what a cache or a checkpoint depends on, as short hex digests.

A cache stores the fingerprint of its inputs beside its values and is used only when the current
inputs have the same one (``mismatch`` names the parts that differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch

__all__ = ["digest", "examples", "features", "model_weights", "mismatch"]


def digest(*parts) -> str:
    """Digest of JSON-serialisable ``parts``."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def examples(items) -> str:
    """Digest of ``RecExample``s (every field, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for ex in items:
        h.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def features(ds, columns=("prompt_ids", "candidate_ids", "target_index")) -> str:
    """Digest of a tokenized dataset's token columns (covers the data, the tokenizer and the
    tokenisation settings at once)."""
    h = hashlib.blake2b(digest_size=16)
    for col in columns:
        h.update(col.encode())
        h.update(json.dumps(list(ds[col])).encode())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_weights(module, stage3: bool = False) -> str:
    """Digest of every parameter and buffer of ``module`` (names, dtypes, shapes, values). Under
    ZeRO-3 each parameter is gathered in turn (a collective: every rank must call this)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        gathered = contextlib.nullcontext()
        if stage3 and hasattr(t, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([t], modifier_rank=None)
        with gathered:
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def mismatch(stored: dict, current: dict) -> list[str]:
    """Keys of ``current`` whose value differs in ``stored`` (missing counts as different)."""
    return [k for k in current if stored.get(k) != current[k]]
