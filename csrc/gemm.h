// The GEMM every native kernel calls: out = a b (+ out when accumulating), fp32, 2-D, on CPU.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sdpo_native {

enum class GemmLibrary { blas, onednn };

// The library for an op call whose GEMM passes each cost `work` multiply-adds (rows * V * D): oneDNN
// when it is usable and work >= kOneDnnMinWork, else torch's BLAS. Chosen once per op call, so all
// its GEMMs (and its reruns) sum in the same order.
constexpr int64_t kOneDnnMinWork = int64_t{1} << 28;
GemmLibrary gemm_library(int64_t work);

// out [m, n] = a [m, k] b [k, n], or out += a b with accumulate. Operands are plain strided views
// (rows or columns contiguous); inside an OpenMP region the call runs on the calling thread only.
void gemm(GemmLibrary lib, at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// Name of gemm_library(work): "onednn" or "blas".
const char* gemm_engine(int64_t work);

}  // namespace sdpo_native
