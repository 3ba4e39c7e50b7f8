// The only file with inline PTX: the warp-level tensor-core and asynchronous-copy instructions
// the float16/bfloat16 kernels (fwd_tc_kernel.cuh, bwd_tc_kernel.cuh) are built from.
//
// Keeping them behind these few functions is what lets CI check the tensor-core kernels without
// a GPU: tests/cuda_emulation/ptx.cuh implements the same functions on the CPU fiber emulator
// (from the PTX ISA's description, independently of the kernels) and the emulation test swaps
// it in for this file. Any new instruction goes here, with its emulation next to it there.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" with .f16/.bf16 inputs), with
// lane = 4 * g + t (g = lane / 4 in 0..7, t = lane % 4 in 0..3):
//   A, 16 x 16 row-major, 4 registers of 2 elements:
//       a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B, 16 x 8 (k x n), 2 registers:  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C/D, 16 x 8 fp32:  c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// The lower-indexed element of a pair is in the low 16 bits of the register.
#pragma once

// mma.sync with bf16 inputs and cp.async exist from sm_80 (Ampere) on.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "self_reasoning_tokens: the CUDA kernels need compute capability 8.0 or newer; remove older architectures from TORCH_CUDA_ARCH_LIST"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace srt::cuda {

// d += A * B for one m16n8k16 tile, fp32 accumulation; T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit elements. Lane l
// passes the shared-memory address of row (l % 8) of matrix (l / 8) (16 bytes, 16-byte aligned);
// r[i] of lane l receives row (l / 4) of matrix i, elements 2 (l % 4) and 2 (l % 4) + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The same with .trans: r[i] of lane l receives column (l / 4) of matrix i, rows 2 (l % 4) and
// 2 (l % 4) + 1 (i.e. the fragment of the transposed matrix).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// cp.async.cg.shared.global, 16 bytes (both addresses 16-byte aligned). When !valid nothing is
// read from global memory and the 16 shared bytes are zero-filled (src-size 0).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}

// Closes the group of this thread's cp.async issued since the previous commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight. Other threads'
// copies are visible only after a barrier that follows their wait. The "memory" clobber keeps
// the compiler from moving shared-memory accesses across the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x on the special-function unit (ex2.approx.ftz.f32: about 2 ulp; subnormal inputs and
// results are flushed to 0; 2^-inf = 0), as FlashAttention's softmax uses it.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// dst[0] += a and dst[1] += b in global memory, each addition atomic (dst 8-byte aligned): one
// vector reduction (red.global.add.v2.f32) on sm_90, two scalar ones on older targets.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Two floats rounded to T and packed as one register (lo in the low 16 bits), the form the
// A operand of mma_16816 takes.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);  // .x = lo (low half)
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace srt::cuda
