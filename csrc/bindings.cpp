// Python bindings of the native CPU backend (sdpo_fast/kernels/logprobs/native.py calls them).
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdpo_fast native CPU kernels (fused log-probs and S-DPO loss); see csrc/common.h";
  // settles the GEMM library here, outside any OpenMP region (gemm.cpp)
  m.def("gemm_engine", &sdpo_native::gemm_engine, py::arg("work"),
        "the library an op call whose GEMM passes cost `work` multiply-adds runs them on: 'onednn' or 'blas'");
  sdpo_native::gemm_engine(0);
  m.def("logprobs_forward", &sdpo_native::logprobs_forward,
        "(h, w, row_ptr, target_ids, target_candidates, num_cands, keep_in_grad, keep_elements, block, chunk_rows, "
        "project) -> (lse, logps, kept_a, kept_b, u)");
  m.def("logprobs_backward", &sdpo_native::logprobs_backward,
        "(h, w, row_ptr, target_ids, target_candidates, lse, grad_logps, need_h, need_w, block, chunk_rows, kept_a, "
        "kept_b, u) -> (dh, dw)");
  m.def("sdpo_loss", &sdpo_native::sdpo_loss,
        "(hidden, logit_rows, w, row_ptr, target_ids, target_candidates, group_row_ptr, ref_logps, mask, lens, beta, "
        "sft_weight, loss_type, need_h, need_w, tile_elements) -> (loss_g, logps, dhidden, dw)");
  m.def("group_loss", &sdpo_native::group_loss,
        "(logps, ref_logps, mask, lens, beta, sft_weight, loss_type) -> (loss_g, grad): group_loss_grad, the C++ mirror of "
        "sdpo_fast.loss.group_loss_and_grad, over every group");
}
