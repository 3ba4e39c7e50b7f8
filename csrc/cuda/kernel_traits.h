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

// Backward preprocessing (dsum = rowsum(dO * O)): one warp per row.
constexpr int kDsumWarps = 4;

}  // namespace srt::cuda
