// Shared-memory bank conflicts, and global-memory sectors, of the emulated kernels, counted on the CPU.
//
// A GPU's shared memory has 32 banks of 4-byte words (word w is in bank w % 32); one warp-wide
// access is served in "wavefronts", and a wavefront reads or writes at most one word per bank
// (lanes asking for the same word share it). Accesses wider than 4 bytes are served in phases,
// and only lanes of the same phase can conflict: 8-byte accesses in two phases of 16 lanes,
// 16-byte accesses in four phases of 8 lanes (each phase can move 128 bytes); an ldmatrix .x4 in
// four phases, one per 8x8 matrix, whose 8 row addresses (16 bytes each) are served together. A
// phase then takes as many wavefronts as the most words any one bank must deliver, and an access
// without conflicts one per phase that has a lane in it ("ideal").
//
// What is counted, and how the accesses of one warp-wide instruction are put together:
// - ldmatrix: exactly, from the 32 row addresses the lanes give (ptx.cuh calls `ldmatrix`);
// - cp.async: its 16-byte shared-memory write (emu_runtime.cpp calls `record`);
// - plain loads and stores of shared memory: only in the racecheck build, whose instrumented
//   code reports every access (emu_racecheck.cpp calls `record`). Their widths are whatever the
//   host compiler makes of the same source (its auto-vectorisation is off in that build; it may
//   still split a struct copy into 4-byte accesses), which nvcc's may not match; the kernels'
//   wide shared-memory accesses are ldmatrix and cp.async, counted exactly. Sizes other than 1,
//   2, 4, 8 and 16 bytes (no kernel has them) count as 16-byte accesses, larger ones as several.
// The lanes of a warp run one after another between two warp barriers (emu_runtime.cpp), so an
// instruction is the n-th execution of one code address by each lane since the warp's last
// collective operation or __syncthreads: the accesses with the same (code address, n) form one
// warp-wide access. Lanes that skip an access (divergence) do not take part in it; this is exact
// when a lane skips its last executions of a code address before the barrier, not when it skips
// one in the middle of a loop (its later executions are then grouped with the other lanes'
// earlier ones: the float32 backward's `if (ok)` read of sDsum in its row loop is such a site;
// its words stay in different banks either way, only its instruction count is off).
//
// Global memory is counted the same way, in 32-byte sectors instead of wavefronts: a warp-wide
// global access takes one sector request per distinct 32-byte sector its lanes touch, and at best
// as many as its distinct bytes fill (ceil(bytes / 32), the "ideal"). Only accesses to the buffers
// registered with add_global (emu_ops.cpp: every tensor of the launch) count, so that a lane's
// own stack (its registers on the GPU) is not taken for global memory. Kinds: cp.async's 16-byte
// read of its source (emu_runtime.cpp; not when it zero-fills), and in the racecheck build plain
// loads, stores and atomicAdds (the float2 atomicAdd as one 8-byte access). This says nothing of
// caches or DRAM: repeated reads of the same sectors by later instructions count each time, as
// they would in L1 requests.
//
// Off unless `enable(true)`; `table()` gives, per code address and kind, the instructions,
// wavefronts (or sectors) and the ideal since `reset()`.
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "stubs/cuda_runtime.h"

// Every function here is left out of the racecheck build's instrumentation, and the hot paths use
// plain arrays only: an instrumented standard container would call back into the checker for
// each of its own loads and stores (millions of accesses per launch for the float32 kernels).
#define EMU_NO_TSAN __attribute__((no_sanitize_thread))

namespace emu::banks {
namespace {
constexpr int kMaxWarps = 64;
constexpr int kBanks = 32;
constexpr int kMaxAddresses = 128;  // distinct (code address, kind)s a lane runs between two barriers
constexpr int kMaxSites = 4096;    // distinct (code address, kind) of a table
constexpr int kMaxWordsPerBank = 32;  // distinct words one bank serves in one phase (32 lanes at most)

// One warp-wide access, filled in lane by lane.
struct Instr {
  const void* pc;
  uint32_t occurrence;  // how many times each lane had run this code address since the warp's last barrier
  uint16_t chunk;       // 16-byte piece of an access wider than 16 bytes
  uint8_t kind;
  uint32_t lanes;       // bit l: lane l takes part
  uint64_t offset[32];  // bytes from the start of shared memory; global kinds: the address
  uint8_t size[32];
};

struct Occurrences {  // per lane: (code address, kind)s run since the warp's last barrier, and how often
  const void* pc[kMaxAddresses];
  int kind[kMaxAddresses];  // (a cp.async is two: its shared write and, unless zero-filling, its global read)
  uint32_t count[kMaxAddresses];
  int n;
};

struct Warp {
  Instr* instrs = nullptr;
  size_t n = 0, capacity = 0;
  uint32_t cursor[32];  // per lane: where its next access most likely is (the lanes run the same code)
  Occurrences occ[32];
};

struct Site {
  const void* pc;
  int kind, size;
  uint64_t instructions, wavefronts, ideal;
};

bool g_enabled = false;
int g_muted = 0;
constexpr int kMaxGlobals = 32;
struct Range {
  uintptr_t lo, hi;
};
Range g_globals[kMaxGlobals];  // the global buffers whose accesses are counted (add_global)
int g_nglobals = 0;
Warp g_warps[kMaxWarps];
Site g_sites[kMaxSites];  // open addressing on (pc, kind); pc == nullptr: free
int g_nsites = 0;

EMU_NO_TSAN Site* site(const void* pc, int kind) {
  size_t h = (reinterpret_cast<uintptr_t>(pc) * 0x9E3779B97F4A7C15ull + static_cast<size_t>(kind)) % kMaxSites;
  for (int probe = 0; probe < kMaxSites; ++probe, h = (h + 1) % kMaxSites) {
    Site& s = g_sites[h];
    if (s.pc == pc && s.kind == kind) return &s;
    if (s.pc == nullptr) {
      if (g_nsites + 1 >= kMaxSites) fail("bank count: more than %d code addresses", kMaxSites - 1);
      ++g_nsites;
      s = Site{pc, kind, 0, 0, 0, 0};
      return &s;
    }
  }
  fail("bank count: site table full");
}

// Wavefronts of one phase: the most distinct words any one bank serves (0 for no word).
struct Phase {
  uint32_t words[kBanks][kMaxWordsPerBank];  // distinct words per bank
  int n[kBanks];
  int most;
};

EMU_NO_TSAN void phase_clear(Phase& p) {
  std::memset(p.n, 0, sizeof p.n);
  p.most = 0;
}

EMU_NO_TSAN void phase_add(Phase& p, uint32_t word) {
  const int b = static_cast<int>(word % kBanks);
  for (int i = 0; i < p.n[b]; ++i)
    if (p.words[b][i] == word) return;
  if (p.n[b] < kMaxWordsPerBank) p.words[b][p.n[b]++] = word;
  if (p.n[b] > p.most) p.most = p.n[b];
}

EMU_NO_TSAN void add_to_site(const void* pc, int kind, int size, int wavefronts, int ideal) {
  Site* s = site(pc, kind);
  ++s->instructions;
  s->wavefronts += static_cast<uint64_t>(wavefronts);
  s->ideal += static_cast<uint64_t>(ideal);
  if (size > s->size) s->size = size;
}

EMU_NO_TSAN bool is_global(int kind) { return kind >= kGlobalLoad; }

// A global access: the distinct 32-byte sectors its lanes touch, against the fewest sectors that
// could hold its distinct bytes.
EMU_NO_TSAN void count_global(const Instr& in) {
  uint64_t sectors[64], lo[32], hi[32];
  int nsectors = 0, nranges = 0, size = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(in.lanes >> l & 1u)) continue;
    if (in.size[l] > size) size = in.size[l];
    const uint64_t a = in.offset[l], b = a + in.size[l];
    for (uint64_t s = a / 32; s <= (b - 1) / 32; ++s) {
      int i = 0;
      while (i < nsectors && sectors[i] != s) ++i;
      if (i == nsectors) sectors[nsectors++] = s;  // (16 bytes at most: 2 sectors a lane)
    }
    int at = nranges++;  // insertion sort by start
    for (; at > 0 && lo[at - 1] > a; --at) {
      lo[at] = lo[at - 1];
      hi[at] = hi[at - 1];
    }
    lo[at] = a;
    hi[at] = b;
  }
  uint64_t bytes = 0, end = 0;
  for (int i = 0; i < nranges; ++i) {  // the union's size
    const uint64_t from = lo[i] > end ? lo[i] : end;
    if (hi[i] > from) bytes += hi[i] - from;
    if (hi[i] > end) end = hi[i];
  }
  add_to_site(in.pc, in.kind, size, nsectors, static_cast<int>((bytes + 31) / 32));
}

EMU_NO_TSAN void count_instruction(const Instr& in) {
  if (is_global(in.kind)) return count_global(in);
  int size = 0;
  for (int l = 0; l < 32; ++l)
    if ((in.lanes >> l & 1u) && in.size[l] > size) size = in.size[l];
  const int lanes_per_phase = size <= 4 ? 32 : size <= 8 ? 16 : 8;
  int wavefronts = 0, ideal = 0;
  static Phase phase;
  for (int first = 0; first < 32; first += lanes_per_phase) {
    phase_clear(phase);
    for (int l = first; l < first + lanes_per_phase; ++l) {
      if (!(in.lanes >> l & 1u)) continue;
      for (uint64_t w = in.offset[l] / 4; w <= (in.offset[l] + in.size[l] - 1) / 4; ++w)
        phase_add(phase, static_cast<uint32_t>(w));
    }
    wavefronts += phase.most;
    ideal += phase.most > 0 ? 1 : 0;
  }
  add_to_site(in.pc, in.kind, size, wavefronts, ideal);
}

EMU_NO_TSAN uint32_t next_occurrence(Occurrences& o, const void* pc, int kind) {
  for (int i = 0; i < o.n; ++i)
    if (o.pc[i] == pc && o.kind[i] == kind) return o.count[i]++;
  if (o.n == kMaxAddresses) fail("bank count: more than %d code addresses between two barriers", kMaxAddresses);
  o.pc[o.n] = pc;
  o.kind[o.n] = kind;
  o.count[o.n++] = 1;
  return 0;
}

EMU_NO_TSAN bool matches(const Instr& in, const void* pc, uint32_t occurrence, uint16_t chunk, int kind) {
  return in.pc == pc && in.occurrence == occurrence && in.chunk == chunk && in.kind == kind;
}

EMU_NO_TSAN void clear(Warp& w) {  // after counting (or dropping) its accesses
  w.n = 0;
  std::memset(w.cursor, 0, sizeof w.cursor);
  for (Occurrences& o : w.occ) o.n = 0;
}

// The instruction (pc, occurrence, chunk, kind) of lane `lane`'s warp: where the lane's cursor
// points (the usual case), else found by search, else a new one.
EMU_NO_TSAN Instr& instruction(Warp& w, int lane, const void* pc, uint32_t occurrence, uint16_t chunk, int kind) {
  size_t i = w.cursor[lane];
  if (!(i < w.n && matches(w.instrs[i], pc, occurrence, chunk, kind))) {
    for (i = 0; i < w.n && !matches(w.instrs[i], pc, occurrence, chunk, kind); ++i) {}
    if (i == w.n) {
      if (w.n == w.capacity) {
        const size_t cap = w.capacity ? 2 * w.capacity : 256;
        auto* grown = static_cast<Instr*>(std::realloc(w.instrs, cap * sizeof(Instr)));
        if (grown == nullptr) throw std::bad_alloc();
        w.instrs = grown;
        w.capacity = cap;
      }
      Instr& in = w.instrs[w.n++];
      in.pc = pc;
      in.occurrence = occurrence;
      in.chunk = chunk;
      in.kind = static_cast<uint8_t>(kind);
      in.lanes = 0;
    }
  }
  w.cursor[lane] = static_cast<uint32_t>(i + 1);
  return w.instrs[i];
}
}  // namespace

EMU_NO_TSAN void enable(bool on) {
  block_done();
  g_enabled = on;
}

EMU_NO_TSAN bool enabled() { return g_enabled; }

EMU_NO_TSAN void reset() {
  block_done();
  for (Site& s : g_sites) s.pc = nullptr;
  g_nsites = 0;
  g_muted = 0;
}

EMU_NO_TSAN void mute(bool on) { g_muted += on ? 1 : -1; }

EMU_NO_TSAN void discard() {
  for (Warp& w : g_warps) clear(w);
}

EMU_NO_TSAN void record(int thread, size_t offset, size_t size, int kind, const void* pc) {
  if (!g_enabled || g_muted > 0 || thread < 0 || size == 0 || thread / 32 >= kMaxWarps) return;
  Warp& w = g_warps[thread / 32];
  const int lane = thread % 32;
  const uint32_t occurrence = next_occurrence(w.occ[lane], pc, kind);
  for (size_t at = 0, chunk = 0; at < size; at += 16, ++chunk) {
    Instr& in = instruction(w, lane, pc, occurrence, static_cast<uint16_t>(chunk), kind);
    in.lanes |= 1u << lane;
    in.offset[lane] = static_cast<uint64_t>(offset + at);
    in.size[lane] = static_cast<uint8_t>(size - at < 16 ? size - at : 16);
  }
}

GlobalBox g_box;

EMU_NO_TSAN void add_global(const void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) return;
  if (g_nglobals == kMaxGlobals) fail("bank count: more than %d global buffers", kMaxGlobals);
  const auto lo = reinterpret_cast<uintptr_t>(ptr);
  g_globals[g_nglobals++] = Range{lo, lo + bytes};
  if (g_nglobals == 1 || lo < g_box.lo) g_box.lo = lo;
  if (g_nglobals == 1 || lo + bytes > g_box.hi) g_box.hi = lo + bytes;
}

EMU_NO_TSAN void clear_globals() {
  g_nglobals = 0;
  g_box.lo = g_box.hi = 0;
}

EMU_NO_TSAN bool counts_global(const void* addr, size_t size) {
  // cheapest rejections first: this runs for every access of the racecheck build while counting
  const auto a = reinterpret_cast<uintptr_t>(addr);
  if (!in_global_box(addr, size) || !g_enabled || g_muted > 0) return false;
  for (int i = 0; i < g_nglobals; ++i)
    if (a < g_globals[i].hi && a + size > g_globals[i].lo) return true;
  return false;
}

EMU_NO_TSAN void record_global(int thread, const void* addr, size_t size, int kind, const void* pc) {
  if (counts_global(addr, size)) record(thread, reinterpret_cast<uintptr_t>(addr), size, kind, pc);
}

// Every lane gives one 16-byte row and the rows of matrix m come from lanes 8m .. 8m + 7: the
// phases of a warp-wide 16-byte access.
EMU_NO_TSAN void ldmatrix(const size_t (&row_offsets)[32], bool trans, const void* pc) {
  if (!g_enabled) return;
  Instr in{};
  in.pc = pc;
  in.kind = static_cast<uint8_t>(trans ? kLdmatrixTrans : kLdmatrix);
  in.lanes = 0xffffffffu;
  for (int l = 0; l < 32; ++l) {
    in.offset[l] = static_cast<uint32_t>(row_offsets[l]);
    in.size[l] = 16;
  }
  count_instruction(in);
}

EMU_NO_TSAN void warp_done(int warp) {
  if (warp < 0 || warp >= kMaxWarps) return;
  Warp& w = g_warps[warp];
  if (w.n == 0) return;  // (no access since the barrier: no occurrence either)
  for (size_t i = 0; i < w.n; ++i) count_instruction(w.instrs[i]);
  clear(w);
}

EMU_NO_TSAN void block_done() {
  for (int w = 0; w < kMaxWarps; ++w) warp_done(w);
}

EMU_NO_TSAN std::vector<int64_t> table() {
  block_done();
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(g_nsites) * 6);
  for (const Site& s : g_sites) {
    if (s.pc == nullptr) continue;
    Dl_info info;
    const auto pc = reinterpret_cast<uintptr_t>(s.pc);
    const uintptr_t base = dladdr(s.pc, &info) != 0 ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
    const int64_t row[6] = {static_cast<int64_t>(pc - base), s.kind, s.size, static_cast<int64_t>(s.instructions),
                            static_cast<int64_t>(s.wavefronts), static_cast<int64_t>(s.ideal)};
    rows.insert(rows.end(), row, row + 6);
  }
  return rows;
}
}  // namespace emu::banks
