// Backward preprocessing shared by both backward kernels: dsum_i = sum_d dO_i * O_i (the
// "D" of FlashAttention-2), one fp32 value per query row, read by every key tile.
#pragma once

#include "kernel_params.h"
#include "kernel_traits.h"
#include "tile_utils.cuh"

namespace srt::cuda {

// dsum[row] = sum_d dO[row, d] * O[row, d] over the B*H*N rows; one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kDsumWarps * kWarpSize) attn_bwd_dsum_kernel(const KernelParams p) {
  const int64_t rows = p.B * p.H * p.N;
  const int64_t row = int64_t(blockIdx.x) * kDsumWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps leave together; no block barrier follows
  const T* o = static_cast<const T*>(p.out) + row * D;
  const T* dout = static_cast<const T*>(p.dout) + row * D;
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < D / kWarpSize; ++t)
    acc = fmaf(to_float(dout[lane + kWarpSize * t]), to_float(o[lane + kWarpSize * t]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.dsum[row] = acc;
}

template <typename T, int D>
cudaError_t launch_attn_bwd_dsum(const KernelParams& p, cudaStream_t stream) {
  return launch_blocks(&attn_bwd_dsum_kernel<T, D>, ceil_div(p.B * p.H * p.N, kDsumWarps),
                       kDsumWarps * kWarpSize, 0, p, stream);
}

}  // namespace srt::cuda
