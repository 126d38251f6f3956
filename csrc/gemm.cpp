// GEMM dispatch of the native backend. torch's fp32 CPU matmul goes to its BLAS (MKL in the x86
// wheels); torch also links oneDNN, whose fp32 matmul measured faster on the CI-like machine
// (figures: benchmarks/results/design_measurements.md). oneDNN's fp32
// matmul is reached through at::native::mkldnn_matmul, which libtorch_cpu exports but no installed
// header declares, so it is declared here as a weak symbol: a torch without it leaves the pointer
// null and the BLAS path is used. It is also skipped when torch.backends.mkldnn is disabled (the
// user's switch, read at every op call) and when a first probe call fails (the function refuses fp32
// on CPUs without AVX-512 BW/VL/DQ) or disagrees with the BLAS result.
//
// oneDNN builds (JIT-compiles) a kernel per new GEMM shape, cached afterwards; small ops with shapes
// that change every step never earn that back (design_measurements.md), hence kOneDnnMinWork.
#include "gemm.h"

#include <mutex>

namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                                         float beta, float alpha);
}  // namespace at::native

namespace sdpo_native {
namespace {

bool probe_onednn() {
  if (&at::native::mkldnn_matmul == nullptr) return false;
  try {
    const at::Tensor a = at::arange(0, 24 * 40, at::kFloat).remainder(7).sub(3).view({24, 40});
    const at::Tensor b = at::arange(0, 40 * 33, at::kFloat).remainder(5).sub(2).view({40, 33});
    at::Tensor c = at::full({24, 33}, 1.0f, at::kFloat);
    at::native::mkldnn_matmul(a, b, c, 1.0f, 1.0f);
    // small integers: the product is exact in fp32 whatever the summation order
    return at::equal(c, at::mm(a, b).add_(1.0f));
  } catch (const std::exception&) {
    return false;
  }
}

bool onednn_usable() {
  static std::once_flag once;
  static bool usable = false;
  std::call_once(once, [] { usable = probe_onednn(); });
  return usable && at::globalContext().userEnabledMkldnn();
}

}  // namespace

GemmLibrary gemm_library(int64_t work) {
  return work >= kOneDnnMinWork && onednn_usable() ? GemmLibrary::onednn : GemmLibrary::blas;
}

void gemm(GemmLibrary lib, at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (lib == GemmLibrary::onednn) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

const char* gemm_engine(int64_t work) { return gemm_library(work) == GemmLibrary::onednn ? "onednn" : "blas"; }

}  // namespace sdpo_native
