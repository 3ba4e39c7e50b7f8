// CPU emulation of csrc/cuda/ptx.cuh: the same functions (namespace srt::cuda), implemented on the
// fiber emulator (stubs/cuda_runtime.h) from the PTX ISA's description of the instructions,
// written independently of csrc/cuda/ptx.cuh so that the two readings of the ISA check each
// other. tests/test_cuda_emulation.py puts this file in place of csrc/cuda/ptx.cuh;
// tests/test_cuda_emulation_ptx.py checks it against torch.
//
// Sources (PTX ISA, "Warp Level Matrix Multiply-Accumulate Instructions"):
// - "Matrix Fragments for mma.m16n8k16 with floating point type", .f16/.bf16 inputs, .f32
//   accumulators. With groupID = %laneid >> 2 and threadID_in_group = %laneid % 4:
//     A (16x16), elements a0..a7, two per .f16x2 register, "low to high" (a0 in the low 16 bits
//       of register 0, a1 in its high 16 bits, a2 low of register 1, ...):
//       row = groupID for a_i with 0 <= i < 2 or 4 <= i < 6, groupID + 8 otherwise
//       col = threadID_in_group * 2 + (i & 1), plus 8 for i >= 4
//     B (16x8), elements b0..b3, two per register:
//       row = threadID_in_group * 2 + (i & 1), plus 8 for i >= 2;  col = groupID
//     C/D (16x8), c0..c3, one per .f32 register:
//       row = groupID for i < 2, groupID + 8 otherwise;  col = threadID_in_group * 2 + (i & 1)
// - "Warp-level matrix load instruction: ldmatrix", .m8n8, .b16, .x4: the addresses of threads
//   0-7 are the 8 rows of matrix 0, threads 8-15 those of matrix 1, 16-23 matrix 2, 24-31
//   matrix 3 (each row 16 bytes, 16-byte aligned); destination register i holds the thread's
//   fragment of matrix i; "a group of four threads loads an entire row": thread l gets row l / 4,
//   elements 2 (l % 4) and 2 (l % 4) + 1 (low, high). With .trans the matrix is "loaded in
//   column-major format": the 8 addressed 16-byte rows are the matrix's columns, so thread l
//   gets elements l / 4 of the rows addressed by threads 2 (l % 4) and 2 (l % 4) + 1 (low, high).
// - cp.async (.cg, 16 bytes, src-size 0 or 16: src-size < cp-size zero-fills the rest),
//   cp.async.commit_group (batches this thread's uncommitted copies into a new, possibly empty
//   group), cp.async.wait_group N (waits until all but the N most recent committed groups are
//   complete; copies not yet committed are not waited for). Implemented in emu_runtime.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace srt::cuda {
namespace ptx_emu {

template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  static constexpr const char* kMmaOp = "mma_16816<__half>";
  static float to_float(uint16_t bits) { __half h; h.bits = bits; return __half2float(h); }
  static uint16_t from_float(float x) { return __float2half_rn(x).bits; }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr const char* kMmaOp = "mma_16816<__nv_bfloat16>";
  static float to_float(uint16_t bits) { __nv_bfloat16 h; h.bits = bits; return __bfloat162float(h); }
  static uint16_t from_float(float x) { return __float2bfloat16_rn(x).bits; }
};

inline uint16_t half_of(uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu); }

// Positions of the fragment elements (the PTX formulas above).
inline void a_pos(int lane, int i, int& row, int& col) {
  const int g = lane >> 2, t = lane & 3;
  row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
inline void b_pos(int lane, int i, int& row, int& col) {
  const int g = lane >> 2, t = lane & 3;
  row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  col = g;
}
inline void c_pos(int lane, int i, int& row, int& col) {
  const int g = lane >> 2, t = lane & 3;
  row = i < 2 ? g : g + 8;
  col = t * 2 + (i & 1);
}

struct MmaSlot {
  uint32_t a[4];
  uint32_t b[2];
  float d[4];
};
static_assert(sizeof(MmaSlot) <= emu::kWarpSlotBytes, "mma slot");

// Runs once per warp-wide mma, when all 32 lanes have deposited their registers: rebuilds A and
// B from the fragments, then writes every lane's D = A B + C (products and sums in double,
// rounded once to float) into its slot.
template <typename T>
void mma_complete(emu::WarpSlots& s, int warp) {
  double A[16][16], B[16][8];
  unsigned char seen_a[16][16] = {}, seen_b[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const auto* in = reinterpret_cast<const MmaSlot*>(s.lane[lane]);
    for (int i = 0; i < 8; ++i) {
      int r, c;
      a_pos(lane, i, r, c);
      A[r][c] = Elem<T>::to_float(half_of(in->a[i / 2], i & 1));
      ++seen_a[r][c];
    }
    for (int i = 0; i < 4; ++i) {
      int r, c;
      b_pos(lane, i, r, c);
      B[r][c] = Elem<T>::to_float(half_of(in->b[i / 2], i & 1));
      ++seen_b[r][c];
    }
  }
  for (int r = 0; r < 16; ++r)  // the layout maps lanes onto the matrices one to one
    for (int c = 0; c < 16; ++c)
      if (seen_a[r][c] != 1 || (c < 8 && seen_b[r][c] != 1)) emu::fail("mma emulation: fragment layout is not a bijection (warp %d)", warp);
  for (int lane = 0; lane < 32; ++lane) {
    auto* io = reinterpret_cast<MmaSlot*>(s.lane[lane]);
    for (int i = 0; i < 4; ++i) {
      int r, c;
      c_pos(lane, i, r, c);
      double acc = io->d[i];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];
      io->d[i] = static_cast<float>(acc);
    }
  }
}

struct LdmSlot {
  const unsigned char* row;
  const void* pc;  // the kernel's code address of the ldmatrix (for the bank-conflict count)
};

// Runs once per warp-wide ldmatrix: checks the 32 row addresses, then gathers every lane's 4
// registers from shared memory (at one instant, as the collective load does on the GPU).
template <bool kTrans>
void ldmatrix_complete(emu::WarpSlots& s, int warp) {
  const char* op = kTrans ? "ldmatrix_x4_trans" : "ldmatrix_x4";
  const unsigned char* rows[32];
  const unsigned char* base = emu::smem_begin();
  const size_t size = emu::smem_size();
  for (int lane = 0; lane < 32; ++lane) {
    rows[lane] = reinterpret_cast<const LdmSlot*>(s.lane[lane])->row;
    const unsigned char* p = rows[lane];
    if (p < base || p + 16 > base + size)
      emu::fail("%s: lane %d of warp %d passed %p (offset %td from the shared memory base): the 16-byte row "
                "is outside the launch's %zu bytes of dynamic shared memory", op, lane, warp,
                static_cast<const void*>(p), p - base, size);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
      emu::fail("%s: lane %d of warp %d passed a row address at shared offset %td, not 16-byte aligned", op,
                lane, warp, p - base);
  }
  size_t offsets[32];
  for (int lane = 0; lane < 32; ++lane) offsets[lane] = static_cast<size_t>(rows[lane] - base);
  emu::banks::ldmatrix(offsets, kTrans, reinterpret_cast<const LdmSlot*>(s.lane[0])->pc);
  // each row read whole, as the lane that addressed it (the racecheck build attributes the read)
  uint16_t data[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    emu::race::act_as(warp * 32 + lane);
    std::memcpy(data[lane], rows[lane], 16);
  }
  emu::race::act_as(-1);
  uint32_t regs[32][4];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int m = 0; m < 4; ++m) {
      uint16_t lo, hi;
      if (!kTrans) {  // row g of matrix m, elements 2t, 2t + 1
        lo = data[8 * m + g][2 * t];
        hi = data[8 * m + g][2 * t + 1];
      } else {  // column g of matrix m, i.e. element g of stored rows 2t and 2t + 1
        lo = data[8 * m + 2 * t][g];
        hi = data[8 * m + 2 * t + 1][g];
      }
      regs[lane][m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) std::memcpy(s.lane[lane], regs[lane], sizeof regs[lane]);
}

// Not inlined nor tail-called, so that its return address is the kernel's ldmatrix (each call
// site its own).
template <bool kTrans>
__attribute__((noipa)) void ldmatrix(uint32_t (&r)[4], const void* smem_row) {
  const LdmSlot in{static_cast<const unsigned char*>(smem_row), __builtin_return_address(0)};
  const emu::WarpSlots& s =
      emu::warp_collective(kTrans ? "ldmatrix_x4_trans" : "ldmatrix_x4", &in, sizeof in, &ldmatrix_complete<kTrans>);
  std::memcpy(r, s.lane[emu::lane_id()], sizeof r);
}

}  // namespace ptx_emu

// d += A * B for one m16n8k16 tile, fp32 accumulation; T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_16816: f16 or bf16");
  ptx_emu::MmaSlot in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.d, d, sizeof in.d);
  const emu::WarpSlots& s = emu::warp_collective(ptx_emu::Elem<T>::kMmaOp, &in, sizeof in, &ptx_emu::mma_complete<T>);
  std::memcpy(d, reinterpret_cast<const ptx_emu::MmaSlot*>(s.lane[emu::lane_id()])->d, sizeof in.d);
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (see the layout above).
__device__ __forceinline__ __attribute__((always_inline)) void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  ptx_emu::ldmatrix<false>(r, smem_row);
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16.
__device__ __forceinline__ __attribute__((always_inline)) void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  ptx_emu::ldmatrix<true>(r, smem_row);
}

// cp.async.cg.shared.global, 16 bytes; when !valid nothing is read and 16 zero bytes are written.
__device__ __forceinline__ __attribute__((always_inline)) void cp_async_16(void* smem, const void* gmem, bool valid) {
  emu::cp_async_16(smem, gmem, valid);
}

__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group N: N >= 0");
  emu::cp_async_wait(N);
}

// Two floats rounded to nearest even in T, lo in the low 16 bits.
// ex2.approx.ftz.f32 (PTX ISA "ex2"): 2^x, "subnormal inputs and results are flushed to
// sign-preserving zero", ex2(-inf) = +0. The hardware's ~2 ulp approximation error is within
// what the comparisons allow; here the result is exact then flushed.
__device__ __forceinline__ float exp2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// atomicAdd(float2*, float2) (sm_90): two fp32 additions at an 8-byte aligned address, each
// atomic, as one 8-byte access (the racecheck and the sector count see one access, as the GPU
// does one instruction). The alignment the vector access needs on the GPU is checked.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
  if (reinterpret_cast<uintptr_t>(dst) % 8 != 0) emu::fail("atomic_add2: address %p is not 8-byte aligned", static_cast<void*>(dst));
  emu::race::atomic_add2(dst, a, b);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "pack2: f16 or bf16");
  return static_cast<uint32_t>(ptx_emu::Elem<T>::from_float(lo)) |
         (static_cast<uint32_t>(ptx_emu::Elem<T>::from_float(hi)) << 16);
}

}  // namespace srt::cuda
