// Plain parameters the CUDA kernels read, and the launchers the host side calls.
//
// Deliberately free of torch headers: the kernel translation units (attn_fwd_*.cu,
// attn_bwd_*.cu) include only this, mask_semantics.h and the CUDA headers, so they compile
// quickly and in parallel. attn_cuda.cu fills the struct from the checked AttnParams.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../mask_semantics.h"

namespace srt::cuda {

// Head dims with compiled kernels. Anything else is rejected on the host with this list.
constexpr int kSupportedHeadDims[] = {32, 64, 96, 128};

struct KernelParams {
  // q, out, grad_out: (B, H, N, D) contiguous; k, v: (B, H, M, D) contiguous; element type T.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;         // forward output; read by the backward's preprocessing
  const void* dout = nullptr;  // backward: grad of out
  float* lse = nullptr;        // (B, H, N) fp32 log-sum-exp, -inf on rows with no allowed key
  float* dsum = nullptr;       // backward: (B, H, N) fp32 D_i = sum_d dO_i * O_i
  float* dq_accum = nullptr;   // backward: (B, H, N, D) fp32, zero-initialised, atomically summed
                               // (round_tiles such buffers in the deterministic schedule)
  void* dk = nullptr;          // backward: (B, H, M, D), element type T
  void* dv = nullptr;

  int64_t B = 0, H = 0, N = 0, M = 0;
  float scale = 1.f;
  bool causal = false;
  int64_t shift = 0;  // M - N: absolute position of query row i is i + shift

  // Masks as (b, h, i, j) strided views (device pointers); see mask_semantics.h.
  MaskView key_padding, attn_mask, q_stop, k_stop, v_stop;
  ReasoningSpec reasoning;  // reasoning.heads, when set, is a device pointer

  // float16/bfloat16 forward: query rows per block, 64 or 128 (FwdTcTraits in kernel_traits.h;
  // the host sets it from SRT_CUDA_FWD_BLOCK_M, host_glue.h)
  int fwd_block_m = 64;
  // float16/bfloat16 backward: keys per block, 64 or 128 (BwdTcTraits; from SRT_CUDA_BWD_BLOCK_N)
  int bwd_block_n = 64;

  // Backward schedule (host_glue.h sets round_tiles and dq_split_stride, the launcher the rest):
  // the key tiles of every (b, h) in rounds of round_tiles tiles, one launch per round, in
  // stream order. Block x of a round holds key tile key_tile_first + x % round_tiles of
  // (b, h) = x / round_tiles and adds its share of dQ into dq_accum + (x % round_tiles) *
  // dq_split_stride (tile_utils.cuh: launch_key_tiles, bwd_block_tile).
  // - Default (round_tiles 0, dq_split_stride 0): one round of every key tile, all adding into
  //   one buffer at once (fp32 atomics, so the summation order, and the last bits of dQ, vary
  //   between runs).
  // - Deterministic (torch.use_deterministic_algorithms): round_tiles buffers, dq_split_stride
  //   B * H * N * D apart. No two blocks of a round add into the same element, each element of a
  //   block is added by one thread, rounds run in order, and the host sums the buffers in a
  //   fixed order: the same inputs give the same bits.
  int64_t round_tiles = 0;
  int64_t key_tile_first = 0;
  int64_t dq_split_stride = 0;  // elements
};

// Launchers, explicitly instantiated for T in {__half, __nv_bfloat16, float} and
// D in kSupportedHeadDims (attn_fwd_<dtype>.cu, attn_bwd_<dtype>.cu). They enqueue on
// `stream` and return the first CUDA error (the host turns it into an exception). The host
// has already checked that the shared memory of kernel_traits.h fits the device.
template <typename T, int D>
cudaError_t launch_attn_fwd(const KernelParams& p, cudaStream_t stream);

// Enqueues the preprocessing (dsum = rowsum(dO * O)) and the dQ/dK/dV kernel.
template <typename T, int D>
cudaError_t launch_attn_bwd(const KernelParams& p, cudaStream_t stream);

}  // namespace srt::cuda
