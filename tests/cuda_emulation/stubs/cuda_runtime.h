// Host emulation of the few CUDA features the srt kernels use (for logic checks without a GPU).
// Threads of a block are cooperative fibers, run warp by warp; __syncthreads, __syncwarp,
// __shfl_xor_sync and the warp-collective PTX instructions of ../ptx.cuh are real barriers
// between them; shared memory is a global buffer (blocks run one after another) that is
// poisoned with the 32-bit pattern 0x7fff7fff (NaN as float, and each half NaN as float16 and
// as bfloat16) before every block. Misuse (a barrier not all threads reach, lanes of a warp in
// different warp-collective operations, an address outside the launch's shared memory, ...)
// ends the launch with a C++ exception (a RuntimeError in Python) naming block, thread and
// operation.
#pragma once
#include <math.h>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

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
extern EmuDim3 block_idx, block_dim, grid_dim;

// Ends the current launch: prints the message (printf format) and makes run_grid throw a
// std::runtime_error carrying it, prefixed with the current block and thread.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

void syncthreads();
void syncwarp();
float shfl_xor(float x, int offset);
bool any_lane(bool pred);

// Warp-collective exchange, the building block of __syncwarp, __shfl_xor_sync, ldmatrix and mma:
// each of the 32 lanes of the calling thread's warp deposits `bytes` (<= kWarpSlotBytes) bytes
// into its slot and waits until all 32 lanes have called warp_collective with the same `op`
// (the op names must match: lanes in different collectives end the launch with an error).
// `complete`, if given, then runs once, in the last lane to arrive, before any lane continues:
// it sees every lane's deposit and may overwrite the slots with results (it is where a
// collective instruction does its work, so that its memory reads happen at one instant, as on
// the GPU). Every lane gets the warp's slots back; they stay valid until the lane's next
// warp-collective call (the slots are double-buffered, so one barrier per call suffices).
constexpr int kWarpSlotBytes = 64;
struct WarpSlots {
  alignas(16) unsigned char lane[32][kWarpSlotBytes];
};
using WarpComplete = void (*)(WarpSlots& slots, int warp);
const WarpSlots& warp_collective(const char* op, const void* in, size_t bytes, WarpComplete complete = nullptr);
inline unsigned lane_id() { return cur_tid->x % 32u; }

// The dynamic shared memory of the current launch: [smem_begin(), smem_begin() + smem_size()).
unsigned char* smem_begin();
size_t smem_size();
// Fails unless [p, p + bytes) lies in the launch's shared memory and p is `align`-aligned.
void check_smem(const void* p, size_t bytes, size_t align, const char* op);

// cp.async (see ../ptx.cuh). Both modes keep the same per-thread bookkeeping (uncommitted copies,
// committed groups, a thread may not exit with copies not waited for); they differ in when the
// 16 bytes are written:
// - kCpAsyncEarly: at issue (a buffer overwritten while other warps still read it shows);
// - kCpAsyncLate: the destination is poisoned at issue and written only by the cp_async_wait that
//   completes the copy's group (a missing or too-weak wait shows as NaN).
enum CpAsyncMode { kCpAsyncEarly = 0, kCpAsyncLate = 1 };
void set_cp_async_mode(int mode);
int cp_async_mode();
void cp_async_16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int newest_groups_left);

// How many times each warp-collective operation (counted once per warp) and cp_async_16 (once
// per thread) ran since the last reset: lets a test check which kernels it exercised.
std::vector<std::pair<std::string, uint64_t>> op_counts();
void reset_op_counts();
void count_op(const char* op);

// Runs `body(arg)` for every thread of `grid` blocks of `block` threads (one block after the
// other); throws std::runtime_error if the kernel misused a primitive or deadlocked, or (in the
// racecheck build) had a shared-memory hazard. `kernel` names the kernel in reports.
void run_grid(unsigned grid, int block, size_t smem, void (*body)(void*), void* arg, const void* kernel = nullptr);
template <typename K, typename P>
void launch(K kernel, unsigned grid, int block, size_t smem, cudaStream_t, const P& p) {
  struct Arg { K k; const P* p; } a{kernel, &p};
  run_grid(grid, block, smem, [](void* v) { auto* a = static_cast<Arg*>(v); a->k(*a->p); }, &a,
           reinterpret_cast<const void*>(kernel));
}

// The thread (fiber) running now, as an index in its block, or -1 in the scheduler.
int current_thread();

// Shared-memory race detection (emu_racecheck.cpp); active only in the racecheck build, whose
// instrumented loads and stores report to it. The runtime tells it where the launch's shared
// memory is, when a block starts, and which barriers complete.
namespace race {
bool instrumented();
void launch_begin(const void* smem, size_t bytes, const void* kernel);
void block_begin(unsigned block);
void block_sync();
void warp_sync(int warp);
std::string launch_end();  // "" or the hazard report; checking stops until the next launch_begin
uint64_t hazards();
// Global buffers the kernels write, checked between blocks too (until untrack_globals).
void track_global(const void* ptr, size_t bytes);
void untrack_globals();
// atomicAdd: the addition, and (racecheck build) an atomic access for the checker.
float atomic_add(float* a, float v);
void atomic_add2(float* a, float x, float y);  // atomicAdd(float2*, float2): one 8-byte access
// With `on`, two atomicAdds to the same global bytes in one launch whose order is not fixed (other
// blocks, or threads of a block with no barrier between) are hazards too ("atomic order"): their
// sum's rounding depends on the schedule. For checking a schedule that must be deterministic.
void set_ordered_atomics(bool on);
// A cp.async into shared memory: in flight from its issue (by the current thread, at the kernel's
// code address `pc`) until its issuer's wait covers it.
void copy_issued(const void* dst, size_t bytes, const void* pc);
void copy_waited(const void* dst, size_t bytes);
// Until act_as(-1), accesses count as thread `thread`'s (a collective reading a lane's data).
void act_as(int thread);
}  // namespace race

// Shared-memory bank conflicts and global-memory sectors (emu_banks.cpp): off until
// enable(true). The runtime reports cp.async writes (and their global reads) and every barrier,
// ptx.cuh each ldmatrix, and the racecheck build's instrumentation every plain access (global
// ones only to the buffers given to add_global); table() gives per code address (as an offset in
// its module) and kind: size in bytes, warp-wide instructions, wavefronts (global kinds: 32-byte
// sectors), and the wavefronts (sectors) they would take at best, six numbers a row.
namespace banks {
enum Kind { kLoad = 0, kStore = 1, kCpAsync = 2, kLdmatrix = 3, kLdmatrixTrans = 4,
            // global memory (from kGlobalLoad on): 32-byte sectors instead of wavefronts
            kGlobalLoad = 5, kGlobalStore = 6, kGlobalAtomic = 7, kCpAsyncSource = 8 };
void enable(bool on);
bool enabled();
void reset();
void record(int thread, size_t offset, size_t size, int kind, const void* pc);
// Global buffers (the op's tensors) whose accesses record_global counts; cleared by the op.
void add_global(const void* ptr, size_t bytes);
void clear_globals();
bool counts_global(const void* addr, size_t size);  // counting, and in one of those buffers
// The smallest range holding those buffers (empty when none is registered),
// for a check inlined into the racecheck's hook, which runs for every access.
struct GlobalBox {
  uintptr_t lo = 0, hi = 0;
};
extern GlobalBox g_box;
__attribute__((no_sanitize_thread)) inline bool in_global_box(const void* addr, size_t size) {
  const auto a = reinterpret_cast<uintptr_t>(addr);
  return a < g_box.hi && a + size > g_box.lo;
}
void record_global(int thread, const void* addr, size_t size, int kind, const void* pc);
void ldmatrix(const size_t (&row_offsets)[32], bool trans, const void* pc);
void mute(bool on);  // nested: accesses of the emulator itself (cp.async's copies) are not the kernel's
struct Muted {       // mute(true) for its lifetime
  Muted() { mute(true); }
  ~Muted() { mute(false); }
  Muted(const Muted&) = delete;
  Muted& operator=(const Muted&) = delete;
};
void discard();      // drops the accesses not yet counted (a launch that failed part-way)
void warp_done(int warp);
void block_done();
std::vector<int64_t> table();
}  // namespace banks
}  // namespace emu

#define threadIdx (*emu::cur_tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
inline float __shfl_xor_sync(unsigned, float x, int offset) { return emu::shfl_xor(x, offset); }
// The kernels call it with the full mask only; all 32 lanes must take part (a barrier here).
inline int __any_sync(unsigned, int pred) { return emu::any_lane(pred != 0) ? 1 : 0; }
// fibers are never preempted: a plain read-modify-write is atomic (emu_racecheck.cpp)
inline float atomicAdd(float* a, float v) { return emu::race::atomic_add(a, v); }
