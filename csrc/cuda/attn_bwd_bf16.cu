// Explicit instantiations of the backward launcher (dsum preprocessing, then dQ/dK/dV) for
// __nv_bfloat16, one per supported head dim.
// One translation unit per dtype and direction, so that a parallel build compiles them at once.
#include "launch.cuh"

namespace srt::cuda {
template cudaError_t launch_attn_bwd<__nv_bfloat16, 32>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<__nv_bfloat16, 64>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<__nv_bfloat16, 96>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<__nv_bfloat16, 128>(const KernelParams&, cudaStream_t);
}  // namespace srt::cuda
