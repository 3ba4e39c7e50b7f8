// The launchers declared in kernel_params.h: float32 inputs run the fp32 CUDA-core kernels
// (fwd_kernel.cuh, bwd_kernel.cuh), float16 and bfloat16 the tensor-core kernels
// (fwd_tc_kernel.cuh, bwd_tc_kernel.cuh); KernelsFor in kernel_traits.h gives the host the
// matching shared-memory sizes and tiles. The attn_{fwd,bwd}_<dtype>.cu files instantiate them.
#pragma once

#include <type_traits>

#include "bwd_kernel.cuh"
#include "bwd_preprocess.cuh"
#include "bwd_tc_kernel.cuh"
#include "fwd_kernel.cuh"
#include "fwd_tc_kernel.cuh"
#include "kernel_params.h"

namespace srt::cuda {

template <typename T, int D>
cudaError_t launch_attn_fwd(const KernelParams& p, cudaStream_t stream) {
  if constexpr (KernelsFor<T, D>::kTensorCores) {
    return launch_attn_fwd_tc<T, D>(p, stream);
  } else {
    return launch_attn_fwd_simt<T, D>(p, stream);
  }
}

template <typename T, int D>
cudaError_t launch_attn_bwd(const KernelParams& p, cudaStream_t stream) {
  const cudaError_t err = launch_attn_bwd_dsum<T, D>(p, stream);
  if (err != cudaSuccess) return err;
  if constexpr (KernelsFor<T, D>::kTensorCores) {
    return launch_attn_bwd_tc<T, D>(p, stream);
  } else {
    return launch_attn_bwd_simt<T, D>(p, stream);
  }
}

}  // namespace srt::cuda
