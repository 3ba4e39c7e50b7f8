// Forward kernel: O = softmax(scale * Q K^T over allowed keys) V and the row log-sum-exp.
//
// One thread block per (batch, head, query tile of kBlockM rows). The block walks the key
// tiles that its rows can see (causally later tiles are never loaded; in hard mode, tiles
// entirely inside the reasoning region are skipped), stages each K/V tile in shared memory
// as fp32 and keeps a running row max and row sum (online softmax), so no score matrix is
// ever stored. Every mask decision goes through forward_allows() of mask_semantics.h, the
// same function the CPU kernel's semantics are written against.
//
// Layout per warp (FwdTraits): rows [w * kRowsPerWarp, ...) of the tile. Scores: lane l
// computes column l of those rows; row max / row sum are warp reductions. P @ V: lane l
// accumulates the head-dim slice {l, l + 32, ...} of the rows, reading the warp's P rows from
// shared memory (broadcast) and V rows (consecutive lanes, consecutive banks).
#pragma once

#include "kernel_params.h"
#include "kernel_traits.h"
#include "tile_utils.cuh"

namespace srt::cuda {

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<D>::kThreads) attn_fwd_kernel(const KernelParams p) {
  using Tr = FwdTraits<D>;
  constexpr int kRows = Tr::kRowsPerWarp;
  constexpr int kDpl = Tr::kDimPerLane;

  extern __shared__ float4 smem_f4[];  // float4: 16-byte alignment for the vector reads below
  float* sQ = reinterpret_cast<float*>(smem_f4);       // kBlockM x kQStride
  float* sK = sQ + Tr::kBlockM * Tr::kQStride;         // kBlockN x kKStride
  float* sV = sK + Tr::kBlockN * Tr::kKStride;         // kBlockN x kVStride
  float* sP = sV + Tr::kBlockN * Tr::kVStride;         // kWarps x kRowsPerWarp x kBlockN

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  // Block -> (b, h, query tile). The last query tiles see the most keys under causality:
  // schedule them first.
  const BlockTile bt = block_tile(p.N, Tr::kBlockM, p.H, /*reverse=*/true);
  const int64_t bh = bt.bh, b = bt.b, h = bt.h, i0 = bt.start, rows_valid = bt.valid, i_last = bt.last;

  const T* q = static_cast<const T*>(p.q) + (bh * p.N + i0) * D;
  const T* k = static_cast<const T*>(p.k) + bh * p.M * D;
  const T* v = static_cast<const T*>(p.v) + bh * p.M * D;

  load_rows<Tr::kBlockM, D, Tr::kQStride, Tr::kThreads>(sQ, q, rows_valid);

  float acc[kRows][kDpl];
  float row_max[kRows], row_sum[kRows];  // the same value in every lane of the warp
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = kNegInf;
    row_sum[r] = 0.f;
#pragma unroll
    for (int t = 0; t < kDpl; ++t) acc[r][t] = 0.f;
  }

  // Keys [0, key_end) are the only ones any row of the tile may see under causality.
  int64_t key_end = p.M;
  if (p.causal) {
    const int64_t last_visible = i_last + p.shift;  // causal_allows(i_last, j) <=> j <= this
    key_end = last_visible + 1 < 0 ? 0 : (last_visible + 1 < p.M ? last_visible + 1 : p.M);
  }
  const ReasoningSpec& rs = p.reasoning;
  const bool hard_region = !rs.stop_grad && rs.on_head(h);  // block-uniform

  float* sP_warp = sP + warp * kRows * Tr::kBlockN;
  const float* sQ_warp = sQ + warp * kRows * Tr::kQStride;

  for (int64_t j0 = 0; j0 < key_end; j0 += Tr::kBlockN) {
    const int64_t cols_valid = p.M - j0 < Tr::kBlockN ? p.M - j0 : Tr::kBlockN;
    // Hard mode: a tile whose every (query, key) pair lies in the region contributes nothing.
    if (hard_region && rs.tile_inside_region(i0 + p.shift, i_last + p.shift, j0, j0 + cols_valid - 1))
      continue;  // block-uniform, so the barriers below stay matched

    __syncthreads();  // all warps are done with the previous K/V/P tiles (and sQ is loaded)
    load_rows<Tr::kBlockN, D, Tr::kKStride, Tr::kThreads>(sK, k + j0 * D, cols_valid);
    load_rows<Tr::kBlockN, D, Tr::kVStride, Tr::kThreads>(sV, v + j0 * D, cols_valid);
    __syncthreads();

    // Scores s[r] = q_row(r) . k_(j0 + lane).
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = 0.f;
    const float* k_row = sK + lane * Tr::kKStride;
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
      const float k0 = k_row[d], k1 = k_row[d + 1], k2 = k_row[d + 2], k3 = k_row[d + 3];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float4 qv = *reinterpret_cast<const float4*>(sQ_warp + r * Tr::kQStride + d);
        s[r] = fmaf(qv.x, k0, fmaf(qv.y, k1, fmaf(qv.z, k2, fmaf(qv.w, k3, s[r]))));
      }
    }

    // Mask, then the online-softmax update of each row.
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + warp * kRows + r;
      const bool ok = i < p.N && j < p.M &&
                      forward_allows(b, h, i, j, p.causal, p.shift, p.attn_mask, p.key_padding, rs);
      const float x = ok ? s[r] * p.scale : kNegInf;
      const float m_new = fmaxf(row_max[r], warp_max(x));
      // A -inf max (nothing allowed yet, or every allowed score -inf: an -inf in q or k) is
      // replaced by 0, so that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN: such a row
      // stays empty, as in fwd_tc_kernel.cuh and the CPU kernel. A NaN score stays NaN.
      const float base = m_new == kNegInf ? 0.f : m_new;
      const float prob = ok ? expf(x - base) : 0.f;
      const float alpha = row_max[r] == kNegInf ? 0.f : expf(row_max[r] - m_new);
      row_sum[r] = row_sum[r] * alpha + warp_sum(prob);
      row_max[r] = m_new;
#pragma unroll
      for (int t = 0; t < kDpl; ++t) acc[r][t] *= alpha;
      sP_warp[r * Tr::kBlockN + lane] = prob;
    }
    __syncwarp();  // the warp's P rows are written before its lanes read them

    // acc[r][t] += sum_c P[r][c] * V[c][lane + 32 t]
#pragma unroll 2
    for (int c = 0; c < Tr::kBlockN; c += 4) {
      float vv[4][kDpl];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int t = 0; t < kDpl; ++t) vv[u][t] = sV[(c + u) * Tr::kVStride + lane + kWarpSize * t];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float4 pv = *reinterpret_cast<const float4*>(sP_warp + r * Tr::kBlockN + c);
#pragma unroll
        for (int t = 0; t < kDpl; ++t)
          acc[r][t] = fmaf(pv.x, vv[0][t], fmaf(pv.y, vv[1][t], fmaf(pv.z, vv[2][t], fmaf(pv.w, vv[3][t], acc[r][t]))));
      }
    }
  }

  // Rows that saw no allowed key (row_max still -inf, row_sum 0): O = 0, lse = -inf.
  T* out = static_cast<T*>(p.out) + (bh * p.N + i0) * D;
  float* lse = p.lse + bh * p.N + i0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rr = warp * kRows + r;
    if (rr >= rows_valid) continue;
    // A NaN score leaves the max at -inf but the sum NaN: not empty, so O and lse become NaN
    // (fwd_tc_kernel.cuh says more).
    const bool empty = row_max[r] == kNegInf && row_sum[r] == 0.f;
    const float inv = empty ? 0.f : 1.f / row_sum[r];  // row_sum >= 1 once a key was allowed
#pragma unroll
    for (int t = 0; t < kDpl; ++t)
      out[int64_t(rr) * D + lane + kWarpSize * t] = from_float<T>(empty ? 0.f : acc[r][t] * inv);
    if (lane == 0) lse[rr] = empty ? kNegInf : row_max[r] + logf(row_sum[r]);
  }
}

template <typename T, int D>
cudaError_t launch_attn_fwd_simt(const KernelParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<D>;
  return launch_blocks(&attn_fwd_kernel<T, D>, p.B * p.H * ceil_div(p.N, Tr::kBlockM), Tr::kThreads,
                       Tr::kSmemBytes, p, stream);
}

}  // namespace srt::cuda
