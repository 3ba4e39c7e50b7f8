// Small device helpers shared by the forward and backward kernels: element conversions,
// warp reductions and the global -> shared tile copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernel_params.h"
#include "kernel_traits.h"
#include "ptx.cuh"

namespace srt::cuda {

constexpr float kNegInf = -INFINITY;

// Inputs are float16, bfloat16 or float32; all arithmetic is fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Reductions over the 32 lanes of a warp; every lane gets the result. All 32 lanes must call.
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Copies rows [0, kRows) of a row-major (rows, D) matrix starting at `src` into shared memory
// (row stride kStride floats), converted to fp32. Rows >= valid_rows are filled with zeros so
// that later arithmetic on them is finite; their results are never stored. All threads of the
// block call it; consecutive threads read consecutive elements (coalesced).
template <int kRows, int D, int kStride, int kThreads, typename T>
__device__ __forceinline__ void load_rows(float* dst, const T* src, int64_t valid_rows) {
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    dst[r * kStride + c] = r < valid_rows ? to_float(src[int64_t(r) * D + c]) : 0.f;
  }
}

// Tensor-core kernels: starts the asynchronous copy of rows [0, kRows) of a row-major (rows, D)
// matrix of T at `src` into shared memory (row stride kStride elements). Rows >= valid_rows are
// zero-filled without reading global memory. 16-byte chunks, consecutive threads on consecutive
// chunks (coalesced); src must be 16-byte aligned (the host guarantees it) and D % 8 == 0.
// The caller commits and waits (cp_async_commit / cp_async_wait, then a barrier).
//
// Fully unrolled with compile-time offsets: when kThreads is a multiple of the chunks per row
// (every head dim but 96), each thread copies the same column of rows r0, r0 + kRowsPerPass, ...,
// so a chunk costs one cp.async plus an add; a full tile (the block-uniform common case) also
// skips the row checks. (A loop with a runtime trip count and 64-bit index arithmetic per chunk
// cost the forward about as many issued instructions as its matrix products.)
template <int kRows, int D, int kStride, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t valid_rows) {
  static_assert(sizeof(T) == 2 && D % 8 == 0 && kStride % 8 == 0, "16-byte chunks of 16-bit elements");
  constexpr int kChunksPerRow = D / 8;
  const int rows = valid_rows <= 0 ? 0 : (valid_rows < kRows ? static_cast<int>(valid_rows) : kRows);
  const int tid = static_cast<int>(threadIdx.x);
  if constexpr (kThreads % kChunksPerRow == 0) {
    constexpr int kRowsPerPass = kThreads / kChunksPerRow;
    constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
    int r0 = tid / kChunksPerRow;
    const int col = (tid % kChunksPerRow) * 8;
    // Rows of 4 chunks (head dim 32): the 8 lanes that shared memory serves together for 16-byte
    // writes would cover two consecutive rows, whose padded stride (80 bytes) puts a chunk of each
    // in the same 4 banks (two wavefronts instead of one). Lanes 4-7 of each such group take the
    // row 4 further on instead (4 strides = 64 bytes modulo 128: the other half of the banks);
    // each warp still copies the same 8 consecutive rows (one stretch of global memory).
    if constexpr (kChunksPerRow == 4 && kRowsPerPass % 8 == 0 && (kStride * sizeof(T) * 4) % 128 == 64) {
      const int lane = tid % 32;
      r0 = tid / 32 * 8 + lane / 8 + lane / 4 % 2 * 4;
    }
    T* d = dst + r0 * kStride + col;
    const T* s = src + r0 * D + col;
    if (rows == kRows) {
#pragma unroll
      for (int i = 0; i < kPasses; ++i)
        if (kRows % kRowsPerPass == 0 || r0 + i * kRowsPerPass < kRows)
          cp_async_16(d + i * kRowsPerPass * kStride, s + i * kRowsPerPass * D, true);
    } else {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = r0 + i * kRowsPerPass;
        if (kRows % kRowsPerPass == 0 || r < kRows) {
          const bool valid = r < rows;
          cp_async_16(d + i * kRowsPerPass * kStride, valid ? s + i * kRowsPerPass * D : src, valid);
        }
      }
    }
  } else {
    constexpr int kChunks = kRows * kChunksPerRow;
    constexpr int kPasses = (kChunks + kThreads - 1) / kThreads;
    // Head dim 96 (12 chunks a row): taken row by row, one phase of 8 lanes in three would cover
    // the end of one row and the start of the next, and share banks (two wavefronts). So the
    // chunks go in groups of 8 rows, column by column: the 8 lanes of a phase take one column of
    // 8 consecutive rows, which an odd row stride in 16-byte units puts in 8 different bank
    // groups; a warp reads 4 columns of 8 rows (64 contiguous bytes of each row).
    constexpr bool kColumns = kRows % 8 == 0 && (kStride / 8) % 2 == 1;  // (8 elements: 16 bytes)
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int c = tid + i * kThreads;
      if (kChunks % kThreads == 0 || c < kChunks) {
        int r, col;
        if constexpr (kColumns) {
          const int in_group = c % (8 * kChunksPerRow);
          r = c / (8 * kChunksPerRow) * 8 + in_group % 8;
          col = in_group / 8 * 8;
        } else {
          r = c / kChunksPerRow;
          col = (c % kChunksPerRow) * 8;
        }
        const bool valid = r < rows;
        cp_async_16(dst + r * kStride + col, valid ? src + r * D + col : src, valid);
      }
    }
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Row-by-row mask passes of the tensor-core kernels (masked tiles only).

// x clipped to [0, kN]: a position relative to a tile of kN keys (exact in int afterwards).
template <int kN>
__device__ __forceinline__ int clip_to_tile(int64_t x) {
  return int(x < 0 ? 0 : (x > kN ? int64_t(kN) : x));
}

// The keys [0, result) of the tile starting at key j0 that query row i may see: the tile's
// `valid` keys (its ragged edge), cut at the row's future when causal (causal_key_end).
template <int kN>
__device__ __forceinline__ int visible_keys(int64_t valid, bool causal, int64_t i, int64_t shift, int64_t j0) {
  int64_t end = valid;
  if (causal && causal_key_end(i, shift) - j0 < end) end = causal_key_end(i, shift) - j0;
  return clip_to_tile<kN>(end);
}

// Masks whose rows can be read at fixed offsets from one pointer (absent, or key stride 1).
__device__ __forceinline__ bool unit_key_stride(const MaskView& m) { return !m.present() || m.sj == 1; }

// A bool mask (unit key stride) at (b, h, i, j), for reading row i's keys j, j + 1, ... at fixed
// offsets; nullptr for an absent mask or a padding row i >= rows (which reads nothing, and whose
// pointer could lie outside the mask).
__device__ __forceinline__ const bool* bool_mask_row(const MaskView& m, int64_t b, int64_t h, int64_t i,
                                                     int64_t j, int64_t rows) {
  return m.present() && i < rows ? static_cast<const bool*>(m.ptr) + m.row_offset(b, h, i) + j : nullptr;
}

// Enqueues `kernel` on `blocks` thread blocks of `threads` threads (nothing when blocks == 0),
// first raising its dynamic shared-memory limit when it needs more than the default 48 KB (the
// host has checked `smem` against the device's opt-in limit; `raise_limit` false: an earlier
// launch of the same kernel did). Returns the first CUDA error.
template <typename Kernel>
cudaError_t launch_blocks(Kernel kernel, int64_t blocks, int threads, size_t smem, const KernelParams& p,
                          cudaStream_t stream, bool raise_limit = true) {
  if (blocks == 0) return cudaSuccess;
  if (raise_limit && smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned int>(blocks), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Enqueues a backward kernel over the `key_tiles` key tiles of every (b, h), in rounds of
// p.round_tiles tiles (KernelParams; 0: all of them in one round), one launch each, in order.
template <typename Kernel>
cudaError_t launch_key_tiles(Kernel kernel, int64_t key_tiles, int threads, size_t smem, const KernelParams& p,
                             cudaStream_t stream) {
  KernelParams round = p;
  if (round.round_tiles <= 0 || round.round_tiles > key_tiles) round.round_tiles = key_tiles;
  for (round.key_tile_first = 0; round.key_tile_first < key_tiles; round.key_tile_first += round.round_tiles) {
    const cudaError_t err = launch_blocks(kernel, p.B * p.H * round.round_tiles, threads, smem, round, stream,
                                          /*raise_limit=*/round.key_tile_first == 0);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The (batch, head, tile) of this thread block, for grids of B * H * ceil(extent / tile) blocks
// numbered (b, h)-major. With `reverse`, the tiles of one (b, h) go from the last to the first
// (the forward schedules the causally busiest query tiles first).
struct BlockTile {
  int64_t bh, b, h;
  int64_t start, valid, last;  // the tile's rows (or keys) [start, start + valid); last = start + valid - 1
};

__device__ __forceinline__ BlockTile block_tile(int64_t extent, int tile, int64_t H, bool reverse) {
  const int64_t tiles = ceil_div(extent, tile);
  BlockTile bt;
  bt.bh = int64_t(blockIdx.x) / tiles;
  int64_t idx = int64_t(blockIdx.x) % tiles;
  if (reverse) idx = tiles - 1 - idx;
  bt.b = bt.bh / H;
  bt.h = bt.bh % H;
  bt.start = idx * tile;
  bt.valid = extent - bt.start < tile ? extent - bt.start : tile;
  bt.last = bt.start + bt.valid - 1;
  return bt;
}

// The (batch, head, key tile) of block x of a backward round (KernelParams::round_tiles): key
// tile key_tile_first + x % round_tiles of (b, h) = x / round_tiles, and `dq`, the fp32 dQ
// buffer of its (b, h) that it adds into (buffer x % round_tiles, all the same one when
// dq_split_stride is 0). A block past the last key tile (a partial last round) gets valid = 0.
struct BwdBlockTile : BlockTile {
  float* dq;
};

__device__ __forceinline__ BwdBlockTile bwd_block_tile(const KernelParams& p, int tile, int64_t D) {
  BwdBlockTile bt;
  const int64_t in_round = int64_t(blockIdx.x) % p.round_tiles;
  bt.bh = int64_t(blockIdx.x) / p.round_tiles;
  bt.b = bt.bh / p.H;
  bt.h = bt.bh % p.H;
  bt.start = (p.key_tile_first + in_round) * tile;
  bt.valid = p.M - bt.start < tile ? (p.M > bt.start ? p.M - bt.start : 0) : tile;
  bt.last = bt.start + bt.valid - 1;
  bt.dq = p.dq_accum + in_round * p.dq_split_stride + bt.bh * p.N * D;
  return bt;
}

}  // namespace srt::cuda
