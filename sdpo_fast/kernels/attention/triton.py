"""Triton kernels of the shared-prefix flash attention (forward, dQ, dK/dV).

Layout and work split (launchers and the tile tables live in ``launch.py``):

* Tensors keep the packed layout of ``PackedBatch``: row ``r``, in-row token position ``t``. Q, K, V, O,
  dO, dQ, dK, dV are addressed through their strides (``[R, *, L, Dh]`` or ``[R, L, *, Dh]`` alike);
  row and block offsets are formed in int64 as scalars, per-element offsets inside a block in int32.
* A *query tile* is up to ``BLOCK_M`` consecutive query tokens of one group, lying either wholly in the
  group's prompt or wholly in its candidate region. It visits two key ranges only:
  range A ``[a_start, a_end)``: prompt keys every query of the tile sees (no mask but bounds), and
  range B ``[b_start, b_end)``: keys masked by the shared-prefix rule (causal, and a candidate key only
  for queries of the same candidate). For a prompt tile A is the prompt before the tile and B the tile's
  diagonal; for a candidate tile A is the whole prompt and B starts at the first key of the candidate
  holding the tile's first query. Other candidates' and groups' blocks are never visited.
* A *key tile* is up to ``BLOCK_N`` keys of one group, again prompt-only or candidate-only. Its queries
  are ``[k_start, m_end)`` under the mask and ``[m_end, q_end)`` without it (a prompt key tile is seen
  unmasked by every later query of its group, all K+1 candidates included).

Mask mode of one block visit (constexpr ``MODE``): 0 = none (full block), 1 = bounds only,
2 = bounds + shared-prefix rule. Softmax runs in base 2 (``qk_scale = scaling * log2(e)``) and the
saved row statistic is ``lse2 = log2(sum exp2(s))``. No atomics: every output element is written by
one program, so results do not depend on scheduling.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _query_tile(tile):
    """One row of a query tile table (``query_tiles``): ``(row int64, q_start, q_end, a_start, a_end,
    b_start)``."""
    return (tl.load(tile).to(tl.int64), tl.load(tile + 1), tl.load(tile + 2), tl.load(tile + 3), tl.load(tile + 4),
            tl.load(tile + 5))


@triton.jit
def _row_ptrs(base, start, stride, BLOCK: tl.constexpr, offs_d):
    # int64 only in the scalar block offset: per-element int32 offsets keep the pointer math (and the
    # register count) small; a block spans BLOCK rows, far below 2**31 elements.
    return (base + tl.cast(start, tl.int64) * stride) + (tl.arange(0, BLOCK)[:, None] * stride + offs_d[None, :])


@triton.jit
def _load_rows(base, start, stride, offs_d, row_mask, d_mask, BLOCK: tl.constexpr, MASK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Load ``[BLOCK, BLOCK_D]`` rows ``start..start+BLOCK`` of ``base`` (rows masked when asked)."""
    ptrs = _row_ptrs(base, start, stride, BLOCK, offs_d)
    if MASK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        return tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_mask[None, :], other=0.0)


@triton.jit
def _store_rows(base, start, stride, offs_d, row_mask, d_mask, val, BLOCK: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = _row_ptrs(base, start, stride, BLOCK, offs_d)
    if EVEN_D:
        tl.store(ptrs, val, mask=row_mask[:, None])
    else:
        tl.store(ptrs, val, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _visible(offs_q, offs_k, cq, ck):
    """Shared-prefix rule for ``[len(offs_q), len(offs_k)]`` (both inside one group)."""
    return (offs_k[None, :] <= offs_q[:, None]) & ((ck[None, :] == -1) | (ck[None, :] == cq[:, None]))


@triton.jit
def _fwd_visit(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq, offs_d, d_mask,
               start, end, qk_scale,
               MODE: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    k = _load_rows(k_base, start, stride_kl, offs_d, n_mask, d_mask, BLOCK_N, MODE != 0, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MODE == 1:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    if MODE == 2:
        ck = tl.load(cand + offs_n, mask=n_mask, other=-2)
        ok = _visible(offs_m, offs_n, cq, ck) & n_mask[None, :]
        s = tl.where(ok, s, float("-inf"))
    # m_i starts finite (-1e30), so a fully masked row gives exp2(-inf) = 0, never NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, start, stride_vl, offs_d, n_mask, d_mask, BLOCK_N, MODE != 0, EVEN_D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def shared_prefix_fwd_kernel(
    Q, K, V, O, LSE2, CAND, TILES,
    stride_qr, stride_qh, stride_ql,
    stride_kr, stride_kh, stride_kl,
    stride_vr, stride_vh, stride_vl,
    stride_or, stride_oh, stride_ol,
    stride_lr, stride_lh,
    stride_cr,
    qk_scale,
    H_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid ``(num_query_tiles, H)``. TILES ``[n, 8]`` int32: row, q_start, q_end, a_start, a_end, b_start."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    row, q_start, q_end, a_start, a_end, b_start = _query_tile(TILES + tl.program_id(0) * 8)
    if q_start >= q_end:
        return
    h = tl.program_id(1)
    kvh = h // H_PER_KV

    offs_m = q_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_end
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_base = Q + row * stride_qr + h * stride_qh
    k_base = K + row * stride_kr + kvh * stride_kh
    v_base = V + row * stride_vr + kvh * stride_vh
    cand = CAND + row * stride_cr
    q = _load_rows(q_base, q_start, stride_ql, offs_d, m_mask, d_mask, BLOCK_M, True, EVEN_D)
    cq = tl.load(cand + offs_m, mask=m_mask, other=-3)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a_full = a_start + ((a_end - a_start) // BLOCK_N) * BLOCK_N
    for start in range(a_start, a_full, BLOCK_N):
        acc, l_i, m_i = _fwd_visit(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq,
                                   offs_d, d_mask, start, a_end, qk_scale, 0, BLOCK_N, EVEN_D, DOT_PREC)
    if a_full < a_end:
        acc, l_i, m_i = _fwd_visit(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq,
                                   offs_d, d_mask, a_full, a_end, qk_scale, 1, BLOCK_N, EVEN_D, DOT_PREC)
    for start in range(b_start, q_end, BLOCK_N):
        acc, l_i, m_i = _fwd_visit(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq,
                                   offs_d, d_mask, start, q_end, qk_scale, 2, BLOCK_N, EVEN_D, DOT_PREC)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    _store_rows(O + row * stride_or + h * stride_oh, q_start, stride_ol, offs_d, m_mask, d_mask,
                out.to(O.dtype.element_ty), BLOCK_M, EVEN_D)
    tl.store(LSE2 + row * stride_lr + h * stride_lh + offs_m, m_i + tl.log2(l_safe), mask=m_mask)


@triton.jit
def _dq_visit(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq, offs_d, d_mask,
              start, end, qk_scale,
              MODE: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    k = _load_rows(k_base, start, stride_kl, offs_d, n_mask, d_mask, BLOCK_N, MODE != 0, EVEN_D)
    v = _load_rows(v_base, start, stride_vl, offs_d, n_mask, d_mask, BLOCK_N, MODE != 0, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MODE == 1:
        p = tl.where(n_mask[None, :], p, 0.0)
    if MODE == 2:
        ck = tl.load(cand + offs_n, mask=n_mask, other=-2)
        p = tl.where(_visible(offs_m, offs_n, cq, ck) & n_mask[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def shared_prefix_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE2, DELTA, CAND, TILES,
    stride_qr, stride_qh, stride_ql,
    stride_kr, stride_kh, stride_kl,
    stride_vr, stride_vh, stride_vl,
    stride_or, stride_oh, stride_ol,
    stride_dor, stride_doh, stride_dol,
    stride_dqr, stride_dqh, stride_dql,
    stride_lr, stride_lh,
    stride_cr,
    qk_scale, sm_scale,
    H_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid ``(num_query_tiles, H)``, same tiles as the forward. Also writes ``DELTA = rowsum(O * dO)``
    (fp32, layout of LSE2), which the dK/dV kernel launched after it reads."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    row, q_start, q_end, a_start, a_end, b_start = _query_tile(TILES + tl.program_id(0) * 8)
    if q_start >= q_end:
        return
    h = tl.program_id(1)
    kvh = h // H_PER_KV

    offs_m = q_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_end
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k_base = K + row * stride_kr + kvh * stride_kh
    v_base = V + row * stride_vr + kvh * stride_vh
    cand = CAND + row * stride_cr
    q = _load_rows(Q + row * stride_qr + h * stride_qh, q_start, stride_ql, offs_d, m_mask, d_mask, BLOCK_M, True,
                   EVEN_D)
    do = _load_rows(DO + row * stride_dor + h * stride_doh, q_start, stride_dol, offs_d, m_mask, d_mask, BLOCK_M,
                    True, EVEN_D)
    o = _load_rows(O + row * stride_or + h * stride_oh, q_start, stride_ol, offs_d, m_mask, d_mask, BLOCK_M, True,
                   EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stat = row * stride_lr + h * stride_lh + offs_m
    tl.store(DELTA + stat, delta, mask=m_mask)
    lse2 = tl.load(LSE2 + stat, mask=m_mask, other=0.0)
    cq = tl.load(cand + offs_m, mask=m_mask, other=-3)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a_full = a_start + ((a_end - a_start) // BLOCK_N) * BLOCK_N
    for start in range(a_start, a_full, BLOCK_N):
        dq = _dq_visit(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq, offs_d,
                       d_mask, start, a_end, qk_scale, 0, BLOCK_N, EVEN_D, DOT_PREC)
    if a_full < a_end:
        dq = _dq_visit(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq, offs_d,
                       d_mask, a_full, a_end, qk_scale, 1, BLOCK_N, EVEN_D, DOT_PREC)
    for start in range(b_start, q_end, BLOCK_N):
        dq = _dq_visit(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, cand, offs_m, cq, offs_d,
                       d_mask, start, q_end, qk_scale, 2, BLOCK_N, EVEN_D, DOT_PREC)
    _store_rows(DQ + row * stride_dqr + h * stride_dqh, q_start, stride_dql, offs_d, m_mask, d_mask,
                (dq * sm_scale).to(DQ.dtype.element_ty), BLOCK_M, EVEN_D)


@triton.jit
def _dkdv_visit(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, stat_base, lse2_ptr, delta_ptr,
                cand, offs_n, ck, offs_d, d_mask, start, end, qk_scale,
                MODE: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    q = _load_rows(q_base, start, stride_ql, offs_d, m_mask, d_mask, BLOCK_M, MODE != 0, EVEN_D)
    do = _load_rows(do_base, start, stride_dol, offs_d, m_mask, d_mask, BLOCK_M, MODE != 0, EVEN_D)
    if MODE == 0:
        lse2 = tl.load(lse2_ptr + stat_base + offs_m)
        delta = tl.load(delta_ptr + stat_base + offs_m)
    else:
        lse2 = tl.load(lse2_ptr + stat_base + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + stat_base + offs_m, mask=m_mask, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.exp2(s_t - lse2[None, :])
    if MODE == 1:
        p_t = tl.where(m_mask[None, :], p_t, 0.0)
    if MODE == 2:
        cq = tl.load(cand + offs_m, mask=m_mask, other=-3)
        ok = (offs_m[None, :] >= offs_n[:, None]) & ((ck[:, None] == -1) | (ck[:, None] == cq[None, :]))
        p_t = tl.where(ok & m_mask[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def shared_prefix_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA, CAND, TILES,
    stride_qr, stride_qh, stride_ql,
    stride_kr, stride_kh, stride_kl,
    stride_vr, stride_vh, stride_vl,
    stride_dor, stride_doh, stride_dol,
    stride_dkr, stride_dkh, stride_dkl,
    stride_dvr, stride_dvh, stride_dvl,
    stride_lr, stride_lh,
    stride_cr,
    qk_scale, sm_scale,
    H_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid ``(num_key_tiles, Hkv)``; each program sums over the ``H_PER_KV`` query heads of its KV head
    (fp32 accumulators, no atomics). TILES ``[n, 8]`` int32: row, k_start, k_end, m_end, q_end."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    tile = TILES + tl.program_id(0) * 8
    kvh = tl.program_id(1)
    row = tl.load(tile).to(tl.int64)
    k_start = tl.load(tile + 1)
    k_end = tl.load(tile + 2)
    if k_start >= k_end:
        return
    m_end = tl.load(tile + 3)
    q_end = tl.load(tile + 4)

    offs_n = k_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < k_end
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    cand = CAND + row * stride_cr
    k = _load_rows(K + row * stride_kr + kvh * stride_kh, k_start, stride_kl, offs_d, n_mask, d_mask, BLOCK_N, True,
                   EVEN_D)
    v = _load_rows(V + row * stride_vr + kvh * stride_vh, k_start, stride_vl, offs_d, n_mask, d_mask, BLOCK_N, True,
                   EVEN_D)
    ck = tl.load(cand + offs_n, mask=n_mask, other=-2)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_full = m_end + ((q_end - m_end) // BLOCK_M) * BLOCK_M
    for g in range(H_PER_KV):
        h = kvh * H_PER_KV + g
        q_base = Q + row * stride_qr + h * stride_qh
        do_base = DO + row * stride_dor + h * stride_doh
        stat_base = row * stride_lr + h * stride_lh
        for start in range(k_start, m_end, BLOCK_M):
            dk, dv = _dkdv_visit(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, stat_base, LSE2, DELTA,
                                 cand, offs_n, ck, offs_d, d_mask, start, m_end, qk_scale,
                                 2, BLOCK_M, EVEN_D, DOT_PREC)
        for start in range(m_end, q_full, BLOCK_M):
            dk, dv = _dkdv_visit(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, stat_base, LSE2, DELTA,
                                 cand, offs_n, ck, offs_d, d_mask, start, q_end, qk_scale,
                                 0, BLOCK_M, EVEN_D, DOT_PREC)
        if q_full < q_end:
            dk, dv = _dkdv_visit(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, stat_base, LSE2, DELTA,
                                 cand, offs_n, ck, offs_d, d_mask, q_full, q_end, qk_scale,
                                 1, BLOCK_M, EVEN_D, DOT_PREC)
    _store_rows(DK + row * stride_dkr + kvh * stride_dkh, k_start, stride_dkl, offs_d, n_mask, d_mask,
                (dk * sm_scale).to(DK.dtype.element_ty), BLOCK_N, EVEN_D)
    _store_rows(DV + row * stride_dvr + kvh * stride_dvh, k_start, stride_dvl, offs_d, n_mask, d_mask,
                dv.to(DV.dtype.element_ty), BLOCK_N, EVEN_D)
