// Fiber scheduler for the CUDA emulation (see stubs/cuda_runtime.h).
//
// Every thread of a block is a fiber with its own stack; the scheduler (on the caller's stack)
// resumes the runnable fibers warp by warp (see run_grid), a fiber runs until it waits at a
// barrier or exits.
// Each warp barrier (every mma, ldmatrix, __shfl_xor_sync) costs a switch into and out of 31 or
// 32 fibers, so the switch is a small hand-written one on x86-64 (callee-saved registers and
// the stack pointer; swapcontext would add a sigprocmask system call per switch, which
// dominated the run time). Elsewhere, or with SRT_EMU_UCONTEXT=1 in the environment, it is
// ucontext's swapcontext.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "stubs/cuda_runtime.h"

// The kernels' `extern __shared__ float4 smem_f4[]` (block scope in namespace srt::cuda)
// resolve to this array.
namespace srt::cuda {
alignas(16) float4 smem_f4[(228 * 1024) / sizeof(float4)];
}
#define smem_storage srt::cuda::smem_f4

#if defined(__x86_64__)
#define EMU_HAVE_ASM_SWITCH 1
// emu_fiber_switch(&save_sp, load_sp): pushes the callee-saved registers on the current stack,
// stores the stack pointer in *save_sp, switches to load_sp and pops the registers saved
// there; `ret` then continues where that stack left off (or, for a new fiber, in the entry
// function whose address init_fiber_stack put above the registers).
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl emu_fiber_switch
    .hidden emu_fiber_switch
    .type emu_fiber_switch, @function
emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_fiber_switch, .-emu_fiber_switch
)");
#else
#define EMU_HAVE_ASM_SWITCH 0
#endif

namespace emu {
EmuDim3* cur_tid = nullptr;
EmuDim3 block_idx, block_dim, grid_dim;

namespace {
constexpr int kMaxWarps = 64;
constexpr size_t kStackBytes = 256 * 1024;
constexpr uint32_t kPoison = 0x7fff7fffu;  // NaN as f32; each half NaN as f16 and as bf16

enum State { kRunnable, kWaitBlock, kWaitWarp, kDone, kFailed };

struct CpCopy {
  unsigned char* dst;
  const unsigned char* src;
  bool valid;
  bool done;  // early mode: written at issue
  int group;  // -1 until committed
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer (asm switch)
  ucontext_t uc;       // ucontext switch
  EmuDim3 tid;
  State state = kRunnable;
  const char* where = nullptr;  // the barrier it waits at
  unsigned seq = 0;             // warp collectives passed (selects the slot buffer)
  std::vector<CpCopy> cp;       // cp.async copies not yet waited for, in issue order
  int cp_groups = 0;            // committed cp.async groups
};

struct Stack {
  unsigned char* base;  // lowest usable byte (a PROT_NONE guard page lies below)
};

std::vector<Fiber> fibers;
std::vector<Stack> stacks;  // kept across launches
void* sched_sp = nullptr;
ucontext_t sched_uc;
bool use_ucontext = !EMU_HAVE_ASM_SWITCH;
int cur = -1, nthreads = 0;
size_t launch_smem = 0;
int arrived_block = 0;
int arrived_warp[kMaxWarps];
WarpSlots slots[kMaxWarps][2];
const char* slot_op[kMaxWarps][2][32];
unsigned slot_seq[kMaxWarps][2][32];
void (*g_body)(void*) = nullptr;
void* g_arg = nullptr;
bool g_failed = false;
bool phase_restart = false;  // a __syncthreads was released: restart the warp order
std::string g_error;
int cp_mode = kCpAsyncEarly;
std::vector<std::pair<const char*, uint64_t>> counts;

void switch_to_scheduler() {
  Fiber& f = fibers[cur];
#if EMU_HAVE_ASM_SWITCH
  if (!use_ucontext) { emu_fiber_switch(&f.sp, sched_sp); return; }
#endif
  swapcontext(&f.uc, &sched_uc);
}

void resume(int i) {
#if EMU_HAVE_ASM_SWITCH
  if (!use_ucontext) { emu_fiber_switch(&sched_sp, fibers[i].sp); return; }
#endif
  swapcontext(&sched_uc, &fibers[i].uc);
}

void park(State s, const char* where) {
  fibers[cur].state = s;
  fibers[cur].where = where;
  switch_to_scheduler();
}

void finish_thread() {
  Fiber& f = fibers[cur];
  if (!f.cp.empty()) {
    size_t uncommitted = 0;
    for (const CpCopy& c : f.cp) uncommitted += c.group < 0;
    fail("exited with %zu cp.async copies not waited for (%zu of them never committed): every copy "
         "needs a cp_async_commit and a cp_async_wait that covers its group",
         f.cp.size(), uncommitted);
  }
}

[[noreturn]] void fiber_entry() {
  g_body(g_arg);
  finish_thread();
  fibers[cur].state = kDone;
  fibers[cur].where = "exited";
  switch_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

void ensure_stacks(int n) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(stacks.size()) < n) {
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("emu: cannot allocate a fiber stack");
    mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting the neighbour
    stacks.push_back({static_cast<unsigned char*>(m) + page});
  }
}

void init_fiber(int i) {
  Fiber& f = fibers[i];
  f.tid = EmuDim3{};
  f.tid.x = static_cast<unsigned>(i);
  f.state = kRunnable;
  f.where = nullptr;
  f.seq = 0;
  f.cp.clear();
  f.cp_groups = 0;
  unsigned char* lo = stacks[i].base;
  if (use_ucontext) {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = lo;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;  // fiber_entry never returns
    makecontext(&f.uc, reinterpret_cast<void (*)()>(fiber_entry), 0);
    return;
  }
  // Frame for emu_fiber_switch to pop: 6 registers, then the address `ret` jumps to, then a
  // null return address for fiber_entry (entered with rsp = 8 mod 16, as after a call).
  auto top = reinterpret_cast<uintptr_t>(lo + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uintptr_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uintptr_t>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--sp = 0;
  f.sp = sp;
}

std::string deadlock_report(unsigned b) {
  std::string s = "emu: DEADLOCK in block " + std::to_string(b) +
                  ": no thread can continue. Where the threads are:";
  for (int w = 0; w < nthreads / 32; ++w) {
    s += "\n  warp " + std::to_string(w) + ":";
    int l = 0;
    while (l < 32) {
      const Fiber& f = fibers[w * 32 + l];
      int e = l + 1;
      while (e < 32 && fibers[w * 32 + e].state == f.state && fibers[w * 32 + e].where == f.where) ++e;
      s += " lanes " + std::to_string(l) + "-" + std::to_string(e - 1) + " " +
           (f.state == kWaitBlock ? "at __syncthreads" :
            f.state == kWaitWarp ? std::string("waiting in ") + f.where : std::string("exited")) + ";";
      l = e;
    }
  }
  return s;
}
}  // namespace

void fail(const char* fmt, ...) {
  char body[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(body, sizeof body, fmt, ap);
  va_end(ap);
  std::string msg = "emu: ";
  if (cur >= 0) {
    msg += "block " + std::to_string(block_idx.x) + ", thread " + std::to_string(fibers[cur].tid.x) +
           " (warp " + std::to_string(fibers[cur].tid.x / 32) + ", lane " +
           std::to_string(fibers[cur].tid.x % 32) + "): ";
  }
  msg += body;
  std::fprintf(stderr, "%s\n", msg.c_str());
  if (cur < 0) throw std::runtime_error(msg);
  // In a fiber: record the error and never come back; run_grid throws on the caller's stack.
  g_failed = true;
  g_error = msg;
  fibers[cur].state = kFailed;
  switch_to_scheduler();
  std::abort();
}

void count_op(const char* op) {
  for (auto& c : counts)
    if (c.first == op || std::strcmp(c.first, op) == 0) { ++c.second; return; }
  counts.emplace_back(op, 1);
}
std::vector<std::pair<std::string, uint64_t>> op_counts() {
  std::vector<std::pair<std::string, uint64_t>> r;
  for (const auto& c : counts) r.emplace_back(c.first, c.second);
  return r;
}
void reset_op_counts() { counts.clear(); }

unsigned char* smem_begin() { return reinterpret_cast<unsigned char*>(smem_storage); }
size_t smem_size() { return launch_smem; }

void check_smem(const void* p, size_t bytes, size_t align, const char* op) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* b = smem_begin();
  if (c < b || c + bytes > b + launch_smem) {
    fail("%s: address %p (offset %td from the shared memory base) with %zu bytes is outside the "
         "launch's %zu bytes of dynamic shared memory", op, p, c - b, bytes, launch_smem);
  }
  if (reinterpret_cast<uintptr_t>(c) % align != 0)
    fail("%s: shared address at offset %td is not %zu-byte aligned", op, c - b, align);
}

int current_thread() { return cur; }

void syncthreads() {
  if (++arrived_block == nthreads) {
    arrived_block = 0;
    race::block_sync();
    banks::block_done();
    for (int i = 0; i < nthreads; ++i)
      if (fibers[i].state == kWaitBlock) fibers[i].state = kRunnable;
    // the releasing thread yields too, so that the next phase starts with the first warp in
    // the block's order (see run_grid), not with the warp that happened to arrive last
    phase_restart = true;
    park(kRunnable, "__syncthreads");
    return;
  }
  park(kWaitBlock, "__syncthreads");
}

const WarpSlots& warp_collective(const char* op, const void* in, size_t bytes, WarpComplete complete) {
  Fiber& f = fibers[cur];
  const int w = static_cast<int>(f.tid.x / 32), l = static_cast<int>(f.tid.x % 32);
  const int buf = static_cast<int>(f.seq++ & 1u);
  if (bytes > static_cast<size_t>(kWarpSlotBytes)) fail("%s: %zu bytes exceed a warp slot", op, bytes);
  WarpSlots& s = slots[w][buf];
  if (bytes) std::memcpy(s.lane[l], in, bytes);
  slot_op[w][buf][l] = op;
  slot_seq[w][buf][l] = f.seq;
  if (++arrived_warp[w] < 32) {
    park(kWaitWarp, op);
    return s;
  }
  arrived_warp[w] = 0;
  for (int o = 0; o < 32; ++o) {
    if (std::strcmp(slot_op[w][buf][o], op) != 0)
      fail("the lanes of warp %d are in different warp-collective operations: lane %d in %s, lane %d in %s "
           "(all 32 lanes must execute the same one)", w, l, op, o, slot_op[w][buf][o]);
    if (slot_seq[w][buf][o] != f.seq)
      fail("%s: lane %d of warp %d is at its warp-collective call #%u, lane %d at #%u (the lanes took "
           "different paths)", op, l, w, f.seq, o, slot_seq[w][buf][o]);
  }
  count_op(op);
  race::warp_sync(w);  // before `complete`: an ldmatrix reads after its warp's barrier
  banks::warp_done(w);  // the lanes' accesses since the last barrier are complete
  if (complete) complete(s, w);
  for (int i = w * 32; i < w * 32 + 32; ++i)
    if (fibers[i].state == kWaitWarp) fibers[i].state = kRunnable;
  return s;
}

void syncwarp() { warp_collective("__syncwarp", nullptr, 0); }

float shfl_xor(float x, int offset) {
  const WarpSlots& s = warp_collective("__shfl_xor_sync", &x, sizeof x);
  float y;
  std::memcpy(&y, s.lane[(lane_id() ^ static_cast<unsigned>(offset)) & 31u], sizeof y);
  return y;
}

bool any_lane(bool pred) {
  const unsigned char in = pred ? 1 : 0;
  const WarpSlots& s = warp_collective("__any_sync", &in, sizeof in);
  for (int l = 0; l < 32; ++l)
    if (s.lane[l][0]) return true;
  return false;
}

// ---- cp.async ----

void set_cp_async_mode(int mode) {
  if (mode != kCpAsyncEarly && mode != kCpAsyncLate)
    throw std::invalid_argument("emu: cp.async mode must be 0 (early) or 1 (late)");
  cp_mode = mode;
}
int cp_async_mode() { return cp_mode; }

namespace {
void perform(const CpCopy& c) {
  if (c.valid) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}
}  // namespace

void cp_async_16(void* smem, const void* gmem, bool valid) {
  check_smem(smem, 16, 16, "cp_async_16 (shared destination)");
  const auto* src = static_cast<const unsigned char*>(gmem);
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp_async_16: global source %p is not 16-byte aligned", gmem);
  const unsigned char* b = smem_begin();
  if (valid && src + 16 > b && src < b + sizeof(smem_storage))
    fail("cp_async_16: the source %p is in shared memory (cp.async copies global -> shared)", gmem);
  count_op("cp_async_16");
  CpCopy c{static_cast<unsigned char*>(smem), src, valid, false, -1};
  banks::record(cur, static_cast<size_t>(c.dst - b), 16, banks::kCpAsync, __builtin_return_address(0));
  if (valid) banks::record_global(cur, gmem, 16, banks::kCpAsyncSource, __builtin_return_address(0));
  {
    const banks::Muted muted;  // the emulator's own writes below are that access, already counted
    if (cp_mode == kCpAsyncEarly) {
      perform(c);
      c.done = true;
    } else {  // contents undefined until the wait: make an early reader see NaN
      for (int i = 0; i < 4; ++i) std::memcpy(c.dst + 4 * i, &kPoison, 4);
    }
  }
  race::copy_issued(c.dst, 16, __builtin_return_address(0));
  fibers[cur].cp.push_back(c);
}

void cp_async_commit() {
  Fiber& f = fibers[cur];
  for (CpCopy& c : f.cp)
    if (c.group < 0) c.group = f.cp_groups;
  ++f.cp_groups;  // possibly an empty group: it still counts among the newest N
}

void cp_async_wait(int newest_groups_left) {
  if (newest_groups_left < 0) fail("cp_async_wait<%d>: N must be >= 0", newest_groups_left);
  Fiber& f = fibers[cur];
  const int limit = f.cp_groups - newest_groups_left;  // groups [0, limit) must be complete
  size_t keep = 0;
  for (size_t i = 0; i < f.cp.size(); ++i) {
    CpCopy& c = f.cp[i];
    if (c.group >= 0 && c.group < limit) {
      race::copy_waited(c.dst, 16);
      const banks::Muted muted;
      if (!c.done) perform(c);
    } else {
      f.cp[keep++] = c;
    }
  }
  f.cp.resize(keep);
}

// ---- launch ----

void run_grid(unsigned grid, int block, size_t smem, void (*body)(void*), void* arg, const void* kernel) {
  if (cur >= 0) fail("kernel launch from inside a kernel");
  if (smem > sizeof(smem_storage)) fail("dynamic shared memory of %zu bytes is more than the emulator's %zu", smem, sizeof(smem_storage));
  if (block <= 0 || block % 32 != 0 || block / 32 > kMaxWarps) fail("block of %d threads: must be a positive multiple of 32, at most %d", block, 32 * kMaxWarps);
  static const bool force_ucontext = [] {
    const char* e = std::getenv("SRT_EMU_UCONTEXT");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }();
  use_ucontext = force_ucontext || !EMU_HAVE_ASM_SWITCH;
  g_body = body;
  g_arg = arg;
  nthreads = block;
  launch_smem = smem;
  block_dim = EmuDim3{};
  block_dim.x = static_cast<unsigned>(block);
  block_dim.y = block_dim.z = 1;
  grid_dim = EmuDim3{};
  grid_dim.x = grid;
  grid_dim.y = grid_dim.z = 1;
  g_failed = false;
  g_error.clear();
  ensure_stacks(block);
  if (static_cast<int>(fibers.size()) < block) fibers.resize(block);
  auto* words = reinterpret_cast<uint32_t*>(smem_storage);
  race::launch_begin(smem_begin(), smem, kernel);
  banks::discard();  // (left over from a launch that failed)
  struct RaceOff {  // an error ends the launch: stop checking, count nothing of it
    ~RaceOff() {
      if (done) return;
      race::launch_end();
      banks::discard();
    }
    bool done = false;
  } race_off;
  for (unsigned b = 0; b < grid; ++b) {
    block_idx.x = b;
    for (size_t i = 0; i < sizeof(smem_storage) / 4; ++i) words[i] = kPoison;
    race::block_begin(b);
    banks::block_done();
    arrived_block = 0;
    std::memset(arrived_warp, 0, sizeof(arrived_warp));
    for (int i = 0; i < block; ++i) init_fiber(i);
    // Warp by warp: a warp runs until none of its lanes can continue (all at __syncthreads,
    // exited, or waiting for a lane that is), then the next warp. Between two __syncthreads the
    // warps thus run one after the other, never interleaved: a warp reading what another one
    // writes in the same phase, or overwriting what another one still reads, sees (or leaves)
    // the wrong data. Even blocks take the warps in ascending order, odd blocks descending, so
    // either warp of a racing pair gets to go first.
    const int nwarps = block / 32;
    phase_restart = false;
    for (;;) {
      bool progress = false, restart = false;
      for (int k = 0; k < nwarps && !restart; ++k) {
        const int w = b % 2 == 0 ? k : nwarps - 1 - k;
        for (bool again = true; again && !restart;) {
          again = false;
          for (int i = w * 32; i < w * 32 + 32; ++i) {
            if (fibers[i].state != kRunnable) continue;
            cur = i;
            cur_tid = &fibers[i].tid;
            resume(i);
            cur = -1;
            progress = again = true;
            if (g_failed) throw std::runtime_error(g_error);
            if (phase_restart) {
              phase_restart = false;
              restart = true;
              break;
            }
          }
        }
      }
      if (restart) continue;
      bool all_done = true;
      for (int i = 0; i < block && all_done; ++i) all_done = fibers[i].state == kDone;
      if (all_done) break;
      if (!progress) {
        g_error = deadlock_report(b);
        std::fprintf(stderr, "%s\n", g_error.c_str());
        throw std::runtime_error(g_error);
      }
    }
  }
  race_off.done = true;
  banks::block_done();
  const std::string hazards = race::launch_end();
  if (!hazards.empty()) {
    std::fprintf(stderr, "%s\n", hazards.c_str());
    throw std::runtime_error(hazards);
  }
}
}  // namespace emu
