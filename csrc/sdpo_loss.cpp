// Native op "sdpo_loss": the S-DPO loss with its gradients in one op over the PackedBatch log-prob
// layout (packing.py); everything is fp32 (the per-group loss math in double).
//
// The S-DPO loss ("sdpo_loss") works on logits tiles of at most `tile_elements` floats:
//   * GEMMs (tile = h W^T, dH = tile W, dW += tile^T h) are split into vocabulary blocks, each a
//     single-threaded GEMM on one OpenMP thread: a tile has few rows, and letting the BLAS split such
//     a GEMM over the threads cost more CPU time (benchmarks/results/design_measurements.md). The tile is stored block by block (Tile below), so every block is a
//     contiguous GEMM operand. dW is one fp32 accumulator: the blocks own disjoint rows of it, so there
//     are no per-thread copies and no atomics. dH is summed per thread over a fixed run of blocks,
//     then over threads in order: deterministic for a given thread count.
//   * The tile's hidden rows are gathered from hidden [T, D] (and converted to fp32) per tile, and
//     its dH rows written back into dhidden [T, D]: no [rows, D] fp32 copies are held.
//   * The per-row passes (max, exp, sums, gradient rows) run in rowops.cpp, OpenMP over rows.
//   * Few OpenMP regions per tile: with the default (active) wait policy an idle worker spins at every
//     region's end, which on a shared 2-vCPU machine cost a share of the step (design_measurements.md),
//     so the small [n, D] ops run serially (c10::ParallelGuard).
//   * Whole groups: logit rows are stored group by group, so a tile holding all rows of one or more
//     groups yields those groups' log-probs, loss and dL/dlogp, and the gradient GEMMs reuse the exp
//     values left in the tile (three GEMMs). A group whose rows do not fit the tile budget falls back
//     to recomputing its logits in the gradient pass (four GEMMs).
#include <c10/util/ParallelGuard.h>
#include <omp.h>

#include <cmath>
#include <exception>
#include <vector>

#include "common.h"
#include "rowops.h"

namespace sdpo_native {

namespace {
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

}  // namespace

// ---- op "sdpo_loss" ------------------------------------------------------------------------------

// Loss and dloss/dlogp of one group in double: the mirror of sdpo_fast.loss.group_loss_and_grad
// (common.h; tests/test_loss_mirror.py holds the two together). loss_type is the position in
// sdpo_fast.loss.LOSS_TYPES: 0 sdpo, 1 dmpo, 2 dpo_pairs, 3 dynamic (formulas: sdpo_fast/loss.py's
// docstring). Each type writes w_j (dL/dlogp_j = beta * w_j, dL/dlogp_w = -beta * sum_j w_j) and
// returns the preference loss; a group without real negatives gives 0 for every type.
namespace {
constexpr double kDynamicMargin = 6.0;  // sdpo_fast.loss.DYNAMIC_MARGIN

double sigmoid(double x) { return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x)); }
double neg_log_sigmoid(double x) { return x >= 0 ? std::log1p(std::exp(-x)) : -x + std::log1p(std::exp(x)); }

double preference_loss(const float* logp, const bool* mask, const std::vector<double>& r, int64_t C, double beta,
                       int64_t loss_type, std::vector<double>& w) {
  const double r_w = r[0];
  int64_t K = 0;
  for (int64_t j = 1; j < C; ++j) K += mask[j] ? 1 : 0;
  if (K == 0) return 0.0;
  if (loss_type == 0) {  // sdpo: logsumexp([0, z_1..z_K])
    double m = 0.0;
    for (int64_t j = 1; j < C; ++j) {
      if (mask[j]) m = std::max(m, beta * (r[j] - r_w));
    }
    double s = std::exp(-m);
    for (int64_t j = 1; j < C; ++j) {
      if (mask[j]) s += std::exp(beta * (r[j] - r_w) - m);
    }
    const double lse = m + std::log(s);
    for (int64_t j = 1; j < C; ++j) w[j] = mask[j] ? std::exp(beta * (r[j] - r_w) - lse) : 0.0;
    return lse;
  }
  if (loss_type == 1) {  // dmpo
    double mean = 0.0;
    for (int64_t j = 1; j < C; ++j) mean += mask[j] ? r[j] : 0.0;
    const double u = beta * (r_w - mean / K);
    for (int64_t j = 1; j < C; ++j) w[j] = mask[j] ? sigmoid(-u) / K : 0.0;
    return neg_log_sigmoid(u);
  }
  if (loss_type == 2) {  // dpo_pairs
    double loss = 0.0;
    for (int64_t j = 1; j < C; ++j) {
      if (!mask[j]) continue;
      const double d = beta * (r_w - r[j]);
      loss += neg_log_sigmoid(d);
      w[j] = sigmoid(-d) / K;
    }
    return loss / K;
  }
  TORCH_CHECK(loss_type == 3, "native backend: unknown loss_type code ", loss_type);
  // dynamic (DynamicPO): boundary set B from the policy log-probs, per-negative beta factors f_j
  const float p_w = logp[0];
  std::vector<char> in_b(C, 0), in_d(C, 0);
  int64_t k = 0;
  float top = -INFINITY;
  for (int64_t j = 1; j < C; ++j) {
    if (!mask[j]) continue;
    top = std::max(top, logp[j]);
    if (logp[j] >= p_w) in_b[j] = 1, ++k;
  }
  if (k == 0) {
    for (int64_t j = 1; j < C; ++j) {
      if (mask[j] && logp[j] == top) in_b[j] = 1, ++k;
    }
  }
  int64_t n_d = 0;
  for (int64_t j = 1; j < C; ++j) {
    in_d[j] = mask[j] && !in_b[j];
    n_d += in_d[j];
  }
  if (n_d == 0) in_d = in_b, n_d = k;
  double m_d = 0.0;
  for (int64_t j = 1; j < C; ++j) m_d += in_d[j] ? static_cast<double>(logp[j]) : 0.0;
  m_d /= n_d;
  std::vector<double> f(C, 0.0);
  double u = 0.0;
  for (int64_t j = 1; j < C; ++j) {
    if (!in_b[j]) continue;
    const double d1 = static_cast<double>(p_w) - logp[j], d2 = logp[j] - m_d, den = std::abs(d1) + std::abs(d2);
    f[j] = 1.0 + 0.5 * (den > 0 ? std::tanh((d1 - d2 - kDynamicMargin) / den) : -1.0);
    u += f[j] * (r_w - r[j]);
  }
  u = beta * u / k;
  for (int64_t j = 1; j < C; ++j) w[j] = sigmoid(-u) * f[j] / k;
  return neg_log_sigmoid(u);
}
}  // namespace

float group_loss_grad(const float* logp, const float* ref, const bool* mask, const int64_t* lens, int64_t C,
                      double beta, double sft_weight, int64_t loss_type, float* grad) {
  std::vector<double> r(C, 0.0), w(C, 0.0);
  for (int64_t j = 0; j < C; ++j) r[j] = mask[j] ? static_cast<double>(logp[j]) - ref[j] : 0.0;
  r[0] = static_cast<double>(logp[0]) - ref[0];
  const double loss = preference_loss(logp, mask, r, C, beta, loss_type, w);
  const double len_w = static_cast<double>(lens[0]);
  double w_tot = 0.0;
  for (int64_t j = 1; j < C; ++j) {
    grad[j] = static_cast<float>(beta * w[j]);
    w_tot += w[j];
  }
  grad[0] = static_cast<float>(-beta * w_tot - sft_weight / len_w);
  return static_cast<float>(loss - sft_weight * logp[0] / len_w);
}

// Returns (loss_g [G], logps [G, C], dhidden [T, D] in hidden's dtype | undefined, dw [V, D] fp32 |
// undefined), gradients of sum_g loss_g, for hidden [T, D] whose logit rows are hidden[logit_rows].
// Logit rows are ordered group by group; group g owns rows [group_row_ptr[g], group_row_ptr[g + 1])
// (host metadata from pack_groups: PackedBatch.group_rows).
std::vector<at::Tensor> sdpo_loss(const at::Tensor& hidden, const at::Tensor& logit_rows, const at::Tensor& w,
                                  const at::Tensor& row_ptr, const at::Tensor& target_ids,
                                  const at::Tensor& target_cands, const at::Tensor& group_row_ptr,
                                  const at::Tensor& ref_logps, const at::Tensor& cand_mask,
                                  const at::Tensor& cand_lens, double beta, double sft_weight, int64_t loss_type,
                                  bool need_h, bool need_w, int64_t tile_elements) {
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

  TORCH_CHECK(group_row_ptr.scalar_type() == at::kLong && group_row_ptr.dim() == 1 && group_row_ptr.is_contiguous() &&
                  group_row_ptr.size(0) == G + 1,
              "native backend: group_row_ptr must be a contiguous int64 vector of G + 1 row offsets");
  const int64_t* gp = group_row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(gp[0] == 0 && gp[G] == L.Nr, "native backend: group_row_ptr must span the logit rows");
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(gp[g + 1] >= gp[g], "native backend: group_row_ptr must be non-decreasing");
  }
  // Blocks: runs of consecutive groups whose rows fit the tile budget together.
  const int64_t max_rows = rows_per_tile(tile_elements, L.V);
  struct Block { int64_t first, last, r0, r1; };  // groups [first, last), rows [r0, r1)
  std::vector<Block> blocks;
  int64_t buf_rows = 1;
  for (int64_t i = 0; i < G;) {
    int64_t j = i + 1;
    while (j < G && gp[j + 1] - gp[i] <= max_rows) ++j;
    const int64_t rows = gp[j] - gp[i];
    blocks.push_back({i, j, gp[i], gp[j]});
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
    for (int64_t g = b.first; g < b.last; ++g) {
      TORCH_CHECK(mk[g * C] && ln[g * C] >= 1, "native backend: group ", g, " has no chosen candidate");
      ls[g] = group_loss_grad(lp + g * C, rf + g * C, mk + g * C, ln + g * C, C, beta, sft_weight, loss_type,
                              gr + g * C);
    }
    for (int64_t t = L.row_ptr[b.r0]; t < L.row_ptr[b.r1]; ++t) gt[t] = gr[L.target_cands[t]];
  };

  for (const Block& b : blocks) {
    const int64_t n = b.r1 - b.r0;
    if (n == 0) {  // groups without logit rows (not produced by pack_groups): loss from zero log-probs
      finish_groups(b);
      continue;
    }
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
  return {loss, logps, dh, dw};
}

// group_loss_grad over every group of [G, C] fp32 log-probs: (loss_g [G], grad [G, C]). For the test
// that holds the mirror to sdpo_fast.loss.group_loss_and_grad; the op itself calls it per tile.
std::vector<at::Tensor> group_loss(const at::Tensor& logps, const at::Tensor& ref_logps, const at::Tensor& cand_mask,
                                   const at::Tensor& cand_lens, double beta, double sft_weight, int64_t loss_type) {
  TORCH_CHECK(logps.dim() == 2 && ref_logps.sizes() == logps.sizes() && cand_mask.sizes() == logps.sizes() &&
                  cand_lens.sizes() == logps.sizes(), "native backend: logps, ref, mask, lens must all be [G, C]");
  const at::Tensor lp = logps.to(at::kFloat).contiguous(), ref = ref_logps.to(at::kFloat).contiguous();
  const at::Tensor mask = cand_mask.to(at::kBool).contiguous(), lens = cand_lens.to(at::kLong).contiguous();
  const int64_t G = lp.size(0), C = lp.size(1);
  at::Tensor loss = at::zeros({G}, lp.options()), grad = at::zeros({G, C}, lp.options());
  for (int64_t g = 0; g < G; ++g) {
    loss.data_ptr<float>()[g] = group_loss_grad(lp.data_ptr<float>() + g * C, ref.data_ptr<float>() + g * C,
                                                mask.data_ptr<bool>() + g * C, lens.data_ptr<int64_t>() + g * C, C,
                                                beta, sft_weight, loss_type, grad.data_ptr<float>() + g * C);
  }
  return {loss, grad};
}

}  // namespace sdpo_native
