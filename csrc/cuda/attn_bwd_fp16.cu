// Explicit instantiations of the backward launcher (dsum preprocessing, then dQ/dK/dV) for
// __half, one per supported head dim.
// One translation unit per dtype and direction, so that a parallel build compiles them at once.
#include "launch.cuh"

namespace srt::cuda {
template cudaError_t launch_attn_bwd<__half, 32>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<__half, 64>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<__half, 96>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<__half, 128>(const KernelParams&, cudaStream_t);
}  // namespace srt::cuda
