// attn_fwd / attn_bwd through the emulated CUDA kernels, on CPU tensors. The host logic follows
// csrc/cuda/attn_cuda.cu (minus device guard/stream), so the kernels see exactly the
// KernelParams they would see on a GPU.
#include <torch/extension.h>

#include "stubs/cuda_runtime.h"
#include "stubs/cuda_fp16.h"
#include "stubs/cuda_bf16.h"
#include "csrc/attn_params.h"
#include "csrc/cuda/fwd_kernel.cuh"
#include "csrc/cuda/bwd_kernel.cuh"

using namespace srt;
using namespace srt::cuda;

template <typename T> struct TypeTag { using type = T; };

template <typename F>
void dispatch(at::ScalarType dtype, int64_t head_dim, const F& f) {
  auto with_hd = [&](auto tag) {
    switch (head_dim) {
      case 32: return f(tag, std::integral_constant<int, 32>{});
      case 64: return f(tag, std::integral_constant<int, 64>{});
      case 96: return f(tag, std::integral_constant<int, 96>{});
      case 128: return f(tag, std::integral_constant<int, 128>{});
      default: TORCH_CHECK(false, "head_dim");
    }
  };
  switch (dtype) {
    case at::kHalf: return with_hd(TypeTag<__half>{});
    case at::kBFloat16: return with_hd(TypeTag<__nv_bfloat16>{});
    case at::kFloat: return with_hd(TypeTag<float>{});
    default: TORCH_CHECK(false, "dtype");
  }
}

KernelParams kernel_params(const AttnParams& a) {
  KernelParams p;
  p.B = a.B; p.H = a.H; p.N = a.N; p.M = a.M;
  p.scale = static_cast<float>(a.scale);
  p.causal = a.causal; p.shift = a.shift;
  p.key_padding = a.key_padding; p.attn_mask = a.attn_mask;
  p.q_stop = a.q_stop; p.k_stop = a.k_stop; p.v_stop = a.v_stop;
  p.reasoning = a.reasoning;
  return p;
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& q_stop, const std::optional<at::Tensor>& k_stop,
    const std::optional<at::Tensor>& v_stop, bool causal, double scale, int64_t R, int64_t W,
    bool stop, const std::optional<at::Tensor>& heads) {
  AttnParams a = make_params(q, k, v, key_padding, attn_mask, q_stop, k_stop, v_stop, causal, scale,
                             R, W, stop, heads);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  // poisoned outputs: every element must be written by the kernel
  at::Tensor out = at::full(qc.sizes(), std::numeric_limits<double>::quiet_NaN(), qc.options());
  at::Tensor lse = at::full({a.B, a.H, a.N}, std::numeric_limits<double>::quiet_NaN(), qc.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  KernelParams p = kernel_params(a);
  p.q = qc.data_ptr(); p.k = kc.data_ptr(); p.v = vc.data_ptr();
  p.out = out.data_ptr(); p.lse = lse.data_ptr<float>();
  dispatch(q.scalar_type(), a.D, [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(hd)::value;
    const int err = launch_attn_fwd<T, D>(p, nullptr); TORCH_CHECK(err == cudaSuccess);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& q_stop, const std::optional<at::Tensor>& k_stop,
    const std::optional<at::Tensor>& v_stop, bool causal, double scale, int64_t R, int64_t W,
    bool stop, const std::optional<at::Tensor>& heads) {
  AttnParams a = make_backward_params(grad_out, q, k, v, out, lse, key_padding, attn_mask, q_stop,
                                      k_stop, v_stop, causal, scale, R, W, stop, heads);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(),
                   oc = out.contiguous(), doc = grad_out.contiguous(), lc = lse.contiguous();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor dk = at::full(kc.sizes(), nan, kc.options());
  at::Tensor dv = at::full(vc.sizes(), nan, vc.options());
  if (qc.numel() == 0 || kc.numel() == 0) {
    dk.zero_(); dv.zero_();
    return {at::zeros(qc.sizes(), qc.options()), dk, dv};
  }
  at::Tensor dq_accum = at::zeros(qc.sizes(), qc.options().dtype(at::kFloat));
  at::Tensor dsum = at::full({a.B, a.H, a.N}, nan, qc.options().dtype(at::kFloat));
  KernelParams p = kernel_params(a);
  p.q = qc.data_ptr(); p.k = kc.data_ptr(); p.v = vc.data_ptr();
  p.out = const_cast<void*>(oc.data_ptr()); p.dout = doc.data_ptr();
  p.lse = const_cast<float*>(lc.data_ptr<float>());
  p.dsum = dsum.data_ptr<float>(); p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  dispatch(q.scalar_type(), a.D, [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(hd)::value;
    const int err = launch_attn_bwd<T, D>(p, nullptr); TORCH_CHECK(err == cudaSuccess);
  });
  at::Tensor dq = q.scalar_type() == at::kFloat ? dq_accum : dq_accum.to(q.scalar_type());
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
}
