// Common header of the native CPU backend: the CSR log-prob layout checks (Layout) shared by the ops,
// the thread count, and the ops' entry points that bindings.cpp exposes. One file per op:
// logprobs.cpp (the plain fused log-prob op), sdpo_loss.cpp (the S-DPO loss with its gradients);
// rowops.cpp (per-row passes) and gemm.cpp (the one GEMM) are shared by both.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"

namespace sdpo_native {

struct Layout {
  int64_t Nr, N, V, D;
  const int64_t* row_ptr;
  const int64_t* target_ids;
  const int64_t* target_cands;
  GemmLibrary lib;  // for all of the call's GEMMs
};

// Checks the weight and the CSR arrays of Nr logit rows.
inline Layout make_layout(int64_t Nr, const at::Tensor& w, const at::Tensor& row_ptr, const at::Tensor& target_ids,
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
           gemm_library(Nr * w.size(0) * w.size(1))};
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
inline Layout check_layout(const at::Tensor& h, const at::Tensor& w, const at::Tensor& row_ptr,
                    const at::Tensor& target_ids, const at::Tensor& target_cands) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.dim() == 2 && h.is_contiguous(),
              "native backend: h must be a contiguous fp32 [Nr, D] CPU tensor (the Python wrapper converts)");
  TORCH_CHECK(w.dim() == 2 && h.size(1) == w.size(1), "native backend: h [Nr, D], w [V, D]");
  return make_layout(h.size(0), w, row_ptr, target_ids, target_cands);
}

inline int threads() { return std::max(1, at::get_num_threads()); }

// ---- entry points (bindings.cpp) -----------------------------------------------------------------

std::vector<at::Tensor> logprobs_forward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& row_ptr,
                                         const at::Tensor& target_ids, const at::Tensor& target_cands,
                                         int64_t num_cands, bool keep_in_grad, int64_t keep_elements,
                                         int64_t block, int64_t chunk_rows, bool project);

std::vector<at::Tensor> logprobs_backward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& row_ptr,
                                          const at::Tensor& target_ids, const at::Tensor& target_cands,
                                          const at::Tensor& lse, const at::Tensor& grad_logps, bool need_h,
                                          bool need_w, int64_t block, int64_t chunk_rows,
                                          c10::optional<at::Tensor> kept_a_opt, c10::optional<at::Tensor> kept_b_opt,
                                          c10::optional<at::Tensor> u_opt);

std::vector<at::Tensor> sdpo_loss(const at::Tensor& hidden, const at::Tensor& logit_rows, const at::Tensor& w,
                                  const at::Tensor& row_ptr, const at::Tensor& target_ids,
                                  const at::Tensor& target_cands, const at::Tensor& group_row_ptr,
                                  const at::Tensor& ref_logps, const at::Tensor& cand_mask,
                                  const at::Tensor& cand_lens, double beta, double sft_weight, int64_t loss_type,
                                  bool need_h, bool need_w, int64_t tile_elements);

std::vector<at::Tensor> group_loss(const at::Tensor& logps, const at::Tensor& ref_logps, const at::Tensor& cand_mask,
                                   const at::Tensor& cand_lens, double beta, double sft_weight, int64_t loss_type);

// Loss and dloss/dlogp of one group in double: the C++ mirror of sdpo_fast.loss.group_loss_and_grad
// (tests/test_loss_mirror.py holds the two together). Defined in sdpo_loss.cpp.
float group_loss_grad(const float* logp, const float* ref, const bool* mask, const int64_t* lens, int64_t C,
                      double beta, double sft_weight, int64_t loss_type, float* grad);

}  // namespace sdpo_native
