// Host emulation of the few CUDA features the srt kernels use (for logic checks without a GPU).
// Threads of a block are cooperative fibers (ucontext), scheduled round-robin; __syncthreads,
// __syncwarp and __shfl_xor_sync are real barriers between them, shared memory is a global
// buffer (blocks run one after another) that is poisoned with NaN before every block.
#pragma once
#include <math.h>
#include <cmath>
#include <cstddef>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct float4 { float x, y, z, w; };
struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
typedef int cudaError_t;
enum { cudaSuccess = 0 };
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace emu {
extern EmuDim3* cur_tid;
extern EmuDim3 block_idx;
void syncthreads();
void syncwarp();
float shfl_xor(float x, int offset);
void run_grid(unsigned grid, int block, size_t smem, void (*body)(void*), void* arg);
template <typename K, typename P>
void launch(K kernel, unsigned grid, int block, size_t smem, cudaStream_t, const P& p) {
  struct Arg { K k; const P* p; } a{kernel, &p};
  run_grid(grid, block, smem, [](void* v) { auto* a = static_cast<Arg*>(v); a->k(*a->p); }, &a);
}
}  // namespace emu

#define threadIdx (*emu::cur_tid)
#define blockIdx (emu::block_idx)
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
inline float __shfl_xor_sync(unsigned, float x, int offset) { return emu::shfl_xor(x, offset); }
// fibers are never preempted: a plain read-modify-write is atomic
inline float atomicAdd(float* a, float v) { float old = *a; *a = old + v; return old; }
