"""GPU benchmark of the attention contenders (issue 6; run by benchmarks/gpu_check.sh).

FlashAttention's benchmark shapes: hidden size 2048, so heads = 2048 / d; (batch, seq) =
(16, 1k), (8, 2k), (4, 4k), (2, 8k), (1, 16k); d = 64 and 128; causal; bfloat16. For each shape
and contender: forward, backward and forward+backward time (ms) and TFLOP/s, and peak memory.

  (a) ours            stop_graddable_attn, no masks
  (a2) ours-fwd128    as (a), the float16/bfloat16 forward with 128-row query tiles
                      (SRT_CUDA_FWD_BLOCK_M=128): an A/B of the tile size
  (a3) ours-bwd128    as (a), the float16/bfloat16 backward with 128-key tiles
                      (SRT_CUDA_BWD_BLOCK_N=128): the same kind of A/B
  (a4) ours-det       as (a), the backward under torch.use_deterministic_algorithms(True): its
                      deterministic schedule (README "Determinism"), what determinism costs
                      (a2), (a3) and (a4) run at the target shape and at its (batch, seq) with
                      the other head dims only
  (b) ours+reasoning  stop_graddable_attn(reasoning=ReasoningPattern(3, 4)), stop-grad mode:
                      causal forward, k/v gradients stopped on the reasoning region (in-kernel)
  (c) ours+kv-mask    stop_graddable_attn with dense (h, n, n) bool k and v stop masks (the same
                      reasoning region, materialised per head: h*n*n bytes, not counted as peak)
  (d) sdpa-flash      F.scaled_dot_product_attention, FLASH_ATTENTION backend, no masks (the
                      ceiling: same math without masks)
  (e) flex-stopgrad   FlexAttention (torch.compile) with the detached-KV construction of
                      benchmarks/flex_stopgrad.py: K' = [k; k.detach()], V' = [v; v.detach()]
                      and a mask_mod that shows each key through its live copy where the
                      gradient flows and through its detached copy where it is stopped: the
                      same stop pattern as (b), exact
  (f) reference       the naive O(n^2) autograd reference with the same pattern, where it fits
                      (by estimate; on a GPU the batch is reduced until it does, and TFLOP/s
                      are computed for the batch actually run)

Then the longest sequence each contender runs at b=1, h=16, d=128 (fwd+bwd; doubling from
--longest-start until out of memory, or halving if the start fails; capped by --longest-max and
by --longest-trial-cap-s for the predicted time of the next trial), and the issue's targets at
the target shape (seq 8k, d=128: (a) >= 60% of (d) TFLOP/s; (b) within 10% of (a); (b) >= 1.5x
(e); (b) >= 10x (f); longest (b) >= 8x longest (f)) evaluated from the measured numbers.

FLOPs: FlashAttention's count, forward 4*b*h*n*n*d halved for causal, backward 2.5x forward;
the same nominal count for every contender (extra work a contender does, e.g. (e)'s doubled
keys, shows as lower TFLOP/s). Times: CUDA events per call after warmup, median over repeats
(all raw times are in the JSON). Peak memory: torch.cuda.max_memory_allocated() during one
fwd+bwd minus the memory allocated before it (inputs, masks and block masks excluded).
FlexAttention is compiled once per shape (dynamic=False by default); the first call's time
(compile included) and the block mask's build time are reported separately, not in the timings.

Run order is by priority, so that a --budget-s cut leaves the important numbers: the target
shape (with a correctness cross-check of (a)-(e) on its inputs), the longest-sequence search,
then the other shapes, the A/B variants at the target's (batch, seq) with the other head dims,
FlexAttention's other shapes. Results go to --out after every measurement; past the budget the script
stops cleanly and records what it skipped.

    python benchmarks/bench_gpu.py --out bench.json --table-out table.txt --budget-s 200
    python benchmarks/bench_gpu.py --dry-run --device cpu   # tiny shapes: checks the code paths
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import self_reasoning_tokens as srt  # noqa: E402
from self_reasoning_tokens.reference import reference_attention  # noqa: E402
from _variants import (AB_VARIANTS, TILE_VARIANTS, R, W, clear_inherited_settings,  # noqa: E402
                       close_stale_settings)
from flex_stopgrad import (build_block_mask, evaluate_mask_mod, flex_stopgrad_attention,  # noqa: E402
                           flex_unavailable_reason, reasoning_stopped, stopgrad_mask_mod)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HIDDEN = 2048  # FlashAttention's benchmark setting: heads = HIDDEN / head_dim
DEFAULT_SHAPES = ["16x1024", "8x2048", "4x4096", "2x8192", "1x16384"]  # batch x seq
CONTENDERS = {  # key: (letter, description)
    "ours": ("a", "stop_graddable_attn, no masks"),
    "ours-fwd128": ("a2", "as (a) with the float16/bfloat16 forward's 128-row query tiles (SRT_CUDA_FWD_BLOCK_M=128; "
                          "an A/B of the tile size at the target (batch, seq))"),
    "ours-bwd128": ("a3", "as (a) with the float16/bfloat16 backward's 128-key tiles (SRT_CUDA_BWD_BLOCK_N=128; "
                          "an A/B of the tile size at the target (batch, seq))"),
    "ours-det": ("a4", "as (a) with the backward's deterministic schedule (torch.use_deterministic_algorithms(True) "
                       "for the backward; its cost at the target (batch, seq))"),
    "ours+reasoning": ("b", f"stop_graddable_attn, ReasoningPattern({R}, {W}) stop-grad, in-kernel"),
    "ours+kv-mask": ("c", "stop_graddable_attn, dense (h,n,n) bool k/v stop masks (same region)"),
    "sdpa-flash": ("d", "SDPA FLASH_ATTENTION backend, no masks (the ceiling)"),
    "flex-stopgrad": ("e", "FlexAttention + torch.compile, detached-KV construction, same pattern"),
    "reference": ("f", "naive O(n^2) autograd reference, same pattern"),
}
ORDER = list(CONTENDERS)
# The A/B variants (AB_VARIANTS, _variants.py) are measured at the target shape and at its
# (batch, seq) with each other head dim (so that a tile default can be chosen per head dim), not at
# the other shapes or in the search.


class Skip(Exception):
    """A contender cannot run here (the reason is recorded)."""


class Terminated(Exception):
    """SIGTERM (the GPU script's stage timeout), or a broken CUDA context: stop and write what
    was measured."""


def attn_flops(b, h, n, d, causal=True):
    f = 4.0 * b * h * n * n * d
    return f / 2 if causal else f


# what CUDA libraries say when an allocation fails at the edge of memory (cuBLAS's handle or
# workspace, the runtime) besides the caching allocator's "out of memory"; the same words also
# follow an earlier kernel fault, so they count as out of memory only while the context still works
ALLOC_FAILED_TEXTS = ("cublas_status_alloc_failed", "cudaerrormemoryallocation")


def cuda_context_error():
    """None while the CUDA context works, else why not (an illegal memory access is sticky: every
    later call fails)."""
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means the context is gone
        return short(e)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e).lower()
    if "out of memory" in text:
        return True
    return any(t in text for t in ALLOC_FAILED_TEXTS) and cuda_context_error() is None


def short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


class Budget:
    def __init__(self, seconds):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + seconds if seconds is not None else math.inf

    def left(self):
        return self.deadline - time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.t0


class Device:
    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def free(self, collect=False):
        """Return cached blocks to the device; collect=True also breaks reference cycles (after
        an exception, whose traceback holds the frames' tensors). gc.collect() takes ~0.1 s with
        torch loaded, so it is not done by default: tensors are freed by reference counting."""
        close_stale_settings()  # a failed (a3)/(a4) backward leaves its setting: not for the next contender
        if collect:
            gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def allocated(self):
        return torch.cuda.memory_allocated() if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def time_calls(self, fn, warmup, repeats):
        """Per-call times in ms (CUDA events, or perf_counter on the CPU) after warmup calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    def wall(self, fn):
        """Seconds of one synchronised call."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def dense_region_mask(h, n, m, device, rows_per_chunk=None):
    """(h, n, m) bool k/v stop mask = the reasoning region for every head, built a chunk of rows
    at a time (the full h*n*m bytes are the point of contender (c))."""
    stopped = reasoning_stopped(R, W, q_offset=m - n)
    mask = torch.empty(h, n, m, dtype=torch.bool, device=device)
    rows = rows_per_chunk or max(1, (1 << 27) // max(m, 1))
    kv = torch.arange(m, device=device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        mask[:, r0:r1] = evaluate_mask_mod(stopped, torch.arange(r0, r1, device=device), kv)
    return mask


def reference_bytes_estimate(b, h, n, itemsize):
    # the autograd reference holds about a dozen (b, h, n, n) tensors at its peak (scores of
    # four products, P, masks, their gradients); measured ~15-21 bytes per entry in bfloat16
    return 12 * b * h * n * n * max(itemsize, 2)


class Bench:
    def __init__(self, args, device, dtype):
        self.args = args
        self.dev = Device(device)
        self.device = device
        self.dtype = dtype
        self.budget = Budget(args.budget_s)
        self.rows, self.skipped, self.errors, self.notes = [], [], [], []
        self.sanity, self.longest = {}, {}
        self.pattern = srt.ReasoningPattern(R, W, stop_grad=True)
        self.block_masks = {}  # (n, m) -> (BlockMask, build seconds); kept for the whole run
        self.flex_shapes = set()  # shapes flex has been compiled for
        self.compile_estimate_s = args.flex_compile_estimate_s
        self.flex_fn, self.flex_reason = self._setup_flex()
        self.sdpa_reason = None
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.meta = self._meta()

    # ---------------------------------------------------------------- setup
    def _setup_flex(self):
        reason = flex_unavailable_reason()
        if reason:
            return None, reason
        from torch.nn.attention.flex_attention import flex_attention
        if not self.dev.cuda:
            def eager_forward(q, k, v, bm):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return flex_stopgrad_attention(q, k, v, bm, attention=flex_attention)
            return eager_forward, None
        try:
            from torch.utils._triton import has_triton
            if not has_triton():
                return None, "Triton is not available: torch.compile cannot build FlexAttention kernels"
        except ImportError:
            pass
        import torch._dynamo.config as dcfg
        for name, value in (("recompile_limit", 64), ("cache_size_limit", 64),
                            ("accumulated_recompile_limit", 512), ("accumulated_cache_size_limit", 512)):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), value))
        if hasattr(dcfg, "fail_on_recompile_limit_hit"):
            dcfg.fail_on_recompile_limit_hit = True  # never fall back to an eager O(n^2) flex

        def flex_fn(q, k, v, bm):
            return flex_stopgrad_attention(q, k, v, bm, attention=flex_attention)

        dynamic = {"false": False, "true": True, "auto": None}[self.args.flex_dynamic]
        return torch.compile(flex_fn, dynamic=dynamic), None

    def _meta(self):
        def git(*cmd):
            try:
                return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                      timeout=10).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                return None

        meta = {
            "device": torch.cuda.get_device_name(self.device) if self.dev.cuda else (platform.processor() or "cpu"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "dtype": str(self.dtype).replace("torch.", ""), "causal": True, "hidden": self.args.hidden,
            "reasoning_pattern": {"num_reason_tokens": R, "num_steps_future_can_use_reason": W,
                                  "stop_grad": True},
            "contenders": {k: f"({v[0]}) {v[1]}" for k, v in CONTENDERS.items()},
            "args": {k: v for k, v in vars(self.args).items()},
            "flops": "FlashAttention count: fwd 4*b*h*n*n*d halved for causal, bwd 2.5x fwd, fwd+bwd 3.5x; "
                     "the same nominal count for every contender",
            "timing": ("CUDA events per call after warmup; median over repeats" if self.dev.cuda
                       else "perf_counter per call after warmup; median over repeats"),
            "memory": "torch.cuda.max_memory_allocated during one fwd+bwd minus memory allocated before "
                      "(inputs, masks, block masks excluded)",
            "flex_dynamic": self.args.flex_dynamic,
        }
        if self.dev.cuda:
            p = torch.cuda.get_device_properties(self.device)
            meta.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                        total_memory_bytes=p.total_memory, cudnn=torch.backends.cudnn.version())
            try:
                import triton
                meta["triton"] = triton.__version__
            except ImportError:
                meta["triton"] = None
        return meta

    def check_device(self):
        """After an error other than OOM: a broken CUDA context (an illegal memory access is
        sticky) makes every later call fail, so stop instead of recording noise."""
        if not self.dev.cuda:
            return
        error = cuda_context_error()
        if error is not None:
            raise Terminated(f"the CUDA context is broken ({error})")

    def disable_flex_after(self, name, msg):
        """A FlexAttention error other than OOM (a compile failure, most likely) would recur at
        every shape and cost a compile each time: record it once and skip (e) from then on."""
        if name == "flex-stopgrad" and self.flex_fn is not None:
            self.flex_fn, self.flex_reason = None, f"not run: FlexAttention failed earlier ({msg})"

    # ---------------------------------------------------------------- contenders
    def inputs(self, b, h, n, d):
        def rnd(*shape):
            return torch.randn(*shape, generator=self.gen, device=self.device,
                               dtype=torch.float32).to(self.dtype)

        q, k, v = (rnd(b, h, n, d).requires_grad_(True) for _ in range(3))
        return q, k, v, rnd(b, h, n, d)

    def block_mask(self, n, m):
        key = (n, m)
        if key not in self.block_masks:
            t = time.perf_counter()
            bm = build_block_mask(stopgrad_mask_mod(reasoning_stopped(R, W, q_offset=m - n), n, m),
                                  n, 2 * m, device=self.device)
            self.dev.sync()
            self.block_masks[key] = (bm, time.perf_counter() - t)
        return self.block_masks[key]

    def prepare(self, name, q, k, v):
        """(fn, info, forward_only): fn() runs the contender's forward on q, k, v."""
        info = {}
        h, n, m = q.shape[1], q.shape[2], k.shape[2]
        if name == "ours":
            return (lambda: srt.stop_graddable_attn(q, k, v, causal=True)), info, False
        if name in AB_VARIANTS:
            if name in TILE_VARIANTS and self.dtype == torch.float32 and self.dev.cuda:
                raise Skip("float32 has one kernel each way (the tile variants are float16/bfloat16)")
            if not self.dev.cuda:
                info["note"] = "CPU: the same kernel and schedule as (a)"
            return AB_VARIANTS[name](q, k, v), info, False
        if name == "ours+reasoning":
            return (lambda: srt.stop_graddable_attn(q, k, v, causal=True, reasoning=self.pattern)), info, False
        if name == "ours+kv-mask":
            t = time.perf_counter()
            mask = dense_region_mask(h, n, m, self.device)
            self.dev.sync()
            info.update(mask_bytes=mask.numel(), mask_build_s=time.perf_counter() - t)
            return (lambda: srt.stop_graddable_attn(q, k, v, causal=True, k_stop_grad_mask=mask,
                                                    v_stop_grad_mask=mask)), info, False
        if name == "sdpa-flash":
            if self.sdpa_reason:
                raise Skip(self.sdpa_reason)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def sdpa():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            if not self.dev.cuda:
                info["note"] = "CPU flash kernel"
            return sdpa, info, False
        if name == "flex-stopgrad":
            if self.flex_fn is None:
                raise Skip(self.flex_reason)
            bm, build_s = self.block_mask(n, m)
            info["block_mask_build_s"] = build_s
            if not self.dev.cuda:  # no CPU backward in FlexAttention: eager forward only
                qd, kd, vd = q.detach(), k.detach(), v.detach()
                info["note"] = "CPU: eager forward only (FlexAttention has no CPU backward)"
                return (lambda: self.flex_fn(qd, kd, vd, bm)), info, True
            return (lambda: self.flex_fn(q, k, v, bm)), info, False
        if name == "reference":
            return (lambda: reference_attention(q, k, v, causal=True, reasoning=self.pattern)), info, False
        raise ValueError(name)

    # ---------------------------------------------------------------- measuring
    def measure(self, fn, leaves, do, forward_only, first_call_is_compile, warmup, repeats):
        """fwd / bwd / fwd+bwd timings of fn; repeats shrink to fit the budget."""
        res = {}

        def fwd():
            return fn()

        def fwd_bwd():
            out = fn()
            torch.autograd.grad(out, leaves, do)

        one = fwd if forward_only else fwd_bwd
        if first_call_is_compile:
            res["first_call_s"] = self.dev.wall(one)  # compile included
        # one more call: warms up, measures peak memory and sizes the repeats to the budget
        self.dev.free()
        base = self.dev.allocated()
        self.dev.reset_peak()
        t1 = self.dev.wall(one)
        if self.dev.cuda:
            res["peak_mem_bytes"] = self.dev.peak() - base
            res["peak_total_bytes"] = self.dev.peak()
        else:
            res["peak_mem_bytes"] = res["peak_total_bytes"] = None
        per_round = t1 * (1 if forward_only else 2)  # fwd + bwd + fwd_bwd ~ 2 fwd_bwd
        left = self.budget.left() - self.args.reserve_s
        rounds = warmup + repeats if math.isinf(left) else int(left / max(per_round, 1e-6))
        if rounds < 1:
            raise Skip(f"budget: one timing round needs ~{per_round:.1f} s, {max(left, 0):.1f} s left")
        if rounds < warmup + repeats:
            warmup = min(warmup, max(0, rounds - 1))
            repeats = max(1, rounds - warmup)
            res["note_budget"] = f"repeats cut to {repeats} (warmup {warmup}) by the budget"
        res["warmup"], res["repeats"] = warmup, repeats
        times = self.dev.time_calls(fwd, warmup, repeats)
        res["fwd_times_ms"] = times
        if not forward_only:
            res["fwd_bwd_times_ms"] = self.dev.time_calls(fwd_bwd, warmup, repeats)
            out = None
            try:
                out = fn()
                res["bwd_times_ms"] = self.dev.time_calls(
                    lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), warmup, repeats)
                res["bwd_method"] = "backward of one retained graph, timed alone"
            except Exception as e:  # noqa: BLE001
                if is_oom(e) or isinstance(e, Terminated):
                    raise
                self.check_device()
                res["bwd_method"] = f"fwd+bwd minus fwd medians (retain_graph failed: {short(e)})"
            out = None  # noqa: F841
        for what in ("fwd", "bwd", "fwd_bwd"):
            if f"{what}_times_ms" in res:
                res[f"{what}_ms"] = statistics.median(res[f"{what}_times_ms"])
        if "fwd_bwd_ms" in res and "bwd_ms" not in res:
            res["bwd_ms"] = max(res["fwd_bwd_ms"] - res["fwd_ms"], 0.0)
        return res

    def run_config(self, b, n, d, contenders, target=False):
        h = max(1, self.args.hidden // d)
        tensors = self.inputs(b, h, n, d)
        # the A/B variants last: under a tight budget the issue's contenders are measured first
        for name in sorted(contenders, key=lambda c: c in AB_VARIANTS):
            row = {"contender": name, "letter": CONTENDERS[name][0], "batch": b, "batch_measured": b,
                   "heads": h, "seq": n, "head_dim": d, "dtype": self.meta["dtype"], "causal": True,
                   "target_shape": target}
            self.run_contender(row, name, tensors)
            self.rows.append(row)
            self.report_row(row)
            self.save()
        del tensors
        self.dev.free()

    def run_contender(self, row, name, tensors):
        b, h, n, d = row["batch"], row["heads"], row["seq"], row["head_dim"]
        q, k, v, do = tensors
        if name == "reference":  # the largest batch that fits by estimate; halve on OOM
            limit = (torch.cuda.mem_get_info(self.device)[0] * 0.9 if self.dev.cuda
                     else self.args.max_reference_gb * 2**30)
            bm = b
            while bm >= 1 and reference_bytes_estimate(bm, h, n, q.element_size()) > limit:
                bm //= 2
            if bm < 1:
                est = reference_bytes_estimate(1, h, n, q.element_size())
                row["skipped"] = f"does not fit: needs ~{est / 2**30:.0f} GiB at batch 1, {limit / 2**30:.0f} GiB free"
                self.skipped.append(self.describe(row) + ": " + row["skipped"])
                return
        else:
            bm = b
        compile_first = name == "flex-stopgrad" and self.dev.cuda
        while True:
            if compile_first and (bm, h, n, d) not in self.flex_shapes:
                need = self.compile_estimate_s + self.args.reserve_s
                if self.budget.left() < need:
                    row["skipped"] = f"budget: compile needs ~{self.compile_estimate_s:.0f} s, {self.budget.left():.0f} s left"
                    self.skipped.append(self.describe(row) + ": " + row["skipped"])
                    return
            elif self.budget.left() < self.args.reserve_s + 1:
                row["skipped"] = f"budget: {max(self.budget.left(), 0):.0f} s left"
                self.skipped.append(self.describe(row) + ": " + row["skipped"])
                return
            sub = tensors if bm == b else tuple(t[:bm].detach().requires_grad_(t.requires_grad) for t in tensors)
            try:
                fn, info, forward_only = self.prepare(name, *sub[:3])
                row.update(info)
                first = compile_first and (bm, h, n, d) not in self.flex_shapes
                warmup, repeats = self.args.warmup, self.args.repeats
                if name == "reference":  # slow and memory-bound: fewer calls
                    warmup, repeats = min(warmup, 1), min(repeats, self.args.reference_repeats)
                elif row["target_shape"]:
                    repeats = max(repeats, self.args.target_repeats)
                res = self.measure(fn, sub[:3], sub[3], forward_only, first, warmup, repeats)
                if first:
                    self.flex_shapes.add((bm, h, n, d))
                    row["compile_s"] = res["first_call_s"]
                    self.compile_estimate_s = max(self.compile_estimate_s * 0.5, res["first_call_s"] * 1.2)
                row.update(res)
                row["batch_measured"] = bm
                if bm != b:
                    row["note_batch"] = f"batch {bm} of {b} (the full batch does not fit); TFLOP/s for batch {bm}"
                flops = attn_flops(bm, h, n, d)
                row["flops_fwd"] = flops
                for what, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)):
                    if f"{what}_ms" in row:
                        row[f"{what}_tflops"] = mult * flops / (row[f"{what}_ms"] * 1e-3) / 1e12
                if forward_only:
                    row["note_forward_only"] = info.get("note", "forward only")
                fn = sub = None  # noqa: F841
                self.dev.free()
                return
            except Skip as e:
                row["skipped"] = str(e)
                self.skipped.append(self.describe(row) + ": " + row["skipped"])
                return
            except Terminated:
                raise
            except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
                if name == "sdpa-flash" and "no available kernel" in str(e).lower():
                    row["skipped"] = f"the flash backend does not take this input: {short(e)}"
                    self.skipped.append(self.describe(row) + ": " + row["skipped"])
                    return
                oom = is_oom(e)
                msg = "out of memory" if oom else short(e)
                if not oom:
                    traceback.print_exc()
                    self.check_device()
                    self.disable_flex_after(name, msg)
            finally:
                fn = sub = None  # noqa: F841 - drop references before freeing
            self.dev.free(collect=True)  # only reached after an exception
            if oom and name == "reference" and bm > 1:
                bm //= 2
                continue
            row["skipped" if oom else "error"] = msg
            (self.skipped if oom else self.errors).append(self.describe(row) + ": " + msg)
            return

    def describe(self, row):
        return f"({row['letter']}) {row['contender']} b={row['batch']} h={row['heads']} n={row['seq']} d={row['head_dim']}"

    def report_row(self, row):
        if "skipped" in row or "error" in row:
            text = row.get("skipped") or "ERROR " + row["error"]
        else:
            parts = [f"{w} {row[w + '_ms']:.3f} ms ({row.get(w + '_tflops', 0):.1f} TF/s)"
                     for w in ("fwd", "bwd", "fwd_bwd") if w + "_ms" in row]
            text = ", ".join(parts)
            if "compile_s" in row:
                text += f", first call (compile) {row['compile_s']:.1f} s"
        print(f"  [{self.budget.elapsed():6.1f}s] {self.describe(row)}: {text}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- cross-check
    def cross_check(self, b, n, d, contenders):
        """Outputs and gradients of (a)-(e) on the same inputs: (a) vs (d) (no masks) and (b),
        (c), (e) against each other (the same stop pattern). Max abs differences, relative to the
        largest magnitude of the compared tensor."""
        if self.budget.left() < self.args.reserve_s + 5:
            self.sanity["skipped"] = "budget"
            return
        h = max(1, self.args.hidden // d)
        q, k, v, do = self.inputs(b, h, n, d)
        results, problems = {}, {}
        for name in ("ours", "ours-fwd128", "ours-bwd128", "ours-det", "sdpa-flash", "ours+reasoning",
                     "ours+kv-mask", "flex-stopgrad"):
            if name not in contenders:
                continue
            try:
                fn, _, forward_only = self.prepare(name, q, k, v)
                out = fn()
                results[name] = [out.detach()] + ([] if forward_only else
                                                  list(torch.autograd.grad(out, (q, k, v), do)))
                del fn, out
            except Skip as e:
                problems[name] = str(e)
            except Terminated:
                raise
            except Exception as e:  # noqa: BLE001
                problems[name] = "out of memory" if is_oom(e) else short(e)
                if not is_oom(e):
                    self.check_device()
            self.dev.free(collect=name in problems)

        def compare(a, b_):
            if a not in results or b_ not in results:
                return None
            out = {}
            for what, x, y in zip(("out", "dq", "dk", "dv"), results[a], results[b_]):
                diff = (x.float() - y.float()).abs().max().item()
                scale = max(y.float().abs().max().item(), 1e-30)
                out[what] = {"max_abs_diff": diff, "relative": diff / scale}
            out["ok"] = all(v["relative"] <= self.args.check_rtol for v in out.values())
            if len(out) < 5:
                out["note"] = "forward only"
            return out

        pairs = {"ours vs sdpa-flash": ("ours", "sdpa-flash"),
                 "ours-fwd128 vs ours": ("ours-fwd128", "ours"),
                 "ours-bwd128 vs ours": ("ours-bwd128", "ours"),
                 "ours-det vs ours": ("ours-det", "ours"),
                 "ours+kv-mask vs ours+reasoning": ("ours+kv-mask", "ours+reasoning"),
                 "flex-stopgrad vs ours+reasoning": ("flex-stopgrad", "ours+reasoning"),
                 "ours+reasoning vs ours (dk, dv must differ)": ("ours+reasoning", "ours")}
        self.sanity = {"shape": {"batch": b, "heads": h, "seq": n, "head_dim": d},
                       "rtol": self.args.check_rtol, "problems": problems}
        for label, (x, y) in pairs.items():
            self.sanity[label] = compare(x, y)
        neg = self.sanity["ours+reasoning vs ours (dk, dv must differ)"]
        if neg is not None:  # the pattern must change k/v gradients (out and dq are equal)
            neg["ok"] = neg["dk"]["relative"] > self.args.check_rtol and neg["dv"]["relative"] > self.args.check_rtol
        del results, q, k, v, do
        self.dev.free()
        self.save()

    # ---------------------------------------------------------------- longest sequence
    def longest_trial(self, name, n):
        """One fwd+bwd at b=1, h=--longest-heads, d=--longest-head-dim: wall seconds and peak memory."""
        h, d = self.args.longest_heads, self.args.longest_head_dim
        self.dev.free()
        self.dev.reset_peak()
        trial = {"n": n}
        q = k = v = do = fn = None
        try:
            q, k, v, do = self.inputs(1, h, n, d)
            fn, info, forward_only = self.prepare(name, q, k, v)
            trial.update({k_: v_ for k_, v_ in info.items() if k_ != "note"})

            def one():
                out = fn()
                if not forward_only:
                    torch.autograd.grad(out, (q, k, v), do)

            if name == "flex-stopgrad" and self.dev.cuda and (1, h, n, d) not in self.flex_shapes:
                trial["compile_s"] = self.dev.wall(one)
                self.flex_shapes.add((1, h, n, d))
                self.compile_estimate_s = max(self.compile_estimate_s * 0.5, trial["compile_s"] * 1.2)
            trial["fwd_bwd_s"] = self.dev.wall(one)
            if forward_only:
                trial["note"] = "forward only"
            trial["peak_total_bytes"] = self.dev.peak()
            trial["ok"] = True
        except Skip as e:
            trial.update(ok=False, skipped=str(e))
        except Terminated:
            raise
        except Exception as e:  # noqa: BLE001
            trial.update(ok=False, oom=is_oom(e), error="out of memory" if is_oom(e) else short(e))
            if not is_oom(e):
                traceback.print_exc()
                self.check_device()
                self.disable_flex_after(name, trial["error"])
        finally:
            q = k = v = do = fn = None  # noqa: F841
            self.dev.free(collect=not trial.get("ok"))
        print(f"  [{self.budget.elapsed():6.1f}s] longest ({CONTENDERS[name][0]}) {name} n={n}: "
              + (f"{trial['fwd_bwd_s']:.3f} s, peak {trial['peak_total_bytes'] / 2**30:.2f} GiB"
                 if trial.get("ok") and trial.get("peak_total_bytes") is not None else
                 f"{trial['fwd_bwd_s']:.3f} s" if trial.get("ok") else
                 trial.get("error") or trial.get("skipped")), file=sys.stderr, flush=True)
        return trial

    def predict_longest_s(self, name, n):
        """Seconds of one fwd+bwd at b=1, n, from this contender's TFLOP/s at the target shape."""
        a = self.args
        for r in self.rows:
            if (r["contender"] == name and r.get("target_shape") and r.get("fwd_bwd_tflops")
                    and not r.get("note_forward_only")):
                flops = 3.5 * attn_flops(1, a.longest_heads, n, a.longest_head_dim)
                return 1.2 * flops / (r["fwd_bwd_tflops"] * 1e12)
        return None

    def longest_all(self, contenders):
        a = self.args
        # the contender whose masks grow as h*n*n goes last: if a huge mask ever broke the CUDA
        # context, the others would already be measured
        for name in sorted(contenders, key=lambda c: c == "ours+kv-mask"):
            res = longest_sequence(lambda n, name=name: self.longest_trial(name, n),
                                   a.longest_start, a.longest_max, a.longest_min,
                                   a.longest_trial_cap_s, self.budget, a.reserve_s,
                                   compile_s=(lambda n, name=name: self.compile_estimate_s
                                              if name == "flex-stopgrad" and self.dev.cuda
                                              and (1, a.longest_heads, n, a.longest_head_dim)
                                              not in self.flex_shapes else 0.0),
                                   predict_s=(None if a.no_cap_probe else
                                              lambda n, name=name: self.predict_longest_s(name, n)))
            res["letter"] = CONTENDERS[name][0]
            self.longest[name] = res
            if res.get("stopped_by", "").startswith("budget"):
                self.skipped.append(f"longest ({res['letter']}) {name}: {res['stopped_by']}")
            self.save()
        # block masks stay cached (small: O((n/128)^2) indices): a rebuilt one would be a new
        # mask_mod object, which could make torch.compile recompile a shape it already has
        self.dev.free()

    # ---------------------------------------------------------------- output
    def result(self, finished=True, note=None):
        if note:
            self.notes.append(note)
        meta = dict(self.meta, elapsed_s=round(self.budget.elapsed(), 1), finished=finished,
                    budget_s=self.args.budget_s, flex_compiled_shapes=sorted(self.flex_shapes),
                    block_mask_build_s={f"{k[0]}x{k[1]}": v[1] for k, v in self.block_masks.items()})
        return {"meta": meta, "results": self.rows, "cross_check": self.sanity, "longest_seq": self.longest,
                "targets": evaluate_targets(self.rows, self.longest, self.args.target_batch,
                                            self.args.target_seq, self.args.target_head_dim),
                "skipped": self.skipped, "errors": self.errors, "notes": self.notes}

    def save(self, finished=False, note=None):
        if not self.args.out:
            return
        data = self.result(finished, note)
        path = os.path.abspath(self.args.out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)


def longest_sequence(trial, start, max_n, min_n, trial_cap_s, budget, reserve_s,
                     compile_s=lambda n: 0.0, predict_s=None):
    """The longest n of the form start * 2^k (within [min_n, max_n]) for which trial(n) succeeds.

    trial(n) -> dict with "ok" and, on success, "fwd_bwd_s"; "oom" on out of memory.
    1. If predict_s(max_n) (seconds, or None) is within trial_cap_s and the budget, max_n is
       tried first: an O(n)-memory contender is done in one trial (the answer is the cap).
    2. Otherwise, or if that fails: double from start while trials succeed (never retrying an n
       known to fail); if start fails, halve until one succeeds. A doubling is not tried when its
       predicted time (4x the last trial, attention being quadratic) exceeds trial_cap_s or the
       budget; the result is then a lower bound ("lower_bound": True), as it is at the cap."""
    trials = []
    res = {"longest": None, "trials": trials, "lower_bound": False, "start": start, "max": max_n}
    fail = {}  # the smallest n known to fail, and why

    def run(n):
        t = trial(n)
        trials.append(t)
        if not t.get("ok") and ("n" not in fail or n < fail["n"]):
            reason = "out of memory" if t.get("oom") else t.get("error") or t.get("skipped") or "failed"
            fail.update(n=n, why=f"{reason} at n={n}", oom=bool(t.get("oom")))
        return t

    def fits(need_s):
        return budget.left() >= reserve_s + need_s

    if not fits(1 + compile_s(min(start, max_n))):
        res.update(stopped_by="budget: no time left to start", lower_bound=True)
        return res
    if predict_s is not None and max_n > start:
        p = predict_s(max_n)
        if p is not None and p <= trial_cap_s and fits(p + compile_s(max_n)):
            res["probed_cap_first"] = True
            t = run(max_n)
            if t.get("ok"):
                res.update(longest=max_n, longest_trial=t, lower_bound=True,
                           stopped_by=f"cap: n={max_n} ran (tried first; --longest-max)")
                return res
    n = min(start, max_n)
    t = run(n)
    if not t.get("ok"):
        n //= 2
        while n >= min_n:
            if not fits(1 + compile_s(n)):
                res["stopped_by"] = fail["why"] + "; the budget ran out while halving"
                return res
            t = run(n)
            if t.get("ok"):
                break
            n //= 2
        else:
            res["stopped_by"] = fail["why"] + f"; nothing ran down to n={min_n}"
            return res
    res["longest"], res["longest_trial"] = n, t
    while True:
        nxt = n * 2
        if "n" in fail and nxt >= fail["n"]:
            res["stopped_by"] = fail["why"]
            res["lower_bound"] = not fail["oom"]
            return res
        if nxt > max_n:
            res.update(stopped_by=f"cap: n={max_n} is the largest tried (--longest-max)", lower_bound=True)
            return res
        predicted = 4.0 * t["fwd_bwd_s"] * 1.1
        if predicted > trial_cap_s:
            res.update(stopped_by=f"time cap: n={nxt} predicted {predicted:.1f} s > {trial_cap_s:g} s per trial",
                       lower_bound=True)
            return res
        if not fits(predicted + compile_s(nxt)):
            res.update(stopped_by=f"budget: n={nxt} predicted {predicted + compile_s(nxt):.1f} s, "
                                  f"{max(budget.left(), 0):.0f} s left", lower_bound=True)
            return res
        t_next = run(nxt)
        if not t_next.get("ok"):
            continue  # recorded in fail: the loop's first check stops
        n, t = nxt, t_next
        res["longest"], res["longest_trial"] = n, t


def evaluate_targets(rows, longest, batch, seq, head_dim):
    """The issue's targets at (batch, seq, head_dim), fwd+bwd, from measured TFLOP/s."""
    at = {r["contender"]: r for r in rows
          if r["seq"] == seq and r["head_dim"] == head_dim and r["batch"] == batch and "fwd_bwd_tflops" in r}

    def tf(name):
        return at[name]["fwd_bwd_tflops"] if name in at else None

    def missing(*names):
        gone = [n for n in names if n not in at]
        return f"not measured: {', '.join('(' + CONTENDERS[n][0] + ') ' + n for n in gone)}" if gone else None

    out = []

    def add(name, value, threshold, passed, detail):
        out.append({"target": name, "value": value, "threshold": threshold, "pass": passed, "detail": detail})

    def ratio_target(label, num, den, threshold, fmt):
        why = missing(num, den)
        if why:
            add(label, None, threshold, None, why)
            return
        value = tf(num) / tf(den)
        detail = fmt.format(tf(num), tf(den))
        if at[den].get("batch_measured", batch) != batch:
            detail += f" ({den} at batch {at[den]['batch_measured']})"
        add(label, value, threshold, value >= threshold, detail)

    ratio_target("(a) >= 60% of (d) TFLOP/s", "ours", "sdpa-flash", 0.6, "{:.3g} / {:.3g} TFLOP/s")
    why = missing("ours+reasoning", "ours")
    if why:
        add("(b) within 10% of (a)", None, 1.10, None, why)
    else:  # time of (b) at most 1.10x the time of (a) (same shape, so TFLOP/s ratio a/b)
        value = tf("ours") / tf("ours+reasoning")
        add("(b) within 10% of (a)", value, 1.10, value <= 1.10,
            f"time (b)/(a) = {value:.3f} ({tf('ours+reasoning'):.3g} vs {tf('ours'):.3g} TFLOP/s); pass if <= 1.10")
    ratio_target("(b) >= 1.5x faster than (e)", "ours+reasoning", "flex-stopgrad", 1.5, "{:.3g} / {:.3g} TFLOP/s")
    ratio_target("(b) >= 10x faster than (f)", "ours+reasoning", "reference", 10.0, "{:.3g} / {:.3g} TFLOP/s")
    lb, lf = longest.get("ours+reasoning"), longest.get("reference")
    if not lb or not lf or lb.get("longest") is None or lf.get("longest") is None:
        add("longest (b) >= 8x longest (f)", None, 8.0, None,
            "not measured" + ("" if not lf or lf.get("longest") is not None else
                              f" ((f): {lf.get('stopped_by')})"))
    else:
        value = lb["longest"] / lf["longest"]
        passed = value >= 8.0
        detail = f"{lb['longest']} / {lf['longest']}"
        if lb.get("lower_bound"):
            detail += f" ((b) is a lower bound: {lb.get('stopped_by')})"
            if not passed:
                passed = None  # not reached, but not shown to fail either
        if lf.get("lower_bound"):
            detail += f" ((f) is a lower bound: {lf.get('stopped_by')})"
            if passed:
                passed = None
        add("longest (b) >= 8x longest (f)", value, 8.0, passed, detail)
    return out


def format_tables(data, shapes_order):
    meta = data["meta"]
    lines = [f"{meta['device']}, torch {meta['torch']}, CUDA {meta['cuda']}, {meta['dtype']}, causal, "
             f"hidden {meta['hidden']} (heads = {meta['hidden']}/d), reasoning pattern R={R} W={W} (stop-grad)"
             + ("" if meta.get("finished") else "  [UNFINISHED]"),
             "contenders: " + "; ".join(f"{v}" for v in meta["contenders"].values()),
             "",
             f"{'contender':<19} {'b':>3} {'h':>3} {'n':>6} {'d':>4} | {'fwd ms':>8} {'TF/s':>6} | "
             f"{'bwd ms':>8} {'TF/s':>6} | {'f+b ms':>8} {'TF/s':>6} | {'peak MiB':>9} | notes"]

    def key(r):
        shape_pos = shapes_order.index((r["batch"], r["seq"])) if (r["batch"], r["seq"]) in shapes_order else 99
        return (-r["head_dim"], shape_pos, r["seq"], ORDER.index(r["contender"]))

    def num(r, k, fmt, width):
        if r.get(k) is None:
            return f"{'-':>{width}}"
        if k.endswith("tflops") and r[k] < 1:
            return f"{r[k]:{width}.2g}"
        return f"{r[k]:{width}{fmt}}"

    prev = None
    for r in sorted(data["results"], key=key):
        if prev is not None and (r["head_dim"], r["seq"]) != prev:
            lines.append("")
        prev = (r["head_dim"], r["seq"])
        b = f"{r['batch_measured']}*" if r.get("batch_measured", r["batch"]) != r["batch"] else str(r["batch"])
        head = f"{'(' + r['letter'] + ')':<4} {r['contender']:<14} {b:>3} {r['heads']:>3} {r['seq']:>6} {r['head_dim']:>4} |"
        if "skipped" in r or "error" in r:
            lines.append(f"{head} {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        notes = []
        if r.get("compile_s") is not None:
            notes.append(f"first call {r['compile_s']:.1f}s")
        if r.get("note_forward_only"):
            notes.append("fwd only")
        if r.get("note_budget"):
            notes.append(r["note_budget"])
        if r.get("mask_bytes"):
            notes.append(f"mask {r['mask_bytes'] / 2**20:.0f} MiB")
        mem = f"{r['peak_mem_bytes'] / 2**20:9.1f}" if r.get("peak_mem_bytes") is not None else f"{'-':>9}"
        lines.append(f"{head} {num(r, 'fwd_ms', '.3f', 8)} {num(r, 'fwd_tflops', '.1f', 6)} | "
                     f"{num(r, 'bwd_ms', '.3f', 8)} {num(r, 'bwd_tflops', '.1f', 6)} | "
                     f"{num(r, 'fwd_bwd_ms', '.3f', 8)} {num(r, 'fwd_bwd_tflops', '.1f', 6)} | {mem} | "
                     + ", ".join(notes))
    lines.append("* batch reduced to fit (TFLOP/s are for the batch run)")

    cc = data.get("cross_check") or {}
    if cc.get("shape"):
        s = cc["shape"]
        lines += ["", f"cross-check on one input (b={s['batch']} h={s['heads']} n={s['seq']} d={s['head_dim']}), "
                      f"max |diff| / max |expected| over out, dq, dk, dv (ok if <= {cc['rtol']:g}):"]
        for label, c in cc.items():
            if label in ("shape", "rtol", "problems"):
                continue
            if c is None:
                lines.append(f"  {label}: not run")
                continue
            have = [w for w in ("out", "dq", "dk", "dv") if w in c]
            worst = max(c[w]["relative"] for w in have)
            detail = ", ".join(f"{w} {c[w]['relative']:.1e}" for w in have) + (f"; {c['note']}" if c.get("note") else "")
            lines.append(f"  {label}: {'ok' if c['ok'] else 'MISMATCH'} (worst {worst:.1e}; {detail})")
        for name, why in cc.get("problems", {}).items():
            lines.append(f"  {name}: not run ({why})")
    elif cc.get("skipped"):
        lines += ["", f"cross-check: skipped ({cc['skipped']})"]

    lines += ab_lines(data["results"])

    if data["longest_seq"]:
        a = meta["args"]
        lines += ["", f"longest sequence, b=1, h={a['longest_heads']}, d={a['longest_head_dim']}, {meta['dtype']}, "
                      f"causal, fwd+bwd (n={a['longest_max']} first when predicted under {a['longest_trial_cap_s']:g} s, "
                      f"else doubling from {a['longest_start']}; at most {a['longest_max']}):",
                  f"{'contender':<18} {'longest n':>10} {'f+b s':>8} {'peak GiB':>9} | stopped by"]
        for name in ORDER:
            res = data["longest_seq"].get(name)
            if res is None:
                continue
            t = res.get("longest_trial") or {}
            n = "-" if res["longest"] is None else f"{res['longest']}{'+' if res.get('lower_bound') else ''}"
            peak = f"{t['peak_total_bytes'] / 2**30:9.2f}" if t.get("peak_total_bytes") is not None else f"{'-':>9}"
            fb = f"{t['fwd_bwd_s']:8.3f}" if t.get("fwd_bwd_s") is not None else f"{'-':>8}"
            lines.append(f"({res['letter']}) {name:<14} {n:>10} {fb} {peak} | {res.get('stopped_by', '')}")
        lines.append("+ a lower bound: the search stopped for time or the cap, not for memory")

    lines += ["", f"targets (b={a_or(meta, 'target_batch')}, n={a_or(meta, 'target_seq')}, "
                  f"d={a_or(meta, 'target_head_dim')}, causal, {meta['dtype']}, fwd+bwd):"]
    for t in data["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  {verdict}  {t['target']:<32} {value:>7}  ({t['detail']})")
    if data["skipped"]:
        lines += ["", f"skipped ({len(data['skipped'])}):"] + [f"  {s}" for s in data["skipped"]]
    if data["errors"]:
        lines += ["", f"ERRORS ({len(data['errors'])}):"] + [f"  {s}" for s in data["errors"]]
    for note in data["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"elapsed {meta['elapsed_s']} s" + (f" of a {meta['budget_s']:g} s budget" if meta.get("budget_s") else ""))
    return "\n".join(lines)


def _spread(times):
    """Interquartile range over the median of one row's timings (None with fewer than 2)."""
    if not times or len(times) < 2:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def ab_lines(results):
    """The A/B variants in a few lines per shape: each variant's time over (a)'s, for the pass it
    changes (fwd for ours-fwd128, bwd for ours-bwd128 and ours-det) and for fwd+bwd, with each
    side's spread (IQR / median), and "faster" or "slower" only where the ratio is further from 1
    than the two spreads together; what the tile defaults in csrc/cuda/host_glue.h are chosen
    from, and what the deterministic schedule costs."""
    rows = {(r["contender"], r["batch"], r["seq"], r["head_dim"]): r for r in results
            if "skipped" not in r and "error" not in r}
    out = []
    for name, phase in (("ours-fwd128", "fwd"), ("ours-bwd128", "bwd"), ("ours-det", "bwd")):
        for (who, b, n, d), r in sorted(rows.items(), key=lambda kv: (-kv[0][3], kv[0][1])):
            base = rows.get(("ours", b, n, d))
            if who != name or base is None:
                continue
            parts = []
            for what in (phase, "fwd_bwd"):
                va, vb = r.get(f"{what}_ms"), base.get(f"{what}_ms")
                if not va or not vb:
                    continue
                ratio = va / vb
                sa, sb = _spread(r.get(f"{what}_times_ms")), _spread(base.get(f"{what}_times_ms"))
                noise = (sa or 0) + (sb or 0)
                call = "faster" if ratio < 1 - noise else "slower" if ratio > 1 + noise else "within noise"
                spread = "" if sa is None or sb is None else f", spread {sa:.1%}/{sb:.1%}"
                parts.append(f"{what.replace('_', '+')} {ratio:.3f}x ({va:.3f} vs {vb:.3f} ms{spread}: {call})")
            if parts:
                out.append(f"  A/B {name} vs ours, d={d} b={b} n={n}: " + "; ".join(parts))
    if out:
        out = ["", "A/B (time of the variant over (a)'s; < 1: the variant is faster):"] + out
    return out


def a_or(meta, k):
    return meta["args"].get(k)


def parse_shape(s):
    b, n = (int(x) for x in s.lower().split("x"))
    return b, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch x seq, e.g. 2x8192")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="heads = hidden / head_dim")
    ap.add_argument("--target", default="2x8192:128", help="the targets' shape, batch x seq : head_dim")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target-repeats", type=int, default=10, help="repeats at the target shape")
    ap.add_argument("--reference-repeats", type=int, default=3, help="repeats for (f) (warmup 1)")
    ap.add_argument("--contenders", nargs="+", default=None, help="subset (names or letters a-f, a2-a4)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop cleanly (partial JSON, skips recorded) after about this many seconds")
    ap.add_argument("--reserve-s", type=float, default=3.0, help="seconds kept back at the end of the budget")
    ap.add_argument("--flex-dynamic", choices=["false", "true", "auto"], default="false",
                    help="torch.compile(dynamic=...) for FlexAttention (false: one compile per shape)")
    ap.add_argument("--flex-compile-estimate-s", type=float, default=45.0,
                    help="budget reserved for FlexAttention's first compile (later: 1.2x the last seen)")
    ap.add_argument("--max-reference-gb", type=float, default=8.0,
                    help="CPU only: the reference's memory limit (on a GPU: 90%% of free memory)")
    ap.add_argument("--check-rtol", type=float, default=0.03,
                    help="cross-check tolerance (relative max abs difference) for bf16")
    ap.add_argument("--skip-longest", action="store_true")
    ap.add_argument("--longest-start", type=int, default=16384)
    ap.add_argument("--no-cap-probe", action="store_true",
                    help="longest search: do not try --longest-max first (pure doubling from the start)")
    ap.add_argument("--longest-min", type=int, default=1024)
    ap.add_argument("--longest-max", type=int, default=131072)
    ap.add_argument("--longest-heads", type=int, default=16)
    ap.add_argument("--longest-head-dim", type=int, default=128)
    ap.add_argument("--longest-trial-cap-s", type=float, default=15.0,
                    help="do not try a longer sequence whose predicted fwd+bwd time exceeds this")
    ap.add_argument("--out", default=None, help="JSON results file (rewritten after every measurement)")
    ap.add_argument("--table-out", default=None, help="also write the printed tables to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes, few repeats: checks every code path on any machine")
    args = ap.parse_args(argv)
    inherited = clear_inherited_settings()
    if inherited:
        print(f"bench_gpu: ignoring the inherited tile settings {inherited}: (a) and the others run the "
              "default tiles, (a2) and (a3) set their own", file=sys.stderr)
    args.inherited_tile_settings = inherited  # recorded in the JSON's meta.args

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if args.dry_run:
        args.shapes, args.head_dims, args.target, args.hidden = ["2x128", "1x256"], [32, 64], "2x128:32", 64
        args.warmup, args.repeats, args.target_repeats, args.reference_repeats = 1, 2, 2, 2
        args.longest_start, args.longest_min, args.longest_max = 128, 64, 512
        args.longest_heads, args.longest_head_dim = 2, 32
        args.flex_compile_estimate_s = min(args.flex_compile_estimate_s, 5.0)
        if device.type == "cpu":
            dtype, args.dtype = torch.float32, "float32"
            args.check_rtol = 1e-4
    elif device.type != "cuda":
        print("bench_gpu: no CUDA device; use --dry-run for a CPU run of the code paths", file=sys.stderr)
        return 2
    if device.type == "cuda" and not srt.cuda_kernels_available():
        print("bench_gpu: self_reasoning_tokens was built without its CUDA kernels", file=sys.stderr)
        return 2
    tshape, td = args.target.split(":")
    args.target_batch, args.target_seq = parse_shape(tshape)
    args.target_head_dim = int(td)
    contenders = ORDER
    if args.contenders:
        wanted = set(args.contenders)
        contenders = [c for c in ORDER if c in wanted or CONTENDERS[c][0] in wanted]

    bench = Bench(args, device, dtype)
    gc.collect()
    gc.freeze()  # the imported modules' objects: later gc.collect() calls take microseconds, not 0.1 s

    def on_term(signum, frame):
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    shapes = [parse_shape(s) for s in args.shapes]
    configs = [(b, n, d) for d in args.head_dims for (b, n) in shapes]
    target = (args.target_batch, args.target_seq, args.target_head_dim)
    note = None
    try:
        # 1. the target shape, then a correctness cross-check on it
        bench.run_config(*target, contenders, target=True)
        bench.cross_check(*target, contenders)
        # 2. the longest sequence per contender
        if not args.skip_longest:
            bench.longest_all([c for c in contenders if c not in AB_VARIANTS])
        # 3. the other shapes, the target's head dim first; then the A/B variants at the target's
        #    (batch, seq) with the other head dims; FlexAttention (a compile per shape) last
        rest = [c for c in configs if c != target]
        rest.sort(key=lambda c: c[2] != target[2])
        twins = [(target[0], target[1], d) for d in args.head_dims if d != target[2]]
        groups = [(rest, [c for c in contenders if c not in {*AB_VARIANTS, "flex-stopgrad"}]),
                  (twins, [c for c in contenders if c in AB_VARIANTS]),
                  (rest, [c for c in contenders if c == "flex-stopgrad"])]
        for where, group in ((w, g) for w, g in groups if g):
            for b, n, d in where:
                if bench.budget.left() < args.reserve_s + 1:
                    bench.skipped.append(f"b={b} n={n} d={d} {'/'.join(group)}: budget")
                    continue
                bench.run_config(b, n, d, group)
    except (Terminated, KeyboardInterrupt) as e:
        note = f"stopped early ({e or type(e).__name__}); the results are partial"
        print(f"bench_gpu: {note}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old)
        gc.unfreeze()
    data = bench.result(finished=note is None, note=note)
    table = format_tables(data, shapes)
    print(table)
    if args.table_out:
        with open(args.table_out, "w") as f:
            f.write(table + "\n")
    if args.out:
        bench.save(finished=note is None)
        print(f"wrote {args.out}")
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
