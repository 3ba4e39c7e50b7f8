// CUDA implementation of self_reasoning_tokens::attn_fwd / attn_bwd: the host side.
//
// Checks the arguments (the shared make_params / make_backward_params of attn_params.cpp, then
// the CUDA-only checks: device, dtype, head dim, shared memory, grid size), sets the device and
// stream, and hands over to host_glue.h (allocation, KernelParams, dispatch on (dtype, head dim))
// for the launchers instantiated in attn_fwd_<dtype>.cu / attn_bwd_<dtype>.cu; registers the
// functions for the CUDA dispatch key. The kernels themselves are in the *_kernel.cuh files.
//
// Only light c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE/cuSOLVER
// headers, which a minimal CUDA toolkit (nvcc + runtime, as on the CI machine) does not have.
// at::cuda::getCurrentCUDAStream is c10::cuda::getCurrentCUDAStream (at::cuda re-exports
// c10::cuda).
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../attn_params.h"
#include "host_glue.h"
#include "kernel_params.h"
#include "kernel_traits.h"

namespace srt::cuda {
namespace {

void check_cuda_inputs(const char* op, const at::Tensor& q, int64_t head_dim) {
  TORCH_CHECK(q.is_cuda(), op, " (CUDA kernel): q must be a CUDA tensor, got ", q.device());
  check_kernel_dtype_head_dim(op, q.scalar_type(), head_dim);
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major >= 8, op, " on CUDA: device ", q.get_device(), " has compute capability ", major, ".",
              minor, "; the kernels need 8.0 or newer (tensor-core mma.sync, cp.async)");
}

// The shared memory a kernel needs must fit the device's per-block opt-in limit; `hint` is
// appended to the error (how to pick a smaller variant, or nothing).
void check_smem(const char* op, size_t bytes, const at::Tensor& q, const char* hint = "") {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, " on CUDA: the kernel for head_dim ", q.size(3),
              " needs ", bytes, " bytes of shared memory per block, but device ", q.get_device(),
              " allows ", optin, hint);
}

void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op,
              " on CUDA: problem too large for one launch (", blocks, " thread blocks)");
}

// Outputs the kernels fill completely: no initialisation needed.
at::Tensor alloc_uninitialised(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

std::tuple<at::Tensor, at::Tensor> attn_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& q_stop, const std::optional<at::Tensor>& k_stop,
    const std::optional<at::Tensor>& v_stop, bool causal, double scale, int64_t num_reason_tokens,
    int64_t reason_window, bool reason_stop_grad, const std::optional<at::Tensor>& reason_heads) {
  AttnParams a = make_params(q, k, v, key_padding, attn_mask, q_stop, k_stop, v_stop, causal,
                             scale, num_reason_tokens, reason_window, reason_stop_grad,
                             reason_heads);
  check_cuda_inputs("attn_fwd", q, a.D);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  return attn_fwd_host(a, q, k, v, &alloc_uninitialised, [&](auto tag, auto head_dim, const KernelParams& p) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(head_dim)::value;
    using K = KernelsFor<T, D>;
    check_smem("attn_fwd", K::fwd_smem_bytes(p.fwd_block_m), q,
               p.fwd_block_m == 128 ? " (SRT_CUDA_FWD_BLOCK_M=128; 64 needs less)" : "");
    check_grid("attn_fwd", a.B * a.H * ((a.N + K::kFwdBlockM - 1) / K::kFwdBlockM));
    const cudaError_t err = launch_attn_fwd<T, D>(p, stream);
    C10_CUDA_CHECK(err);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& q_stop,
    const std::optional<at::Tensor>& k_stop, const std::optional<at::Tensor>& v_stop, bool causal,
    double scale, int64_t num_reason_tokens, int64_t reason_window, bool reason_stop_grad,
    const std::optional<at::Tensor>& reason_heads) {
  AttnParams a = make_backward_params(grad_out, q, k, v, out, lse, key_padding, attn_mask,
                                      q_stop, k_stop, v_stop, causal, scale, num_reason_tokens,
                                      reason_window, reason_stop_grad, reason_heads);
  check_cuda_inputs("attn_bwd", q, a.D);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // torch.use_deterministic_algorithms(True): the deterministic schedule (KernelParams::round_tiles)
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  int sm_count = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.get_device()));
  return attn_bwd_host(a, grad_out, q, k, v, out, lse, deterministic, sm_count, &alloc_uninitialised,
                       [&](auto tag, auto head_dim, const KernelParams& p) {
                         using T = typename decltype(tag)::type;
                         constexpr int D = decltype(head_dim)::value;
                         using K = KernelsFor<T, D>;
                         check_smem("attn_bwd", K::bwd_smem_bytes(p.bwd_block_n), q,
                                    p.bwd_block_n == 128 ? " (SRT_CUDA_BWD_BLOCK_N=128; 64 needs less)" : "");
                         check_grid("attn_bwd", a.B * a.H * ((a.M + K::kBwdBlockN - 1) / K::kBwdBlockN));
                         check_grid("attn_bwd", (a.B * a.H * a.N + kDsumWarps - 1) / kDsumWarps);
                         const cudaError_t err = launch_attn_bwd<T, D>(p, stream);
                         C10_CUDA_CHECK(err);
                       });
}

}  // namespace

TORCH_LIBRARY_IMPL(self_reasoning_tokens, CUDA, m) {
  m.impl("attn_fwd", &attn_fwd_cuda);
  m.impl("attn_bwd", &attn_bwd_cuda);
}

}  // namespace srt::cuda
