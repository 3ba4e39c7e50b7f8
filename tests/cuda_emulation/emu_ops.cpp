// attn_fwd / attn_bwd through the emulated CUDA kernels, on CPU tensors, registered as the torch
// ops srt_cuda_emulation::fwd / bwd (plus the emulator's controls). The host logic follows
// csrc/cuda/attn_cuda.cu (minus device guard/stream), so the kernels see exactly the
// KernelParams they would see on a GPU. The launchers are instantiated in emu_kernels_*.cpp
// (no torch headers there, and the three compile in parallel with this file).
#include <torch/library.h>

#include <string>

#include "stubs/cuda_runtime.h"
#include "stubs/cuda_fp16.h"
#include "stubs/cuda_bf16.h"
#include "csrc/attn_params.h"
#include "csrc/cuda/kernel_params.h"

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

// As attn_cuda.cu: contiguous, with a 16-byte aligned start (the tensor-core kernels copy 16-byte
// chunks; the emulated cp.async checks the alignment).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
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
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v);
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
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v), oc = dense(out), doc = dense(grad_out),
                   lc = lse.contiguous();
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

TORCH_LIBRARY(srt_cuda_emulation, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  // cp.async timing: 0 = early (copy at issue), 1 = late (copy at the wait that covers it)
  m.def("set_cp_async_mode", [](int64_t mode) { emu::set_cp_async_mode(static_cast<int>(mode)); });
  m.def("cp_async_mode", []() -> int64_t { return emu::cp_async_mode(); });
  // warp-collective operations (once per warp) and cp_async_16 calls (per thread) since the reset
  m.def("op_counts", [] {
    c10::Dict<std::string, int64_t> r;
    for (const auto& c : emu::op_counts()) r.insert(c.first, static_cast<int64_t>(c.second));
    return r;
  });
  m.def("reset_op_counts", [] { emu::reset_op_counts(); });
}
