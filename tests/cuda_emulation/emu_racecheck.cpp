// Shared-memory race detection for the emulated kernels: the emulator's counterpart of
// compute-sanitizer's racecheck, on the CPU.
//
// The racecheck build (tests/test_cuda_racecheck.py) compiles the kernels and the emulator's
// runtime with GCC's -fsanitize=thread *instrumentation* but links none of ThreadSanitizer's
// runtime: every load and store of the instrumented code calls one of the __tsan_* entry points
// defined at the end of this file, which look only at the launch's dynamic shared memory and only
// while a fiber (an emulated GPU thread) runs. Each 2-byte granule of shared memory remembers its
// last writer and its readers since then: thread, the number of __syncthreads the block had
// passed, and the number of warp-collective operations (__syncwarp, shuffles, mma, ldmatrix) its
// warp had passed. Two accesses of different threads to a granule, at least one a write, are a
// hazard unless a __syncthreads lies between them, or, for two lanes of one warp, a warp
// collective does:
//   RAW  a thread reads what another wrote in the same interval;
//   WAR  a thread overwrites what another read in the same interval;
//   WAW  two threads write it in the same interval.
// This is the ordering CUDA gives shared memory (a barrier orders the accesses before it before
// the ones after it); it does not depend on the order the emulator happens to run the warps in,
// so a missing barrier shows even where the schedule would hide it. Writes by cp.async are the
// issuing thread's (at issue, when the emulator poisons or fills the destination, and at the
// wait that completes them in the late mode); ldmatrix reads are the reads of the lane that
// completes the collective, after its warp's barrier.
//
// A launch with hazards fails (run_grid throws) with a report of the first few distinct ones:
// kind, shared-memory offset, both threads and the code locations (function + offset in the
// module; `addr2line -f -C -e <module> <address>` gives the line when built with -g).
#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "stubs/cuda_runtime.h"

#define EMU_NO_TSAN __attribute__((no_sanitize_thread))

namespace emu::race {
namespace {
constexpr int kReaders = 8;     // readers kept per granule; more only lose WAR reports, never add any
constexpr int kMaxReports = 6;  // distinct (kind, code location pair) hazards described
constexpr int kMaxWarps = 64;

struct Access {
  int32_t tid;
  uint32_t block_epoch;  // __syncthreads the block had passed
  uint32_t warp_epoch;   // warp collectives the thread's warp had passed
  const void* pc;        // the instrumented code's address of the access
};

struct Granule {
  uint32_t gen;  // == g_gen: valid in this block; anything else: untouched so far
  int32_t readers;
  bool written;
  Access w;
  Access r[kReaders];
};

struct Report {
  char kind[4];
  const void* pc_now;
  const void* pc_before;
};

bool g_on = false;
uintptr_t g_lo = 0, g_hi = 0;
uint32_t g_gen = 0;
uint32_t g_block_epoch = 0;
uint32_t g_warp_epoch[kMaxWarps];
unsigned g_block = 0;
Granule* g_shadow = nullptr;
size_t g_capacity = 0;  // granules allocated
uint64_t g_hazards = 0;
Report g_seen[kMaxReports];
int g_nseen = 0;
std::string g_text;
const void* g_kernel = nullptr;

EMU_NO_TSAN std::string symbolize(const void* pc) {
  Dl_info info;
  char buf[512];
  if (pc == nullptr || dladdr(pc, &info) == 0) {
    std::snprintf(buf, sizeof buf, "%p", pc);
    return buf;
  }
  std::string name = "?";
  if (info.dli_sname != nullptr) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    name = status == 0 && d != nullptr ? d : info.dli_sname;
    std::free(d);
    if (name.size() > 160) name = name.substr(0, 157) + "...";
  }
  const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  const auto sym = reinterpret_cast<uintptr_t>(info.dli_saddr);
  const auto at = reinterpret_cast<uintptr_t>(pc);
  std::snprintf(buf, sizeof buf, "%s+0x%zx (module offset 0x%zx)", name.c_str(),
                static_cast<size_t>(info.dli_saddr != nullptr ? at - sym : 0), static_cast<size_t>(at - base));
  return buf;
}

EMU_NO_TSAN void report(const char* kind, uintptr_t offset, int t, const void* pc, const Access& before) {
  ++g_hazards;
  for (int i = 0; i < g_nseen; ++i)
    if (std::strcmp(g_seen[i].kind, kind) == 0 && g_seen[i].pc_now == pc && g_seen[i].pc_before == before.pc) return;
  if (g_nseen == kMaxReports) return;
  Report& r = g_seen[g_nseen++];
  std::snprintf(r.kind, sizeof r.kind, "%s", kind);
  r.pc_now = pc;
  r.pc_before = before.pc;
  const bool raw = std::strcmp(kind, "RAW") == 0, war = std::strcmp(kind, "WAR") == 0;
  const char* what = raw ? "reads what" : war ? "overwrites what" : "writes what";
  const char* did = war ? "read" : "wrote";
  char buf[2048];
  std::snprintf(buf, sizeof buf,
                "\n  %s hazard at shared-memory offset %zu (block %u, after %u __syncthreads): thread %d "
                "(warp %d, lane %d) at %s\n    %s thread %d (warp %d, lane %d) %s at %s, with no barrier between",
                kind, static_cast<size_t>(offset), g_block, g_block_epoch, t, t / 32, t % 32,
                symbolize(pc).c_str(), what, before.tid, before.tid / 32, before.tid % 32, did,
                symbolize(before.pc).c_str());
  g_text += buf;
}

// Does `a` (by another thread) lack a barrier between it and an access of thread t now?
EMU_NO_TSAN inline bool unordered(const Access& a, int t) {
  if (a.tid == t || a.block_epoch != g_block_epoch) return false;
  return a.tid / 32 != t / 32 || a.warp_epoch == g_warp_epoch[t / 32];
}

EMU_NO_TSAN void on_granule(size_t g, int t, bool write, const void* pc) {
  Granule& s = g_shadow[g];
  if (s.gen != g_gen) {
    s.gen = g_gen;
    s.readers = 0;
    s.written = false;
  }
  const uintptr_t offset = g * 2;
  const Access now{t, g_block_epoch, g_warp_epoch[t / 32], pc};
  if (!write) {
    if (s.written && unordered(s.w, t)) report("RAW", offset, t, pc, s.w);
    // keep this interval's readers (a stale one, before the last __syncthreads, is dropped)
    int keep = 0;
    bool known = false;
    for (int i = 0; i < s.readers && i < kReaders; ++i) {
      if (s.r[i].block_epoch != g_block_epoch) continue;
      known = known || (s.r[i].tid == t && s.r[i].warp_epoch == now.warp_epoch);
      s.r[keep++] = s.r[i];
    }
    s.readers = keep;
    if (!known && keep < kReaders) s.r[s.readers++] = now;
    return;
  }
  if (s.written && unordered(s.w, t)) report("WAW", offset, t, pc, s.w);
  for (int i = 0; i < s.readers && i < kReaders; ++i)
    if (unordered(s.r[i], t)) { report("WAR", offset, t, pc, s.r[i]); break; }
  s.written = true;
  s.w = now;
  s.readers = 0;
}

EMU_NO_TSAN inline void on_access(const void* addr, size_t size, bool write, const void* pc) {
  const auto a = reinterpret_cast<uintptr_t>(addr);
  if (!g_on || a >= g_hi || a + size <= g_lo) return;
  const int t = current_thread();
  if (t < 0) return;  // the scheduler itself (poisoning shared memory between blocks)
  const uintptr_t lo = a < g_lo ? g_lo : a, hi = a + size > g_hi ? g_hi : a + size;
  for (size_t g = (lo - g_lo) / 2; g < (hi - g_lo + 1) / 2; ++g) on_granule(g, t, write, pc);
}
}  // namespace

EMU_NO_TSAN bool instrumented() {
#if defined(EMU_RACECHECK)
  return true;
#else
  return false;
#endif
}

EMU_NO_TSAN void launch_begin(const void* smem, size_t bytes, const void* kernel) {
  g_on = false;
  g_hazards = 0;
  g_nseen = 0;
  g_text.clear();
  g_kernel = kernel;
  if (!instrumented() || bytes == 0) return;
  const size_t granules = (bytes + 1) / 2;
  if (granules > g_capacity) {
    std::free(g_shadow);
    g_shadow = static_cast<Granule*>(std::calloc(granules, sizeof(Granule)));
    if (g_shadow == nullptr) throw std::bad_alloc();
    g_capacity = granules;
    g_gen = 0;
  }
  g_lo = reinterpret_cast<uintptr_t>(smem);
  g_hi = g_lo + bytes;
  g_on = true;
}

EMU_NO_TSAN void block_begin(unsigned block) {
  ++g_gen;  // every granule is untouched again
  if (g_gen == 0) {  // wrapped: clear for real
    std::memset(g_shadow, 0, g_capacity * sizeof(Granule));
    g_gen = 1;
  }
  g_block = block;
  g_block_epoch = 0;
  std::memset(g_warp_epoch, 0, sizeof g_warp_epoch);
}

EMU_NO_TSAN void block_sync() { ++g_block_epoch; }

EMU_NO_TSAN void warp_sync(int warp) { ++g_warp_epoch[warp]; }

EMU_NO_TSAN std::string launch_end() {
  const bool was_on = g_on;
  g_on = false;
  if (!was_on || g_hazards == 0) return "";
  return "emu: racecheck: " + std::to_string(g_hazards) + " shared-memory hazard(s) in " +
         symbolize(g_kernel) + "; the first distinct ones:" + g_text;
}

EMU_NO_TSAN uint64_t hazards() { return g_hazards; }
}  // namespace emu::race

// ---- the entry points of GCC's -fsanitize=thread instrumentation ----
#define EMU_PC __builtin_return_address(0)
extern "C" {
EMU_NO_TSAN void __tsan_init() {}
EMU_NO_TSAN void __tsan_func_entry(void*) {}
EMU_NO_TSAN void __tsan_func_exit() {}
#define EMU_TSAN_SIZED(n)                                                                        \
  EMU_NO_TSAN void __tsan_read##n(void* p) { emu::race::on_access(p, n, false, EMU_PC); }         \
  EMU_NO_TSAN void __tsan_write##n(void* p) { emu::race::on_access(p, n, true, EMU_PC); }         \
  EMU_NO_TSAN void __tsan_unaligned_read##n(void* p) { emu::race::on_access(p, n, false, EMU_PC); } \
  EMU_NO_TSAN void __tsan_unaligned_write##n(void* p) { emu::race::on_access(p, n, true, EMU_PC); } \
  EMU_NO_TSAN void __tsan_volatile_read##n(void* p) { emu::race::on_access(p, n, false, EMU_PC); } \
  EMU_NO_TSAN void __tsan_volatile_write##n(void* p) { emu::race::on_access(p, n, true, EMU_PC); }
EMU_TSAN_SIZED(1)
EMU_TSAN_SIZED(2)
EMU_TSAN_SIZED(4)
EMU_TSAN_SIZED(8)
EMU_TSAN_SIZED(16)
#undef EMU_TSAN_SIZED
EMU_NO_TSAN void __tsan_read_range(void* p, unsigned long n) { emu::race::on_access(p, n, false, EMU_PC); }
EMU_NO_TSAN void __tsan_write_range(void* p, unsigned long n) { emu::race::on_access(p, n, true, EMU_PC); }
// clang's instrumentation calls these for memory intrinsics (GCC uses the range calls above)
EMU_NO_TSAN void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  emu::race::on_access(s, n, false, EMU_PC);
  emu::race::on_access(d, n, true, EMU_PC);
  return std::memcpy(d, s, n);
}
EMU_NO_TSAN void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  emu::race::on_access(s, n, false, EMU_PC);
  emu::race::on_access(d, n, true, EMU_PC);
  return std::memmove(d, s, n);
}
EMU_NO_TSAN void* __tsan_memset(void* d, int c, unsigned long n) {
  emu::race::on_access(d, n, true, EMU_PC);
  return std::memset(d, c, n);
}
EMU_NO_TSAN void __tsan_vptr_update(void**, void*) {}
EMU_NO_TSAN void __tsan_vptr_read(void**) {}

// Atomics (std::atomic in the torch and libstdc++ headers the instrumented sources include): the
// instrumentation turns them into these calls, which must do the real operation. All run
// sequentially consistent, at least as strong as any order asked for.
#define EMU_SC __ATOMIC_SEQ_CST
#define EMU_TSAN_ATOMICS(bits, T)                                                                         \
  EMU_NO_TSAN T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, EMU_SC); } \
  EMU_NO_TSAN void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, EMU_SC); } \
  EMU_NO_TSAN T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, EMU_SC); } \
  EMU_NO_TSAN T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, EMU_SC); } \
  EMU_NO_TSAN T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, EMU_SC); } \
  EMU_NO_TSAN T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, EMU_SC); } \
  EMU_NO_TSAN T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, EMU_SC); } \
  EMU_NO_TSAN T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, EMU_SC); } \
  EMU_NO_TSAN T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, EMU_SC); } \
  EMU_NO_TSAN int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {      \
    return __atomic_compare_exchange_n(a, c, v, false, EMU_SC, EMU_SC);                                    \
  }                                                                                                         \
  EMU_NO_TSAN int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {        \
    return __atomic_compare_exchange_n(a, c, v, true, EMU_SC, EMU_SC);                                     \
  }                                                                                                         \
  EMU_NO_TSAN T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {            \
    __atomic_compare_exchange_n(a, &c, v, false, EMU_SC, EMU_SC);                                          \
    return c;                                                                                               \
  }
EMU_TSAN_ATOMICS(8, uint8_t)
EMU_TSAN_ATOMICS(16, uint16_t)
EMU_TSAN_ATOMICS(32, uint32_t)
EMU_TSAN_ATOMICS(64, uint64_t)
#undef EMU_TSAN_ATOMICS
#undef EMU_SC
EMU_NO_TSAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_NO_TSAN void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}
