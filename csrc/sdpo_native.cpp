// Native CPU backend of sdpo_fast: fused lm_head + log-softmax + gather + per-candidate sum, and the
// S-DPO loss with its gradients, over the PackedBatch log-prob layout (packing.py). Logits are never
// held as [rows, V]; everything is fp32.
//
// Every GEMM goes through gemm() (gemm.cpp: oneDNN's fp32 matmul where torch has it, else torch's BLAS),
// on the library chosen once per op call (Layout::lib).
//
// The plain log-prob op ("logprobs", below) runs vocabulary block by vocabulary block over all rows,
// with multi-threaded GEMMs whose output blocks stay in cache; see its section.
//
// The S-DPO loss ("sdpo_loss") works on logits tiles of at most `tile_elements` floats:
//   * GEMMs (tile = h W^T, dH = tile W, dW += tile^T h) are split into vocabulary blocks, each a
//     single-threaded GEMM on one OpenMP thread. A tile has few rows (two groups: ~480 at the
//     benchmark shape), and letting the BLAS split such a GEMM over 2 threads costs ~35% more CPU
//     time than 1 thread (measured here: logits GEMM [241, 512] x [512, 32000], 0.98 s vs 0.74 s of
//     CPU per 1928 rows). The tile is stored block by block (Tile below), so every block is a
//     contiguous GEMM operand. dW is one fp32 accumulator: the blocks own disjoint rows of it, so there
//     are no per-thread copies and no atomics. dH is summed per thread over a fixed run of blocks,
//     then over threads in order: deterministic for a given thread count.
//   * The tile's hidden rows are gathered from hidden [T, D] (and converted to fp32) per tile, and
//     its dH rows written back into dhidden [T, D]: no [rows, D] fp32 copies are held.
//   * The per-row passes (max, exp, sums, gradient rows) run in rowops.cpp, OpenMP over rows.
//   * Few OpenMP regions per tile: with the default (active) wait policy an idle worker spins at every
//     region's end, which on a 2-vCPU machine shared with other work cost ~20% of the step (2.52 s vs
//     3.0 s with OMP_WAIT_POLICY=passive), so the small [n, D] ops run serially (c10::ParallelGuard).
//   * Whole groups: logit rows are stored group by group, so a tile holding all rows of one or more
//     groups yields those groups' log-probs, loss and dL/dlogp, and the gradient GEMMs reuse the exp
//     values left in the tile (three GEMMs). A group whose rows do not fit the tile budget falls back
//     to recomputing its logits in the gradient pass (four GEMMs).
#include <c10/util/ParallelGuard.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <vector>

#include "gemm.h"
#include "rowops.h"

namespace {

using sdpo_native::gemm;
using sdpo_native::rows_fused_grad;
using sdpo_native::rows_block_grad;
using sdpo_native::rows_block_stats;
using sdpo_native::rows_recompute_grad;
using sdpo_native::rows_softmax_stats;

struct Layout {
  int64_t Nr, N, V, D;
  const int64_t* row_ptr;
  const int64_t* target_ids;
  const int64_t* target_cands;
  sdpo_native::GemmLibrary lib;  // for all of the call's GEMMs
};

// Checks the weight and the CSR arrays of Nr logit rows.
Layout make_layout(int64_t Nr, const at::Tensor& w, const at::Tensor& row_ptr, const at::Tensor& target_ids,
                   const at::Tensor& target_cands) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "native backend: w must be a contiguous fp32 [V, D] CPU tensor (the Python wrapper converts)");
  for (const auto* t : {&row_ptr, &target_ids, &target_cands}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "native backend: row_ptr / target_ids / target_candidates must be contiguous int64 vectors");
  }
  TORCH_CHECK(row_ptr.size(0) == Nr + 1, "native backend: row_ptr must have Nr + 1 entries");
  TORCH_CHECK(target_ids.size(0) == target_cands.size(0), "native backend: target_ids / target_candidates differ in length");
  Layout L{Nr, target_ids.size(0), w.size(0), w.size(1), row_ptr.data_ptr<int64_t>(),
           target_ids.data_ptr<int64_t>(), target_cands.data_ptr<int64_t>(),
           sdpo_native::gemm_library(Nr * w.size(0) * w.size(1))};
  TORCH_CHECK(L.Nr == 0 || (L.row_ptr[0] == 0 && L.row_ptr[L.Nr] == L.N), "native backend: row_ptr must span the targets");
  for (int64_t r = 0; r < L.Nr; ++r) {
    TORCH_CHECK(L.row_ptr[r + 1] > L.row_ptr[r], "native backend: logit row ", r, " has no target");
  }
  for (int64_t t = 0; t < L.N; ++t) {
    TORCH_CHECK(L.target_ids[t] >= 0 && L.target_ids[t] < L.V, "native backend: target id ", L.target_ids[t],
                " outside [0, ", L.V, ")");
  }
  return L;
}

// Layout of logit rows given as h [Nr, D] fp32.
Layout check_layout(const at::Tensor& h, const at::Tensor& w, const at::Tensor& row_ptr,
                    const at::Tensor& target_ids, const at::Tensor& target_cands) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.dim() == 2 && h.is_contiguous(),
              "native backend: h must be a contiguous fp32 [Nr, D] CPU tensor (the Python wrapper converts)");
  TORCH_CHECK(w.dim() == 2 && h.size(1) == w.size(1), "native backend: h [Nr, D], w [V, D]");
  return make_layout(h.size(0), w, row_ptr, target_ids, target_cands);
}

int threads() { return std::max(1, at::get_num_threads()); }

// Vocabulary blocks for the GEMMs: 4 per thread, fewer when V is small (~512 columns or more each).
struct VBlocks {
  int64_t size, count;
};

VBlocks vocab_blocks(int64_t V) {
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>(4 * threads(), (V + 511) / 512));
  const int64_t size = (V + count - 1) / count;
  return {size, (V + size - 1) / size};
}

// Runs fn(v0, len) for every vocabulary block in parallel. ATen ops inside run single-threaded (they
// see the OpenMP region). An exception in a block is rethrown after the region.
template <typename Fn>
void for_vocab_blocks(int64_t V, const Fn& fn) {
  const VBlocks vb = vocab_blocks(V);
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads())
  for (int64_t b = 0; b < vb.count; ++b) {
    const int64_t v0 = b * vb.size, len = std::min(vb.size, V - v0);
    try {
      fn(b, v0, len);
    } catch (...) {
#pragma omp critical(sdpo_native_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// A logits tile of n rows in the flat fp32 buffer `buf`, stored block-major along the GEMMs' vocabulary
// blocks (rowops.h, BlockedTile): each block is a contiguous [n, len] operand, which oneDNN's matmul
// takes as it is (a column slice of a row-major [n, V] tile it would first copy).
struct Tile {
  at::Tensor buf;
  int64_t n, V;

  at::Tensor block(int64_t v0, int64_t len) const { return buf.narrow(0, v0 * n, n * len).view({n, len}); }
  sdpo_native::BlockedTile rows() const { return {buf.data_ptr<float>(), n, V, vocab_blocks(V).size}; }
};

// tile [n, V] = h [n, D] w^T
void logits_gemm(const Layout& L, const Tile& tile, const at::Tensor& h, const at::Tensor& w) {
  for_vocab_blocks(w.size(0), [&](int64_t, int64_t v0, int64_t len) {
    at::Tensor out = tile.block(v0, len);
    gemm(L.lib, out, h, w.narrow(0, v0, len).t(), false);
  });
}

// Logit rows taken from the packed hidden states [T, D] (any float dtype) a tile at a time, so no
// [Nr, D] fp32 copy is held, and their dH rows written back into dhidden [T, D] the same way.
struct HiddenRows {
  at::Tensor hidden, logit_rows;  // [T, D], [Nr] int64

  at::Tensor rows(int64_t r0, int64_t n) const {  // [n, D] fp32, contiguous
    return hidden.index_select(0, logit_rows.narrow(0, r0, n)).to(at::kFloat).contiguous();
  }
  void put(at::Tensor& dhidden, int64_t r0, const at::Tensor& dh_rows) const {
    dhidden.index_copy_(0, logit_rows.narrow(0, r0, dh_rows.size(0)), dh_rows.to(dhidden.scalar_type()));
  }
};

int64_t rows_per_tile(int64_t tile_elements, int64_t V) { return std::max<int64_t>(1, tile_elements / V); }

// Logits of rows [r0, r0 + n) (hidden rows hb [n, D]) into `tile` and their forward statistics (rowops.h).
void forward_rows(const Layout& L, const at::Tensor& hb, const at::Tensor& w, int64_t r0, int64_t n,
                  const Tile& tile, float* lse, float* sum, float* token_logp, bool keep_exp) {
  logits_gemm(L, tile, hb, w);
  rows_softmax_stats(tile.rows(), L.row_ptr + r0, L.target_ids, lse + r0, sum + r0, token_logp, keep_exp,
                     threads());
}

// Returns the dH rows [n, D] (undefined unless need_h) of the tile's rows (hidden rows hb) and adds their
// part of dW into dw (or writes it, when dw_fresh: dw is then uninitialised), from a gradient tile
// dlogits = diag(scale) tile (scale undefined: 1; else it is indexed from row r0).
at::Tensor gradient_gemms(const Layout& L, const at::Tensor& hb, const at::Tensor& w, int64_t r0, int64_t n,
                          const Tile& tile, const at::Tensor& scale, bool need_h, at::Tensor& dw, bool dw_fresh) {
  at::Tensor hs = hb;
  if (dw.defined() && scale.defined()) {
    c10::ParallelGuard serial(true);  // [n, D] is too small to be worth an OpenMP region (see below)
    hs = hb * scale.narrow(0, r0, n).unsqueeze(1);
  }
  // Each thread takes a fixed run of vocabulary blocks and sums its dH part in place, so the parts are
  // added in thread order afterwards: deterministic for a given thread count, [threads, n, D] floats.
  const VBlocks vb = vocab_blocks(w.size(0));
  const int nt = static_cast<int>(std::min<int64_t>(threads(), vb.count));
  at::Tensor partial = need_h ? at::empty({nt, n, hb.size(1)}, hb.options()) : at::Tensor();
  std::exception_ptr error;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t b0 = vb.count * t / T, b1 = vb.count * (t + 1) / T;
    try {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t v0 = b * vb.size, len = std::min(vb.size, w.size(0) - v0);
        const at::Tensor tb = tile.block(v0, len);
        if (need_h) {
          at::Tensor pb = partial.select(0, t);
          gemm(L.lib, pb, tb, w.narrow(0, v0, len), b != b0);
        }
        if (dw.defined()) {
          at::Tensor dwb = dw.narrow(0, v0, len);
          gemm(L.lib, dwb, tb.t(), hs, !dw_fresh);
        }
      }
    } catch (...) {
#pragma omp critical(sdpo_native_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  if (!need_h) return at::Tensor();
  c10::ParallelGuard serial(true);
  at::Tensor dhb = partial.sum(0);
  if (scale.defined()) dhb.mul_(scale.narrow(0, r0, n).unsqueeze(1));
  return dhb;
}

// Recomputing gradient pass over rows [r0, r1) given their lse and per-target upstream gradients.
void recompute_backward(const Layout& L, const HiddenRows& src, const at::Tensor& w, int64_t r0, int64_t r1,
                        const float* lse, const float* g_t, at::Tensor& buf, int64_t chunk, at::Tensor& dhidden,
                        at::Tensor& dw, bool& dw_fresh) {
  const at::Tensor none;
  for (int64_t a = r0; a < r1; a += chunk) {
    const int64_t n = std::min(chunk, r1 - a);
    const Tile tile{buf, n, L.V};
    const at::Tensor hb = src.rows(a, n);
    logits_gemm(L, tile, hb, w);
    rows_recompute_grad(tile.rows(), L.row_ptr + a, L.target_ids, g_t, lse + a, threads());
    const at::Tensor dhb = gradient_gemms(L, hb, w, a, n, tile, none, dhidden.defined(), dw, dw_fresh);
    dw_fresh = false;
    if (dhidden.defined()) src.put(dhidden, a, dhb);
  }
}

// ---- op "logprobs" -------------------------------------------------------------------------------
//
// Vocabulary-block-major: for each block of `block` vocabulary columns in turn, one GEMM per row
// segment writes the block's logits [rows, block] (cache-sized: at the benchmark shape this GEMM runs
// ~25% faster than one writing [rows, V] to memory), and the row pass reads them while they are hot.
// The forward keeps an online max / sum per row; the backward turns each block into its gradient and
// runs the dHidden and dW GEMMs on it. dW block j (rows [v0, v0 + len)) is complete after block j,
// so it is written once.
//
// Row segments: rows [0, ka) are kept from the forward to the backward in a buffer shaped like dW
// ([V, D] fp32, ka = min(Nr, D)): block j's logits [ka, len] lie at offset v0 * D, inside the region
// that dW rows [v0, v0 + len) occupy, so once the backward has consumed block j it writes dW's block
// there, and the buffer is returned as dW. Keeping these rows costs no memory beyond the gradient the
// backward allocates anyway (it only exists earlier). Rows [ka, ka + kb) are kept in a second buffer
// (block j at offset v0 * kb) sized by the caller's budget; the other rows are recomputed, `chunk_rows`
// at a time, in a [chunk_rows, block] work tile.

at::Tensor block_view(const at::Tensor& flat, int64_t offset, int64_t rows, int64_t len) {
  return flat.narrow(0, offset, rows * len).view({rows, len});
}

struct SeqSegments {
  int64_t ka, kb, chunk;  // rows kept in the dW-shaped buffer, in the extra buffer; recompute chunk
};

// Runs fn(x, r0, n, kept) over the row segments of vocabulary block [v0, v0 + len): the kept blocks
// (views into the buffers) first, then the recomputed rows chunk by chunk in the work tile.
template <typename Fn>
void for_segments(const Layout& L, const SeqSegments& sg, int64_t v0, int64_t len, const at::Tensor& kept_a,
                  const at::Tensor& kept_b, const at::Tensor& work, const Fn& fn) {
  if (sg.ka > 0) fn(block_view(kept_a.view(-1), v0 * L.D, sg.ka, len), 0, sg.ka, true);
  if (sg.kb > 0) fn(block_view(kept_b, v0 * sg.kb, sg.kb, len), sg.ka, sg.kb, true);
  for (int64_t r0 = sg.ka + sg.kb; r0 < L.Nr; r0 += sg.chunk) {
    const int64_t n = std::min(sg.chunk, L.Nr - r0);
    fn(block_view(work, 0, n, len), r0, n, false);
  }
}

at::Tensor work_tile(const Layout& L, const SeqSegments& sg, int64_t block) {
  const bool any = sg.ka + sg.kb < L.Nr;
  return any ? at::empty({sg.chunk * std::min(block, L.V)}, at::TensorOptions().dtype(at::kFloat)) : at::Tensor();
}

// Forward pass of rows [0, L.Nr) over the vocabulary blocks: running max m and sum s per row, token
// logits tok (absolute target offsets), the kept segments filled with their logits; with u defined
// (zeros [Nr, D]), u accumulates exp(logits - m) W instead, rescaled when a row's maximum grows
// (divide by s at the end for softmax(logits) W).
void seq_forward_pass(const Layout& L, const at::Tensor& h, const at::Tensor& w, const SeqSegments& sg,
                      int64_t block, const at::Tensor& kept_a, const at::Tensor& kept_b, float* mp, float* sp,
                      float* tk, const at::Tensor& u) {
  const at::Tensor work = work_tile(L, sg, block);
  const bool project = u.defined();
  std::vector<float> alpha(project ? sg.chunk : 0);
  for (int64_t v0 = 0; v0 < L.V; v0 += block) {
    const int64_t len = std::min(block, L.V - v0);
    const at::Tensor wb = w.narrow(0, v0, len);
    for_segments(L, sg, v0, len, kept_a, kept_b, work, [&](at::Tensor x, int64_t r0, int64_t n, bool) {
      gemm(L.lib, x, h.narrow(0, r0, n), wb.t(), false);
      rows_block_stats(x.data_ptr<float>(), n, len, v0, L.row_ptr + r0, L.target_ids, mp + r0, sp + r0, tk,
                       project ? alpha.data() : nullptr, threads());
      if (!project) return;
      float* ub = u.data_ptr<float>() + r0 * L.D;
      for (int64_t r = 0; r < n; ++r) {
        if (alpha[r] == 1.0f) continue;
        for (int64_t d = 0; d < L.D; ++d) ub[r * L.D + d] *= alpha[r];
      }
      at::Tensor ub_rows = u.narrow(0, r0, n);
      gemm(L.lib, ub_rows, x, wb, true);
    });
  }
}

// Gradient pass of rows [0, L.Nr): each vocabulary block becomes dL/dlogits (kept segments in place,
// the others recomputed), dh (zeros [Nr, D] or undefined) accumulates, and dw ([V, D] or undefined) is
// written block by block; dw may be kept_a's storage (block j's kept logits are consumed first).
void seq_backward_pass(const Layout& L, const at::Tensor& h, const at::Tensor& w, const SeqSegments& sg,
                       int64_t block, const at::Tensor& kept_a, const at::Tensor& kept_b, const float* gt,
                       const float* g_row, const float* ls, const at::Tensor& dh, const at::Tensor& dw) {
  const at::Tensor work = work_tile(L, sg, block);
  const bool need_h = dh.defined(), need_w = dw.defined();
  at::Tensor dw_block = need_w ? at::empty({std::min(block, L.V), L.D}, w.options()) : at::Tensor();
  for (int64_t v0 = 0; v0 < L.V; v0 += block) {
    const int64_t len = std::min(block, L.V - v0);
    const at::Tensor wb = w.narrow(0, v0, len);
    at::Tensor dwb = need_w ? dw_block.narrow(0, 0, len) : at::Tensor();
    bool first = true;
    for_segments(L, sg, v0, len, kept_a, kept_b, work, [&](at::Tensor x, int64_t r0, int64_t n, bool kept) {
      const at::Tensor hb = h.narrow(0, r0, n);
      if (!kept) gemm(L.lib, x, hb, wb.t(), false);
      rows_block_grad(x.data_ptr<float>(), n, len, v0, L.row_ptr + r0, L.target_ids, gt, g_row + r0, ls + r0,
                      threads());
      if (need_h) {
        at::Tensor dh_rows = dh.narrow(0, r0, n);
        gemm(L.lib, dh_rows, x, wb, true);
      }
      if (need_w) {
        gemm(L.lib, dwb, x.t(), hb, !first);
      }
      first = false;
    });
    // dW rows [v0, v0 + len): in kept_a this region held block j's kept logits, consumed above
    if (need_w) dw.narrow(0, v0, len).copy_(dwb);
  }
}

// Returns (lse [Nr], logps [num_cands], kept_a [V, D] | undefined, kept_b [kb * V] | undefined,
// u [Nr, D] | undefined) with logps[c] = sum of the token log-probs of candidate c. kept_a holds rows
// [0, min(Nr, D)) when keep_in_grad (the backward returns it as dW); kept_b holds the next
// kb = keep_elements / V rows. With project (frozen weight: only dH will be wanted) nothing is kept;
// instead u = softmax(logits) W is accumulated block by block (a second GEMM on the cache-hot exp
// block), from which the backward forms dH without touching the logits again: two GEMMs in all,
// against three for recomputing.
std::vector<at::Tensor> logprobs_forward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& row_ptr,
                                         const at::Tensor& target_ids, const at::Tensor& target_cands,
                                         int64_t num_cands, bool keep_in_grad, int64_t keep_elements,
                                         int64_t block, int64_t chunk_rows, bool project) {
  const Layout L = check_layout(h, w, row_ptr, target_ids, target_cands);
  TORCH_CHECK(block >= 1 && chunk_rows >= 1 && keep_elements >= 0,
              "native backend: block and chunk_rows must be >= 1, keep_elements >= 0");
  TORCH_CHECK(!(project && keep_in_grad), "native backend: project keeps no logits (dW is not wanted)");
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  SeqSegments sg{keep_in_grad ? std::min(L.Nr, L.D) : 0, 0, 0};
  sg.kb = (L.V > 0 && !project) ? std::min(L.Nr - sg.ka, keep_elements / L.V) : 0;
  sg.chunk = std::max<int64_t>(1, std::min(chunk_rows, L.Nr - sg.ka - sg.kb));
  at::Tensor kept_a = sg.ka > 0 ? at::empty({L.V, L.D}, f32) : at::Tensor();
  at::Tensor kept_b = sg.kb > 0 ? at::empty({sg.kb * L.V}, f32) : at::Tensor();
  at::Tensor m = at::full({L.Nr}, -std::numeric_limits<float>::infinity(), f32), s = at::zeros({L.Nr}, f32);
  at::Tensor tok = at::empty({L.N}, f32), logps = at::zeros({num_cands}, f32);
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>(), *tk = tok.data_ptr<float>();
  at::Tensor u = project ? at::zeros({L.Nr, L.D}, f32) : at::Tensor();
  seq_forward_pass(L, h, w, sg, block, kept_a, kept_b, mp, sp, tk, u);
  at::Tensor lse = at::empty({L.Nr}, f32);
  float* ls = lse.data_ptr<float>();
  float* lp = logps.data_ptr<float>();
  for (int64_t r = 0; r < L.Nr; ++r) {
    ls[r] = mp[r] + std::log(sp[r]);
    if (project) {
      float* ur = u.data_ptr<float>() + r * L.D;
      const float inv = 1.0f / sp[r];
      for (int64_t d = 0; d < L.D; ++d) ur[d] *= inv;
    }
    for (int64_t t = L.row_ptr[r]; t < L.row_ptr[r + 1]; ++t) {
      const int64_t c = L.target_cands[t];
      TORCH_CHECK(c >= 0 && c < num_cands, "native backend: bad target candidate");
      lp[c] += tk[t] - ls[r];
    }
  }
  return {lse, logps, kept_a, kept_b, u};
}

// dH of the projected forward (frozen weight): with u[r] = softmax(logits[r]) W from the forward,
// dH[r] = sum_t g_t W[id_t] - g_row[r] u[r], no logits needed.
at::Tensor projected_backward(const Layout& L, const at::Tensor& w, const at::Tensor& u,
                              const at::Tensor& grad_logps, const at::Tensor& target_cands, bool need_h,
                              bool need_w) {
  TORCH_CHECK(!need_w, "native backend: the projected forward (frozen weight) cannot give dW");
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.dim() == 2 && u.size(0) == L.Nr &&
                  u.size(1) == L.D, "native backend: u must be the forward's [Nr, D] projection");
  if (!need_h) return at::Tensor();
  const at::Tensor g_t = grad_logps.to(at::kFloat).contiguous().index_select(0, target_cands);
  const float *gt = g_t.data_ptr<float>(), *up = u.data_ptr<float>(), *wp = w.data_ptr<float>();
  at::Tensor dh = at::empty({L.Nr, L.D}, u.options());
  float* dp = dh.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t r = 0; r < L.Nr; ++r) {
    float g_row = 0.0f;
    for (int64_t t = L.row_ptr[r]; t < L.row_ptr[r + 1]; ++t) g_row += gt[t];
    float* dr = dp + r * L.D;
    for (int64_t d = 0; d < L.D; ++d) dr[d] = -g_row * up[r * L.D + d];
    for (int64_t t = L.row_ptr[r]; t < L.row_ptr[r + 1]; ++t) {
      const float* wr = wp + L.target_ids[t] * L.D;
      for (int64_t d = 0; d < L.D; ++d) dr[d] += gt[t] * wr[d];
    }
  }
  return dh;
}

// Returns (dh [Nr, D] fp32 | undefined, dw [V, D] fp32 | undefined) for upstream grad_logps
// [num_cands]. kept_a / kept_b: the forward's buffers (their logits are overwritten; dw is kept_a
// when it is given), or undefined to recompute those rows.
std::vector<at::Tensor> logprobs_backward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& row_ptr,
                                          const at::Tensor& target_ids, const at::Tensor& target_cands,
                                          const at::Tensor& lse, const at::Tensor& grad_logps, bool need_h,
                                          bool need_w, int64_t block, int64_t chunk_rows,
                                          c10::optional<at::Tensor> kept_a_opt, c10::optional<at::Tensor> kept_b_opt,
                                          c10::optional<at::Tensor> u_opt) {
  const Layout L = check_layout(h, w, row_ptr, target_ids, target_cands);
  TORCH_CHECK(block >= 1 && chunk_rows >= 1, "native backend: block and chunk_rows must be >= 1");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == L.Nr, "native backend: lse [Nr] fp32");
  if (u_opt.has_value() && u_opt->defined()) {
    return {projected_backward(L, w, *u_opt, grad_logps, target_cands, need_h, need_w), at::Tensor()};
  }
  const at::Tensor kept_a = kept_a_opt.has_value() ? *kept_a_opt : at::Tensor();
  const at::Tensor kept_b = kept_b_opt.has_value() ? *kept_b_opt : at::Tensor();
  SeqSegments sg{kept_a.defined() ? std::min(L.Nr, L.D) : 0, 0, 0};
  if (kept_a.defined()) {
    TORCH_CHECK(kept_a.scalar_type() == at::kFloat && kept_a.is_contiguous() && kept_a.dim() == 2 &&
                    kept_a.size(0) == L.V && kept_a.size(1) == L.D,
                "native backend: kept_a must be the forward's [V, D] buffer");
  }
  if (kept_b.defined()) {
    TORCH_CHECK(kept_b.scalar_type() == at::kFloat && kept_b.is_contiguous() && kept_b.dim() == 1 && L.V > 0 &&
                    kept_b.numel() % L.V == 0, "native backend: kept_b must be the forward's [kb * V] buffer");
    sg.kb = kept_b.numel() / L.V;
    TORCH_CHECK(sg.ka + sg.kb <= L.Nr, "native backend: kept_b holds more rows than the batch");
  }
  sg.chunk = std::max<int64_t>(1, std::min(chunk_rows, L.Nr - sg.ka - sg.kb));
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dh = need_h ? at::zeros({L.Nr, L.D}, f32) : at::Tensor();
  at::Tensor dw = need_w ? (kept_a.defined() ? kept_a : at::empty({L.V, L.D}, f32)) : at::Tensor();
  if (L.Nr == 0 || (!need_h && !need_w)) {
    if (need_w) dw.zero_();
    return {dh, dw};
  }
  const at::Tensor g = grad_logps.to(at::kFloat).contiguous();
  const at::Tensor g_t = g.index_select(0, target_cands);
  const float* gt = g_t.data_ptr<float>();
  std::vector<float> g_row(L.Nr, 0.0f);
  for (int64_t r = 0; r < L.Nr; ++r) {
    for (int64_t t = L.row_ptr[r]; t < L.row_ptr[r + 1]; ++t) g_row[r] += gt[t];
  }
  seq_backward_pass(L, h, w, sg, block, kept_a, kept_b, gt, g_row.data(), lse.data_ptr<float>(), dh, dw);
  return {dh, dw};
}

// ---- op "sdpo_loss" ------------------------------------------------------------------------------

// Loss and dloss/dlogp of one group (fused_loss.group_loss_and_grad), in double.
float group_loss_grad(const float* logp, const float* ref, const bool* mask, const int64_t* lens, int64_t C,
                      double beta, double sft_weight, float* grad) {
  const double r_w = static_cast<double>(logp[0]) - ref[0];
  std::vector<double> z(C, 0.0);
  double m = 0.0;  // the constant 0 term of logsumexp([0, z_1..z_K])
  for (int64_t j = 1; j < C; ++j) {
    if (!mask[j]) continue;
    z[j] = beta * ((static_cast<double>(logp[j]) - ref[j]) - r_w);
    m = std::max(m, z[j]);
  }
  double s = std::exp(-m);
  for (int64_t j = 1; j < C; ++j) {
    if (mask[j]) s += std::exp(z[j] - m);
  }
  const double lse = m + std::log(s);
  const double len_w = static_cast<double>(lens[0]);
  double s_tot = 0.0;
  for (int64_t j = 1; j < C; ++j) {
    const double sj = mask[j] ? std::exp(z[j] - lse) : 0.0;
    grad[j] = static_cast<float>(beta * sj);
    s_tot += sj;
  }
  grad[0] = static_cast<float>(-beta * s_tot - sft_weight / len_w);
  return static_cast<float>(lse - sft_weight * logp[0] / len_w);
}

// Returns (loss_g [G], logps [G, C], dhidden [T, D] in hidden's dtype | undefined, dw [V, D] fp32 |
// undefined), gradients of sum_g loss_g, for hidden [T, D] whose logit rows are hidden[logit_rows].
// Logit rows must be ordered group by group (packing.py does).
std::vector<at::Tensor> sdpo_loss(const at::Tensor& hidden, const at::Tensor& logit_rows, const at::Tensor& w,
                                  const at::Tensor& row_ptr, const at::Tensor& target_ids,
                                  const at::Tensor& target_cands, const at::Tensor& ref_logps,
                                  const at::Tensor& cand_mask, const at::Tensor& cand_lens, double beta,
                                  double sft_weight, bool need_h, bool need_w, int64_t tile_elements) {
  TORCH_CHECK(hidden.device().is_cpu() && hidden.is_floating_point() && hidden.dim() == 2 && hidden.is_contiguous(),
              "native backend: hidden must be a contiguous floating [T, D] CPU tensor");
  TORCH_CHECK(logit_rows.scalar_type() == at::kLong && logit_rows.dim() == 1 && logit_rows.is_contiguous(),
              "native backend: logit_rows must be a contiguous int64 vector");
  TORCH_CHECK(w.dim() == 2 && hidden.size(1) == w.size(1), "native backend: hidden [T, D], w [V, D]");
  const Layout L = make_layout(logit_rows.size(0), w, row_ptr, target_ids, target_cands);
  const int64_t* lr = logit_rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < L.Nr; ++r) {
    TORCH_CHECK(lr[r] >= 0 && lr[r] < hidden.size(0), "native backend: logit row index ", lr[r], " outside [0, ",
                hidden.size(0), ")");
  }
  const HiddenRows src{hidden, logit_rows};
  TORCH_CHECK(ref_logps.dim() == 2, "native backend: ref_logps must be [G, C]");
  const int64_t G = ref_logps.size(0), C = ref_logps.size(1);
  const at::Tensor ref = ref_logps.to(at::kFloat).contiguous();
  const at::Tensor mask = cand_mask.to(at::kBool).contiguous();
  const at::Tensor lens = cand_lens.to(at::kLong).contiguous();
  TORCH_CHECK(mask.sizes() == ref.sizes() && lens.sizes() == ref.sizes(), "native backend: mask / lens must be [G, C]");
  auto f32 = at::TensorOptions().dtype(at::kFloat);

  // Group of every logit row (all targets of a row belong to one group) and the groups' row ranges.
  std::vector<int64_t> g_begin(G, -1), g_end(G, -1);
  for (int64_t r = 0; r < L.Nr; ++r) {
    const int64_t c = L.target_cands[L.row_ptr[r]];
    TORCH_CHECK(c >= 0 && c < G * C, "native backend: target candidate out of range");
    const int64_t g = c / C;
    if (g_begin[g] < 0) {
      g_begin[g] = r;
    } else {
      TORCH_CHECK(g_end[g] == r, "native backend: the logit rows of group ", g, " are not contiguous");
    }
    g_end[g] = r + 1;
  }
  // Blocks: runs of consecutive groups (in row order) whose rows fit the tile budget together.
  std::vector<int64_t> order;
  for (int64_t g = 0; g < G; ++g) {
    if (g_begin[g] >= 0) order.push_back(g);
  }
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return g_begin[a] < g_begin[b]; });
  const int64_t max_rows = rows_per_tile(tile_elements, L.V);
  struct Block { int64_t first, last, r0, r1; };  // groups order[first..last), rows [r0, r1)
  std::vector<Block> blocks;
  int64_t buf_rows = 1;
  for (size_t i = 0; i < order.size();) {
    size_t j = i + 1;
    while (j < order.size() && g_end[order[j]] - g_begin[order[i]] <= max_rows) ++j;
    const int64_t rows = g_end[order[j - 1]] - g_begin[order[i]];
    blocks.push_back({static_cast<int64_t>(i), static_cast<int64_t>(j), g_begin[order[i]], g_end[order[j - 1]]});
    buf_rows = std::max(buf_rows, std::min(rows, max_rows));
    i = j;
  }

  at::Tensor loss = at::zeros({G}, f32), logps = at::zeros({G, C}, f32);
  at::Tensor lse = at::empty({L.Nr}, f32), sum = at::empty({L.Nr}, f32), tok = at::empty({L.N}, f32);
  at::Tensor g_t = at::zeros({L.N}, f32), grad = at::zeros({G, C}, f32), scale = at::empty({L.Nr}, f32);
  at::Tensor dh = need_h ? at::zeros_like(hidden) : at::Tensor();  // [T, D]: rows without logits stay 0
  // dW is written by the first gradient pass (no zero fill: one 4 * V * D-byte pass less), then added to
  at::Tensor dw = need_w ? at::empty({L.V, L.D}, f32) : at::Tensor();
  bool dw_fresh = true;
  at::Tensor buf = at::empty({buf_rows * L.V}, f32);
  float *lp = logps.data_ptr<float>(), *gr = grad.data_ptr<float>(), *gt = g_t.data_ptr<float>();
  float *tk = tok.data_ptr<float>(), *ls = loss.data_ptr<float>();
  const float* rf = ref.data_ptr<float>();
  const bool* mk = mask.data_ptr<bool>();
  const int64_t* ln = lens.data_ptr<int64_t>();

  // Log-probs, loss and per-target dL/dlogp of the groups of rows [r0, r1) once their tokens are scored.
  auto finish_groups = [&](const Block& b) {
    for (int64_t t = L.row_ptr[b.r0]; t < L.row_ptr[b.r1]; ++t) lp[L.target_cands[t]] += tk[t];
    for (int64_t i = b.first; i < b.last; ++i) {
      const int64_t g = order[i];
      TORCH_CHECK(mk[g * C] && ln[g * C] >= 1, "native backend: group ", g, " has no chosen candidate");
      ls[g] = group_loss_grad(lp + g * C, rf + g * C, mk + g * C, ln + g * C, C, beta, sft_weight, gr + g * C);
    }
    for (int64_t t = L.row_ptr[b.r0]; t < L.row_ptr[b.r1]; ++t) gt[t] = gr[L.target_cands[t]];
  };

  for (const Block& b : blocks) {
    const int64_t n = b.r1 - b.r0;
    if (n <= max_rows) {  // whole groups in one tile: no recompute
      const Tile tile{buf, n, L.V};
      const at::Tensor hb = src.rows(b.r0, n);
      forward_rows(L, hb, w, b.r0, n, tile, lse.data_ptr<float>(), sum.data_ptr<float>(), tk, true);
      finish_groups(b);
      if (!need_h && !need_w) continue;
      rows_fused_grad(tile.rows(), L.row_ptr + b.r0, L.target_ids, gt, sum.data_ptr<float>() + b.r0,
                      scale.data_ptr<float>() + b.r0, threads());
      const at::Tensor dhb = gradient_gemms(L, hb, w, b.r0, n, tile, scale, need_h, dw, dw_fresh);
      dw_fresh = false;
      if (need_h) src.put(dh, b.r0, dhb);
    } else {  // one group larger than the budget: score it chunk by chunk, then recompute
      for (int64_t a = b.r0; a < b.r1; a += max_rows) {
        const int64_t m = std::min(max_rows, b.r1 - a);
        const Tile tile{buf, m, L.V};
        forward_rows(L, src.rows(a, m), w, a, m, tile, lse.data_ptr<float>(), sum.data_ptr<float>(), tk, false);
      }
      finish_groups(b);
      if (!need_h && !need_w) continue;
      recompute_backward(L, src, w, b.r0, b.r1, lse.data_ptr<float>(), gt, buf, max_rows, dh, dw, dw_fresh);
    }
  }
  if (need_w && dw_fresh) dw.zero_();  // no logit rows at all
  // Groups without logit rows (not produced by pack_groups) still get their loss from zero log-probs.
  for (int64_t g = 0; g < G; ++g) {
    if (g_begin[g] < 0) ls[g] = group_loss_grad(lp + g * C, rf + g * C, mk + g * C, ln + g * C, C, beta, sft_weight, gr + g * C);
  }
  return {loss, logps, dh, dw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdpo_fast native CPU kernels (fused log-probs and S-DPO loss); see csrc/sdpo_native.cpp";
  // settles the GEMM library here, outside any OpenMP region (gemm.cpp)
  m.def("gemm_engine", &sdpo_native::gemm_engine, py::arg("work"),
        "the library an op call whose GEMM passes cost `work` multiply-adds runs them on: 'onednn' or 'blas'");
  sdpo_native::gemm_engine(0);
  m.def("logprobs_forward", &logprobs_forward,
        "(h, w, row_ptr, target_ids, target_candidates, num_cands, keep_in_grad, keep_elements, block, chunk_rows, "
        "project) -> (lse, logps, kept_a, kept_b, u)");
  m.def("logprobs_backward", &logprobs_backward,
        "(h, w, row_ptr, target_ids, target_candidates, lse, grad_logps, need_h, need_w, block, chunk_rows, kept_a, "
        "kept_b, u) -> (dh, dw)");
  m.def("sdpo_loss", &sdpo_loss,
        "(hidden, logit_rows, w, row_ptr, target_ids, target_candidates, ref_logps, mask, lens, beta, sft_weight, "
        "need_h, need_w, tile_elements) -> (loss_g, logps, dhidden, dw)");
}
