// Small device helpers shared by the forward and backward kernels: element conversions,
// warp reductions and the global -> shared tile copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernel_traits.h"

namespace srt::cuda {

constexpr float kNegInf = -INFINITY;

// Inputs are float16, bfloat16 or float32; all arithmetic is fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Reductions over the 32 lanes of a warp; every lane gets the result. All 32 lanes must call.
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Copies rows [0, kRows) of a row-major (rows, D) matrix starting at `src` into shared memory
// (row stride kStride floats), converted to fp32. Rows >= valid_rows are filled with zeros so
// that later arithmetic on them is finite; their results are never stored. All threads of the
// block call it; consecutive threads read consecutive elements (coalesced).
template <int kRows, int D, int kStride, int kThreads, typename T>
__device__ __forceinline__ void load_rows(float* dst, const T* src, int64_t valid_rows) {
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    dst[r * kStride + c] = r < valid_rows ? to_float(src[int64_t(r) * D + c]) : 0.f;
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace srt::cuda
