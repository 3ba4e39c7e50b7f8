// The one place where the attention's mask semantics live (SPEC sections 2 and 3).
//
// Everything here is a small inline function on plain integers and pointers so that the
// C++ CPU kernels and the CUDA kernels evaluate exactly the same predicates and factors.
// Nothing in this header allocates: masks are read through their strides (stride 0 for
// broadcast dimensions) and the reasoning pattern is computed from indices.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SRT_HD __host__ __device__ __forceinline__
#else
#define SRT_HD inline
#endif

namespace srt {

// Element type of a mask tensor. kNone means "no mask": every factor is 1 / everything allowed.
enum MaskKind : int32_t { kNone = 0, kBool = 1, kFloat32 = 2, kFloat64 = 3, kBFloat16 = 4, kFloat16 = 5 };

// A (b, h, i, j)-indexed view of a mask tensor broadcast to (B, H, N, M) by strides.
// Key padding masks use the same struct with sh = si = 0.
struct MaskView {
  const void* ptr = nullptr;
  int32_t kind = kNone;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;

  SRT_HD bool present() const { return kind != kNone; }
  // The (b, h, i) part of offset(): kernels that walk the keys of a row compute it once.
  SRT_HD int64_t row_offset(int64_t b, int64_t h, int64_t i) const { return b * sb + h * sh + i * si; }
  SRT_HD int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return row_offset(b, h, i) + j * sj;
  }
};

SRT_HD float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  // memcpy-free type pun that both nvcc and gcc accept for trivially copyable types
  union { uint32_t u; float f; } cvt;
  cvt.u = u;
  f = cvt.f;
  return f;
}

SRT_HD float half_bits_to_float(uint16_t h) {
  // IEEE binary16 -> binary32, exact for all inputs (normals, subnormals, inf, nan).
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  union { uint32_t u; float f; } cvt;
  cvt.u = bits;
  return cvt.f;
}

// Pass-through factor of a bool stop mask at one element: True = stop (0), False = pass (1).
// (Kernels that know every mask is bool call this directly, without stop_factor_at's switch.)
template <typename acc_t>
SRT_HD acc_t bool_stop_factor(const bool* m, int64_t off) {
  return m[off] ? acc_t(0) : acc_t(1);
}

// Pass-through factor F of a stop-gradient mask at one element (SPEC 2):
// bool True = stop (0), bool False = pass (1); floating masks are the factor itself; no mask = 1.
template <typename acc_t>
SRT_HD acc_t stop_factor_at(const MaskView& m, int64_t off) {
  switch (m.kind) {
    case kBool: return bool_stop_factor<acc_t>(static_cast<const bool*>(m.ptr), off);
    case kFloat32: return static_cast<acc_t>(static_cast<const float*>(m.ptr)[off]);
    case kFloat64: return static_cast<acc_t>(static_cast<const double*>(m.ptr)[off]);
    case kBFloat16: return static_cast<acc_t>(bf16_bits_to_float(static_cast<const uint16_t*>(m.ptr)[off]));
    case kFloat16: return static_cast<acc_t>(half_bits_to_float(static_cast<const uint16_t*>(m.ptr)[off]));
    default: return acc_t(1);
  }
}

// attn_mask and key padding (always bool): True = may attend.
SRT_HD bool bool_allow_at(const bool* m, int64_t off) { return m[off]; }

// The same through a MaskView; an absent mask allows everything.
SRT_HD bool allow_at(const MaskView& m, int64_t off) {
  return m.kind == kNone || bool_allow_at(static_cast<const bool*>(m.ptr), off);
}

// ---------------------------------------------------------------------------------------------
// Causality (bottom-right aligned, as FlashAttention): key j is visible to query i iff
// j <= i + (m - n). `shift` is m - n.
// causal_key_end(i, shift) is the first key in query i's future: kernels that walk a row's keys
// compare with it once per key, or clip their key range to it.
SRT_HD int64_t causal_key_end(int64_t i, int64_t shift) { return i + shift + 1; }
SRT_HD bool causal_allows(int64_t i, int64_t j, int64_t shift) { return j < causal_key_end(i, shift); }

// ---------------------------------------------------------------------------------------------
// The reasoning-token pattern (SPEC 3), evaluated from absolute positions.
// A sequence of L real tokens with R reasoning tokens after each becomes L*(R+1) positions;
// position p has step p / (R+1) and is a reasoning token iff p % (R+1) != 0.
struct ReasoningSpec {
  int64_t num_reason = 0;     // R; 0 disables the pattern (no position is a reasoning token)
  int64_t window = 0;         // W = num_steps_future_can_use_reason
  bool stop_grad = true;      // true: stop k/v gradients on the region; false: mask the region out
  const bool* heads = nullptr;  // optional (H,) flags: the pattern applies only where heads[h]

  SRT_HD bool active() const { return num_reason > 0; }
  SRT_HD bool on_head(int64_t h) const { return active() && (heads == nullptr || heads[h]); }
  SRT_HD int64_t step(int64_t p) const { return p / (num_reason + 1); }
  SRT_HD bool is_reason(int64_t p) const { return p % (num_reason + 1) != 0; }

  // region(i, j) for absolute query position qi and key position j.
  SRT_HD bool region(int64_t qi, int64_t j) const {
    if (!active() || !is_reason(j)) return false;
    const int64_t si = step(qi), sj = step(j);
    return si > sj && si - window <= sj;
  }

  // True when every (qi, j) with qi in [qa, qb] and j in [ja, jb] (inclusive, absolute query
  // positions) lies inside the region: then hard mode can skip the whole tile.
  SRT_HD bool tile_inside_region(int64_t qa, int64_t qb, int64_t ja, int64_t jb) const {
    if (!active() || ja > jb || qa > qb) return false;
    const int64_t sj = step(ja);
    if (step(jb) != sj) return false;                  // all keys in one step...
    if (!is_reason(ja)) return false;                  // ...and none is that step's real token
    // step(qi) is monotone in qi, so the extremes decide.
    return step(qa) > sj && step(qb) - window <= sj;
  }
};

// forward_allows without the reasoning pattern, for a kernel that walks the keys j of one row i
// and has computed the masks' row offsets once (attn_row = attn_mask.row_offset(b, h, i),
// padding_row = key_padding.row_offset(b, h, i)).
SRT_HD bool forward_allows_in_row(int64_t i, int64_t j, bool causal, int64_t shift,
                                  const MaskView& attn_mask, int64_t attn_row,
                                  const MaskView& key_padding, int64_t padding_row) {
  if (causal && !causal_allows(i, j, shift)) return false;
  if (!allow_at(key_padding, padding_row + j * key_padding.sj)) return false;
  return allow_at(attn_mask, attn_row + j * attn_mask.sj);
}

// Is (i, j) allowed in the forward attention? i is the query row index (0..n-1), j the key index.
// The reasoning pattern only masks in hard mode; in stop-grad mode it only changes factors.
SRT_HD bool forward_allows(int64_t b, int64_t h, int64_t i, int64_t j, bool causal, int64_t shift,
                           const MaskView& attn_mask, const MaskView& key_padding,
                           const ReasoningSpec& rs) {
  if (!forward_allows_in_row(i, j, causal, shift, attn_mask, attn_mask.row_offset(b, h, i), key_padding,
                             key_padding.row_offset(b, h, i)))
    return false;
  return !(!rs.stop_grad && rs.on_head(h) && rs.region(i + shift, j));
}

// Extra k/v factor from the pattern in stop-grad mode: 0 on the region, else 1.
template <typename acc_t>
SRT_HD acc_t reasoning_kv_factor(const ReasoningSpec& rs, int64_t h, int64_t qi_abs, int64_t j) {
  return (rs.stop_grad && rs.on_head(h) && rs.region(qi_abs, j)) ? acc_t(0) : acc_t(1);
}

}  // namespace srt

namespace srt {

// For an absolute query position qi, the keys j that can be in the region form the half-open
// range [*lo, *hi) (whole steps qi's step - W .. qi's step - 1); inside it only reasoning
// positions (is_reason(j)) are in the region. Lets kernels visit the region row by row without
// testing every key.
SRT_HD void region_key_range(const ReasoningSpec& rs, int64_t qi, int64_t* lo, int64_t* hi) {
  if (!rs.active()) { *lo = 0; *hi = 0; return; }
  const int64_t period = rs.num_reason + 1;
  const int64_t si = rs.step(qi);
  const int64_t first = si > rs.window ? si - rs.window : 0;  // (no si - window overflow for a huge W)
  *lo = first * period;
  *hi = si * period;
  if (*hi < *lo) *hi = *lo;
}

// ReasoningSpec::region(qi, j) for a key j whose is_reason(j) the caller already knows, with
// [lo, hi) = region_key_range(rs, qi): kernels evaluate is_reason once per key column and the
// range once per row, instead of the divisions of region() per element.
// (Any integer type: a kernel may pass j, lo and hi relative to its tile, clipped to it.)
template <typename Index>
SRT_HD bool region_in_range(bool key_is_reason, Index j, Index lo, Index hi) {
  return key_is_reason && j >= lo && j < hi;
}

// Conservative tile test for kernels that skip per-element work: false only when no pair (qi, j)
// with absolute query position qi in [qa, qb] and key j in [ja, jb] lies in the region. Both ends
// of region_key_range grow with qi, so the rows' ranges all lie inside [lo(qa), hi(qb)).
SRT_HD bool tile_may_touch_region(const ReasoningSpec& rs, int64_t qa, int64_t qb, int64_t ja, int64_t jb) {
  if (!rs.active() || rs.window <= 0 || qa > qb || ja > jb) return false;
  int64_t lo_a, hi_a, lo_b, hi_b;
  region_key_range(rs, qa, &lo_a, &hi_a);
  region_key_range(rs, qb, &lo_b, &hi_b);
  return lo_a <= jb && hi_b > ja;
}

}  // namespace srt
