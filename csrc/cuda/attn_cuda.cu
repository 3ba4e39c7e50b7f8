// CUDA implementation of self_reasoning_tokens::attn_fwd / attn_bwd: the host side.
//
// Checks and packs the arguments (the shared make_params / make_backward_params of
// attn_params.cpp, then the CUDA-only dtype and head-dim checks),
// allocates outputs and the backward's fp32 buffers, dispatches on (dtype, head dim) to the
// launchers instantiated in attn_fwd_<dtype>.cu / attn_bwd_<dtype>.cu, and registers the
// functions for the CUDA dispatch key. The kernels themselves are in fwd_kernel.cuh and
// bwd_kernel.cuh.
//
// Only light c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE/cuSOLVER
// headers, which a minimal CUDA toolkit (nvcc + runtime, as on the CI machine) does not have.
// at::cuda::getCurrentCUDAStream is c10::cuda::getCurrentCUDAStream (at::cuda re-exports
// c10::cuda).
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
#include "kernel_params.h"
#include "kernel_traits.h"

namespace srt::cuda {
namespace {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, std::integral_constant<int, D>{}) for the kernel element type of
// `dtype` and the head dim D. Both were checked by check_cuda_inputs.
template <typename F>
void dispatch_dtype_head_dim(at::ScalarType dtype, int64_t head_dim, const F& f) {
  auto with_head_dim = [&](auto tag) {
    switch (head_dim) {
      case 32: return f(tag, std::integral_constant<int, 32>{});
      case 64: return f(tag, std::integral_constant<int, 64>{});
      case 96: return f(tag, std::integral_constant<int, 96>{});
      case 128: return f(tag, std::integral_constant<int, 128>{});
      default: TORCH_CHECK(false, "unreachable: head_dim ", head_dim);
    }
  };
  switch (dtype) {
    case at::kHalf: return with_head_dim(TypeTag<__half>{});
    case at::kBFloat16: return with_head_dim(TypeTag<__nv_bfloat16>{});
    case at::kFloat: return with_head_dim(TypeTag<float>{});
    default: TORCH_CHECK(false, "unreachable: dtype ", dtype);
  }
}

void check_cuda_inputs(const char* op, const at::Tensor& q, int64_t head_dim) {
  TORCH_CHECK(q.is_cuda(), op, " (CUDA kernel): q must be a CUDA tensor, got ", q.device());
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, op,
              " on CUDA: q, k and v must be float16, bfloat16 or float32; got ", t);
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major >= 8, op, " on CUDA: device ", q.get_device(), " has compute capability ", major, ".",
              minor, "; the kernels need 8.0 or newer (tensor-core mma.sync, cp.async)");
  bool supported = false;
  for (int d : kSupportedHeadDims) supported = supported || d == head_dim;
  TORCH_CHECK(supported, op, " on CUDA: head_dim ", head_dim,
              " is not supported; supported head dims: 32, 64, 96, 128");
}

// The shared memory a kernel needs must fit the device's per-block opt-in limit.
void check_smem(const char* op, size_t bytes, const at::Tensor& q) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, " on CUDA: the kernel for head_dim ", q.size(3),
              " needs ", bytes, " bytes of shared memory per block, but device ", q.get_device(),
              " allows ", optin);
}

void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op,
              " on CUDA: problem too large for one launch (", blocks, " thread blocks)");
}

// q, k, v, out and grad_out as the kernels read them: contiguous (B, H, rows, D) with a 16-byte
// aligned start (the tensor-core kernels copy 16-byte chunks). Copies (O(N) memory) only when the
// caller passed other strides or a misaligned view; masks are never copied.
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

KernelParams kernel_params(const AttnParams& a) {
  KernelParams p;
  p.B = a.B;
  p.H = a.H;
  p.N = a.N;
  p.M = a.M;
  p.scale = static_cast<float>(a.scale);
  p.causal = a.causal;
  p.shift = a.shift;
  p.key_padding = a.key_padding;
  p.attn_mask = a.attn_mask;
  p.q_stop = a.q_stop;
  p.k_stop = a.k_stop;
  p.v_stop = a.v_stop;
  p.reasoning = a.reasoning;  // heads (if any) is a device pointer on q's device
  return p;
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

  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v);
  at::Tensor out = at::empty(qc.sizes(), qc.options());
  at::Tensor lse = at::empty({a.B, a.H, a.N}, qc.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  KernelParams p = kernel_params(a);
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype_head_dim(q.scalar_type(), a.D, [&](auto tag, auto head_dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(head_dim)::value;
    using K = KernelsFor<T, D>;
    check_smem("attn_fwd", K::kFwdSmemBytes, q);
    check_grid("attn_fwd", a.B * a.H * ((a.N + K::kFwdBlockM - 1) / K::kFwdBlockM));
    const cudaError_t err = launch_attn_fwd<T, D>(p, stream);
    C10_CUDA_CHECK(err);
  });
  return {out, lse};
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

  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v), oc = dense(out), doc = dense(grad_out),
                   lc = lse.contiguous();
  at::Tensor dk = at::empty(kc.sizes(), kc.options());
  at::Tensor dv = at::empty(vc.sizes(), vc.options());
  if (qc.numel() == 0 || kc.numel() == 0) {  // no queries or no keys: every gradient is 0
    dk.zero_();
    dv.zero_();
    return {at::zeros(qc.sizes(), qc.options()), dk, dv};
  }
  // dQ receives a contribution from every key tile: blocks add them atomically in fp32.
  at::Tensor dq_accum = at::zeros(qc.sizes(), qc.options().dtype(at::kFloat));
  at::Tensor dsum = at::empty({a.B, a.H, a.N}, qc.options().dtype(at::kFloat));

  KernelParams p = kernel_params(a);
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = const_cast<void*>(oc.data_ptr());  // only read by the backward
  p.dout = doc.data_ptr();
  p.lse = const_cast<float*>(lc.data_ptr<float>());  // only read by the backward
  p.dsum = dsum.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype_head_dim(q.scalar_type(), a.D, [&](auto tag, auto head_dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(head_dim)::value;
    using K = KernelsFor<T, D>;
    check_smem("attn_bwd", K::kBwdSmemBytes, q);
    check_grid("attn_bwd", a.B * a.H * ((a.M + K::kBwdBlockN - 1) / K::kBwdBlockN));
    check_grid("attn_bwd", (a.B * a.H * a.N + kDsumWarps - 1) / kDsumWarps);
    const cudaError_t err = launch_attn_bwd<T, D>(p, stream);
    C10_CUDA_CHECK(err);
  });
  // fp32 inputs: the buffer is the result; otherwise one O(N) conversion.
  at::Tensor dq = q.scalar_type() == at::kFloat ? dq_accum : dq_accum.to(q.scalar_type());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(self_reasoning_tokens, CUDA, m) {
  m.impl("attn_fwd", &attn_fwd_cuda);
  m.impl("attn_bwd", &attn_bwd_cuda);
}

}  // namespace srt::cuda
