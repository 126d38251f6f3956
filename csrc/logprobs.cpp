// Native op "logprobs": fused lm_head + log-softmax + gather + per-candidate sum over the PackedBatch
// log-prob layout (packing.py), forward and backward. Logits are never held as [rows, V]; everything
// is fp32. Every GEMM goes through gemm() (gemm.cpp), on the library chosen once per op call (Layout::lib).
#include <c10/util/ParallelGuard.h>
#include <omp.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "rowops.h"

namespace sdpo_native {

namespace {
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

}  // namespace

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

}  // namespace sdpo_native
