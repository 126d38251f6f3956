// Per-row passes over a logits tile (see rowops.h). The row functions are compiled for AVX-512,
// AVX2 and baseline x86-64 (gcc target_clones, dispatched once at load), so a build made on one
// machine runs anywhere and uses the widest vectors present. Rows are distributed over OpenMP threads.
#include "rowops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SDPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SDPO_CLONES
#endif

namespace sdpo_native {
namespace {

// exp(x) for x <= 0 within ~2 ulp (Cephes expf scheme: x = n ln2 + r, |r| <= ln2/2, degree-6
// polynomial, 2^n through the exponent bits). Branch-free so the loops below vectorise; libm's expf
// does not, and exp is the one transcendental per logit. Inputs below -87 give ~1e-38 instead of 0,
// which no fp32 sum can tell apart.
inline __attribute__((always_inline)) float exp_neg(float x) {
  x = x > -87.0f ? x : -87.0f;
  // round to nearest by the 1.5 * 2^23 trick (no floor call, which blocks vectorising without SSE4.1)
  float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

SDPO_CLONES float row_max(const float* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = x[v] > m ? x[v] : m;
  return m;
}

// x <- exp(x - shift) in place; returns the sum.
SDPO_CLONES float row_exp_sum(float* x, int64_t V, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) {
    float e = exp_neg(x[v] - shift);
    x[v] = e;
    s += e;
  }
  return s;
}

// sum of exp(x - shift), x left as it is (the forward of the recomputing op needs no exp values).
SDPO_CLONES float row_sum_exp(const float* x, int64_t V, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += exp_neg(x[v] - shift);
  return s;
}

SDPO_CLONES void row_scale(float* x, int64_t V, float a) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) x[v] *= a;
}

// x <- a * exp(x - shift) in place.
SDPO_CLONES void row_scaled_exp(float* x, int64_t V, float shift, float a) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) x[v] = a * exp_neg(x[v] - shift);
}

float tile_row_max(const BlockedTile& x, int64_t r) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < x.blocks(); ++b) m = std::max(m, row_max(x.segment(r, b), x.len(b)));
  return m;
}

}  // namespace

void rows_softmax_stats(const BlockedTile& x, const int64_t* row_ptr, const int64_t* target_ids, float* lse,
                        float* sum, float* token_logp, bool keep_exp, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < x.n; ++r) {
    const float m = tile_row_max(x, r);
    // Target logits are read before the row is overwritten with exp values.
    for (int64_t t = row_ptr[r]; t < row_ptr[r + 1]; ++t) token_logp[t] = x.at(r, target_ids[t]);
    float s = 0.0f;
    for (int64_t b = 0; b < x.blocks(); ++b) {
      s += keep_exp ? row_exp_sum(x.segment(r, b), x.len(b), m) : row_sum_exp(x.segment(r, b), x.len(b), m);
    }
    const float l = m + std::log(s);
    lse[r] = l;
    sum[r] = s;
    for (int64_t t = row_ptr[r]; t < row_ptr[r + 1]; ++t) token_logp[t] -= l;
  }
}

void rows_fused_grad(const BlockedTile& x, const int64_t* row_ptr, const int64_t* target_ids, const float* g_t,
                     const float* sum, float* scale, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < x.n; ++r) {
    const int64_t t0 = row_ptr[r], t1 = row_ptr[r + 1];
    if (t1 - t0 == 1) {
      x.at(r, target_ids[t0]) -= sum[r];
      scale[r] = -g_t[t0] / sum[r];
      continue;
    }
    float g_r = 0.0f;
    for (int64_t t = t0; t < t1; ++t) g_r += g_t[t];
    for (int64_t b = 0; b < x.blocks(); ++b) row_scale(x.segment(r, b), x.len(b), -g_r / sum[r]);
    for (int64_t t = t0; t < t1; ++t) x.at(r, target_ids[t]) += g_t[t];
    scale[r] = 1.0f;
  }
}

void rows_recompute_grad(const BlockedTile& x, const int64_t* row_ptr, const int64_t* target_ids, const float* g_t,
                         const float* lse, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < x.n; ++r) {
    float g_r = 0.0f;
    for (int64_t t = row_ptr[r]; t < row_ptr[r + 1]; ++t) g_r += g_t[t];
    for (int64_t b = 0; b < x.blocks(); ++b) row_scaled_exp(x.segment(r, b), x.len(b), lse[r], -g_r);
    for (int64_t t = row_ptr[r]; t < row_ptr[r + 1]; ++t) x.at(r, target_ids[t]) += g_t[t];
  }
}

// Blocks are narrow (hundreds of columns), so one OpenMP region pays off only above this much work.
constexpr int64_t kParallelElements = 1 << 15;

void rows_block_stats(float* x, int64_t n, int64_t len, int64_t v0, const int64_t* row_ptr,
                      const int64_t* target_ids, float* m, float* s, float* token_logit, float* alpha,
                      int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n * len >= kParallelElements)
  for (int64_t r = 0; r < n; ++r) {
    float* xr = x + r * len;
    const float m_new = std::max(m[r], row_max(xr, len));
    // the running sum is rescaled to the new maximum (nothing to rescale before the first block)
    const float a = m[r] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m[r] - m_new);
    for (int64_t t = row_ptr[r]; t < row_ptr[r + 1]; ++t) {  // read before x is overwritten
      const int64_t c = target_ids[t] - v0;
      if (c >= 0 && c < len) token_logit[t] = xr[c];
    }
    s[r] = s[r] * a + (alpha != nullptr ? row_exp_sum(xr, len, m_new) : row_sum_exp(xr, len, m_new));
    m[r] = m_new;
    if (alpha != nullptr) alpha[r] = a;
  }
}

void rows_block_grad(float* x, int64_t n, int64_t len, int64_t v0, const int64_t* row_ptr,
                     const int64_t* target_ids, const float* g_t, const float* g_row, const float* lse,
                     int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n * len >= kParallelElements)
  for (int64_t r = 0; r < n; ++r) {
    float* xr = x + r * len;
    row_scaled_exp(xr, len, lse[r], -g_row[r]);
    for (int64_t t = row_ptr[r]; t < row_ptr[r + 1]; ++t) {
      const int64_t c = target_ids[t] - v0;
      if (c >= 0 && c < len) xr[c] += g_t[t];
    }
  }
}

}  // namespace sdpo_native
