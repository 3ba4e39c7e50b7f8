// Tile shapes of the CUDA kernels, per head dim, and the shared memory they need.
//
// One place for the numbers so that the host (which checks the shared memory against the
// device before launching) and the kernels agree. Tiles are staged in shared memory as fp32
// whatever the input type, so the sizes do not depend on it.
//
// The lane <-> key mapping used by both kernels needs 32 keys per tile (one per lane), and
// the per-lane slice of a row is D / 32 values, hence D % 32 == 0.
#pragma once

#include <cstddef>

namespace srt::cuda {

constexpr int kWarpSize = 32;

// Forward: one block = kWarps warps = one (batch, head, query tile of kBlockM rows).
// Warp w owns query rows [w * kRowsPerWarp, (w + 1) * kRowsPerWarp) of the tile; in the
// S = Q K^T step lane l computes column l (key j0 + l) of those rows, in the O += P V step
// lane l owns the head-dim slice {l, l + 32, ...} of the same rows.
template <int D>
struct FwdTraits {
  static_assert(D % kWarpSize == 0, "head dim must be a multiple of 32");
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRowsPerWarp = 16;
  static constexpr int kBlockM = kWarps * kRowsPerWarp;  // query rows per block
  static constexpr int kBlockN = kWarpSize;              // keys per tile
  static constexpr int kDimPerLane = D / kWarpSize;
  // fp32 shared memory: Q tile (row stride D), K tile (row stride D + 1: lane l reads row l,
  // so the pad puts the 32 lanes in 32 different banks), V tile (row stride D), and each
  // warp's P rows.
  static constexpr int kQStride = D;
  static constexpr int kKStride = D + 1;
  static constexpr int kVStride = D;
  static constexpr size_t kSmemFloats = size_t(kBlockM) * kQStride + size_t(kBlockN) * kKStride +
                                        size_t(kBlockN) * kVStride +
                                        size_t(kWarps) * kRowsPerWarp * kBlockN;
  static constexpr size_t kSmemBytes = kSmemFloats * sizeof(float);
};

// Backward: one block = kWarps warps = one (batch, head, key tile of kBlockN keys), looping
// over query tiles of kBlockM rows.
// - P/dS step: warp w owns query rows [w * kRowsPerWarp, ...) of the query tile, lane l key l.
// - dK/dV step: warp w owns keys [w * kKeysPerWarp, ...) of the key tile, lane l the head-dim
//   slice {l, l + 32, ...}; the accumulators stay in registers across all query tiles.
// - dQ step: warp w owns the same query rows as in the P/dS step, lane l the head-dim slice.
template <int D>
struct BwdTraits {
  static_assert(D % kWarpSize == 0, "head dim must be a multiple of 32");
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockN = kWarpSize;                 // keys per block
  static constexpr int kBlockM = 32;                        // query rows per inner iteration
  static constexpr int kRowsPerWarp = kBlockM / kWarps;     // P/dS and dQ steps
  static constexpr int kKeysPerWarp = kBlockN / kWarps;     // dK/dV step
  static constexpr int kDimPerLane = D / kWarpSize;
  static_assert(kBlockM % kWarps == 0 && kBlockN % kWarps == 0, "tiles must split over warps");
  // fp32 shared memory: K and V tiles (row stride D + 1, read by lane = key), Q and dO tiles
  // (row stride D), the three factor-weighted tiles Fv*P, Fk*dS, Fq*dS (kBlockM x kBlockN),
  // and the query tile's lse and D values.
  static constexpr int kKStride = D + 1;
  static constexpr int kQStride = D;
  static constexpr size_t kSmemFloats = 2 * size_t(kBlockN) * kKStride +
                                        2 * size_t(kBlockM) * kQStride +
                                        3 * size_t(kBlockM) * kBlockN + 2 * size_t(kBlockM);
  static constexpr size_t kSmemBytes = kSmemFloats * sizeof(float);
};

// Tensor-core kernels (float16 / bfloat16; fwd_tc_kernel.cuh, bwd_tc_kernel.cuh): tiles are
// staged in shared memory in the input type, each row padded by 8 elements (16 bytes) so that
// the 8 row addresses of one ldmatrix fall into 8 different 16-byte bank groups for every
// supported head dim. All matrix products are m16n8k16 mma.sync tiles (ptx.cuh).
constexpr int kTcPad = 8;

// Forward: one block = kBlockM / 16 warps = one (batch, head, query tile of kBlockM rows); warp w
// owns rows [16 w, 16 w + 16) for the whole key loop (Q fragments, S, P and the O accumulator stay
// in registers). Shared memory: the Q tile and one K and one V tile of kBlockN keys.
// kBlockM is 64 (4 warps, two blocks per SM) or 128 (8 warps, one block per SM: each K/V tile
// serves twice the rows, halving the K/V traffic from L2 per FLOP); both are compiled and the host
// picks one per call (KernelParams::fwd_block_m).
template <int D, int kBlockM_ = 64>
struct FwdTcTraits {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kBlockM_ == 64 || kBlockM_ == 128, "64 or 128 query rows per block");
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  // Keys per tile: 128 while the S tile (kBlockN / 2 fp32 registers per lane) and the O
  // accumulator (D / 2) fit the register file together, 64 for the larger head dims.
  static constexpr int kBlockN = D <= 64 ? 128 : 64;
  static constexpr int kStride = D + kTcPad;  // elements per shared row
  static constexpr size_t kSmemBytes = size_t(kBlockM + 2 * kBlockN) * kStride * 2;
};

// Backward: one block = 8 warps = one (batch, head, key tile of kBlockN keys), looping over query
// tiles of 64 rows. kBlockN is 64 or 128 (both compiled; the host picks one per call,
// KernelParams::bwd_block_n): 128 keys halve, per FLOP, the Q/dO tile reads and the fp32 dQ
// atomics (64 x D per query tile and block either way) at twice the dK/dV registers
// (kBlockN * D / 128 per lane) and more shared memory. Warp w = (wm, wn) = (w % 4, w / 4):
// - S / dP step, per 64-key chunk of the tile in turn: query rows [16 wm, +16) x keys
//   [32 wn, +32) of the chunk;
// - dK / dV step: keys [kBlockN/4 wm, +kBlockN/4) x head dims [D/2 wn, +D/2) (accumulators in
//   registers);
// - dQ step: query rows [16 wm, +16) x head dims [D/2 wn, +D/2), added atomically.
// Shared memory: two buffers of Q and dO tiles (the next query tile loads while the current one
// is computed), K and V tiles; the three factor-weighted 64 x kBlockN tiles Fv*P, Fk*dS, Fq*dS
// in the input type. (Each lane keeps the lse and D values of its two rows in registers.)
template <int D, int kBlockN_ = 64>
struct BwdTcTraits {
  static_assert(D % 32 == 0, "head dim must be a multiple of 32 (two warps split it in 8-wide n-tiles)");
  static_assert(kBlockN_ == 64 || kBlockN_ == 128, "64 or 128 keys per block");
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStride = D + kTcPad;
  static constexpr int kPStride = kBlockN + kTcPad;
  static constexpr size_t kSmemBytes = size_t(4 * kBlockM + 2 * kBlockN) * kStride * 2 +
                                       3 * size_t(kBlockM) * kPStride * 2;
};

// The traits a (T, D) launch uses: fp32 inputs run the fp32 CUDA-core kernels above, float16
// and bfloat16 the tensor-core ones. The host reads shared memory and tile sizes from here.
template <typename T, int D>
struct KernelsFor {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  // the shared memory of the tile variant the host picked (fwd_block_m, bwd_block_n: 64 or 128;
  // float32 has one kernel each way)
  static constexpr size_t fwd_smem_bytes(int fwd_block_m) {
    return !kTensorCores ? FwdTraits<D>::kSmemBytes
           : fwd_block_m == 128 ? FwdTcTraits<D, 128>::kSmemBytes
                                : FwdTcTraits<D, 64>::kSmemBytes;
  }
  static constexpr size_t bwd_smem_bytes(int bwd_block_n) {
    return !kTensorCores ? BwdTraits<D>::kSmemBytes
           : bwd_block_n == 128 ? BwdTcTraits<D, 128>::kSmemBytes
                                : BwdTcTraits<D, 64>::kSmemBytes;
  }
  // the smaller variant: the most blocks a forward launches
  static constexpr int kFwdBlockM = kTensorCores ? FwdTcTraits<D, 64>::kBlockM : FwdTraits<D>::kBlockM;
  static constexpr int kBwdBlockN = kTensorCores ? BwdTcTraits<D, 64>::kBlockN : BwdTraits<D>::kBlockN;
  // the keys per backward block of the variant the host picked
  static constexpr int bwd_block_keys(int bwd_block_n) { return kTensorCores ? bwd_block_n : BwdTraits<D>::kBlockN; }
};

// Backward preprocessing (dsum = rowsum(dO * O)): one warp per row.
constexpr int kDsumWarps = 4;

}  // namespace srt::cuda
