"""Triton kernels: fused ``lm_head`` + log-softmax + gather + per-candidate sum, and the S-DPO loss
with its gradients in one op. Backend ``"triton"`` of the ops ``"logprobs"`` and ``"sdpo_loss"``.

Readable reference: ``reference.py`` beside this file (``logprobs_forward`` / ``logprobs_backward``);
the backend contract (``Options``, ``forward``, ``backward``) is described there.

Layout (the ``PackedBatch`` of ``sdpo_fast.packing``): ``Nr`` logit rows (``logit_rows [Nr]``, flat token index
into ``hidden [T, D]``), CSR ``row_ptr [Nr + 1]`` of their ``N`` targets (``target_ids``,
``target_candidates = g * C + j``). The prompt's last row is one logit row with K+1 targets.

Forward (never holds ``[Nr, V]``):
    ``_lse_kernel``     one program per (block of BLOCK_M rows, vocabulary split): logit tiles
                        ``[BLOCK_M, BLOCK_V]`` via ``tl.dot`` over D with fp32 accumulation, online
                        max / sum-exp in fp32; the splits' partials are merged in torch (``[S, Nr]``).
    ``_target_kernel``  one program per BLOCK_T targets: fp32 dot ``hidden[row] . weight[id]`` minus
                        the row's logsumexp, atomically added into ``logps [G * C]`` (segment sum).
Gradient pass, over vocabulary slices ``[v0, v0 + S)`` (bounded extra memory ``Nr * S`` elements):
    ``_dlogits_kernel`` recomputes each logit tile and writes, formed in fp32 before the cast,
                        ``dlogits = sum_t g_t onehot(id_t) - g_row * softmax`` (``g_row = sum_t g_t``
                        over the row's targets), so ``g (1 - p)`` never cancels in low precision.
    then two GEMMs on the slice: ``dW[v0:v0+S] = dlogits^T @ h`` (complete reduction over all rows in
    one GEMM: fp32 accumulation, one rounding) and ``dh += dlogits @ W[v0:v0+S]`` (fp32 accumulator
    when there is more than one slice). ``dW`` is skipped when the weight is frozen.
Inside the fused loss (``forward(..., fused=True)``) the forward can keep the forward's fp32 logits when ``[Nr, V]`` fits
``reuse_logits_bytes``; the gradient pass then reads them instead of recomputing (3 GEMMs, not 4).

All index arithmetic that can exceed 2**31 (row * D, id * D, row * S) is int64; every grid is 1-D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataclasses import dataclass

from ..options import option

__all__ = ["Options", "DW_PRECISION", "INPUT_DTYPES", "forward", "backward", "logprobs_forward", "logprobs_grad"]

DW_PRECISION = "one GEMM per vocabulary slice over all rows: fp32 accumulation, one rounding to the weight's dtype"
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Options:
    """Tile shapes: CUDA defaults for bf16/fp16 at D = 4096 (128 x 128 logit tiles, D in steps of 64);
    on CPU (the interpreter, tests) small tiles keep numpy work and the number of programs low."""

    block_m: int = option(128, cpu=16, check="pow2>=16", doc="logit rows per tile")
    block_v: int = option(128, cpu=64, check="pow2>=16", doc="vocabulary columns per tile")
    block_d: int = option(64, cpu=32, check="pow2>=16", doc="hidden dims per tl.dot step")
    block_t: int = option(32, cpu=16, check="pow2", doc="targets per program of the target kernel")
    num_warps: int = option(8, cpu=4)
    num_stages: int = option(3, cpu=1)
    group_m: int = option(8, cpu=4, doc="row blocks that sweep a slice together (L2 reuse)")
    reuse_logits_bytes: int = option(1 << 30, cpu=0, check="int>=0",
                                     doc="fused loss: keep the forward's fp32 logits when [Nr, V] fits this")
    v_splits: int | None = option(None, check="int>=1|None", doc="forward vocabulary splits (default ~8 programs/SM)")
    slice_cols: int | None = option(None, check="int>=1|None", doc="columns per gradient slice")
    allow_tf32: bool = option(False, doc="tf32 products for fp32 inputs")

# dlogits slice: elements of the [Nr, S] buffer (2**25 bf16 = 64 MiB), small for the peak-memory goal
# while each slice's two GEMMs stay large (benchmarks/results/design_measurements.md).
_SLICE_ELEMENTS = 1 << 25
# Rows per step of the final fp32 -> input-dtype scatter of dHidden (bounds its temporary).
_CAST_ROWS = 4096


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_V]`` tile of ``hidden[rows] @ weight[cols]^T``; rows, cols int64."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_base = h_ptr + rows[:, None] * stride_h
    w_base = w_ptr + cols[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_base + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_base + offs_d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PREC)
    return acc


@triton.jit
def _lse_kernel(h_ptr, w_ptr, rows_ptr, m_ptr, s_ptr, x_ptr, Nr, V, D, stride_h, stride_w, tiles_per_split,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                STORE: tl.constexpr):
    """Partial logsumexp of rows ``[BLOCK_M]`` over one vocabulary split: ``m = max``, ``s = sum exp(x - m)``
    stored at ``[split, row]`` of ``m_ptr`` / ``s_ptr`` (fp32 ``[S, Nr]``). With STORE, the fp32 logits
    also go to ``x_ptr`` (``[Nr, V]``) for a gradient pass that reuses them."""
    pid = tl.program_id(0)
    n_mb = tl.cdiv(Nr, BLOCK_M)
    # Row blocks vary fastest: neighbouring programs read the same weight tiles (L2 reuse).
    pid_m = pid % n_mb
    split = pid // n_mb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < Nr
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t_begin, t_end):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        x = _logit_tile(h_ptr, w_ptr, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
                        BLOCK_M, BLOCK_V, BLOCK_D, PREC)
        if STORE:
            # 64-bit tile base, 32-bit offsets inside the tile: int64 per-element addresses spill
            # (255 registers + 424 stack bytes at 128 x 128, sm_90).
            x_tile = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * V + t * BLOCK_V
            loc = tl.arange(0, BLOCK_M)[:, None] * V + tl.arange(0, BLOCK_V)[None, :]
            tl.store(x_tile + loc, x, mask=row_mask[:, None] & col_mask[None, :])
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m_i = m_new
    out = split.to(tl.int64) * Nr + offs_m
    tl.store(m_ptr + out, m_i, mask=row_mask)
    tl.store(s_ptr + out, s_i, mask=row_mask)


@triton.jit
def _target_kernel(h_ptr, w_ptr, rows_ptr, t_rows_ptr, t_ids_ptr, t_cands_ptr, lse_ptr, out_ptr, N, D,
                   stride_h, stride_w, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[cand_t] += hidden[row_t] . weight[id_t] - lse[row_t]`` for BLOCK_T targets (fp32)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < N
    r = tl.load(t_rows_ptr + offs_t, mask=t_mask, other=0)
    tok = tl.load(rows_ptr + r, mask=t_mask, other=0).to(tl.int64)
    tid = tl.load(t_ids_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = t_mask[:, None] & (offs_d < D)[None, :]
        h = tl.load(h_ptr + tok[:, None] * stride_h + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + tid[:, None] * stride_w + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
    lse = tl.load(lse_ptr + r, mask=t_mask, other=0.0)
    cand = tl.load(t_cands_ptr + offs_t, mask=t_mask, other=0)
    tl.atomic_add(out_ptr + cand, acc - lse, mask=t_mask)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, rows_ptr, x_ptr, lse_ptr, g_row_ptr, row_ptr_ptr, t_ids_ptr, g_t_ptr, out_ptr,
                    Nr, V, D, v0, n_cols, stride_h, stride_w, stride_out,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    GROUP_M: tl.constexpr, PREC: tl.constexpr, STORED: tl.constexpr):
    """``out[r, c] = sum_{t in row r} g_t [id_t == v0 + c] - g_row[r] * softmax(logits[r])[v0 + c]``
    for one ``[BLOCK_M, BLOCK_V]`` tile of the slice ``[v0, v0 + n_cols)``, in fp32, then cast. The
    logits are recomputed, or with STORED read from the forward's fp32 ``x_ptr`` ``[Nr, V]``."""
    pid = tl.program_id(0)
    n_mb = tl.cdiv(Nr, BLOCK_M)
    n_vb = tl.cdiv(n_cols, BLOCK_V)
    # Grouped order: GROUP_M row blocks sweep the slice's columns together (L2 reuse of both operands).
    per_group = GROUP_M * n_vb
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_mb - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_v = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < Nr
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < n_cols
    cols = v0 + local
    tile_m = (pid_m * BLOCK_M).to(tl.int64)
    if STORED:
        x_tile = x_ptr + tile_m * V + v0 + pid_v * BLOCK_V
        loc = tl.arange(0, BLOCK_M)[:, None] * V + tl.arange(0, BLOCK_V)[None, :]
        x = tl.load(x_tile + loc, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        x = _logit_tile(h_ptr, w_ptr, rows, row_mask, cols, col_mask & (cols < V), D, stride_h, stride_w,
                        BLOCK_M, BLOCK_V, BLOCK_D, PREC)
    lse = tl.load(lse_ptr + offs_m, mask=row_mask, other=0.0)
    g_row = tl.load(g_row_ptr + offs_m, mask=row_mask, other=0.0)
    d = -g_row[:, None] * tl.exp(x - lse[:, None])
    # Fold the one-hot terms in: most rows own one target, the prompt's last row owns K+1.
    t_lo = tl.load(row_ptr_ptr + offs_m, mask=row_mask, other=0)
    t_hi = tl.load(row_ptr_ptr + offs_m + 1, mask=row_mask, other=0)
    cnt = t_hi - t_lo
    for k in range(0, tl.max(cnt, axis=0)):
        has = k < cnt
        tid = tl.load(t_ids_ptr + t_lo + k, mask=has, other=-1)
        g_k = tl.load(g_t_ptr + t_lo + k, mask=has, other=0.0)
        d += tl.where(cols[None, :] == tid[:, None], g_k[:, None], 0.0)
    out_tile = out_ptr + tile_m * stride_out + pid_v * BLOCK_V
    loc = tl.arange(0, BLOCK_M)[:, None] * stride_out + tl.arange(0, BLOCK_V)[None, :]
    tl.store(out_tile + loc, d.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype, opts: Options) -> str:
    # fp32 inputs: exact fp32 products unless tf32 is asked for (tf32 logits would make the target
    # logit and the logsumexp disagree by ~1e-3 relative, enough to flip the sign of log p ~ -1e-3).
    return "tf32" if dtype != torch.float32 or opts.allow_tf32 else "ieee"


def logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, batch, opts: Options, store=None):
    """Log-probs of every candidate.

    Args: hidden ``[T, D]``, weight ``[V, D]`` (same dtype, last dim contiguous), batch, resolved opts;
        store: optional fp32 ``[Nr, V]`` that receives the logits (for ``logprobs_grad(stored=...)``).
    Returns: ``(lse [Nr] fp32, logps [G * C] fp32)``.
    """
    rows = batch.logit_rows
    Nr, N = rows.shape[0], batch.num_targets
    V, D = weight.shape
    bm, bv, bd = opts.block_m, opts.block_v, opts.block_d
    prec = _precision(hidden.dtype, opts)
    n_mb, n_vt = triton.cdiv(Nr, bm), triton.cdiv(V, bv)
    splits = opts.v_splits
    if splits is None:
        # About 8 programs per SM, so that the last wave of long programs is a small fraction.
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
        splits = max(1, min(n_vt, triton.cdiv(8 * sms, n_mb)))
    splits = min(splits, n_vt)
    tiles_per_split = triton.cdiv(n_vt, splits)
    splits = triton.cdiv(n_vt, tiles_per_split)
    m = torch.empty(splits, Nr, dtype=torch.float32, device=hidden.device)
    s = torch.empty_like(m)
    if Nr:
        _lse_kernel[(n_mb * splits,)](
            hidden, weight, rows, m, s, m if store is None else store, Nr, V, D, hidden.stride(0), weight.stride(0),
            tiles_per_split, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, PREC=prec, STORE=store is not None,
            num_warps=opts.num_warps, num_stages=opts.num_stages,
        )
    if splits == 1:
        lse = m[0] + torch.log(s[0])
    else:
        mx = m.amax(dim=0)
        lse = mx + torch.log((s * torch.exp(m - mx)).sum(dim=0))
    G, C = batch.candidate_mask.shape
    logps = torch.zeros(G * C, dtype=torch.float32, device=hidden.device)
    if N:
        bt = opts.block_t
        _target_kernel[(triton.cdiv(N, bt),)](
            hidden, weight, rows, batch.target_rows, batch.target_ids, batch.target_candidates, lse, logps, N, D,
            hidden.stride(0), weight.stride(0), BLOCK_T=bt, BLOCK_D=bd, num_warps=4,
        )
    return lse, logps


_MM_MODE: dict = {}


def _mm_acc(out32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out32 += a @ b`` for 16-bit ``a``, ``b`` and an fp32 ``out32``, with the fp32 product where the
    device offers it: in place (``addmm`` with ``out_dtype``, no temporary), else an fp32 ``mm``, else
    a rounded product added in fp32. The first mode that works is remembered per device type."""
    if a.dtype == torch.float32:
        out32.addmm_(a, b)
        return
    modes = ("addmm", "mm", "plain") if a.is_cuda else ("plain",)
    start = modes.index(_MM_MODE.get(a.device.type, modes[0]))
    for mode in modes[start:]:
        try:
            if mode == "addmm":
                torch.addmm(out32, a, b, out_dtype=torch.float32, out=out32)
            elif mode == "mm":
                out32 += torch.mm(a, b, out_dtype=torch.float32)
            else:
                out32 += torch.mm(a, b).float()
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            if mode == "plain":
                raise
            continue
        _MM_MODE[a.device.type] = mode
        return


def logprobs_grad(hidden, weight, batch, lse, grad_logps, need_h: bool, need_w: bool, opts: Options,
                  stored=None):
    """Gradients of ``sum(grad_logps * logps)``.

    Args:
        hidden ``[T, D]``, weight ``[V, D]``, lse ``[Nr]`` fp32 from ``logprobs_forward``,
        grad_logps ``[G * C]`` (dL/dlogp per candidate), stored: the forward's fp32 logits ``[Nr, V]``
        (then no logit tile is recomputed: three GEMMs in all instead of four), or None.
    Returns:
        ``(dhidden [T, D] or None, dweight [V, D] or None)`` in the input dtypes; dhidden is zero
        outside ``batch.logit_rows``.
    """
    if not (need_h or need_w):
        return None, None
    rows = batch.logit_rows
    Nr = rows.shape[0]
    V, D = weight.shape
    dev = hidden.device
    g_t = grad_logps.float().index_select(0, batch.target_candidates).contiguous()
    g_row = torch.zeros(Nr, dtype=torch.float32, device=dev).index_add_(0, batch.target_rows, g_t)
    bm, bv, bd = opts.block_m, opts.block_v, opts.block_d
    S = opts.slice_cols or max(bv, _SLICE_ELEMENTS // max(Nr, 1) // bv * bv)
    S = min(S, V)
    n_slices = triton.cdiv(V, S)
    buf = torch.empty(Nr, S, dtype=hidden.dtype, device=dev)
    h_rows = hidden.index_select(0, rows) if need_w else None
    dweight = torch.empty_like(weight) if need_w else None
    dh = None
    if need_h:
        dh = torch.zeros(Nr, D, dtype=torch.float32, device=dev) if n_slices > 1 else None
    prec = _precision(hidden.dtype, opts)
    part = None
    for v0 in range(0, V, S):
        n = min(S, V - v0)
        part = buf[:, :n]
        if Nr:
            grid = (triton.cdiv(Nr, bm) * triton.cdiv(n, bv),)
            _dlogits_kernel[grid](
                hidden, weight, rows, lse if stored is None else stored, lse, g_row, batch.row_ptr, batch.target_ids,
                g_t, part, Nr, V, D, v0, n, hidden.stride(0), weight.stride(0), buf.stride(0),
                BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, GROUP_M=opts.group_m, PREC=prec, STORED=stored is not None,
                num_warps=opts.num_warps, num_stages=opts.num_stages,
            )
        if need_w:
            torch.mm(part.t(), h_rows, out=dweight[v0 : v0 + n])
        if need_h:
            if n_slices == 1:
                dh = torch.mm(part, weight[v0 : v0 + n])
            else:
                _mm_acc(dh, part, weight[v0 : v0 + n])
    buf = part = h_rows = None  # free the slice buffer and gathered rows before the dHidden scatter
    dhidden = None
    if need_h:
        dhidden = torch.zeros_like(hidden)
        if dh.dtype == hidden.dtype:
            dhidden.index_copy_(0, rows, dh)
        else:
            for a in range(0, Nr, _CAST_ROWS):
                dhidden.index_copy_(0, rows[a : a + _CAST_ROWS], dh[a : a + _CAST_ROWS].to(hidden.dtype))
    return dhidden, dweight


# --------------------------------------------------------------------------------------------------
# backend entry points
# --------------------------------------------------------------------------------------------------


def forward(hidden, weight, batch, opts: Options, need_h: bool, need_w: bool, fused: bool = False):
    """Contract ``forward`` (``reference.py``). ``fused``: when the fp32 logits ``[Nr, V]`` take at most
    ``opts.reuse_logits_bytes`` the forward keeps them and the gradient pass reads them instead of
    recomputing (three GEMMs instead of four). State: ``(lse [Nr], stored logits or None)``."""
    Nr, V = batch.logit_rows.shape[0], weight.shape[0]
    reuse = fused and (need_h or need_w) and Nr * V * 4 <= opts.reuse_logits_bytes
    store = torch.empty(Nr, V, dtype=torch.float32, device=hidden.device) if reuse else None
    lse, logps = logprobs_forward(hidden, weight, batch, opts, store)
    return logps, (lse, store)


def backward(hidden, weight, batch, state, grad_logps, need_h: bool, need_w: bool, opts: Options):
    """Contract ``backward``: ``logprobs_grad`` with the forward's state."""
    lse, store = state
    return logprobs_grad(hidden, weight, batch, lse, grad_logps.contiguous(), need_h, need_w, opts, store)
