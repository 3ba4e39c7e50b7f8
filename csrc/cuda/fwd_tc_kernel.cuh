// Tensor-core forward for float16 / bfloat16 (FlashAttention-2 style): O = softmax(scale * Q K^T
// over allowed keys) V and the row log-sum-exp, with fp32 accumulation.
//
// One block of 4 (or 8) warps per (batch, head, query tile of 64 (or 128) rows; kernel_traits.h);
// warp w owns rows [16 w, +16).
// Each warp keeps its Q fragments, the S tile, P and the O accumulator in registers: S = Q K^T
// and O += P V are m16n8k16 mma.sync products (ptx.cuh), and the accumulator fragment of S is
// exactly the A fragment P needs, so P never goes through shared memory. K and V tiles of kBlockN
// keys (kernel_traits.h) are copied with cp.async; V of tile t and K of tile t+1 load while the
// warps compute, with two barriers per tile.
//
// Masks: a tile is evaluated element by element with the predicates of mask_semantics.h only
// when something can mask inside it: a dense attn_mask or key padding, the causal diagonal, the
// reasoning region in hard mode, or the ragged last key tile. Other tiles skip the checks. With
// masks of unit key stride (contiguous rows) each row's keys are clipped to the ragged edge and
// to causality once and the masks are read at fixed offsets from one pointer per row; other
// strides go through forward_allows() per element.
// Causally invisible tiles are never visited; hard-mode tiles entirely inside the region are
// skipped.
//
// Softmax runs in the log2 domain (x = scale * log2(e) * s, ex2.approx), the row max and sum are
// reduced over the 4 lanes that share a row. Rows with no allowed key get O = 0, lse = -inf.
#pragma once

#include "kernel_params.h"
#include "kernel_traits.h"
#include "ptx.cuh"
#include "tile_utils.cuh"

namespace srt::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The address lane `lane` passes to ldmatrix_x4 so that the 4 registers are the A fragment
// (16 x 16, ptx.cuh) of the row-major tile at `base` (row stride `stride` elements):
// matrix i = lane / 8 covers rows 8 (i % 2) .. +8 and columns 8 (i / 2) .. +8.
template <typename T>
__device__ __forceinline__ const T* a_frag_row(const T* base, int stride, int lane) {
  return base + ((lane % 8) + 8 * ((lane / 8) % 2)) * stride + 8 * (lane / 16);
}

// ldmatrix_x4 address giving the B fragments of two adjacent n-tiles when B^T is stored
// row-major at `base` (rows = n, columns = k; e.g. K for S = Q K^T): registers {0, 1} are
// n-tile 0 (rows 0..7) and {2, 3} n-tile 1 (rows 8..15), each k 0..7 then 8..15.
template <typename T>
__device__ __forceinline__ const T* bt_frag_row(const T* base, int stride, int lane) {
  return base + ((lane % 8) + 8 * (lane / 16)) * stride + 8 * ((lane / 8) % 2);
}

// ldmatrix_x4_trans address giving the B fragments of two adjacent n-tiles when B itself is
// stored row-major at `base` (rows = k, columns = n; e.g. V for O += P V): registers {0, 1} are
// n-tile 0 (columns 0..7), k 0..7 then 8..15, and {2, 3} n-tile 1 (columns 8..15).
template <typename T>
__device__ __forceinline__ const T* b_frag_row_trans(const T* base, int stride, int lane) {
  return base + ((lane % 8) + 8 * ((lane / 8) % 2)) * stride + 8 * (lane / 16);
}

template <typename T, int D, int kBlockM>
__global__ void __launch_bounds__(FwdTcTraits<D, kBlockM>::kThreads) attn_fwd_tc_kernel(const KernelParams p) {
  using Tr = FwdTcTraits<D, kBlockM>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kS = Tr::kStride;
  constexpr int kKSteps = D / 16;    // k-steps of S = Q K^T
  constexpr int kSTiles = kBN / 8;   // 8-key n-tiles of S
  constexpr int kOTiles = D / 8;     // 8-dim n-tiles of O

  extern __shared__ float4 smem_f4[];
  T* sQ = reinterpret_cast<T*>(smem_f4);  // kBM x kS
  T* sK = sQ + kBM * kS;                  // kBN x kS
  T* sV = sK + kBN * kS;                  // kBN x kS

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;  // this lane's rows g, g + 8 and columns 2t, 2t + 1

  // Block -> (b, h, query tile); the last query tiles see the most keys, so they go first.
  const BlockTile bt = block_tile(p.N, kBM, p.H, /*reverse=*/true);
  const int64_t bh = bt.bh, b = bt.b, h = bt.h, i0 = bt.start, rows_valid = bt.valid, i_last = bt.last;

  const T* q = static_cast<const T*>(p.q) + (bh * p.N + i0) * D;
  const T* k = static_cast<const T*>(p.k) + bh * p.M * D;
  const T* v = static_cast<const T*>(p.v) + bh * p.M * D;

  int64_t key_end = p.M;  // causality: no row of the tile sees a key >= key_end
  if (p.causal) {
    const int64_t last_visible = i_last + p.shift;
    key_end = last_visible + 1 < 0 ? 0 : (last_visible + 1 < p.M ? last_visible + 1 : p.M);
  }
  const ReasoningSpec& rs = p.reasoning;
  const bool hard_region = !rs.stop_grad && rs.on_head(h);  // block-uniform
  const bool dense_masks = p.attn_mask.present() || p.key_padding.present();
  // the masks have unit key stride (contiguous rows, the usual case): read row by row below
  const bool unit_stride_masks = unit_key_stride(p.attn_mask) && unit_key_stride(p.key_padding);
  const float scale_log2 = p.scale * kLog2e;

  // First key tile at or after j0 that is not skipped (block-uniform).
  auto next_tile = [&](int64_t j0) {
    for (; j0 < key_end; j0 += kBN) {
      const int64_t j_last = (j0 + kBN < p.M ? j0 + kBN : p.M) - 1;
      if (!(hard_region && rs.tile_inside_region(i0 + p.shift, i_last + p.shift, j0, j_last))) break;
    }
    return j0;
  };

  int64_t j0 = next_tile(0);
  load_tile_async<kBM, D, kS, Tr::kThreads>(sQ, q, rows_valid);
  if (j0 < key_end) load_tile_async<kBN, D, kS, Tr::kThreads>(sK, k + j0 * D, p.M - j0);
  cp_async_commit();

  uint32_t qf[kKSteps][4];
  float acc[kOTiles][4];
  float row_max[2] = {kNegInf, kNegInf};  // rows g, g + 8; the same in the row's 4 lanes
  float row_sum[2] = {0.f, 0.f};          // this lane's partial sums (reduced at the end)
#pragma unroll
  for (int n = 0; n < kOTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

  // Per key tile, two barriers (as FlashAttention-2): V of this tile loads while S and the
  // softmax are computed, K of the next tile while O += P V is.
  bool q_in_registers = false;
  while (j0 < key_end) {
    cp_async_wait<0>();  // this K tile (and the first time Q) has landed...
    __syncthreads();     // ...for every thread, and every warp is done reading sV
    load_tile_async<kBN, D, kS, Tr::kThreads>(sV, v + j0 * D, p.M - j0);
    cp_async_commit();
    if (!q_in_registers) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) ldmatrix_x4(qf[ks], a_frag_row(sQ + warp * 16 * kS + ks * 16, kS, lane));
      q_in_registers = true;
    }

    // S = Q K^T for this warp's 16 rows and the tile's kBN keys.
    float s[kSTiles][4];
#pragma unroll
    for (int n = 0; n < kSTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, bt_frag_row(sK + np * 16 * kS + ks * 16, kS, lane));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_16816<T>(s[2 * np], qf[ks], b0);
        mma_16816<T>(s[2 * np + 1], qf[ks], b1);
      }
    }

    // Scale into the log2 domain; mask in a separate pass, only where something can mask
    // inside this tile (a block-uniform branch around the whole pass).
#pragma unroll
    for (int n = 0; n < kSTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
    const bool ragged = j0 + kBN > p.M;
    const bool crosses_diagonal = p.causal && j0 + kBN - 1 > i0 + p.shift;
    const bool touches_region =
        hard_region && tile_may_touch_region(rs, i0 + p.shift, i_last + p.shift, j0, j0 + kBN - 1);
    if ((dense_masks || ragged || crosses_diagonal || touches_region) && unit_stride_masks) {
      // forward_allows row by row: the row's keys clipped to the ragged edge and to causality
      // (causal_key_end) once, the masks read at fixed offsets from one pointer per row, the
      // region tested only on tiles that may touch it.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = i0 + warp * 16 + g + 8 * r;
        const int visible_end = visible_keys<kBN>(i < p.N ? p.M - j0 : 0, p.causal, i, p.shift, j0);  // padding rows: none
        const int64_t col = j0 + 2 * t;  // this lane's first key
        const bool* attn = bool_mask_row(p.attn_mask, b, h, i, col, p.N);
        const bool* padding = bool_mask_row(p.key_padding, b, h, i, col, p.N);
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int off = n * 8 + c;  // from the row pointers; the key is j0 + 2 t + off
            const bool ok = 2 * t + off < visible_end && (!p.attn_mask.present() || bool_allow_at(attn, off)) &&
                            (!p.key_padding.present() || bool_allow_at(padding, off)) &&
                            !(touches_region && rs.region(i + p.shift, col + off));
            if (!ok) s[n][2 * r + c] = kNegInf;
          }
        }
      }
    } else if (dense_masks || ragged || crosses_diagonal || touches_region) {  // masks with other key strides
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t i = i0 + warp * 16 + g + 8 * (e / 2);
          const int64_t j = j0 + n * 8 + 2 * t + (e % 2);
          const bool ok = i < p.N && j < p.M &&
                          forward_allows(b, h, i, j, p.causal, p.shift, p.attn_mask, p.key_padding, rs);
          if (!ok) s[n][e] = kNegInf;
        }
      }
    }

    // Online softmax per row: new max over the 4 lanes of the row, exponentiate, rescale.
    float alpha[2];
    bool new_max = false;  // some row of this lane has a new max (else its alpha is 1)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // -inf max: nothing allowed yet; exp2(-inf - 0) = 0 keeps P at 0 without inf - inf.
      const float base = mx == kNegInf ? 0.f : mx;
      alpha[r] = row_max[r] == kNegInf ? 0.f : exp2_approx(row_max[r] - mx);
      new_max |= !(mx == row_max[r]);  // (a NaN max counts as new)
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) {
        s[n][2 * r] = exp2_approx(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2_approx(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha[r] + sum;
    }
    // O *= alpha only when a row of the warp has a new max: once the maxima settle (most tiles
    // of a long causal row) the warp skips D / 2 multiplications per lane. A row without a new
    // max has the factor 2^0 = 1 (or 0 while it is still empty and its O is all zero), so
    // skipping it is exact; rows of the warp that do rescale keep their usual arithmetic.
    if (__any_sync(0xffffffffu, new_max)) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
          acc[n][2 * r] *= alpha[r];
          acc[n][2 * r + 1] *= alpha[r];
        }
    }

    cp_async_wait<0>();  // this V tile has landed...
    __syncthreads();     // ...for every thread, and every warp is done reading sK
    const int64_t j_next = next_tile(j0 + kBN);
    if (j_next < key_end) load_tile_async<kBN, D, kS, Tr::kThreads>(sK, k + j_next * D, p.M - j_next);
    cp_async_commit();

    // O += P V: the S accumulators of key n-tiles (2 kk, 2 kk + 1) are P's A fragment.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kOTiles / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, b_frag_row_trans(sV + kk * 16 * kS + dp * 16, kS, lane));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_16816<T>(acc[2 * dp], pa, b0);
        mma_16816<T>(acc[2 * dp + 1], pa, b1);
      }
    }
    j0 = j_next;
  }
  cp_async_wait<0>();  // nothing left in flight (e.g. the Q tile of a block that saw no key)

  // Epilogue: full row sums, normalise, store O (two elements per lane and n-tile) and lse.
  T* out = static_cast<T*>(p.out) + (bh * p.N + i0) * D;
  float* lse = p.lse + bh * p.N + i0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int row = warp * 16 + g + 8 * r;
    if (row >= rows_valid) continue;
    // No allowed key: max -inf and sum 0. A NaN score (from a NaN in q or k) leaves the max at
    // -inf (fmaxf ignores NaN) but makes the sum NaN: such a row is not empty, and its output and
    // lse become NaN, as in the reference, instead of passing for a row with no allowed key.
    const bool empty = row_max[r] == kNegInf && total == 0.f;
    const float inv = empty ? 0.f : 1.f / total;  // total >= 1 once a key was allowed
#pragma unroll
    for (int n = 0; n < kOTiles; ++n)
      *reinterpret_cast<uint32_t*>(out + int64_t(row) * D + n * 8 + 2 * t) =
          pack2<T>(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
    if (t == 0) lse[row] = empty ? kNegInf : (row_max[r] + log2f(total)) * kLn2;
  }
}

template <typename T, int D, int kBlockM>
cudaError_t launch_attn_fwd_tc_tiles(const KernelParams& p, cudaStream_t stream) {
  using Tr = FwdTcTraits<D, kBlockM>;
  return launch_blocks(&attn_fwd_tc_kernel<T, D, kBlockM>, p.B * p.H * ceil_div(p.N, Tr::kBlockM), Tr::kThreads,
                       Tr::kSmemBytes, p, stream);
}

template <typename T, int D>
cudaError_t launch_attn_fwd_tc(const KernelParams& p, cudaStream_t stream) {
  return p.fwd_block_m == 128 ? launch_attn_fwd_tc_tiles<T, D, 128>(p, stream)
                              : launch_attn_fwd_tc_tiles<T, D, 64>(p, stream);
}

}  // namespace srt::cuda
