// The GEMM every native kernel calls: out = a b (+ out when accumulating), fp32, 2-D, on CPU.
#pragma once

#include <ATen/ATen.h>

namespace sdpo_native {

// out [m, n] = a [m, k] b [k, n], or out += a b with accumulate. Operands are plain strided views
// (rows or columns contiguous); inside an OpenMP region the call runs on the calling thread only.
void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// The library gemm() dispatches to now: "onednn" or "blas" (see gemm.cpp).
const char* gemm_engine();

}  // namespace sdpo_native
