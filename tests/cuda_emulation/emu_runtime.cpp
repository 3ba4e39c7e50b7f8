// Fiber scheduler for the CUDA emulation (see stubs/cuda_runtime.h).
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "stubs/cuda_runtime.h"

// The kernels' `extern __shared__ float4 smem_f4[]` (block scope in namespace srt::cuda)
// resolve to this array.
namespace srt::cuda {
alignas(16) float4 smem_f4[(228 * 1024) / sizeof(float4)];
}
#define smem_storage srt::cuda::smem_f4

namespace emu {
EmuDim3* cur_tid = nullptr;
EmuDim3 block_idx;

namespace {
enum State { kRunnable, kWaitBlock, kWaitWarp, kDone };
struct Fiber {
  ucontext_t ctx;
  EmuDim3 tid;
  State state = kRunnable;
  std::vector<char> stack;
};
std::vector<Fiber> fibers;
ucontext_t sched_ctx;
int cur = -1, nthreads = 0;
int arrived_block = 0;
int arrived_warp[64];
float xbuf[64][32];
void (*g_body)(void*) = nullptr;
void* g_arg = nullptr;

void trampoline() {
  g_body(g_arg);
  fibers[cur].state = kDone;
  // returning switches to uc_link (the scheduler)
}

void park(State s) {
  fibers[cur].state = s;
  swapcontext(&fibers[cur].ctx, &sched_ctx);
}
}  // namespace


void syncthreads() {
  if (++arrived_block == nthreads) {
    arrived_block = 0;
    for (auto& f : fibers)
      if (f.state == kWaitBlock) f.state = kRunnable;
    return;
  }
  park(kWaitBlock);
}

void syncwarp() {
  const int w = cur_tid->x / 32;
  if (++arrived_warp[w] == 32) {
    arrived_warp[w] = 0;
    for (int i = w * 32; i < w * 32 + 32; ++i)
      if (fibers[i].state == kWaitWarp) fibers[i].state = kRunnable;
    return;
  }
  park(kWaitWarp);
}

float shfl_xor(float x, int offset) {
  const int t = cur_tid->x, w = t / 32, l = t % 32;
  xbuf[w][l] = x;
  syncwarp();
  const float y = xbuf[w][l ^ offset];
  syncwarp();
  return y;
}

void run_grid(unsigned grid, int block, size_t smem, void (*body)(void*), void* arg) {
  if (smem > sizeof(smem_storage)) { std::fprintf(stderr, "emu: smem %zu too large\n", smem); std::abort(); }
  if (block % 32 != 0 || block / 32 > 64) { std::fprintf(stderr, "emu: bad block %d\n", block); std::abort(); }
  g_body = body;
  g_arg = arg;
  nthreads = block;
  for (unsigned b = 0; b < grid; ++b) {
    block_idx.x = b;
    float* s = reinterpret_cast<float*>(smem_storage);
    for (size_t i = 0; i < sizeof(smem_storage) / sizeof(float); ++i) s[i] = std::numeric_limits<float>::quiet_NaN();
    arrived_block = 0;
    std::memset(arrived_warp, 0, sizeof(arrived_warp));
    fibers.assign(block, Fiber{});
    for (int i = 0; i < block; ++i) {
      Fiber& f = fibers[i];
      f.tid.x = i;
      f.stack.resize(256 * 1024);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &sched_ctx;
      makecontext(&f.ctx, trampoline, 0);
    }
    for (;;) {
      bool progress = false, all_done = true;
      for (int i = 0; i < block; ++i) {
        if (fibers[i].state == kDone) continue;
        all_done = false;
        if (fibers[i].state != kRunnable) continue;
        cur = i;
        cur_tid = &fibers[i].tid;
        swapcontext(&sched_ctx, &fibers[i].ctx);
        progress = true;
      }
      if (all_done) break;
      if (!progress) {
        int wb = 0, ww = 0, done = 0;
        for (auto& f : fibers) { wb += f.state == kWaitBlock; ww += f.state == kWaitWarp; done += f.state == kDone; }
        std::fprintf(stderr, "emu: DEADLOCK in block %u: %d at __syncthreads, %d at warp barriers, %d exited\n", b, wb, ww, done);
        std::abort();
      }
    }
  }
}
}  // namespace emu

