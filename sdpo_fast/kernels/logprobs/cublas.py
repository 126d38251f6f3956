"""Log-probs and the fused S-DPO loss as library GEMMs (cuBLAS on CUDA) plus two Triton row kernels.
Backend ``"cublas"`` of the ops ``"logprobs"`` and ``"sdpo_loss"``; ``"auto"`` prefers it on CUDA.
Contract and reference: ``reference.py`` beside this file.

Why: the logit GEMMs that ``triton.py`` fuses into its Triton kernels trail the library's GEMMs on an
H200 (figures: ``benchmarks/results/bench_logprob_h200_run1.md``), so here every GEMM is a library GEMM
and Triton only does what GEMMs cannot: the row passes over a bounded chunk of logits.

Rows are processed in chunks of at most ``chunk_bytes`` of logits (``[c, V]`` in the input dtype):
    x = h[rows] @ W^T                 GEMM into the chunk buffer
    lse = _row_lse_kernel(x)          one read: online max / sum-exp in fp32 per row
    logp_t = x[row_t, id_t] - lse     gathered, summed per candidate (index_add)
and for the gradient, once dL/dlogp per candidate is known (``g_t`` per target, ``g_row = sum g_t``):
    x <- _row_grad_kernel(x)          in place: ``sum_t g_t onehot(id_t) - g_row softmax(x)``, formed
                                      in fp32 before the cast, so ``g (1 - p)`` never cancels
    dh[rows] = x @ W                  GEMM, one rounding per element
    dW += x^T @ h[rows]               GEMM; accumulated in the weight's dtype across chunks
``fused_sdpo_loss``: when every group's rows fit one chunk, chunks hold whole groups, so each chunk's
loss weights are known right after its forward and the gradient reuses the chunk: three GEMMs in all.
Otherwise (or for ``sequence_logprobs``, whose upstream gradient comes later) the gradient pass
recomputes the logits: four GEMMs.

Extra memory: the chunk buffer plus ``[c, D]`` temporaries. dW accumulates in the weight's dtype (bf16
rounding once per chunk, as other chunked fused-CE implementations do); fp32 inputs stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..options import option

__all__ = ["Options", "DW_PRECISION", "INPUT_DTYPES", "forward", "backward", "fused_loss", "plan_chunks"]

DW_PRECISION = "accumulated in the weight's dtype across chunks (one rounding per chunk); fp32 inputs stay fp32"
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Options:
    """The CUDA chunk (192 MiB of logits: 784 rows at V = 128256 in bf16) was chosen for peak memory
    against speed on an H200 (``benchmarks/results/bench_logprob_h200*.md``)."""

    chunk_bytes: int = option(192 << 20, cpu=1 << 20, check="int>=1", doc="logits per chunk, in bytes")
    chunk_rows: int | None = option(None, check="int>=1|None", doc="logit rows per chunk (overrides chunk_bytes)")
    block: int = option(4096, cpu=64, check="pow2>=16", doc="columns per step of the row kernels")
    num_warps: int = option(8, cpu=4)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _row_lse_kernel(x_ptr, lse_ptr, V, stride_x, BLOCK: tl.constexpr):
    """``lse[r] = logsumexp(x[r, :V])`` in fp32, one program per row of the chunk."""
    r = tl.program_id(0).to(tl.int64)
    base = x_ptr + r * stride_x
    offs = tl.arange(0, BLOCK)
    m_i = tl.full((1,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((1,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)[None, :]
        # Every block holds at least one real column, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + r + tl.arange(0, 1), m_i + tl.log(s_i))


@triton.jit
def _row_grad_kernel(x_ptr, lse_ptr, g_row_ptr, row_ptr_ptr, t_ids_ptr, g_t_ptr, row0, V, stride_x,
                     BLOCK: tl.constexpr):
    """In place on row r of the chunk (global logit row ``row0 + r``):
    ``x[r, v] <- sum_{t of row} g_t [id_t == v] - g_row[r] * exp(x[r, v] - lse[r])``, in fp32, then cast."""
    r = tl.program_id(0).to(tl.int64)
    one = tl.arange(0, 1)
    base = x_ptr + r * stride_x
    lse = tl.load(lse_ptr + r + one)
    g_row = tl.load(g_row_ptr + r + one)
    t_lo = tl.load(row_ptr_ptr + row0 + r + one)
    cnt = tl.load(row_ptr_ptr + row0 + r + 1 + one) - t_lo
    n_t = tl.max(cnt, axis=0)
    offs = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
        d = -g_row[:, None] * tl.exp(x - lse[:, None])
        # Most rows own one target; the prompt's last row owns one per candidate.
        for k in range(0, n_t):
            tid = tl.load(t_ids_ptr + t_lo + k)
            g_k = tl.load(g_t_ptr + t_lo + k)
            d += tl.where(cols[None, :] == tid[:, None], g_k[:, None], 0.0)
        tl.store(base + cols[None, :], d.to(x_ptr.dtype.element_ty), mask=mask[None, :])


# --------------------------------------------------------------------------------------------------
# chunk plan (host side, from the batch's layout: no device sync)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Logit rows ``[r0, r1)`` and their targets ``[t0, t1)``; ``groups`` ``(g0, g1)`` when the chunk
    holds whole groups ``g0 .. g1 - 1``, else None."""

    r0: int
    r1: int
    t0: int | None  # None (with t1): the targets of rows [r0, r1) are found on the device
    t1: int | None
    groups: tuple[int, int] | None

    def targets(self, batch):
        """``(local rows, target ids, candidate keys, inside)`` of the chunk's targets: their slice when
        the host knows it (``inside`` None), else every target with ``inside`` marking the chunk's."""
        if self.t0 is not None:
            t = slice(self.t0, self.t1)
            return batch.target_rows[t] - self.r0, batch.target_ids[t], batch.target_candidates[t], None
        local = batch.target_rows - self.r0
        inside = (local >= 0) & (local < self.r1 - self.r0)
        return local.clamp(0, self.r1 - self.r0 - 1), batch.target_ids, batch.target_candidates, inside


def _group_extents(batch):
    """Per group, in group order: ``(rows, targets, K + 1)`` from ``batch.group_rows`` (host ranges
    ``(r0, r1, t0, t1)``). The prompt's last row owns K+1 targets, then every candidate token after the
    first is one row with one target."""
    return [(r1 - r0, t1 - t0, t1 - t0 - (r1 - r0) + 1) for r0, r1, t0, t1 in batch.group_rows]


def plan_chunks(batch, max_rows: int, whole_groups: bool):
    """Chunks (``Chunk``) of at most ``max_rows`` logit rows. With ``whole_groups`` every chunk holds
    whole groups, or the plan is None when some group has more rows than ``max_rows``.

    A bucketed batch (``batch.bucket`` set) is planned from its shapes alone, so that every batch of
    its bucket gets the same plan (one CUDA graph replays them all): one chunk of all rows, targets
    and groups when the rows fit ``max_rows``, else row ranges whose targets are found on the device
    (``t0 = t1 = None``) and no whole-group plan."""
    if getattr(batch, "bucket", None) is not None:
        Nr = batch.logit_rows.shape[0]
        if Nr <= max_rows:
            return [Chunk(0, Nr, 0, batch.num_targets, (0, batch.num_groups))]
        if whole_groups:
            return None
        return [Chunk(a, min(Nr, a + max_rows), None, None, None) for a in range(0, Nr, max_rows)]
    ext = _group_extents(batch)
    if whole_groups and any(rows > max_rows for rows, _, _ in ext):
        return None
    chunks, r, t = [], 0, 0
    cur = None  # [r0, t0, g0] of the open whole-group chunk
    for g, (rows, targets, n_cands) in enumerate(ext):
        if rows <= max_rows:
            if cur is not None and r + rows - cur[0] > max_rows:
                chunks.append(Chunk(cur[0], r, cur[1], t, (cur[2], g)))
                cur = None
            if cur is None:
                cur = [r, t, g]
            r, t = r + rows, t + targets
            continue
        if cur is not None:
            chunks.append(Chunk(cur[0], r, cur[1], t, (cur[2], g)))
            cur = None
        # A group longer than a chunk: split its rows; row i > 0 owns target n_cands + i - 1.
        for a in range(0, rows, max_rows):
            b = min(rows, a + max_rows)
            ta = 0 if a == 0 else n_cands + a - 1
            chunks.append(Chunk(r + a, r + b, t + ta, t + n_cands + b - 1, None))
        r, t = r + rows, t + targets
    if cur is not None:
        chunks.append(Chunk(cur[0], r, cur[1], t, (cur[2], len(ext))))
    return chunks


# --------------------------------------------------------------------------------------------------
# passes
# --------------------------------------------------------------------------------------------------


def _max_rows(weight: torch.Tensor, opts: Options) -> int:
    if opts.chunk_rows:
        return opts.chunk_rows
    return max(1, opts.chunk_bytes // (weight.shape[0] * weight.element_size()))


class _Pass:
    """Buffers shared by the chunks of one call: the logits chunk and the gradient outputs."""

    def __init__(self, hidden, weight, batch, opts, chunks):
        self.hidden, self.weight, self.batch, self.opts = hidden, weight, batch, opts
        self.V = weight.shape[0]
        rows = max((c.r1 - c.r0 for c in chunks), default=1)  # a small batch needs no full-budget buffer
        self.buf = torch.empty(rows, self.V, dtype=hidden.dtype, device=hidden.device)
        self.dhidden = self.dweight = None

    def logits(self, c: Chunk):
        """``(h [c, D], x [c, V])`` of the chunk's rows; x lives in the shared buffer."""
        h = self.hidden.index_select(0, self.batch.logit_rows[c.r0 : c.r1])
        x = self.buf[: c.r1 - c.r0]
        torch.mm(h, self.weight.t(), out=x)
        return h, x

    def forward(self, c: Chunk, x, lse, logps):
        """Writes ``lse[c.r0:c.r1]`` and adds the chunk's token log-probs into ``logps [G * C]``."""
        b = self.batch
        lse_c = lse[c.r0 : c.r1]
        _row_lse_kernel[(c.r1 - c.r0,)](x, lse_c, self.V, x.stride(0), BLOCK=self.opts.block,
                                        num_warps=self.opts.num_warps)
        if c.t0 is None or c.t1 > c.t0:
            local, ids, keys, inside = c.targets(b)
            tok = x[local, ids].float() - lse_c.index_select(0, local)
            logps.index_add_(0, keys, tok if inside is None else tok.masked_fill(~inside, 0.0))

    def backward(self, c: Chunk, h, x, lse, g_t, need_h, need_w):
        """Gradient of ``sum_t g_t logp_t`` over the chunk's rows (``g_t [N]`` fp32, all targets)."""
        b = self.batch
        n = c.r1 - c.r0
        g_row = torch.zeros(n, dtype=torch.float32, device=x.device)
        if c.t0 is None:
            local, _, _, inside = c.targets(b)
            g_row.index_add_(0, local, g_t.masked_fill(~inside, 0.0))
        elif c.t1 > c.t0:
            g_row.index_add_(0, b.target_rows[c.t0 : c.t1] - c.r0, g_t[c.t0 : c.t1])
        _row_grad_kernel[(n,)](x, lse[c.r0 : c.r1], g_row, b.row_ptr, b.target_ids, g_t, c.r0, self.V, x.stride(0),
                               BLOCK=self.opts.block, num_warps=self.opts.num_warps)
        if need_h:
            if self.dhidden is None:
                self.dhidden = torch.zeros_like(self.hidden)
            self.dhidden.index_copy_(0, b.logit_rows[c.r0 : c.r1], torch.mm(x, self.weight))
        if need_w:
            if self.dweight is None:
                self.dweight = torch.mm(x.t(), h)
            else:
                self.dweight.addmm_(x.t(), h)

    def grads(self, need_h, need_w):
        dh, dw = self.dhidden, self.dweight
        if need_h and dh is None:
            dh = torch.zeros_like(self.hidden)
        if need_w and dw is None:
            dw = torch.zeros_like(self.weight)
        return dh, dw


def _forward_all(p: _Pass, chunks):
    b = p.batch
    lse = torch.empty(b.logit_rows.shape[0], dtype=torch.float32, device=p.hidden.device)
    logps = torch.zeros(b.candidate_mask.numel(), dtype=torch.float32, device=p.hidden.device)
    for c in chunks:
        _, x = p.logits(c)
        p.forward(c, x, lse, logps)
    return lse, logps


def _backward_all(p: _Pass, chunks, lse, grad_logps, need_h, need_w):
    g_t = grad_logps.float().index_select(0, p.batch.target_candidates).contiguous()
    for c in chunks:
        h, x = p.logits(c)
        p.backward(c, h, x, lse, g_t, need_h, need_w)
    return p.grads(need_h, need_w)


# --------------------------------------------------------------------------------------------------
# backend entry points
# --------------------------------------------------------------------------------------------------


def forward(hidden, weight, batch, opts: Options, need_h: bool, need_w: bool, fused: bool = False):
    """Contract ``forward`` (``reference.py``): chunks of at most ``_max_rows`` rows; state
    ``(lse [Nr], chunks)``. The backward recomputes each chunk's logits."""
    chunks = plan_chunks(batch, _max_rows(weight, opts), whole_groups=False)
    lse, logps = _forward_all(_Pass(hidden, weight, batch, opts, chunks), chunks)
    return logps, (lse, chunks)


def backward(hidden, weight, batch, state, grad_logps, need_h: bool, need_w: bool, opts: Options):
    """Contract ``backward``."""
    if not (need_h or need_w):
        return None, None
    lse, chunks = state
    return _backward_all(_Pass(hidden, weight, batch, opts, chunks), chunks, lse, grad_logps, need_h, need_w)


def fused_loss(hidden, weight, batch, loss, need_h: bool, need_w: bool, opts: Options):
    """Contract ``fused_loss``: when every group's rows fit one chunk, chunks hold whole groups, so each
    chunk's loss weights are known right after its forward and the gradient reuses the chunk (three
    GEMMs). Otherwise (a group longer than a chunk, or no gradient) None: the generic path recomputes."""
    if not (need_h or need_w):
        return None
    chunks = plan_chunks(batch, _max_rows(weight, opts), whole_groups=True)
    if chunks is None:
        return None
    G, C = batch.candidate_mask.shape
    dev = hidden.device
    p = _Pass(hidden, weight, batch, opts, chunks)
    lse = torch.empty(batch.logit_rows.shape[0], dtype=torch.float32, device=dev)
    logps = torch.zeros(G * C, dtype=torch.float32, device=dev)
    loss_g = torch.zeros(G, dtype=torch.float32, device=dev)
    grad = torch.zeros(G, C, dtype=torch.float32, device=dev)
    g_t = torch.zeros(batch.num_targets, dtype=torch.float32, device=dev)
    lp2 = logps.view(G, C)
    for c in chunks:
        h, x = p.logits(c)
        p.forward(c, x, lse, logps)
        g = slice(*c.groups)
        loss_g[g], grad[g] = loss(lp2[g], groups=g)
        if c.t1 > c.t0:
            g_t[c.t0 : c.t1] = grad.view(-1).index_select(0, batch.target_candidates[c.t0 : c.t1])
        p.backward(c, h, x, lse, g_t, need_h, need_w)
    dh, dw = p.grads(need_h, need_w)
    return loss_g, lp2, dh, dw
