// Explicit instantiations of the forward launcher for float, one per supported head dim.
// One translation unit per dtype and direction, so that a parallel build compiles them at once.
#include "launch.cuh"

namespace srt::cuda {
template cudaError_t launch_attn_fwd<float, 32>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_fwd<float, 64>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_fwd<float, 96>(const KernelParams&, cudaStream_t);
template cudaError_t launch_attn_fwd<float, 128>(const KernelParams&, cudaStream_t);
}  // namespace srt::cuda
