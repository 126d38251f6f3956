// Row kernels of the native backend: the per-row passes over a logits tile (fp32). Plain C++ + OpenMP,
// no ATen: the GEMMs that produce and consume the tile live in sdpo_loss.cpp and logprobs.cpp. Target indices
// (`row_ptr`, `target_ids`, per-target arrays) are absolute offsets into the batch's CSR arrays; every
// offset is int64.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sdpo_native {

// A logits tile [n, V] stored vocabulary block by vocabulary block, so that each block is one
// contiguous row-major GEMM operand: block b holds columns [b * bs, b * bs + len(b)) of all n rows as
// an [n, len(b)] array at base + b * bs * n (len(b) = bs, the last block possibly shorter). With
// bs >= V it is the plain row-major [n, V] layout.
struct BlockedTile {
  float* base;
  int64_t n, V, bs;

  int64_t blocks() const { return (V + bs - 1) / bs; }
  int64_t len(int64_t b) const { return std::min(bs, V - b * bs); }
  float* segment(int64_t r, int64_t b) const { return base + b * bs * n + r * len(b); }
  float& at(int64_t r, int64_t v) const { return segment(r, v / bs)[v % bs]; }
};

// Forward statistics of rows [0, x.n) of the tile (row r of the tile is batch logit row r0 + r, whose
// targets are row_ptr[r]..row_ptr[r + 1] with row_ptr already shifted to start at r0):
//   token_logp[t] = x[r, target_ids[t]] - lse[r]     lse[r] = log sum_v exp x[r, v]   (fp32)
// and sum[r] = sum_v exp(x[r, v] - max_r). With keep_exp (for the no-recompute gradient) the row is
// overwritten with x[r, v] <- exp(x[r, v] - max_r), so softmax(r) = x[r] / sum[r]; without it x is
// only read (one write pass over the tile less).
void rows_softmax_stats(const BlockedTile& x, const int64_t* row_ptr, const int64_t* target_ids, float* lse,
                        float* sum, float* token_logp, bool keep_exp, int num_threads);

// Gradient from the tile left by rows_softmax_stats (no recompute). With g_t = dL/dlogp of target t's
// candidate and g_r = sum of the row's g_t, dL/dlogits[r] = -g_r * x[r] / sum[r] + sum_t g_t onehot(t).
// Written as scale[r] * x[r] so the common single-target row needs no pass over V:
//   one target:  x[r, id] -= sum[r]  and  scale[r] = -g_r / sum[r]
//                (x[r, id] - sum[r] = -(sum of the other entries): the (p - 1) cancellation in fp32)
//   several:     x[r] <- -g_r / sum[r] * x[r] + sum_t g_t onehot(t)  and  scale[r] = 1
// (a shared prompt row has g_r = sum_j dL/dlogp_j, often exactly 0, so it cannot be divided by).
void rows_fused_grad(const BlockedTile& x, const int64_t* row_ptr, const int64_t* target_ids, const float* g_t,
                     const float* sum, float* scale, int num_threads);

// Gradient by recompute: x holds fresh logits; x[r] <- -g_r * exp(x[r] - lse[r]) + sum_t g_t onehot(t).
void rows_recompute_grad(const BlockedTile& x, const int64_t* row_ptr, const int64_t* target_ids, const float* g_t,
                         const float* lse, int num_threads);

// Vocabulary-block passes of the plain log-prob op (logprobs.cpp, op "logprobs"). x is the block
// [n, len] of logits (row-major, rows contiguous) of rows [0, n) and vocabulary ids [v0, v0 + len);
// row_ptr, m, s, lse and g_row are shifted to the block's first row, target offsets stay absolute.
//
// Online softmax statistics, updated block after block: m[r] <- max(m[r], max of the block) and
// s[r] <- sum of exp(logit - m[r]) over the blocks seen so far (m = -inf, s = 0 before the first);
// token_logit[t] = x[r, id_t - v0] for the row's targets whose ids fall in the block. With alpha
// (non-null) the block is also overwritten with exp(x - m[r]) at the updated m[r], and
// alpha[r] = exp(m_before - m_after) (0 before the first block) rescales what the caller accumulated
// with the previous maximum; without it x is only read.
void rows_block_stats(float* x, int64_t n, int64_t len, int64_t v0, const int64_t* row_ptr,
                      const int64_t* target_ids, float* m, float* s, float* token_logit, float* alpha,
                      int num_threads);

// Gradient of a block in place: x[r] <- -g_row[r] * exp(x[r] - lse[r]) + sum_t g_t onehot(id_t - v0)
// over the row's targets in the block (g_row[r] = sum of the row's g_t).
void rows_block_grad(float* x, int64_t n, int64_t len, int64_t v0, const int64_t* row_ptr,
                     const int64_t* target_ids, const float* g_t, const float* g_row, const float* lse,
                     int num_threads);

}  // namespace sdpo_native
