// Explicit instantiations of the backward launcher (dsum preprocessing, then dQ/dK/dV) for
// float, one per supported head dim.
// One translation unit per dtype and direction, so that a parallel build compiles them at once.
#include "launch.cuh"

namespace srt::cuda {
template cudaError_t launch_attn_bwd<float, 32>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<float, 64>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<float, 96>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_bwd<float, 128>(const KernelParams&, cudaStream_t);
}  // namespace srt::cuda
