// The host steps of attn_fwd / attn_bwd between the argument checks and the launch: kernel-ready
// inputs, output and buffer allocation, KernelParams, dispatch on (dtype, head dim), and the
// fp32 dQ buffer's conversion. One copy, used by the CUDA ops (attn_cuda.cu) and by the CPU
// emulation of the kernels (tests/cuda_emulation/emu_ops.cpp), so the emulation checks the
// kernels with exactly the tensors and parameters the GPU path gives them.
//
// The callers differ only in how outputs are allocated (`alloc`: uninitialised on the GPU,
// NaN-poisoned in the emulation so that every element must be written) and in what surrounds a
// launch (`launch(TypeTag<T>, std::integral_constant<int, D>, const KernelParams&)`: device
// checks, stream and error handling on the GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include "../attn_params.h"
#include "kernel_params.h"
#include "kernel_traits.h"

namespace srt::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// The element types and head dims the kernels are compiled for: anything else is an error naming
// the supported set. Checked before anything is allocated, by the CUDA ops (attn_cuda.cu, with
// the device checks) and by the emulated ones alike.
inline void check_kernel_dtype_head_dim(const char* op, at::ScalarType dtype, int64_t head_dim) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
              " on CUDA: q, k and v must be float16, bfloat16 or float32; got ", dtype);
  bool supported = false;
  std::string names;
  for (int d : kSupportedHeadDims) {
    supported = supported || d == head_dim;
    names += (names.empty() ? "" : ", ") + std::to_string(d);
  }
  TORCH_CHECK(supported, op, " on CUDA: head_dim ", head_dim, " is not supported; supported head dims: ", names);
}

// Calls f(TypeTag<T>{}, std::integral_constant<int, D>{}) for the kernel element type of
// `dtype` and the head dim D (both checked by the caller: check_kernel_dtype_head_dim).
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

// q, k, v, out and grad_out as the kernels read them: contiguous (B, H, rows, D) with a 16-byte
// aligned start (the tensor-core kernels copy 16-byte chunks). Copies (O(N) memory) only when the
// caller passed other strides or a misaligned view; masks are never copied.
inline at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// The tensor-core kernels' tile variants, read at every call (so that a benchmark can compare
// them in one process); unset or empty is the default, any other value is an error naming the
// variable. kernel_traits.h weighs the sizes.
// - SRT_CUDA_FWD_BLOCK_M: the float16/bfloat16 forward's query rows per block, 64 (default) or 128;
// - SRT_CUDA_BWD_BLOCK_N: the float16/bfloat16 backward's keys per block, 64 (default) or 128.
inline int tile_from_env(const char* name, const char* what) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 64;
  const std::string s(v);
  TORCH_CHECK(s == "64" || s == "128", name, " must be 64 or 128 (", what, "), got '", s, "'");
  return s == "128" ? 128 : 64;
}

inline int fwd_block_m_from_env() {
  return tile_from_env("SRT_CUDA_FWD_BLOCK_M", "query rows per block of the float16/bfloat16 CUDA forward");
}

inline int bwd_block_n_from_env() {
  return tile_from_env("SRT_CUDA_BWD_BLOCK_N", "keys per block of the float16/bfloat16 CUDA backward");
}

// Sizes, flags and masks; the tensor pointers are filled in by the steps below.
inline KernelParams kernel_params(const AttnParams& a) {
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
  p.reasoning = a.reasoning;  // heads (if any) is a pointer on q's device
  return p;
}

using AllocFn = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);

// (out, lse) for checked params `a`.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> attn_fwd_host(const AttnParams& a, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, AllocFn alloc, const Launch& launch) {
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v);
  at::Tensor out = alloc(qc.sizes(), qc.options());
  at::Tensor lse = alloc({a.B, a.H, a.N}, qc.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  KernelParams p = kernel_params(a);
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (q.scalar_type() != at::kFloat) p.fwd_block_m = fwd_block_m_from_env();  // tensor-core kernels only
  dispatch_dtype_head_dim(q.scalar_type(), a.D, [&](auto tag, auto head_dim) { launch(tag, head_dim, p); });
  return {out, lse};
}

// The deterministic backward schedule's number of dQ buffers, which is its round_tiles
// (KernelParams): about one (b, h, key tile) block per multiprocessor of the device's
// `sm_count` per round (the tensor-core backward runs one block per SM), but at most one per key
// tile, at most kMaxDqSplits buffers, and no more than fit in kDqSplitsBytes together
// (`buffer_bytes` each); always at least one. With few (batch, head) pairs a round therefore
// fills only kMaxDqSplits * B * H SMs. The buffer count, and so dQ's rounding, depends on the
// SM count and B * H: the same bits for the same inputs on the same kind of device.
constexpr int64_t kMaxDqSplits = 8;
constexpr int64_t kDqSplitsBytes = int64_t(2) << 30;  // 2 GiB
inline int64_t deterministic_dq_splits(int64_t batch_heads, int64_t key_tiles, int64_t sm_count,
                                       int64_t buffer_bytes) {
  int64_t splits = batch_heads < 1 ? 1 : sm_count / batch_heads;
  if (splits > kMaxDqSplits) splits = kMaxDqSplits;
  if (splits > key_tiles) splits = key_tiles;
  if (buffer_bytes > 0 && splits > kDqSplitsBytes / buffer_bytes) splits = kDqSplitsBytes / buffer_bytes;
  return splits < 1 ? 1 : splits;
}

// (dq, dk, dv) for checked params `a`. `deterministic` (torch.use_deterministic_algorithms on
// the caller's side) selects the deterministic backward schedule (KernelParams::round_tiles),
// sized for `sm_count` multiprocessors; otherwise every key tile adds into one dQ buffer at once.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_host(const AttnParams& a, const at::Tensor& grad_out,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& out,
                                                             const at::Tensor& lse, bool deterministic,
                                                             int64_t sm_count, AllocFn alloc, const Launch& launch) {
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v), oc = dense(out), doc = dense(grad_out),
                   lc = lse.contiguous();
  at::Tensor dk = alloc(kc.sizes(), kc.options());
  at::Tensor dv = alloc(vc.sizes(), vc.options());
  if (qc.numel() == 0 || kc.numel() == 0) {  // no queries or no keys: every gradient is 0
    dk.zero_();
    dv.zero_();
    return {at::zeros(qc.sizes(), qc.options()), dk, dv};
  }
  at::Tensor dsum = alloc({a.B, a.H, a.N}, qc.options().dtype(at::kFloat));

  KernelParams p = kernel_params(a);
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = const_cast<void*>(oc.data_ptr());  // only read by the backward
  p.dout = doc.data_ptr();
  p.lse = const_cast<float*>(lc.data_ptr<float>());  // only read by the backward
  p.dsum = dsum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (q.scalar_type() != at::kFloat) p.bwd_block_n = bwd_block_n_from_env();  // tensor-core kernels only
  // dQ receives a contribution from every key tile: blocks add them in fp32 into dq_accum, one
  // (B, H, N, D) buffer, or `splits` of them in the deterministic schedule. (Through `alloc`
  // like every buffer the kernels write, so that the emulation's checks see it too.)
  at::Tensor dq_accum;
  int64_t splits = 0;
  dispatch_dtype_head_dim(q.scalar_type(), a.D, [&](auto tag, auto head_dim) {
    using K = KernelsFor<typename decltype(tag)::type, decltype(head_dim)::value>;
    const int64_t keys = K::bwd_block_keys(p.bwd_block_n), key_tiles = (a.M + keys - 1) / keys;
    splits = deterministic ? deterministic_dq_splits(a.B * a.H, key_tiles, sm_count, qc.numel() * 4) : 0;
    dq_accum = splits == 0 ? alloc(qc.sizes(), qc.options().dtype(at::kFloat))
                           : alloc({splits, a.B, a.H, a.N, a.D}, qc.options().dtype(at::kFloat));
    dq_accum.zero_();
    p.dq_accum = dq_accum.data_ptr<float>();
    p.round_tiles = splits;  // 0: every key tile in one launch
    p.dq_split_stride = splits == 0 ? 0 : qc.numel();
    launch(tag, head_dim, p);
  });
  if (splits > 0) {  // the buffers summed in a fixed order, into the first
    at::Tensor sum = dq_accum.select(0, 0);
    for (int64_t s = 1; s < splits; ++s) sum.add_(dq_accum.select(0, s));
    // a float32 dq must not keep the other buffers alive (peak: splits + 1 buffers)
    dq_accum = q.scalar_type() == at::kFloat && splits > 1 ? sum.clone() : sum;
  }
  // fp32 inputs: the buffer is the result; otherwise one O(N) conversion.
  at::Tensor dq = q.scalar_type() == at::kFloat ? dq_accum : dq_accum.to(q.scalar_type());
  return {dq, dk, dv};
}

}  // namespace srt::cuda
