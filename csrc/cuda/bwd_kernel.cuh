// Backward kernels (SPEC 2):
//
//   dsum_i = sum_d dO_i * O_i                                  (bwd_preprocess.cuh)
//   P_ij   = exp(scale * q_i . k_j - lse_i)   on allowed (i, j), else 0
//   dV_j  += sum_i Fv_ij * P_ij * dO_i
//   dS_ij  = P_ij * (dO_i . v_j - dsum_i)
//   dQ_i  += scale * sum_j Fq_ij * dS_ij * k_j                 (fp32 atomics into dq_accum)
//   dK_j  += scale * sum_i Fk_ij * dS_ij * q_i                 (attn_bwd_kernel)
//
// Fq, Fk, Fv are the per-element pass-through factors of the stop masks (stop_factor_at), and
// Fk, Fv also carry the reasoning pattern's 0 on the region in stop-grad mode
// (reasoning_kv_factor); allowed(i, j) is forward_allows(), exactly as in the forward. As in
// FlashAttention-2's backward, the v-factor is applied to P before the dV product and the
// q- and k-factors to separate copies of dS before the dQ and dK products.
//
// One thread block per (batch, head, key tile of kBlockN keys): dK and dV of those keys stay
// in registers while the block loops over query tiles (only those that can see the key tile
// under causality; in hard mode, tiles entirely inside the region are skipped). dQ gets
// contributions from every key tile, so blocks add them atomically into an fp32 (B, H, N, D)
// buffer that the host converts afterwards (or, in the deterministic schedule, each tile of a
// round into its own buffer, summed by the host in a fixed order: KernelParams::round_tiles).
// Memory beyond inputs and outputs: that buffer and two (B, H, N) fp32 rows; never an N x M
// matrix.
#pragma once

#include "kernel_params.h"
#include "kernel_traits.h"
#include "tile_utils.cuh"

namespace srt::cuda {

template <typename T, int D>
__global__ void __launch_bounds__(BwdTraits<D>::kThreads) attn_bwd_kernel(const KernelParams p) {
  using Tr = BwdTraits<D>;
  constexpr int kRows = Tr::kRowsPerWarp;
  constexpr int kKeys = Tr::kKeysPerWarp;
  constexpr int kDpl = Tr::kDimPerLane;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN;

  extern __shared__ float4 smem_f4[];  // float4: 16-byte alignment for the vector reads below
  float* sQ = reinterpret_cast<float*>(smem_f4);  // kBM x kQStride
  float* sdO = sQ + kBM * Tr::kQStride;           // kBM x kQStride
  float* sK = sdO + kBM * Tr::kQStride;           // kBN x kKStride
  float* sV = sK + kBN * Tr::kKStride;            // kBN x kKStride
  float* sPv = sV + kBN * Tr::kKStride;           // kBM x kBN: Fv * P
  float* sdSk = sPv + kBM * kBN;                  // kBM x kBN: Fk * dS
  float* sdSq = sdSk + kBM * kBN;                 // kBM x kBN: Fq * dS
  float* sLse = sdSq + kBM * kBN;                 // kBM
  float* sDsum = sLse + kBM;                      // kBM

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  const BwdBlockTile bt = bwd_block_tile(p, kBN, D);
  if (bt.valid == 0) return;  // past the last key tile (deterministic schedule; the whole block)
  const int64_t bh = bt.bh, b = bt.b, h = bt.h, j0 = bt.start, cols_valid = bt.valid, j_last = bt.last;

  float* dq_accum = bt.dq;  // this block's (N, D) fp32 dQ buffer
  const T* q = static_cast<const T*>(p.q) + bh * p.N * D;
  const T* dout = static_cast<const T*>(p.dout) + bh * p.N * D;
  const float* lse = p.lse + bh * p.N;
  const float* dsum = p.dsum + bh * p.N;

  load_rows<kBN, D, Tr::kKStride, Tr::kThreads>(sK, static_cast<const T*>(p.k) + (bh * p.M + j0) * D, cols_valid);
  load_rows<kBN, D, Tr::kKStride, Tr::kThreads>(sV, static_cast<const T*>(p.v) + (bh * p.M + j0) * D, cols_valid);

  // dK / dV of keys j0 + warp * kKeys + kk, head-dim slice lane + 32 t.
  float dk_acc[kKeys][kDpl], dv_acc[kKeys][kDpl];
#pragma unroll
  for (int kk = 0; kk < kKeys; ++kk)
#pragma unroll
    for (int t = 0; t < kDpl; ++t) dk_acc[kk][t] = dv_acc[kk][t] = 0.f;

  const ReasoningSpec& rs = p.reasoning;
  const bool hard_region = !rs.stop_grad && rs.on_head(h);  // block-uniform

  // Under causality query i sees key j0 iff j0 <= i + shift: earlier query tiles see none of
  // this key tile and are never visited.
  int64_t i_begin = 0;
  if (p.causal && j0 - p.shift > 0) i_begin = (j0 - p.shift) / kBM * kBM;

  const int64_t j = j0 + lane;  // this lane's key in the P/dS step
  const float* k_row = sK + lane * Tr::kKStride;
  const float* v_row = sV + lane * Tr::kKStride;

  for (int64_t i0 = i_begin; i0 < p.N; i0 += kBM) {
    const int64_t rows_valid = p.N - i0 < kBM ? p.N - i0 : kBM;
    if (hard_region && rs.tile_inside_region(i0 + p.shift, i0 + rows_valid - 1 + p.shift, j0, j_last))
      continue;  // block-uniform, so the barriers below stay matched

    __syncthreads();  // all warps are done with the previous query tile (and K/V are loaded)
    load_rows<kBM, D, Tr::kQStride, Tr::kThreads>(sQ, q + i0 * D, rows_valid);
    load_rows<kBM, D, Tr::kQStride, Tr::kThreads>(sdO, dout + i0 * D, rows_valid);
    for (int r = threadIdx.x; r < kBM; r += Tr::kThreads) {
      sLse[r] = r < rows_valid ? lse[i0 + r] : kNegInf;  // padding rows act as fully masked
      sDsum[r] = r < rows_valid ? dsum[i0 + r] : 0.f;
    }
    __syncthreads();

    // 1. s = q_i . k_j and dp = dO_i . v_j for this warp's rows i and this lane's key j.
    float s[kRows], dp[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
      const float k0 = k_row[d], k1 = k_row[d + 1], k2 = k_row[d + 2], k3 = k_row[d + 3];
      const float v0 = v_row[d], v1 = v_row[d + 1], v2 = v_row[d + 2], v3 = v_row[d + 3];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int rr = warp * kRows + r;
        const float4 qv = *reinterpret_cast<const float4*>(sQ + rr * Tr::kQStride + d);
        const float4 gv = *reinterpret_cast<const float4*>(sdO + rr * Tr::kQStride + d);
        s[r] = fmaf(qv.x, k0, fmaf(qv.y, k1, fmaf(qv.z, k2, fmaf(qv.w, k3, s[r]))));
        dp[r] = fmaf(gv.x, v0, fmaf(gv.y, v1, fmaf(gv.z, v2, fmaf(gv.w, v3, dp[r]))));
      }
    }

    // 2. P, dS and the three factor-weighted copies.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int rr = warp * kRows + r;
      const int64_t i = i0 + rr;
      const float lse_i = sLse[rr];
      // lse_i == -inf: the row saw no allowed key; its P is 0 (and exp(s - lse) would be inf).
      const bool ok = i < p.N && j < p.M && lse_i != kNegInf &&
                      forward_allows(b, h, i, j, p.causal, p.shift, p.attn_mask, p.key_padding, rs);
      float pv = 0.f, dsk = 0.f, dsq = 0.f;
      if (ok) {
        const float prob = expf(s[r] * p.scale - lse_i);
        const float ds = prob * (dp[r] - sDsum[rr]);
        const int64_t i_abs = i + p.shift;
        const float region = reasoning_kv_factor<float>(rs, h, i_abs, j);
        pv = stop_factor_at<float>(p.v_stop, p.v_stop.offset(b, h, i, j)) * region * prob;
        dsk = stop_factor_at<float>(p.k_stop, p.k_stop.offset(b, h, i, j)) * region * ds;
        dsq = stop_factor_at<float>(p.q_stop, p.q_stop.offset(b, h, i, j)) * ds;
      }
      sPv[rr * kBN + lane] = pv;
      sdSk[rr * kBN + lane] = dsk;
      sdSq[rr * kBN + lane] = dsq;
    }
    __syncthreads();  // the dK/dV step reads every row of the three tiles

    // 3. dV_j += sum_i (Fv P)_ij dO_i and dK_j += sum_i (Fk dS)_ij q_i for this warp's keys.
    for (int rr = 0; rr < kBM; ++rr) {
      float qd[kDpl], gd[kDpl];
#pragma unroll
      for (int t = 0; t < kDpl; ++t) {
        qd[t] = sQ[rr * Tr::kQStride + lane + kWarpSize * t];
        gd[t] = sdO[rr * Tr::kQStride + lane + kWarpSize * t];
      }
#pragma unroll
      for (int kk = 0; kk < kKeys; ++kk) {
        const int c = warp * kKeys + kk;
        const float pv = sPv[rr * kBN + c], dsk = sdSk[rr * kBN + c];  // warp-wide broadcasts
#pragma unroll
        for (int t = 0; t < kDpl; ++t) {
          dv_acc[kk][t] = fmaf(pv, gd[t], dv_acc[kk][t]);
          dk_acc[kk][t] = fmaf(dsk, qd[t], dk_acc[kk][t]);
        }
      }
    }

    // 4. dQ_i += scale * sum_j (Fq dS)_ij k_j for this warp's rows, added into the fp32 buffer.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int rr = warp * kRows + r;
      if (rr >= rows_valid) continue;  // warp-uniform
      float dq[kDpl];
#pragma unroll
      for (int t = 0; t < kDpl; ++t) dq[t] = 0.f;
#pragma unroll 4
      for (int c = 0; c < kBN; ++c) {
        const float dsq = sdSq[rr * kBN + c];
#pragma unroll
        for (int t = 0; t < kDpl; ++t) dq[t] = fmaf(dsq, sK[c * Tr::kKStride + lane + kWarpSize * t], dq[t]);
      }
#pragma unroll
      for (int t = 0; t < kDpl; ++t)
        atomicAdd(dq_accum + (i0 + rr) * D + lane + kWarpSize * t, p.scale * dq[t]);
    }
  }

  // Every key of the tile is written, also keys no query could see (their gradients are 0).
  T* dk = static_cast<T*>(p.dk) + (bh * p.M + j0) * D;
  T* dv = static_cast<T*>(p.dv) + (bh * p.M + j0) * D;
#pragma unroll
  for (int kk = 0; kk < kKeys; ++kk) {
    const int c = warp * kKeys + kk;
    if (c >= cols_valid) continue;
#pragma unroll
    for (int t = 0; t < kDpl; ++t) {
      dk[int64_t(c) * D + lane + kWarpSize * t] = from_float<T>(p.scale * dk_acc[kk][t]);
      dv[int64_t(c) * D + lane + kWarpSize * t] = from_float<T>(dv_acc[kk][t]);
    }
  }
}

template <typename T, int D>
cudaError_t launch_attn_bwd_simt(const KernelParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<D>;
  return launch_key_tiles(&attn_bwd_kernel<T, D>, ceil_div(p.M, Tr::kBlockN), Tr::kThreads, Tr::kSmemBytes, p,
                          stream);
}

}  // namespace srt::cuda
