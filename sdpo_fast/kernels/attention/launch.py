"""Shared-prefix flash attention in Triton: the ``"triton"`` backend of the ``"attention"`` op.

``triton_shared_prefix_attention(query, key, value, batch, scaling, dropout=0.0)`` has the signature of
the torch reference ``reference.torch_shared_prefix_attention`` beside this file: query ``[R, H, L, Dh]``,
key/value ``[R, Hkv, L, Dh]`` (any strides, KV heads not repeated, ``H % Hkv == 0``) and a
``PackedBatch`` give ``[R, L, H, Dh]``; padding tokens get 0. Differentiable in query, key and value.

The per-tile tables the kernels read (see ``triton.py`` for what a tile is) are derived on
the device from the batch tensors with torch ops whose sizes come from the host-side
``batch.group_spans`` only, so building them never waits for the GPU. They are cached per batch and
block size: every layer of a forward (and its backward) reuses them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref

import torch

try:
    import triton
except ImportError as exc:  # the backend table skips this backend then
    raise ImportError(f"the triton attention backend needs triton ({exc})") from exc

from .triton import shared_prefix_bwd_dkdv_kernel, shared_prefix_bwd_dq_kernel, shared_prefix_fwd_kernel

__all__ = ["AttentionConfig", "INTERPRETER_CONFIG", "default_config", "triton_shared_prefix_attention", "query_tiles",
           "key_tiles"]

_LOG2E = 1.4426950408889634
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Block sizes and launch options of the three kernels.

    fwd_m/fwd_n: queries/keys per block of the forward; dq_m/dq_n: of the dQ kernel; dkdv_n/dkdv_m:
    keys/queries per block of the dK/dV kernel; *_warps, *_stages: Triton's num_warps/num_stages.

    The CUDA defaults were chosen from the sm_90 compiler report (``python -m
    sdpo_fast.kernels.attention.aot``, no GPU needed): the largest blocks that compile without
    register spills for head dims 64..128 in bf16 (e.g. Dh=128: forward 220 registers, dQ 173,
    dK/dV 244, no local memory; with 4 warps or 64x128 dK/dV blocks they spill). Triton 3.6 spills
    at 32x128 dK/dV blocks, so ``default_config`` halves their query rows there.
    """

    fwd_m: int = 128
    fwd_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_m: int = 128
    dq_n: int = 32
    dq_warps: int = 8
    dq_stages: int = 3
    dkdv_n: int = 128
    dkdv_m: int = 32
    dkdv_warps: int = 8
    dkdv_stages: int = 2

    def __post_init__(self):
        for f in ("fwd_m", "fwd_n", "dq_m", "dq_n", "dkdv_n", "dkdv_m"):
            b = getattr(self, f)
            if b < 16 or b & (b - 1):
                raise ValueError(f"AttentionConfig.{f} must be a power of two >= 16, got {b}")


# Under the CPU interpreter: small blocks (speed of the tests), launch options are ignored there.
INTERPRETER_CONFIG = AttentionConfig(16, 16, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> AttentionConfig:
    """Block sizes for ``head_dim`` and ``dtype`` on ``device`` (small blocks under the CPU interpreter)."""
    if device.type != "cuda" or _interpreting():
        return INTERPRETER_CONFIG
    if dtype == torch.float32:  # twice the bytes per tile: halve the blocks to stay in shared memory
        return AttentionConfig(fwd_m=64, fwd_n=32, fwd_warps=4, fwd_stages=2, dq_m=64, dq_n=32, dq_warps=4,
                               dq_stages=2, dkdv_n=64, dkdv_m=32, dkdv_warps=4, dkdv_stages=2)
    # Triton < 3.9 (3.6 measured) spills the 32x128 dK/dV block (255 registers, 72-248 stack bytes);
    # 16 query rows per step compile without spills there.
    dkdv_m = 32 if _TRITON_VERSION >= (3, 9) else 16
    if head_dim <= 64:  # 235 registers at 3 stages, no spills
        return AttentionConfig(dkdv_m=dkdv_m, dkdv_stages=3)
    return AttentionConfig(dkdv_m=dkdv_m)


# ----------------------------------------------------------------------------------------------- tiles

_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def _cached(batch, key, build):
    entry = _CACHE.get(id(batch))
    if entry is None or entry[0]() is not batch:
        entry = (weakref.ref(batch), {})
        _CACHE[id(batch)] = entry
        weakref.finalize(batch, _CACHE.pop, id(batch), None)
    table = entry[1]
    if key not in table:
        table[key] = build()
    return table[key]


def _slots(batch, block: int):
    """Per tile slot: its group's row, start/prompt end/end within the row, and the slot's own range.

    A group gets ``ceil(len / block) + 1`` slots (>= prompt tiles + candidate tiles), the last group
    also the rest of ``ceil(R * L / block) + 2 * G`` (a bound of that sum from the batch's shape
    alone: no loop over groups, and the same for every batch of one shape bucket); the unused ones
    come out empty (start == end).
    """
    R, L = batch.shape
    dev = batch.device
    G = batch.num_groups
    n_slots = -(-R * L // block) + 2 * G
    counts = (batch.group_lens + block - 1) // block + 1
    counts = torch.cat([counts[:-1], (n_slots - counts[:-1].sum()).reshape(1)])
    g = torch.repeat_interleave(torch.arange(G, device=dev), counts, output_size=n_slots)
    j = torch.arange(n_slots, device=dev) - (torch.cumsum(counts, 0) - counts)[g]
    flat = batch.group_starts[g]
    row = flat // L
    s = flat - row * L
    pe = s + batch.prompt_lens[g]
    e = s + batch.group_lens[g]
    n_prompt = (batch.prompt_lens[g] + block - 1) // block
    in_prompt = j < n_prompt
    lo = torch.where(in_prompt, s + j * block, pe + (j - n_prompt) * block)
    hi = torch.minimum(torch.where(in_prompt, pe, e), lo + block)
    hi = torch.maximum(hi, lo)
    return g, row, s, pe, lo, hi, in_prompt


def _candidate_bounds(batch, g, row, pe, pos):
    """Start and end (in-row) of the candidate holding token ``pos`` (clamped for empty slots)."""
    L = batch.shape[1]
    c = batch.candidate_ids[row, pos.clamp(max=L - 1)].clamp(min=0)
    lens = batch.candidate_lens
    first = torch.cumsum(lens, 1) - lens
    start = pe + first[g, c]
    return start, start + lens[g, c]


def query_tiles(batch, block: int) -> torch.Tensor:
    """``[n, 8]`` int32 on the batch's device: row, q_start, q_end, a_start, a_end, b_start, 0, 0.

    Sorted by decreasing work so the longest programs start first.
    """

    def build():
        g, row, s, pe, lo, hi, in_prompt = _slots(batch, block)
        cstart, _ = _candidate_bounds(batch, g, row, pe, lo)
        a_end = torch.where(in_prompt, lo, pe)
        b_start = torch.where(in_prompt, lo, cstart)
        zero = torch.zeros_like(lo)
        t = torch.stack([row, lo, hi, s, a_end, b_start, zero, zero], 1)
        work = (a_end - s) + (hi - b_start)
        work = torch.where(hi > lo, work, -1)
        return t[torch.argsort(work, descending=True, stable=True)].to(torch.int32).contiguous()

    return _cached(batch, ("q", block), build)


def key_tiles(batch, block: int) -> torch.Tensor:
    """``[n, 8]`` int32: row, k_start, k_end, m_end, q_end, 0, 0, 0. Queries ``[k_start, m_end)`` see
    the tile under the shared-prefix mask, queries ``[m_end, q_end)`` see all of it."""

    def build():
        g, row, s, pe, lo, hi, in_prompt = _slots(batch, block)
        e = s + batch.group_lens[g]
        _, cend = _candidate_bounds(batch, g, row, pe, (hi - 1).clamp(min=0))
        m_end = torch.where(in_prompt, hi, cend)
        q_end = torch.where(in_prompt, e, cend)
        zero = torch.zeros_like(lo)
        t = torch.stack([row, lo, hi, m_end, q_end, zero, zero, zero], 1)
        work = torch.where(hi > lo, q_end - lo, -1)
        return t[torch.argsort(work, descending=True, stable=True)].to(torch.int32).contiguous()

    return _cached(batch, ("k", block), build)


def _candidate_ids32(batch) -> torch.Tensor:
    return _cached(batch, "cand32", lambda: batch.candidate_ids.to(torch.int32).contiguous())


# ------------------------------------------------------------------------------------------- launchers


def _check(query, key, value, batch):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query/key/value must be 4-D [R, H, L, Dh], got {query.shape}, {key.shape}, {value.shape}")
    R, H, L, Dh = query.shape
    if key.shape != value.shape or key.shape[0] != R or key.shape[2] != L or key.shape[3] != Dh:
        raise ValueError(f"key/value must be [R, Hkv, L, Dh] matching query {tuple(query.shape)}, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if H % key.shape[1]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({key.shape[1]})")
    if (R, L) != batch.shape:
        raise ValueError(f"query covers {R} rows of {L} tokens but the batch is {batch.shape}")
    if query.dtype not in _SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"query/key/value must share one of {_SUPPORTED_DTYPES}, got "
                         f"{query.dtype}, {key.dtype}, {value.dtype}")
    if Dh > 256:
        raise ValueError(f"head dim {Dh} > 256 is not supported")
    if query.device != batch.device or key.device != batch.device or value.device != batch.device:
        raise ValueError(f"tensors on {query.device}/{key.device}/{value.device}, batch on {batch.device}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (interpreter tests, fp32 CUDA runs) get exact products, not tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _has_padding(batch) -> bool:
    """Whether some row positions belong to no real group (host metadata only; a bucketed batch always
    has padding groups, so every batch of a bucket zero-fills alike). Without padding the kernels write
    every position (the tiles partition each group), so outputs need no zero-fill."""
    R, L = batch.shape
    return _cached(batch, "padded", lambda: batch.num_tokens != R * L)


def _alloc(shape, like: torch.Tensor, batch, dtype=None) -> torch.Tensor:
    """Zeros where padding positions exist (they stay 0), else uninitialised memory."""
    fill = torch.zeros if _has_padding(batch) else torch.empty
    return fill(shape, device=like.device, dtype=dtype or like.dtype)


def _forward(q, k, v, batch, scaling, cfg):
    R, H, L, Dh = q.shape
    Hkv = k.shape[1]
    out = _alloc((R, L, H, Dh), q, batch)
    lse2 = torch.empty(R, H, L, device=q.device, dtype=torch.float32)
    tiles = query_tiles(batch, cfg.fwd_m)
    cand = _candidate_ids32(batch)
    shared_prefix_fwd_kernel[(tiles.shape[0], H)](
        q, k, v, out, lse2, cand, tiles,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        lse2.stride(0), lse2.stride(1),
        cand.stride(0),
        scaling * _LOG2E,
        H_PER_KV=H // Hkv, HEAD_DIM=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)),
        BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, DOT_PREC=_dot_precision(q.dtype),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return out, lse2


def _backward(q, k, v, out, lse2, dout, batch, scaling, cfg):
    R, H, L, Dh = q.shape
    Hkv = k.shape[1]
    dout = _last_dim_contiguous(dout)  # [R, L, H, Dh]
    dq = _alloc((R, L, H, Dh), q, batch)
    dk = _alloc((R, L, Hkv, Dh), k, batch)
    dv = _alloc((R, L, Hkv, Dh), v, batch)
    delta = torch.empty_like(lse2)
    cand = _candidate_ids32(batch)
    consts = dict(H_PER_KV=H // Hkv, HEAD_DIM=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)),
                  DOT_PREC=_dot_precision(q.dtype))
    qt = query_tiles(batch, cfg.dq_m)
    shared_prefix_bwd_dq_kernel[(qt.shape[0], H)](
        q, k, v, out, dout, dq, lse2, delta, cand, qt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        dout.stride(0), dout.stride(2), dout.stride(1),
        dq.stride(0), dq.stride(2), dq.stride(1),
        lse2.stride(0), lse2.stride(1),
        cand.stride(0),
        scaling * _LOG2E, scaling,
        BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, num_warps=cfg.dq_warps, num_stages=cfg.dq_stages, **consts,
    )
    kt = key_tiles(batch, cfg.dkdv_n)
    shared_prefix_bwd_dkdv_kernel[(kt.shape[0], Hkv)](
        q, k, v, dout, dk, dv, lse2, delta, cand, kt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(2), dout.stride(1),
        dk.stride(0), dk.stride(2), dk.stride(1),
        dv.stride(0), dv.stride(2), dv.stride(1),
        lse2.stride(0), lse2.stride(1),
        cand.stride(0),
        scaling * _LOG2E, scaling,
        BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages, **consts,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class _SharedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, batch, scaling, cfg):
        out, lse2 = _forward(q, k, v, batch, scaling, cfg)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.batch, ctx.scaling, ctx.cfg = batch, scaling, cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse2 = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse2, dout, ctx.batch, ctx.scaling, ctx.cfg)
        return dq, dk, dv, None, None, None


def triton_shared_prefix_attention(query, key, value, batch, scaling: float, dropout: float = 0.0,
                                   config: AttentionConfig | None = None):
    """Shared-prefix attention of a packed batch.

    Args:
        query: ``[R, H, L, Dh]``; key, value: ``[R, Hkv, L, Dh]`` with ``H % Hkv == 0``; fp16/bf16 on
            CUDA, fp32 too (exact fp32 products). Any strides with a unit last stride (else copied).
        batch: the ``PackedBatch`` the rows come from (same device).
        scaling: softmax scale (usually ``Dh ** -0.5``).
        dropout: must be 0 (attention dropout is not implemented).
        config: block sizes; default ``default_config(Dh, device)``.

    Returns:
        ``[R, L, H, Dh]`` in the query's dtype; 0 at padding tokens.
    """
    if dropout > 0.0:
        raise NotImplementedError("the triton shared-prefix attention has no attention dropout; set the "
                                  "model's attention_dropout to 0 or use the 'torch' attention backend")
    _check(query, key, value, batch)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    cfg = config or default_config(query.shape[-1], query.device, query.dtype)
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    return _SharedPrefixAttention.apply(q, k, v, batch, float(scaling), cfg)

