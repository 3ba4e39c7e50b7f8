// attn_fwd / attn_bwd through the emulated CUDA kernels, on CPU tensors, registered as the torch
// ops srt_cuda_emulation::fwd / bwd (plus the emulator's controls). The host steps are those of
// csrc/cuda/attn_cuda.cu itself (its dtype and head-dim check and csrc/cuda/host_glue.h; minus
// the device checks, guard and stream), so the kernels see exactly the tensors and KernelParams they would see on a GPU. The
// launchers are instantiated in emu_kernels_*.cpp (no torch headers there, and the three compile
// in parallel with this file).
#include <ATen/Context.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "stubs/cuda_runtime.h"
#include "stubs/cuda_fp16.h"
#include "stubs/cuda_bf16.h"
#include "csrc/attn_params.h"
#include "csrc/cuda/host_glue.h"
#include "csrc/cuda/kernel_params.h"

using namespace srt;
using namespace srt::cuda;

// Outputs poisoned with NaN: every element must be written by the kernel. In the racecheck build
// the checker also watches each of them between blocks (emu_racecheck.cpp).
at::Tensor alloc_poisoned(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  emu::race::track_global(t.data_ptr(), t.nbytes());
  return t;
}

// The buffers of one op call are watched during its launches only.
struct TrackedBuffers {
  TrackedBuffers() { clear(); }
  ~TrackedBuffers() { clear(); }
  static void clear() {
    emu::race::untrack_globals();
    emu::banks::clear_globals();
  }
};

// Bytes from a mask's pointer to the end of the last element its (B, H, N, M) view reaches.
size_t mask_extent(const MaskView& m, const KernelParams& p) {
  static constexpr size_t kBytes[] = {0, 1, 4, 8, 2, 2};  // per MaskKind
  const int64_t last = (p.B - 1) * m.sb + (p.H - 1) * m.sh + (p.N - 1) * m.si + (p.M - 1) * m.sj;
  return m.present() ? static_cast<size_t>(last + 1) * kBytes[m.kind] : 0;
}

// Every global buffer of a launch, for the sector count of global accesses (emu_banks.cpp): the
// accesses to anything else (the lanes' own stacks, the emulator's data) are not global memory.
template <typename T>
void count_globals(const KernelParams& p, int64_t head_dim) {
  const size_t rows_q = static_cast<size_t>(p.B * p.H * p.N), rows_k = static_cast<size_t>(p.B * p.H * p.M);
  const size_t d = static_cast<size_t>(head_dim), e = sizeof(T);
  for (const void* t : {p.q, static_cast<const void*>(p.out), p.dout}) emu::banks::add_global(t, rows_q * d * e);
  for (const void* t : {p.k, p.v, static_cast<const void*>(p.dk), static_cast<const void*>(p.dv)})
    emu::banks::add_global(t, rows_k * d * e);
  emu::banks::add_global(p.lse, rows_q * 4);
  emu::banks::add_global(p.dsum, rows_q * 4);
  emu::banks::add_global(p.dq_accum, static_cast<size_t>(p.round_tiles > 0 ? p.round_tiles : 1) * rows_q * d * 4);
  for (const MaskView* m : {&p.key_padding, &p.attn_mask, &p.q_stop, &p.k_stop, &p.v_stop})
    emu::banks::add_global(m->ptr, mask_extent(*m, p));
  emu::banks::add_global(p.reasoning.heads, static_cast<size_t>(p.H));
}

// The multiprocessors the deterministic backward schedule is sized for (deterministic_dq_splits):
// few, so that small test problems take several dQ buffers and several rounds.
int64_t emulated_sm_count = 3;

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& q_stop, const std::optional<at::Tensor>& k_stop,
    const std::optional<at::Tensor>& v_stop, bool causal, double scale, int64_t R, int64_t W,
    bool stop, const std::optional<at::Tensor>& heads) {
  const TrackedBuffers tracked;
  AttnParams a = make_params(q, k, v, key_padding, attn_mask, q_stop, k_stop, v_stop, causal, scale,
                             R, W, stop, heads);
  check_kernel_dtype_head_dim("attn_fwd", q.scalar_type(), a.D);
  return attn_fwd_host(a, q, k, v, &alloc_poisoned, [](auto tag, auto head_dim, const KernelParams& p) {
    count_globals<typename decltype(tag)::type>(p, decltype(head_dim)::value);
    const int err = launch_attn_fwd<typename decltype(tag)::type, decltype(head_dim)::value>(p, nullptr);
    TORCH_CHECK(err == cudaSuccess);  // launches on the emulator: no device, no stream
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& q_stop, const std::optional<at::Tensor>& k_stop,
    const std::optional<at::Tensor>& v_stop, bool causal, double scale, int64_t R, int64_t W,
    bool stop, const std::optional<at::Tensor>& heads) {
  const TrackedBuffers tracked;
  AttnParams a = make_backward_params(grad_out, q, k, v, out, lse, key_padding, attn_mask, q_stop,
                                      k_stop, v_stop, causal, scale, R, W, stop, heads);
  check_kernel_dtype_head_dim("attn_bwd", q.scalar_type(), a.D);
  // torch.use_deterministic_algorithms(True) selects the deterministic schedule, as on the GPU
  // (attn_cuda.cu), sized for the emulated device's multiprocessor count (set_sm_count).
  return attn_bwd_host(a, grad_out, q, k, v, out, lse, at::globalContext().deterministicAlgorithms(),
                       emulated_sm_count, &alloc_poisoned,
                       [](auto tag, auto head_dim, const KernelParams& p) {
                         count_globals<typename decltype(tag)::type>(p, decltype(head_dim)::value);
                         const int err =
                             launch_attn_bwd<typename decltype(tag)::type, decltype(head_dim)::value>(p, nullptr);
                         TORCH_CHECK(err == cudaSuccess);
                       });
}

// The ops' namespace: srt_cuda_emulation, or another for a second build loaded in the same process
// (the racecheck build, tests/test_cuda_racecheck.py).
#ifndef EMU_OPS_NAMESPACE
#define EMU_OPS_NAMESPACE srt_cuda_emulation
#endif
#define EMU_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands EMU_OPS_NAMESPACE first

EMU_TORCH_LIBRARY(EMU_OPS_NAMESPACE, m) {
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
  // the multiprocessor count the deterministic backward schedule is sized for
  m.def("set_sm_count", [](int64_t n) {
    TORCH_CHECK(n >= 1, "sm_count must be at least 1");
    emulated_sm_count = n;
  });
  // host_glue.h's choice of the deterministic schedule's dQ buffer count
  m.def("deterministic_dq_splits", [](int64_t batch_heads, int64_t key_tiles, int64_t sm_count, int64_t buffer_bytes) {
    return deterministic_dq_splits(batch_heads, key_tiles, sm_count, buffer_bytes);
  });
  // whether this build reports shared-memory hazards (emu_racecheck.cpp)
  m.def("racecheck_instrumented", []() -> bool { return emu::race::instrumented(); });
  // racecheck build: report atomicAdds to the same bytes whose order is not fixed (set_ordered_atomics)
  m.def("set_ordered_atomics", [](bool on) { emu::race::set_ordered_atomics(on); });
  // shared-memory bank conflicts and global-memory sectors (emu_banks.cpp): on/off, reset, and the
  // table since the reset, six numbers a code address and kind: its offset in this module, kind,
  // bytes, instructions, wavefronts (sectors), ideal wavefronts (sectors) (plain loads, stores and
  // atomics only in the racecheck build)
  m.def("set_bank_count", [](bool on) { emu::banks::enable(on); });
  m.def("reset_bank_count", [] { emu::banks::reset(); });
  m.def("bank_table", [] { return emu::banks::table(); });
}
