// Small kernels that exercise the emulated PTX layer (ptx.cuh) on its own, for
// tests/test_cuda_emulation_ptx.py. A plain C interface (called with ctypes): every function
// returns 0, or 1 with the emulator's error message in `err`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>

#include "ptx.cuh"

// The kernels live in namespace srt::cuda (not an unnamed one), like the real ones, so that their
// `extern __shared__ float4 smem_f4[]` is the emulator's shared memory.
namespace srt::cuda {

constexpr int kS = 24;  // smem row stride in elements (48 bytes): rows are 16-byte aligned, padding poisoned
constexpr size_t kMmaSmem = 2 * 16 * kS * 2;

template <typename T>
uint16_t bits_of(float x) {
  return static_cast<uint16_t>(pack2<T>(x, 0.f) & 0xffffu);
}

// ---- mma ----
struct MmaArgs {
  int a_src;    // 0: ldmatrix_x4 of row-major A; 1: ldmatrix_x4_trans of A stored transposed (k x m);
                // 2: registers packed with pack2 from A per the fragment layout (no shared memory)
  int b_trans;  // 0: ldmatrix_x4 of B^T stored n x k; 1: ldmatrix_x4_trans of B stored k x n
  const float* A;  // 16 x 16 (m x k), values representable in T
  const float* B;  // 16 x 16 (k x n)
  const float* C;  // 16 x 16
  float* D;        // 16 x 16: D = A B + C, two n-tiles of 8
};

template <typename T>
__global__ void mma_kernel(const MmaArgs p) {
  extern __shared__ float4 smem_f4[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_f4);  // 16 rows x kS
  uint16_t* sB = sA + 16 * kS;
  const int lane = static_cast<int>(threadIdx.x);
  const int g = lane / 4, t = lane % 4;
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;  // A[r][c], B[r][c]
    if (p.a_src == 1) sA[c * kS + r] = bits_of<T>(p.A[e]); else sA[r * kS + c] = bits_of<T>(p.A[e]);
    if (p.b_trans == 1) sB[r * kS + c] = bits_of<T>(p.B[e]); else sB[c * kS + r] = bits_of<T>(p.B[e]);
  }
  __syncthreads();
  const int i = lane / 8, r8 = lane % 8;  // this lane addresses row r8 of matrix i
  uint32_t a[4];
  if (p.a_src == 0) {  // matrices: A[0:8,0:8], A[8:16,0:8], A[0:8,8:16], A[8:16,8:16]
    ldmatrix_x4(a, sA + (8 * (i % 2) + r8) * kS + 8 * (i / 2));
  } else if (p.a_src == 1) {  // the same matrices, stored transposed (rows = k)
    ldmatrix_x4_trans(a, sA + (8 * (i / 2) + r8) * kS + 8 * (i % 2));
  } else {  // a_j: row g (+8 for registers 1, 3), columns 2t, 2t+1 (+8 for registers 2, 3)
    for (int j = 0; j < 4; ++j) {
      const int row = g + 8 * (j % 2), col = 2 * t + 8 * (j / 2);
      a[j] = pack2<T>(p.A[row * 16 + col], p.A[row * 16 + col + 1]);
    }
  }
  uint32_t bb[4];  // {0, 1}: n-tile 0 (k 0..7, 8..15); {2, 3}: n-tile 1
  if (p.b_trans == 0) {  // B^T rows = n
    ldmatrix_x4(bb, sB + (8 * (i / 2) + r8) * kS + 8 * (i % 2));
  } else {  // B rows = k
    ldmatrix_x4_trans(bb, sB + (8 * (i % 2) + r8) * kS + 8 * (i / 2));
  }
  for (int nt = 0; nt < 2; ++nt) {
    float d[4];
    for (int e = 0; e < 4; ++e) d[e] = p.C[(g + 8 * (e / 2)) * 16 + 8 * nt + 2 * t + e % 2];
    const uint32_t b[2] = {bb[2 * nt], bb[2 * nt + 1]};
    mma_16816<T>(d, a, b);
    for (int e = 0; e < 4; ++e) p.D[(g + 8 * (e / 2)) * 16 + 8 * nt + 2 * t + e % 2] = d[e];
  }
}

// ---- ldmatrix, register by register ----
struct LdmArgs {
  int trans;
  int bad_lane;       // >= 0: this lane's address is broken as `bad_kind` says
  int bad_kind;       // 0: 2 bytes off alignment; 1: past the end of the launch's shared memory
  const int* rows;    // 32 row indices (16-byte rows of shared memory) the lanes pass
  uint32_t* out;      // 32 lanes x 4 registers
};

__global__ void ldmatrix_kernel(const LdmArgs p) {
  extern __shared__ float4 smem_f4[];
  uint16_t* s = reinterpret_cast<uint16_t*>(smem_f4);  // 64 rows of 8 halves, element e holds e
  const int lane = static_cast<int>(threadIdx.x);
  for (int e = lane; e < 64 * 8; e += 32) s[e] = static_cast<uint16_t>(e);
  __syncthreads();
  const unsigned char* addr = reinterpret_cast<const unsigned char*>(s + 8 * p.rows[lane]);
  if (lane == p.bad_lane) addr += p.bad_kind == 0 ? 2 : 64 * 16;
  uint32_t r[4];
  if (p.trans) ldmatrix_x4_trans(r, addr); else ldmatrix_x4(r, addr);
  for (int j = 0; j < 4; ++j) p.out[lane * 4 + j] = r[j];
}

// ---- warp-collective misuse ----
struct DivergeArgs {
  int kind;  // 0: lanes 16..31 skip the mma (and exit); 1: lanes 16..31 do __syncwarp instead
};

__global__ void diverge_kernel(const DivergeArgs p) {
  const int lane = static_cast<int>(threadIdx.x);
  float d[4] = {0, 0, 0, 0};
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  if (lane < 16) mma_16816<__half>(d, a, b);
  else if (p.kind == 1) __syncwarp();
}

// ---- cp.async ----
struct CpArgs {
  int scenario;
  unsigned blocks;
  const float4* src;  // 64 threads x 16 bytes (plus a spare chunk at the end)
  float4* out;        // per block: 64 threads x 2 chunks
};

__global__ void cp_async_kernel(const CpArgs p) {
  extern __shared__ float4 smem_f4[];
  float4* buf1 = smem_f4;       // 64 chunks
  float4* buf2 = smem_f4 + 64;  // 64 chunks
  const int tid = static_cast<int>(threadIdx.x), other = (tid + 1) % 64;
  float4* out = p.out + blockIdx.x * 128;
  const float4 zero{0.f, 0.f, 0.f, 0.f};
  switch (p.scenario) {
    case 0:  // correct: copy, commit, wait, barrier, read another thread's chunk
      cp_async_16(buf1 + tid, p.src + tid, true);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      out[tid] = buf1[other];
      break;
    case 1:  // every third copy invalid, with a null source: zero-filled, nothing read
      cp_async_16(buf1 + tid, tid % 3 == 0 ? nullptr : p.src + tid, tid % 3 != 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      out[tid] = buf1[other];
      break;
    case 2:  // missing wait before the barrier
      cp_async_16(buf1 + tid, p.src + tid, true);
      cp_async_commit();
      __syncthreads();
      out[tid] = buf1[other];
      cp_async_wait<0>();
      break;
    case 3:  // two groups, wait<1>: only the older one is complete
      cp_async_16(buf1 + tid, p.src + tid, true);
      cp_async_commit();
      cp_async_16(buf2 + tid, p.src + other, true);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      out[tid] = buf1[other];
      out[64 + tid] = buf2[other];
      cp_async_wait<0>();
      break;
    case 4:  // wait<0> without commit: the uncommitted copy is not waited for
      cp_async_16(buf1 + tid, p.src + tid, true);
      cp_async_wait<0>();
      __syncthreads();
      out[tid] = buf1[other];
      cp_async_commit();
      cp_async_wait<0>();
      break;
    case 5:  // exits with a committed copy never waited for
      cp_async_16(buf1 + tid, p.src + tid, true);
      cp_async_commit();
      break;
    case 6:  // exits with a copy never committed
      cp_async_16(buf1 + tid, p.src + tid, true);
      break;
    case 7:  // misaligned shared destination
      cp_async_16(reinterpret_cast<float*>(buf1 + tid) + 1, p.src + tid, true);
      break;
    case 8:  // misaligned global source
      cp_async_16(buf1 + tid, reinterpret_cast<const float*>(p.src + tid) + 1, true);
      break;
    case 9:  // destination past the launch's shared memory (the kernel gets 2 x 64 chunks)
      cp_async_16(buf2 + 64 + tid, p.src + tid, true);
      cp_async_commit();
      cp_async_wait<0>();
      break;
    case 10:  // an empty group still counts among the newest N: wait<1> completes the copy
      cp_async_16(buf1 + tid, p.src + tid, true);
      cp_async_commit();
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      out[tid] = buf1[other];
      break;
    case 11:    // warp 1 overwrites buf1 while warp 0 still reads it (no barrier in between)
    case 12: {  // the same with the barrier
      buf1[tid] = p.src[64];
      __syncthreads();
      if (p.scenario == 12) {
        if (tid < 32) out[tid] = buf1[other];
        __syncthreads();
      }
      if (tid >= 32) {
        cp_async_16(buf1 + tid - 32, p.src + tid, true);
        cp_async_commit();
        cp_async_wait<0>();
      } else if (p.scenario == 11) {
        out[tid] = buf1[other];
      }
      break;
    }
    case 13:  // reading a destination before the wait: stale data, or (late mode) poison
      buf1[tid] = p.src[64];
      __syncthreads();
      cp_async_16(buf1 + tid, p.src + tid, true);
      cp_async_commit();
      out[tid] = buf1[tid];
      cp_async_wait<0>();
      out[64 + tid] = buf1[tid];
      break;
    default:
      out[tid] = zero;
  }
}

// ---- shared-memory hazards (for the racecheck build, emu_racecheck.cpp) ----
struct RaceArgs {
  int scenario;
  const float* src;  // 64 floats
  float* out;        // 64 x 4 floats
};

// Two warps. Scenarios with a hazard: 1 RAW across warps, 2 WAR across warps, 3 WAW across warps,
// 4 RAW between lanes of one warp, 6 a cp.async destination read by another warp after the wait
// without a barrier, 8 ldmatrix of rows another warp wrote without a barrier, 11 another warp
// reads a cp.async destination before the issuer's wait (barriers between do not complete a copy),
// 13 another warp reads it after the issuer's wait but with no barrier after that wait (the barrier
// before it orders nothing: the copy completes at the wait, in either cp.async mode).
// Without: 0, 5 (__syncwarp between the lanes), 7 (cp.async, wait, barrier), 9 (ldmatrix after a
// barrier), 10 (each thread only ever touches its own word), 12 (each lane overwrites the row it
// gave an ldmatrix, after the ldmatrix).
__global__ void race_kernel(const RaceArgs p) {
  extern __shared__ float4 smem_f4[];
  float* buf = reinterpret_cast<float*>(smem_f4);  // 64 floats, then 64 16-byte chunks
  float4* chunks = smem_f4 + 16;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, across = (tid + 32) % 64;
  float* out = p.out + 4 * tid;
  switch (p.scenario) {
    case 0:
      buf[tid] = p.src[tid];
      __syncthreads();
      out[0] = buf[across];
      break;
    case 1:
      buf[tid] = p.src[tid];
      out[0] = buf[across];
      break;
    case 2:
      buf[tid] = p.src[tid];
      __syncthreads();
      out[0] = buf[across];
      buf[tid] = 2 * p.src[tid];
      break;
    case 3:
      buf[lane] = p.src[tid];
      break;
    case 4:
    case 5:
      buf[tid] = p.src[tid];
      if (p.scenario == 5) __syncwarp();
      out[0] = buf[tid ^ 1];
      break;
    case 6:
    case 7: {
      const float4* src = reinterpret_cast<const float4*>(p.src);
      cp_async_16(chunks + tid, src + tid % 16, true);
      cp_async_commit();
      cp_async_wait<0>();
      if (p.scenario == 7) __syncthreads();
      const float4 x = chunks[across];
      out[0] = x.x;
      break;
    }
    case 8:
    case 9: {
      if (tid < 32) chunks[tid] = float4{p.src[tid], 0.f, 0.f, 0.f};
      if (p.scenario == 9) __syncthreads();
      if (tid >= 32) {
        uint32_t r[4];
        ldmatrix_x4(r, chunks + lane);
        for (int j = 0; j < 4; ++j) std::memcpy(out + j, &r[j], 4);
      }
      break;
    }
    case 11:
    case 13: {  // warp 0 copies, warp 1 reads: before the wait (11) or after it, unordered (13)
      if (tid < 32) {
        cp_async_16(chunks + tid, reinterpret_cast<const float4*>(p.src) + tid % 16, true);
        cp_async_commit();
      }
      __syncthreads();
      if (p.scenario == 13 && tid < 32) cp_async_wait<0>();
      if (tid >= 32) out[0] = chunks[lane].x;
      if (p.scenario == 11) {
        __syncthreads();
        if (tid < 32) cp_async_wait<0>();
      }
      break;
    }
    case 12:
      if (tid < 32) {
        chunks[tid] = float4{p.src[tid], 0.f, 0.f, 0.f};
        __syncwarp();
        uint32_t r[4];
        ldmatrix_x4(r, chunks + lane);
        chunks[tid] = float4{0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < 4; ++j) std::memcpy(out + j, &r[j], 4);
      }
      break;
    default:
      for (int i = 0; i < 3; ++i) {
        buf[tid] = p.src[tid] + i;
        out[i] = buf[tid];
      }
  }
}

// Global memory, 2 blocks of 64 threads over a watched buffer of 128 floats. Hazards: 1 both blocks
// write the same words, 3 one block writes and the other atomicAdds the same words, 4 a block
// reads what the other writes, 5 two warps of a block write the same words with no barrier, 7 both
// blocks atomicAdd, then the second (after a barrier) reads the sums: its own additions are
// ordered before the read, the first block's are not.
// None: 0 (each block its own words), 2 (both atomicAdd), 6 (the two warps with a barrier between).
struct GlobalRaceArgs {
  int scenario;
  float* buf;
};

__global__ void global_race_kernel(const GlobalRaceArgs p) {
  const int tid = static_cast<int>(threadIdx.x), b = static_cast<int>(blockIdx.x), lane = tid % 32;
  switch (p.scenario) {
    case 0: p.buf[b * 64 + tid] = static_cast<float>(tid); break;
    case 1: p.buf[tid] = static_cast<float>(b); break;
    case 2: atomicAdd(p.buf + tid, 1.f); break;
    case 3:
      if (b == 0) p.buf[tid] = 1.f;
      else atomicAdd(p.buf + tid, 1.f);
      break;
    case 4:
      if (b == 0) p.buf[tid] = 1.f;
      else p.buf[64 + tid] = p.buf[tid];
      break;
    case 5:
    case 6:
      if (tid < 32) p.buf[b * 64 + lane] = 1.f;
      if (p.scenario == 6) __syncthreads();
      if (tid >= 32) p.buf[b * 64 + lane] = 2.f;
      break;
    case 7:
      atomicAdd(p.buf + tid, 1.f);
      __syncthreads();
      if (b == 1) p.buf[64 + tid] = p.buf[tid];
      break;
  }
}

// Shared-memory bank conflicts (emu_banks.cpp) of known access patterns: two warps (8 KiB of shared
// memory each), each lane doing the scenario's access twice (the second time 4 KiB further on, same
// banks), so each warp issues two instructions per access site. Loads go to `out` so that they are
// kept.
//  0 float, lane l word l          1 float, word 32 l (one bank)    2 float, word 33 l
//  3 float, every lane word 0      4 8 bytes, words 2l, 2l + 1        5 16 bytes, chunk l
//  6 16 bytes, chunk 4 l (64-byte stride)                               7 ldmatrix, rows 64 bytes apart
//  8 ldmatrix, rows 80 bytes apart (padded)                           9 cp.async, chunk l
// 10 cp.async, chunk 8 l (128-byte stride)   11 float store, word 2 l   12 float store by even lanes, word 32 l
// Global memory (32-byte sectors; src, or out for the atomics, is the counted buffer):
// 13 float load, src[l]                       14 float load, src[8 l] (32-byte stride)
// 15 byte load, byte 32 l of src               16 cp.async source, chunk l of src
// 17 atomic_add2 (float2), out[2 l, 2 l + 1]   18 atomicAdd, out[2 l] (8-byte stride)
struct BankArgs {
  int scenario;
  const float* src;  // 64 x 4 floats (cp.async source)
  float* out;        // 64 floats
};
constexpr size_t kBankSmem = 2 * 4096 * 4;

__global__ void bank_kernel(const BankArgs p) {
  extern __shared__ float4 smem_f4[];
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32;
  float acc = 0.f;
  for (int it = 0; it < 2; ++it) {
    const int at = 2048 * (tid / 32) + 1024 * it;  // word: 8 KiB per warp, 4 KiB per iteration
    float* words = reinterpret_cast<float*>(smem_f4) + at;
    float4* chunks = reinterpret_cast<float4*>(words);
    switch (p.scenario) {
      case 0: acc += words[lane]; break;
      case 1: acc += words[32 * lane]; break;
      case 2: acc += words[33 * lane]; break;
      case 3: acc += words[0]; break;
      // 8- and 16-byte loads: told to the count directly (how wide the host compiler makes a
      // plain access of a struct is its own choice), so these check the phase rule itself
      case 4: emu::banks::record(tid, (at + 2 * lane) * 4, 8, emu::banks::kLoad, p.out); break;
      case 5: emu::banks::record(tid, (at + 4 * lane) * 4, 16, emu::banks::kLoad, p.out); break;
      case 6: emu::banks::record(tid, (at + 16 * lane) * 4, 16, emu::banks::kLoad, p.out); break;
      case 7:
      case 8: {
        uint32_t r[4];
        ldmatrix_x4(r, reinterpret_cast<unsigned char*>(words) + (p.scenario == 7 ? 64 : 80) * lane);
        acc += static_cast<float>(r[0] & 1u);
        break;
      }
      case 9:
      case 10:
        cp_async_16(chunks + (p.scenario == 9 ? lane : 8 * lane), reinterpret_cast<const float4*>(p.src) + lane, true);
        cp_async_commit();
        cp_async_wait<0>();
        break;
      case 11: words[2 * lane] = 1.f; break;
      case 12: if (lane % 2 == 0) words[32 * lane] = 1.f; break;
      case 13: acc += p.src[lane]; break;
      case 14: acc += p.src[8 * lane]; break;
      case 15: acc += static_cast<float>(reinterpret_cast<const unsigned char*>(p.src)[32 * lane]); break;
      case 16:
        cp_async_16(chunks + lane, reinterpret_cast<const float4*>(p.src) + lane, true);
        cp_async_commit();
        cp_async_wait<0>();
        break;
      case 17: atomic_add2(p.out + 2 * lane, 1.f, 1.f); break;
      case 18: atomicAdd(p.out + 2 * lane, 1.f); break;
    }
  }
  if (p.scenario < 17) p.out[tid] = acc;  // (out is the counted buffer of 17 and 18)
}

int run(char* err, int errlen, void (*f)(void*), void* arg) {
  try {
    f(arg);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
    return 1;
  }
}
}  // namespace srt::cuda

using namespace srt::cuda;

extern "C" {

int ptx_mma(int bf16, int a_src, int b_trans, const float* A, const float* B, const float* C, float* D,
            char* err, int errlen) {
  MmaArgs p{a_src, b_trans, A, B, C, D};
  if (bf16) {
    return run(err, errlen, [](void* v) {
      emu::launch(mma_kernel<__nv_bfloat16>, 1, 32, kMmaSmem, nullptr, *static_cast<const MmaArgs*>(v));
    }, &p);
  }
  return run(err, errlen, [](void* v) {
    emu::launch(mma_kernel<__half>, 1, 32, kMmaSmem, nullptr, *static_cast<const MmaArgs*>(v));
  }, &p);
}

int ptx_ldmatrix(int trans, int bad_lane, int bad_kind, const int* rows, uint32_t* out, char* err, int errlen) {
  LdmArgs p{trans, bad_lane, bad_kind, rows, out};
  return run(err, errlen, [](void* v) {
    emu::launch(ldmatrix_kernel, 1, 32, 64 * 16, nullptr, *static_cast<const LdmArgs*>(v));
  }, &p);
}

int ptx_diverge(int kind, char* err, int errlen) {
  DivergeArgs p{kind};
  return run(err, errlen, [](void* v) {
    emu::launch(diverge_kernel, 1, 32, 0, nullptr, *static_cast<const DivergeArgs*>(v));
  }, &p);
}

int ptx_cp_async(int mode, int scenario, int blocks, const void* src, void* out, char* err, int errlen) {
  CpArgs p{scenario, static_cast<unsigned>(blocks), static_cast<const float4*>(src), static_cast<float4*>(out)};
  try {
    emu::set_cp_async_mode(mode);
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
    return 1;
  }
  return run(err, errlen, [](void* v) {
    const CpArgs& q = *static_cast<const CpArgs*>(v);
    emu::launch(cp_async_kernel, q.blocks, 64, 128 * 16, nullptr, q);
  }, &p);
}

int ptx_race(int mode, int scenario, const float* src, float* out, char* err, int errlen) {
  RaceArgs p{scenario, src, out};
  emu::set_cp_async_mode(mode);
  return run(err, errlen, [](void* v) {
    emu::launch(race_kernel, 1, 64, 16 * 16 + 64 * 16, nullptr, *static_cast<const RaceArgs*>(v));
  }, &p);
}

int ptx_global_race(int scenario, float* buf, char* err, int errlen) {
  GlobalRaceArgs p{scenario, buf};
  emu::race::untrack_globals();
  emu::race::track_global(buf, 128 * sizeof(float));
  const int rc = run(err, errlen, [](void* v) {
    emu::launch(global_race_kernel, 2, 64, 0, nullptr, *static_cast<const GlobalRaceArgs*>(v));
  }, &p);
  emu::race::untrack_globals();
  return rc;
}

// Runs bank_kernel's scenario with the bank count on; writes up to `cap` rows of emu::banks::table()
// (6 numbers each) into `rows` and their number into `nrows`.
int ptx_banks(int scenario, const float* src, float* out, int64_t* rows, int cap, int* nrows, char* err, int errlen) {
  BankArgs p{scenario, src, out};
  emu::set_cp_async_mode(emu::kCpAsyncEarly);
  emu::banks::reset();
  emu::banks::clear_globals();
  if (scenario >= 17) emu::banks::add_global(out, 64 * sizeof(float));
  else if (scenario >= 13) emu::banks::add_global(src, 256 * sizeof(float));
  emu::banks::enable(true);
  const int rc = run(err, errlen, [](void* v) {
    emu::launch(bank_kernel, 1, 64, kBankSmem, nullptr, *static_cast<const BankArgs*>(v));
  }, &p);
  emu::banks::enable(false);
  emu::banks::clear_globals();
  const std::vector<int64_t> t = emu::banks::table();
  const int n = static_cast<int>(t.size() / 6);
  *nrows = n;
  for (int i = 0; i < n && i < cap; ++i)
    for (int j = 0; j < 6; ++j) rows[6 * i + j] = t[6 * static_cast<size_t>(i) + j];
  return rc;
}

int ptx_racecheck_instrumented() { return emu::race::instrumented() ? 1 : 0; }

void ptx_pack2(int bf16, const float* lo, const float* hi, int n, uint32_t* out) {
  for (int i = 0; i < n; ++i) out[i] = bf16 ? pack2<__nv_bfloat16>(lo[i], hi[i]) : pack2<__half>(lo[i], hi[i]);
}

}  // extern "C"
