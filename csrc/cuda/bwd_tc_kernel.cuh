// Tensor-core backward for float16 / bfloat16 (FlashAttention-2 style), the math of SPEC 2 as
// written at the top of bwd_kernel.cuh:
//   P = exp(scale * Q K^T - lse) on allowed pairs;  dS = P * (dO V^T - dsum)
//   dV += (Fv P)^T dO;  dK += scale (Fk dS)^T Q;  dQ += scale (Fq dS) K
// with the v-factor applied to P before the dV product and the q- and k-factors applied to
// separate copies of dS before the dQ and dK products.
//
// One block of 8 warps per (batch, head, key tile of kBlockN = 64 or 128 keys; the host picks,
// BwdTcTraits); dK and dV of the tile stay in registers while the block walks the query tiles of
// 64 rows that can see it (causally earlier tiles are never visited; hard-mode tiles entirely
// inside the reasoning region are skipped).
// The next query tile's Q and dO are copied (cp.async, two buffers) while the current one is
// computed. Per query tile, for each 64-key chunk of the key tile in turn: S and dP (mma from
// Q, K, dO, V tiles in shared memory), then P, dS and the three factor-weighted copies in the
// input type into shared memory (one chunk at a time keeps the S and dP accumulators at 32
// registers per lane whatever the tile width); then, over the whole key tile, the dV/dK
// products (their A operands read transposed with ldmatrix.trans) and this tile's share of dQ,
// added atomically (float2) into the fp32 dQ buffer of the block's round (one shared by every
// key tile, or one per tile of the deterministic schedule's rounds: KernelParams::round_tiles,
// bwd_block_tile). Warp roles are in BwdTcTraits (kernel_traits.h).
//
// Masks and factors are evaluated per element only on tiles where something can mask or stop
// (dense masks, stop masks, the causal diagonal, the reasoning region, ragged tiles); the
// predicates and factors are those of mask_semantics.h, as everywhere else.
#pragma once

#include "fwd_tc_kernel.cuh"  // fragment address helpers, kLog2e
#include "kernel_params.h"
#include "kernel_traits.h"
#include "ptx.cuh"
#include "tile_utils.cuh"

#include <type_traits>

namespace srt::cuda {

template <typename T, int D, int kBlockN>
__global__ void __launch_bounds__(BwdTcTraits<D, kBlockN>::kThreads, 1) attn_bwd_tc_kernel(const KernelParams p) {
  using Tr = BwdTcTraits<D, kBlockN>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kS = Tr::kStride, kPS = Tr::kPStride;
  constexpr int kChunkN = 64;             // keys per chunk of the S/dP step (2 warp columns x 32)
  constexpr int kChunks = kBN / kChunkN;  // chunks per key tile
  constexpr int kKM = kBN / 4 / 16;       // 16-key m-tiles per warp in the dK/dV step (kBN / 4 keys)
  constexpr int kHalfD = D / 2;           // head dims per warp in the dK/dV and dQ steps
  constexpr int kDTiles = kHalfD / 8;     // their 8-dim n-tiles
  static_assert(kDTiles % 2 == 0, "n-tiles are loaded in pairs");
  static_assert(kBN % kChunkN == 0 && 8 * kChunks <= 32, "reason_cols holds 8 bits per chunk");

  extern __shared__ float4 smem_f4[];
  T* sQdO = reinterpret_cast<T*>(smem_f4);  // 2 buffers x (Q, dO), each kBM x kS
  T* sK = sQdO + 4 * kBM * kS;              // kBN x kS
  T* sV = sK + kBN * kS;                    // kBN x kS
  T* sPv = sV + kBN * kS;                 // kBM x kPS: Fv * P          ([query][key])
  T* sdSk = sPv + kBM * kPS;              // kBM x kPS: Fk * dS
  T* sdSq = sdSk + kBM * kPS;             // kBM x kPS: Fq * dS

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int wm = warp % 4, wn = warp / 4;

  const BwdBlockTile bt = bwd_block_tile(p, kBN, D);
  if (bt.valid == 0) return;  // past the last key tile (deterministic schedule; the whole block)
  const int64_t bh = bt.bh, b = bt.b, h = bt.h, j0 = bt.start, cols_valid = bt.valid, j_last = bt.last;

  float* dq_accum = bt.dq;  // this block's (N, D) fp32 dQ buffer
  const T* q = static_cast<const T*>(p.q) + bh * p.N * D;
  const T* dout = static_cast<const T*>(p.dout) + bh * p.N * D;
  // this lane's rows 16 wm + g (+ 8) of query tile i0 are lse_lane[i0] (and [i0 + 8])
  const float* lse_lane = p.lse + bh * p.N + wm * 16 + g;
  const float* dsum_lane = p.dsum + bh * p.N + wm * 16 + g;

  load_tile_async<kBN, D, kS, Tr::kThreads>(sK, static_cast<const T*>(p.k) + (bh * p.M + j0) * D, cols_valid);
  load_tile_async<kBN, D, kS, Tr::kThreads>(sV, static_cast<const T*>(p.v) + (bh * p.M + j0) * D, cols_valid);
  cp_async_commit();

  // dK / dV of keys [kBN/4 wm + 16 km, +16) and head dims [kHalfD wn, +kHalfD): C fragments.
  float dk_acc[kKM][kDTiles][4], dv_acc[kKM][kDTiles][4];
#pragma unroll
  for (int km = 0; km < kKM; ++km)
#pragma unroll
    for (int n = 0; n < kDTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk_acc[km][n][e] = dv_acc[km][n][e] = 0.f;

  const ReasoningSpec& rs = p.reasoning;
  const bool hard_region = !rs.stop_grad && rs.on_head(h);          // block-uniform
  const bool soft_region = rs.stop_grad && rs.on_head(h);           // k/v factor 0 on the region
  const bool dense_masks = p.attn_mask.present() || p.key_padding.present();
  const bool stop_masks = p.q_stop.present() || p.k_stop.present() || p.v_stop.present();
  const float scale_log2 = p.scale * kLog2e;

  // Which of this lane's 8 keys per chunk of the S/dP step (j0 + 64 ch + 32 wn + 8 n + 2 t + c,
  // bit 8 ch + 2 n + c) are reasoning positions: fixed for the block. With each row's
  // region_key_range, the region test per element (stop-grad or hard mode) is then a bit test
  // and a range check (region_in_range), the same predicate as ReasoningSpec::region without its
  // divisions.
  uint32_t reason_cols = 0;
  if (soft_region || hard_region) {
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch)
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (rs.is_reason(j0 + ch * kChunkN + wn * 32 + n * 8 + 2 * t + c)) reason_cols |= 1u << (8 * ch + 2 * n + c);
  }
  // Every stop mask is bool and every mask has unit key stride (the usual case: contiguous
  // (n, m), (h, n, m) or (b, h, n, m) masks, broadcast or not): the general P/dS step then reads
  // them through one pointer per row at fixed per-lane offsets, without stop_factor_at's switch
  // on the mask type and without 64-bit offset arithmetic per element (block-uniform).
  auto bool_rows = [](const MaskView& m) { return !m.present() || (m.kind == kBool && m.sj == 1); };
  const bool bool_masks = bool_rows(p.q_stop) && bool_rows(p.k_stop) && bool_rows(p.v_stop) &&
                          unit_key_stride(p.attn_mask) && unit_key_stride(p.key_padding);

  int64_t i_begin = 0;  // query i sees key j0 iff j0 <= i + shift
  if (p.causal && j0 - p.shift > 0) i_begin = (j0 - p.shift) / kBM * kBM;
  // First query tile at or after i0 that is not skipped (hard mode; block-uniform).
  auto next_tile = [&](int64_t i0) {
    for (; i0 < p.N; i0 += kBM) {
      const int64_t i_last = (i0 + kBM < p.N ? i0 + kBM : p.N) - 1;
      if (!(hard_region && rs.tile_inside_region(i0 + p.shift, i_last + p.shift, j0, j_last))) break;
    }
    return i0;
  };
  // Q and dO of query tile i0 into buffer `buf`, asynchronously (the caller commits).
  auto load_q_do = [&](int64_t i0, int buf) {
    const int64_t rows = p.N - i0 < kBM ? p.N - i0 : kBM;
    load_tile_async<kBM, D, kS, Tr::kThreads>(sQdO + (2 * buf) * kBM * kS, q + i0 * D, rows);
    load_tile_async<kBM, D, kS, Tr::kThreads>(sQdO + (2 * buf + 1) * kBM * kS, dout + i0 * D, rows);
  };

  int64_t i0 = next_tile(i_begin);
  if (i0 < p.N) load_q_do(i0, 0);
  cp_async_commit();  // second group: the first Q/dO tile
  for (int buf = 0; i0 < p.N; buf ^= 1) {
    const int64_t rows_valid = p.N - i0 < kBM ? p.N - i0 : kBM;
    const int64_t i_last = i0 + rows_valid - 1;
    const T* sQ = sQdO + (2 * buf) * kBM * kS;
    const T* sdO = sQdO + (2 * buf + 1) * kBM * kS;

    __syncthreads();  // every warp is done with the previous tile (its Q/dO buffer, P/dS tiles)
    const int64_t i_next = next_tile(i0 + kBM);
    if (i_next < p.N) load_q_do(i_next, buf ^ 1);  // prefetch while this tile is computed
    cp_async_commit();  // possibly empty: keeps the group count uniform
    // lse (log2 domain) and dsum of this lane's rows 16 wm + g (+ 8), in registers: their loads
    // are in flight while the S/dP products run. Padding rows act as fully masked.
    float lse_r[2], dsum_r[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int rr = wm * 16 + g + 8 * r;
      lse_r[r] = rr < rows_valid ? lse_lane[i0 + 8 * r] * kLog2e : kNegInf;
      dsum_r[r] = rr < rows_valid ? dsum_lane[i0 + 8 * r] : 0.f;
    }
    cp_async_wait<1>();  // this tile's Q/dO (and K/V) have landed
    __syncthreads();

#pragma unroll 1
    for (int ch = 0; ch < kChunks; ++ch) {
      const int kc0 = ch * kChunkN;   // the chunk's first key in the tile
      const int64_t jc0 = j0 + kc0;   // ... and in the sequence
      // 1. S = Q K^T and dP = dO V^T: rows [16 wm, +16) x keys [kc0 + 32 wn, +32) (4 key n-tiles).
      float s[4][4], dp[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t qa[4], ga[4];
        ldmatrix_x4(qa, a_frag_row(sQ + wm * 16 * kS + ks * 16, kS, lane));
        ldmatrix_x4(ga, a_frag_row(sdO + wm * 16 * kS + ks * 16, kS, lane));
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t kb[4], vb[4];
          ldmatrix_x4(kb, bt_frag_row(sK + (kc0 + wn * 32 + np * 16) * kS + ks * 16, kS, lane));
          ldmatrix_x4(vb, bt_frag_row(sV + (kc0 + wn * 32 + np * 16) * kS + ks * 16, kS, lane));
          const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
          const uint32_t v0[2] = {vb[0], vb[1]}, v1[2] = {vb[2], vb[3]};
          mma_16816<T>(s[2 * np], qa, k0);
          mma_16816<T>(s[2 * np + 1], qa, k1);
          mma_16816<T>(dp[2 * np], ga, v0);
          mma_16816<T>(dp[2 * np + 1], ga, v1);
        }
      }

      // 2. P, dS and the factor-weighted copies, two adjacent keys (one register) at a time, in
      //    one of four instantiations chosen per chunk (block-uniform), so that a chunk carries
      //    only the per-element code it needs:
      //    - kPlain: nothing can mask or stop inside the chunk (no predicate code at all);
      //    - kRegionOnly: only the stop-grad region can stop gradients here (the reasoning pattern
      //      in stop-grad mode, no masks, not on the diagonal): a bit test and a range check;
      //    - kBoolMasks / kGeneral: everything else (dense masks, stop masks, the causal
      //      diagonal, hard mode, a ragged last tile), element by element with the predicates of
      //      mask_semantics.h. kBoolMasks (see bool_masks) clips the row's keys to causality and
      //      the ragged edge once per row and reads each mask at fixed offsets from a per-row
      //      pointer; kGeneral (floating factors, other key strides) computes each mask's row
      //      offset once per row and goes through stop_factor_at.
      const int64_t jc_last = jc0 + kChunkN - 1;
      const bool ragged = cols_valid < kc0 + kChunkN;
      const bool crosses_diagonal = p.causal && jc_last > i0 + p.shift;
      const bool region = (hard_region || soft_region) &&
                          tile_may_touch_region(rs, i0 + p.shift, i_last + p.shift, jc0, jc_last);
      const bool check = dense_masks || ragged || crosses_diagonal || (hard_region && region);
      const bool soft_tile = soft_region && region;
      const bool factors = stop_masks || soft_tile;
      enum { kPlain, kRegionOnly, kBoolMasks, kGeneral };
      auto p_and_ds = [&](auto mode) {
        constexpr int kMode = decltype(mode)::value;
        const int lane_col = kc0 + wn * 32 + 2 * t;  // this lane's first key in the tile (n = 0, c = 0)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rr = wm * 16 + g + 8 * r;  // row in the tile
          const int64_t i = i0 + rr;
          // Row r's region keys (region_key_range), relative to j0 and clipped to the tile.
          int region_lo = 0, region_hi = 0;
          if (kMode != kPlain && region) {
            int64_t lo, hi;
            region_key_range(rs, i + p.shift, &lo, &hi);
            region_lo = clip_to_tile<kBN>(lo - j0);
            region_hi = clip_to_tile<kBN>(hi - j0);
          }
          // kBoolMasks: the tile's keys [0, visible_end) are inside the ragged edge and not in
          // the row's future (causal_key_end); the masks' pointers at (b, h, i, j0 + lane_col).
          int visible_end = kBN;
          const bool *attn = nullptr, *padding = nullptr, *q_stop = nullptr, *k_stop = nullptr, *v_stop = nullptr;
          // kGeneral: the masks' offsets of row i.
          int64_t attn_row = 0, padding_row = 0, q_row = 0, k_row = 0, v_row = 0;
          if (kMode == kBoolMasks) {
            visible_end = visible_keys<kBN>(cols_valid, p.causal, i, p.shift, j0);
            const int64_t col = j0 + lane_col;
            attn = bool_mask_row(p.attn_mask, b, h, i, col, p.N);
            padding = bool_mask_row(p.key_padding, b, h, i, col, p.N);
            q_stop = bool_mask_row(p.q_stop, b, h, i, col, p.N);
            k_stop = bool_mask_row(p.k_stop, b, h, i, col, p.N);
            v_stop = bool_mask_row(p.v_stop, b, h, i, col, p.N);
          } else if (kMode == kGeneral) {
            attn_row = p.attn_mask.row_offset(b, h, i);
            padding_row = p.key_padding.row_offset(b, h, i);
            q_row = p.q_stop.row_offset(b, h, i);
            k_row = p.k_stop.row_offset(b, h, i);
            v_row = p.v_stop.row_offset(b, h, i);
          }
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            const int cc = lane_col + n * 8;  // first of the two keys in the tile
            float pv[2], dsk[2], dsq[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int jj = cc + c;            // the key in the tile...
              const int64_t j = j0 + jj;        // ... and in the sequence
              const int off = n * 8 + c;        // ... and from the kBoolMasks row pointers
              // ReasoningSpec::region(i + shift, j), as described at reason_cols
              const bool in_region = kMode != kPlain && region &&
                                     region_in_range<int>((reason_cols >> (8 * ch + 2 * n + c)) & 1u, jj, region_lo, region_hi);
              bool ok = lse_r[r] != kNegInf;  // a row with no allowed key (or a padding row) has P = 0
              if (kMode == kBoolMasks && check && ok)  // forward_allows, with the row's keys clipped
                ok = jj < visible_end && (!p.attn_mask.present() || bool_allow_at(attn, off)) &&
                     (!p.key_padding.present() || bool_allow_at(padding, off)) && !(hard_region && in_region);
              if (kMode == kGeneral && check && ok)
                ok = i < p.N && j < p.M &&
                     forward_allows_in_row(i, j, p.causal, p.shift, p.attn_mask, attn_row, p.key_padding, padding_row) &&
                     !(hard_region && in_region);
              const float prob = ok ? exp2_approx(s[n][2 * r + c] * scale_log2 - lse_r[r]) : 0.f;
              const float ds = prob * (dp[n][2 * r + c] - dsum_r[r]);
              float fq = 1.f, fk = 1.f, fv = 1.f;
              if (kMode == kRegionOnly) {  // reasoning_kv_factor
                fk = fv = in_region ? 0.f : 1.f;
              } else if ((kMode == kBoolMasks || kMode == kGeneral) && factors && ok) {
                if (kMode == kBoolMasks) {
                  if (p.q_stop.present()) fq = bool_stop_factor<float>(q_stop, off);
                  if (p.k_stop.present()) fk = bool_stop_factor<float>(k_stop, off);
                  if (p.v_stop.present()) fv = bool_stop_factor<float>(v_stop, off);
                } else {
                  fq = stop_factor_at<float>(p.q_stop, q_row + j * p.q_stop.sj);
                  fk = stop_factor_at<float>(p.k_stop, k_row + j * p.k_stop.sj);
                  fv = stop_factor_at<float>(p.v_stop, v_row + j * p.v_stop.sj);
                }
                if (soft_region && in_region) fk = fv = 0.f;  // reasoning_kv_factor
              }
              pv[c] = fv * prob;
              dsk[c] = fk * ds;
              dsq[c] = fq * ds;
            }
            *reinterpret_cast<uint32_t*>(sPv + rr * kPS + cc) = pack2<T>(pv[0], pv[1]);
            *reinterpret_cast<uint32_t*>(sdSk + rr * kPS + cc) = pack2<T>(dsk[0], dsk[1]);
            *reinterpret_cast<uint32_t*>(sdSq + rr * kPS + cc) = pack2<T>(dsq[0], dsq[1]);
          }
        }
      };
      if (!check && !factors) {
        p_and_ds(std::integral_constant<int, kPlain>{});
      } else if (!check && !stop_masks) {  // factors come from the soft region alone
        p_and_ds(std::integral_constant<int, kRegionOnly>{});
      } else if (bool_masks) {
        p_and_ds(std::integral_constant<int, kBoolMasks>{});
      } else {
        p_and_ds(std::integral_constant<int, kGeneral>{});
      }
    }
    __syncthreads();  // the next steps read every row and key of the three tiles

    // 3. dV += (Fv P)^T dO and dK += (Fk dS)^T Q: keys [kBN/4 wm + 16 km, +16) x dims
    //    [kHalfD wn, +kHalfD). The A operands are the [query][key] tiles read transposed: for a
    //    16-query k-step, matrix i = lane / 8 covers queries 8 (i / 2) and keys 8 (i % 2) of the
    //    m-tile's keys. Each B fragment (dO, Q) serves the warp's kKM key m-tiles. At D = 128 with
    //    128-key tiles (128 accumulator registers per lane) the k-steps stay a loop: unrolled, the
    //    compiler's prefetching of the next k-step's fragments spills accumulators (ptxas -v:
    //    192 bytes per lane, against none as a loop).
    constexpr int kDkvUnroll = (D == 128 && kBN == 128) ? 1 : kBM / 16;
#pragma unroll kDkvUnroll
    for (int ks = 0; ks < kBM / 16; ++ks) {
      uint32_t pa[kKM][4], sa[kKM][4];
#pragma unroll
      for (int km = 0; km < kKM; ++km) {
        const int a_off = (ks * 16 + (lane % 8) + 8 * (lane / 16)) * kPS + (wm * kKM + km) * 16 + 8 * ((lane / 8) % 2);
        ldmatrix_x4_trans(pa[km], sPv + a_off);
        ldmatrix_x4_trans(sa[km], sdSk + a_off);
      }
#pragma unroll
      for (int dpair = 0; dpair < kDTiles / 2; ++dpair) {
        uint32_t gb[4], qb[4];
        const int col = wn * kHalfD + dpair * 16;
        ldmatrix_x4_trans(gb, b_frag_row_trans(sdO + ks * 16 * kS + col, kS, lane));
        ldmatrix_x4_trans(qb, b_frag_row_trans(sQ + ks * 16 * kS + col, kS, lane));
        const uint32_t g0[2] = {gb[0], gb[1]}, g1[2] = {gb[2], gb[3]};
        const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
#pragma unroll
        for (int km = 0; km < kKM; ++km) {
          mma_16816<T>(dv_acc[km][2 * dpair], pa[km], g0);
          mma_16816<T>(dv_acc[km][2 * dpair + 1], pa[km], g1);
          mma_16816<T>(dk_acc[km][2 * dpair], sa[km], q0);
          mma_16816<T>(dk_acc[km][2 * dpair + 1], sa[km], q1);
        }
      }
    }

    // 4. dQ += scale (Fq dS) K for rows [16 wm, +16) x dims [kHalfD wn, +kHalfD).
    float dq[kDTiles][4];
#pragma unroll
    for (int n = 0; n < kDTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      uint32_t da[4];
      ldmatrix_x4(da, a_frag_row(sdSq + wm * 16 * kPS + ks * 16, kPS, lane));
#pragma unroll
      for (int dpair = 0; dpair < kDTiles / 2; ++dpair) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, b_frag_row_trans(sK + ks * 16 * kS + wn * kHalfD + dpair * 16, kS, lane));
        const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
        mma_16816<T>(dq[2 * dpair], da, k0);
        mma_16816<T>(dq[2 * dpair + 1], da, k1);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int rr = wm * 16 + g + 8 * r;
      if (rr >= rows_valid) continue;
      float* dst = dq_accum + (i0 + rr) * D + wn * kHalfD + 2 * t;
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) atomic_add2(dst + n * 8, p.scale * dq[n][2 * r], p.scale * dq[n][2 * r + 1]);
    }
    i0 = i_next;
  }
  cp_async_wait<0>();  // the K/V copies of a block that visited no query tile

  // Every key of the tile is written, also keys no query could see (their gradients are 0).
  T* dk = static_cast<T*>(p.dk) + (bh * p.M + j0) * D;
  T* dv = static_cast<T*>(p.dv) + (bh * p.M + j0) * D;
#pragma unroll
  for (int km = 0; km < kKM; ++km) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int c = (wm * kKM + km) * 16 + g + 8 * r;
      if (c >= cols_valid) continue;
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) {
        const int64_t off = int64_t(c) * D + wn * kHalfD + n * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(dk + off) =
            pack2<T>(p.scale * dk_acc[km][n][2 * r], p.scale * dk_acc[km][n][2 * r + 1]);
        *reinterpret_cast<uint32_t*>(dv + off) = pack2<T>(dv_acc[km][n][2 * r], dv_acc[km][n][2 * r + 1]);
      }
    }
  }
}

template <typename T, int D, int kBlockN>
cudaError_t launch_attn_bwd_tc_tiles(const KernelParams& p, cudaStream_t stream) {
  using Tr = BwdTcTraits<D, kBlockN>;
  return launch_key_tiles(&attn_bwd_tc_kernel<T, D, kBlockN>, ceil_div(p.M, Tr::kBlockN), Tr::kThreads,
                          Tr::kSmemBytes, p, stream);
}

template <typename T, int D>
cudaError_t launch_attn_bwd_tc(const KernelParams& p, cudaStream_t stream) {
  return p.bwd_block_n == 128 ? launch_attn_bwd_tc_tiles<T, D, 128>(p, stream)
                              : launch_attn_bwd_tc_tiles<T, D, 64>(p, stream);
}

}  // namespace srt::cuda
