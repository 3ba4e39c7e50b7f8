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
// wait that completes them, in both modes), and from issue to that wait the destination is in
// flight: an access to it by any thread, barriers or not, is a hazard ("cp.async RAW", "cp.async
// WAW"), since only the issuer's wait completes the copy. An ldmatrix reads each 16-byte row as
// the lane that supplied the row's address (a lane may overwrite its own row afterwards), after
// its warp's barrier. An atomicAdd on shared memory counts as a plain write (stricter than the
// GPU; no kernel here adds atomically in shared memory).
//
// Global memory: the buffers the kernels write (registered with track_global; the emulated ops
// register every output and buffer they allocate) are checked too, per launch, with blocks
// unordered among themselves (they run concurrently on a GPU): two accesses from different
// blocks, at least one a plain write, are a hazard (a kernel that adds into dQ without atomics, a
// block reading what another writes); atomicAdd against atomicAdd is not, atomicAdd against a
// plain access is (also when several blocks added and the plain access is ordered after the last
// of them). Within a block the shared-memory rule applies. With set_ordered_atomics(true),
// atomicAdd against an unordered atomicAdd is a hazard too ("atomic order": the order of the
// additions, and so the rounding of the sum, would depend on the schedule), for checking the
// backward's deterministic schedule.
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
#include <stdexcept>
#include <string>

#include "stubs/cuda_runtime.h"

#define EMU_NO_TSAN __attribute__((no_sanitize_thread))

namespace emu::race {
namespace {
constexpr int kReaders = 8;     // readers kept per granule; more only lose WAR reports, never add any
constexpr int kMaxReports = 10;  // distinct (kind, code location pair) hazards described
constexpr int kMaxWarps = 64;

struct Access {
  int32_t tid;
  uint32_t block;        // blockIdx.x
  uint32_t block_epoch;  // __syncthreads the block had passed
  uint32_t warp_epoch;   // warp collectives the thread's warp had passed
  const void* pc;        // the instrumented code's address of the access
};

struct Granule {
  uint32_t gen;  // == g_gen: valid in this block; anything else: untouched so far
  int32_t readers;
  bool written;
  bool in_flight;  // a cp.async into it is issued and its issuer has not waited for it yet
  Access w;
  Access copy;     // that cp.async's issue
  Access r[kReaders];
};

// A granule of a tracked global buffer: its last writer (and whether by atomicAdd) and one reader
// since, plus whether readers of other blocks were seen (their identities are not needed: any
// later write from a block is unordered with at least one of them).
// With atomic writers from several blocks, w is the last of them and w_other one of another block
// than w's: a plain access ordered after w (w's own thread) is still unordered with w_other.
struct GlobalGranule {
  uint32_t gen;  // == g_launch_gen: valid in this launch
  bool written, atomic_write, has_reader, many_reader_blocks, many_atomic_blocks;
  Access w, r, w_other;
};

struct Tracked {
  uintptr_t lo, hi;
  size_t first;  // index of its first granule in g_global
};

struct Report {
  char kind[16];  // "atomic WAW" and the like fit
  const void* pc_now;
  const void* pc_before;
};

struct Reports {  // hazards of one memory space in this launch
  uint64_t count = 0;
  Report seen[kMaxReports];
  int nseen = 0;
  std::string text;
};

bool g_on = false;
uintptr_t g_lo = 0, g_hi = 0;
uint32_t g_gen = 0;
uint32_t g_block_epoch = 0;
uint32_t g_warp_epoch[kMaxWarps];
unsigned g_block = 0;
Granule* g_shadow = nullptr;
size_t g_capacity = 0;  // granules allocated
constexpr int kMaxTracked = 16;
Tracked g_tracked[kMaxTracked];
int g_ntracked = 0;
GlobalGranule* g_global = nullptr;
size_t g_global_capacity = 0, g_global_used = 0;
uint32_t g_launch_gen = 0;
int g_actor = -1;  // >= 0: the thread the accesses are attributed to (an ldmatrix row's lane)
bool g_ordered_atomics = false;  // set_ordered_atomics
Reports g_shared_reports, g_global_reports;
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

// kind: RAW, WAR, WAW (an "atomic" before it when one side is an atomicAdd); `offset` in shared
// memory, or in a global buffer of `buffer_bytes` bytes (> 0).
EMU_NO_TSAN void report(Reports& rs, const char* kind, size_t offset, size_t buffer_bytes, int t, const void* pc,
                        const Access& before, bool before_atomic) {
  ++rs.count;
  for (int i = 0; i < rs.nseen; ++i)
    if (std::strcmp(rs.seen[i].kind, kind) == 0 && rs.seen[i].pc_now == pc && rs.seen[i].pc_before == before.pc) return;
  if (rs.nseen == kMaxReports) return;
  Report& r = rs.seen[rs.nseen++];
  std::snprintf(r.kind, sizeof r.kind, "%s", kind);
  r.pc_now = pc;
  r.pc_before = before.pc;
  const bool raw = std::strstr(kind, "RAW") != nullptr, war = std::strstr(kind, "WAR") != nullptr;
  const bool copy = std::strncmp(kind, "cp.async", 8) == 0;
  const char* what = copy ? "accesses what" : raw ? "reads what" : war ? "overwrites what" : "writes what";
  const char* did = copy ? "copies into with cp.async" : war ? "read" : before_atomic ? "added (atomicAdd)" : "wrote";
  const char* between = copy ? "still in flight (its issuer has not waited for it)" :
      before.block != g_block ? "in another block (blocks are unordered)" : "with no barrier between";
  const std::string where = buffer_bytes == 0 ? "shared-memory offset " + std::to_string(offset) :
      "byte " + std::to_string(offset) + " of a " + std::to_string(buffer_bytes) + "-byte global buffer";
  char buf[2048];
  std::snprintf(buf, sizeof buf,
                "\n  %s hazard at %s (block %u, after %u __syncthreads): thread %d (warp %d, lane %d) at %s\n"
                "    %s block %u thread %d (warp %d, lane %d) %s at %s, %s",
                kind, where.c_str(), g_block, g_block_epoch, t, t / 32, t % 32, symbolize(pc).c_str(), what,
                before.block, before.tid, before.tid / 32, before.tid % 32, did, symbolize(before.pc).c_str(),
                between);
  rs.text += buf;
}

// Does `a` (by another thread) lack a barrier between it and an access of thread t now? Blocks
// have no barrier between them.
EMU_NO_TSAN inline bool unordered(const Access& a, int t) {
  if (a.block != g_block) return true;
  if (a.tid == t || a.block_epoch != g_block_epoch) return false;
  return a.tid / 32 != t / 32 || a.warp_epoch == g_warp_epoch[t / 32];
}

EMU_NO_TSAN Granule& granule(size_t g) {
  Granule& s = g_shadow[g];
  if (s.gen != g_gen) {
    s.gen = g_gen;
    s.readers = 0;
    s.written = s.in_flight = false;
  }
  return s;
}

EMU_NO_TSAN void on_granule(size_t g, int t, bool write, const void* pc) {
  Granule& s = granule(g);
  const size_t where = g * 2;
  const Access now{t, g_block, g_block_epoch, g_warp_epoch[t / 32], pc};
  if (s.in_flight) report(g_shared_reports, write ? "cp.async WAW" : "cp.async RAW", where, 0, t, pc, s.copy, false);
  if (!write) {
    if (s.written && unordered(s.w, t)) report(g_shared_reports, "RAW", where, 0, t, pc, s.w, false);
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
  if (s.written && unordered(s.w, t)) report(g_shared_reports, "WAW", where, 0, t, pc, s.w, false);
  for (int i = 0; i < s.readers && i < kReaders; ++i)
    if (unordered(s.r[i], t)) { report(g_shared_reports, "WAR", where, 0, t, pc, s.r[i], false); break; }
  s.written = true;
  s.w = now;
  s.readers = 0;
}

EMU_NO_TSAN void on_global_granule(const Tracked& tr, size_t g, int t, bool write, bool atomic, const void* pc) {
  GlobalGranule& s = g_global[tr.first + g];
  if (s.gen != g_launch_gen) {
    s.gen = g_launch_gen;
    s.written = s.atomic_write = s.has_reader = s.many_reader_blocks = s.many_atomic_blocks = false;
  }
  const Access now{t, g_block, g_block_epoch, g_warp_epoch[t / 32], pc};
  const size_t where = g * 2, bytes = tr.hi - tr.lo;
  if (atomic) {  // conflicts only with plain accesses
    if (s.written && !s.atomic_write && unordered(s.w, t))
      report(g_global_reports, "atomic WAW", where, bytes, t, pc, s.w, false);
    if (s.has_reader && (s.many_reader_blocks || unordered(s.r, t)))
      report(g_global_reports, "atomic WAR", where, bytes, t, pc, s.r, false);
    if (g_ordered_atomics && s.written && s.atomic_write &&
        (unordered(s.w, t) || (s.many_atomic_blocks && unordered(s.w_other, t))))
      report(g_global_reports, "atomic order", where, bytes, t, pc, unordered(s.w, t) ? s.w : s.w_other, true);
    if (!s.written || s.atomic_write) {
      if (s.written && s.w.block != g_block) {
        s.many_atomic_blocks = true;
        s.w_other = s.w;
      }
      s.written = s.atomic_write = true;
      s.w = now;
    }
    return;
  }
  // the writer unordered with an access of thread t now, if any
  const Access* wrote = !s.written ? nullptr : unordered(s.w, t) ? &s.w :
      s.many_atomic_blocks && unordered(s.w_other, t) ? &s.w_other : nullptr;
  if (!write) {
    if (wrote != nullptr) report(g_global_reports, "RAW", where, bytes, t, pc, *wrote, s.atomic_write);
    if (!s.has_reader) {
      s.has_reader = true;
      s.r = now;
    } else if (s.r.block != g_block) {
      s.many_reader_blocks = true;
    } else if (!unordered(s.r, t)) {
      s.r = now;  // the newer of two ordered reads of this block
    }
    return;
  }
  if (wrote != nullptr) report(g_global_reports, "WAW", where, bytes, t, pc, *wrote, s.atomic_write);
  if (s.has_reader && (s.many_reader_blocks || unordered(s.r, t)))
    report(g_global_reports, "WAR", where, bytes, t, pc, s.r, false);
  s.written = true;
  s.atomic_write = s.many_atomic_blocks = false;
  s.w = now;
  s.has_reader = s.many_reader_blocks = false;
}

// The 2-byte granules [first, end) that [a, a + size) overlaps in [lo, hi), indexed from lo; none
// (first == end) when the ranges are disjoint. (No lambdas here: their bodies would be instrumented.)
struct Granules {
  size_t first = 0, end = 0;
};
EMU_NO_TSAN inline Granules overlap(uintptr_t a, size_t size, uintptr_t lo, uintptr_t hi) {
  if (a >= hi || a + size <= lo) return {};
  const uintptr_t from = a < lo ? lo : a, to = a + size > hi ? hi : a + size;
  return {(from - lo) / 2, (to - lo + 1) / 2};
}

EMU_NO_TSAN void on_access(const void* addr, size_t size, bool write, const void* pc, bool atomic = false) {
  if (!g_on) return;
  const auto a = reinterpret_cast<uintptr_t>(addr);
  Granules gs = overlap(a, size, g_lo, g_hi);
  // the sector count of global accesses (current_thread() only then: it reads memory itself)
  if (gs.first == gs.end && g_actor < 0 && banks::in_global_box(addr, size) && banks::counts_global(addr, size)) {
    const int t = current_thread();
    if (t >= 0)
      banks::record(t, a, size, atomic ? banks::kGlobalAtomic : write ? banks::kGlobalStore : banks::kGlobalLoad, pc);
  }
  const Tracked* tr = nullptr;
  for (int i = 0; i < g_ntracked && gs.first == gs.end; ++i) {
    gs = overlap(a, size, g_tracked[i].lo, g_tracked[i].hi);
    tr = &g_tracked[i];
  }
  if (gs.first == gs.end) return;
  const int t = g_actor >= 0 ? g_actor : current_thread();
  if (t < 0) return;  // the scheduler itself (poisoning shared memory between blocks)
  // a plain shared-memory access of the kernel's code (not a collective's read for a lane)
  if (tr == nullptr && g_actor < 0 && banks::enabled()) banks::record(t, a - g_lo, size, write ? banks::kStore : banks::kLoad, pc);
  for (size_t g = gs.first; g < gs.end; ++g)
    if (tr == nullptr) on_granule(g, t, write, pc);
    else on_global_granule(*tr, g, t, write, atomic, pc);
}

EMU_NO_TSAN std::string section(const char* space, const Reports& rs) {
  if (rs.count == 0) return "";
  return "\n" + std::to_string(rs.count) + " " + space + " hazard(s); the first distinct ones:" + rs.text;
}
}  // namespace

EMU_NO_TSAN bool instrumented() {
#if defined(EMU_RACECHECK)
  return true;
#else
  return false;
#endif
}

EMU_NO_TSAN void track_global(const void* ptr, size_t bytes) {
  if (!instrumented() || bytes == 0) return;
  if (g_ntracked == kMaxTracked) throw std::runtime_error("emu: racecheck: too many tracked global buffers");
  const size_t granules = (bytes + 1) / 2;
  if (g_global_used + granules > g_global_capacity) {  // grow, keeping the entries of the others
    const size_t cap = 2 * (g_global_used + granules);
    auto* grown = static_cast<GlobalGranule*>(std::calloc(cap, sizeof(GlobalGranule)));
    if (grown == nullptr) throw std::bad_alloc();
    if (g_global != nullptr) std::memcpy(grown, g_global, g_global_used * sizeof(GlobalGranule));
    std::free(g_global);
    g_global = grown;
    g_global_capacity = cap;
  }
  const auto lo = reinterpret_cast<uintptr_t>(ptr);
  g_tracked[g_ntracked++] = Tracked{lo, lo + bytes, g_global_used};
  std::memset(g_global + g_global_used, 0, granules * sizeof(GlobalGranule));
  g_global_used += granules;
}

EMU_NO_TSAN void set_ordered_atomics(bool on) { g_ordered_atomics = on; }

EMU_NO_TSAN void untrack_globals() {
  g_ntracked = 0;
  g_global_used = 0;
}

EMU_NO_TSAN void launch_begin(const void* smem, size_t bytes, const void* kernel) {
  g_on = false;
  g_shared_reports = Reports{};
  g_global_reports = Reports{};
  g_kernel = kernel;
  g_actor = -1;
  if (!instrumented()) return;
  const size_t granules = (bytes + 1) / 2;
  if (granules > g_capacity) {
    std::free(g_shadow);
    g_shadow = static_cast<Granule*>(std::calloc(granules, sizeof(Granule)));
    if (g_shadow == nullptr) throw std::bad_alloc();
    g_capacity = granules;
    g_gen = 0;
  }
  if (++g_launch_gen == 0) {  // wrapped: clear for real
    if (g_global != nullptr) std::memset(g_global, 0, g_global_capacity * sizeof(GlobalGranule));
    g_launch_gen = 1;
  }
  g_lo = reinterpret_cast<uintptr_t>(smem);
  g_hi = g_lo + bytes;
  g_on = true;
}

EMU_NO_TSAN void block_begin(unsigned block) {
  g_actor = -1;
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
  if (!was_on || hazards() == 0) return "";
  return "emu: racecheck: " + std::to_string(hazards()) + " hazard(s) in " + symbolize(g_kernel) + ":" +
         section("shared-memory", g_shared_reports) + section("global-memory", g_global_reports);
}

EMU_NO_TSAN void act_as(int thread) { g_actor = thread; }

EMU_NO_TSAN void copy_issued(const void* dst, size_t bytes, const void* pc) {
  const int t = current_thread();
  if (!g_on || t < 0) return;
  const Access issue{t, g_block, g_block_epoch, g_warp_epoch[t / 32], pc};
  const Granules gs = overlap(reinterpret_cast<uintptr_t>(dst), bytes, g_lo, g_hi);
  for (size_t g = gs.first; g < gs.end; ++g) {
    Granule& s = granule(g);
    s.in_flight = true;
    s.copy = issue;
  }
}

// The wait completes the copy: a write by the issuer now (in both cp.async modes, so that a reader
// the barrier before the wait does not order is reported whichever ran first).
EMU_NO_TSAN void copy_waited(const void* dst, size_t bytes) {
  const int t = current_thread();
  if (!g_on || t < 0) return;
  const Granules gs = overlap(reinterpret_cast<uintptr_t>(dst), bytes, g_lo, g_hi);
  for (size_t g = gs.first; g < gs.end; ++g) {
    Granule& s = granule(g);
    const void* pc = s.in_flight ? s.copy.pc : nullptr;
    s.in_flight = false;
    on_granule(g, t, true, pc);
  }
}

EMU_NO_TSAN uint64_t hazards() { return g_shared_reports.count + g_global_reports.count; }

EMU_NO_TSAN float atomic_add(float* a, float v) {
  on_access(a, sizeof(float), true, __builtin_return_address(0), true);
  const float old = *a;
  *a = old + v;  // fibers are never preempted: a plain read-modify-write is atomic
  return old;
}

EMU_NO_TSAN void atomic_add2(float* a, float x, float y) {
  on_access(a, 2 * sizeof(float), true, __builtin_return_address(0), true);
  a[0] += x;
  a[1] += y;
}
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
