"""GPU benchmark of the attention contenders: forward, backward and forward+backward time,
TFLOP/s and peak memory (called by benchmarks/gpu_check.sh).

Contenders (causal, the same q, k, v and output gradient for all):
  ours            stop_graddable_attn, no masks
  ours+kv-mask    stop_graddable_attn with dense (h, n, n) bool k and v stop masks
  ours+reasoning  stop_graddable_attn with ReasoningPattern(3, 4) (stop-grad mode)
  sdpa            torch.nn.functional.scaled_dot_product_attention (no masks)
  reference       the O(n^2) autograd reference (self_reasoning_tokens.reference), where it fits

FLOPs follow FlashAttention's count: forward 4 * b * h * n * n * d, backward 2.5x that,
halved under causality. Times are medians over repeats measured with CUDA events after warmup;
peak memory is torch.cuda.max_memory_allocated() during one forward+backward minus the memory
allocated before it (inputs and masks excluded).

    python benchmarks/bench_gpu.py --out results.json            # on a GPU
    python benchmarks/bench_gpu.py --dry-run                     # any machine: tiny shapes, 1 repeat
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import self_reasoning_tokens as srt  # noqa: E402
from self_reasoning_tokens.reference import reference_attention  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# FlashAttention's benchmark setting: hidden size 2048, so heads = 2048 / head_dim.
DEFAULT_SHAPES = ["8x1024", "4x2048", "2x4096"]  # batch x seq
HIDDEN = 2048


def attn_flops(b, h, n, d, causal):
    f = 4.0 * b * h * n * n * d
    return f / 2 if causal else f


class Timer:
    """Median wall time of a callable in ms: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup, repeats):
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
        return statistics.median(times), times

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def make_contenders(b, h, n, d, dtype, device, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v = (rnd(b, h, n, d).requires_grad_(True) for _ in range(3))
    do = rnd(b, h, n, d)
    stop = torch.rand(h, n, n, generator=gen, device=device) < 0.5  # dense per-head bool masks
    pattern = srt.ReasoningPattern(3, 4, stop_grad=True)
    contenders = {
        "ours": lambda: srt.stop_graddable_attn(q, k, v, causal=True),
        "ours+kv-mask": lambda: srt.stop_graddable_attn(q, k, v, causal=True, k_stop_grad_mask=stop,
                                                        v_stop_grad_mask=stop),
        "ours+reasoning": lambda: srt.stop_graddable_attn(q, k, v, causal=True, reasoning=pattern),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "reference": lambda: reference_attention(q, k, v, causal=True),
    }
    return (q, k, v, do), contenders


def reference_bytes_estimate(b, h, n, itemsize):
    # the autograd reference keeps about a dozen (b, h, n, n) tensors (scores in four
    # products, P, masks, their gradients) alive at its peak
    return 12 * b * h * n * n * max(itemsize, 4)


def bench_one(fn, tensors, timer, warmup, repeats, device):
    q, k, v, do = tensors
    leaves = (q, k, v)

    def fwd():
        return fn()

    def fwd_bwd():
        out = fn()
        torch.autograd.grad(out, leaves, do)

    out = fn()  # graph kept for the backward-only timing

    def bwd():
        torch.autograd.grad(out, leaves, do, retain_graph=True)

    res = {}
    res["fwd_ms"], _ = timer(fwd, warmup, repeats)
    res["bwd_ms"], _ = timer(bwd, warmup, repeats)
    res["fwd_bwd_ms"], res["fwd_bwd_times_ms"] = timer(fwd_bwd, warmup, repeats)
    del out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        res["peak_mem_bytes"] = None
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch x seq, e.g. 2x4096")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-reference-gb", type=float, default=40.0,
                    help="skip the reference where its estimated memory exceeds this")
    ap.add_argument("--contenders", nargs="+", default=None, help="subset of contenders to run")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--table-out", default=None, help="also write the printed table to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes, 1 repeat, on CUDA if available else CPU: checks that the script runs")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.dry_run:
        args.shapes, args.head_dims, args.warmup, args.repeats = ["1x64"], [32], 1, 1
        if device.type == "cpu":
            dtype = torch.float32
    elif device.type != "cuda":
        print("bench_gpu: no CUDA device visible; use --dry-run for a CPU syntax check", file=sys.stderr)
        return 2
    if device.type == "cuda" and not srt.cuda_kernels_available():
        print("bench_gpu: self_reasoning_tokens was built without its CUDA kernels", file=sys.stderr)
        return 2

    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for d in args.head_dims:
        h = max(1, HIDDEN // d)
        for shape in args.shapes:
            b, n = (int(x) for x in shape.lower().split("x"))
            tensors, contenders = make_contenders(b, h, n, d, dtype, device, gen)
            if args.contenders:
                contenders = {k: v for k, v in contenders.items() if k in args.contenders}
            flops = attn_flops(b, h, n, d, causal=True)
            est = reference_bytes_estimate(b, h, n, tensors[0].element_size())
            with torch.no_grad():  # sanity: ours agrees with SDPA on this shape
                diff = (contenders["ours"]() - F.scaled_dot_product_attention(
                    *tensors[:3], is_causal=True)).abs().max().item() if "ours" in contenders else None
            for name, fn in contenders.items():
                row = {"contender": name, "batch": b, "heads": h, "seq": n, "head_dim": d,
                       "dtype": str(dtype).replace("torch.", ""), "causal": True}
                if name == "reference" and est > args.max_reference_gb * 2**30:
                    row["skipped"] = f"needs ~{est / 2**30:.0f} GiB > --max-reference-gb {args.max_reference_gb:g}"
                else:
                    try:
                        row.update(bench_one(fn, tensors, timer, args.warmup, args.repeats, device))
                        row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
                        row["bwd_tflops"] = 2.5 * flops / (row["bwd_ms"] * 1e-3) / 1e12
                        row["fwd_bwd_tflops"] = 3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                    except torch.cuda.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if name == "ours":
                    row["max_abs_diff_vs_sdpa_fwd"] = diff
                results.append(row)
                print(f"  {name:<15s} b={b} h={h} n={n} d={d}: "
                      + (row["skipped"] if "skipped" in row else
                         f"fwd {row['fwd_ms']:.3f} ms, bwd {row['bwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms"),
                      file=sys.stderr, flush=True)
            del tensors, contenders
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""), "causal": True, "hidden": HIDDEN,
        "warmup": args.warmup, "repeats": args.repeats, "dry_run": args.dry_run,
        "flops": "FlashAttention count: fwd 4*b*h*n*n*d, bwd 2.5x fwd, halved for causal",
        "timing": "median of CUDA-event times per call after warmup" if device.type == "cuda" else "perf_counter",
        "memory": "torch.cuda.max_memory_allocated during one fwd+bwd minus memory allocated before",
    }
    lines = [f"{meta['device']}, torch {meta['torch']}, CUDA {meta['cuda']}, {meta['dtype']}, causal, "
             f"hidden {HIDDEN} (heads = {HIDDEN}/d)",
             f"{'contender':<15} {'b':>2} {'h':>3} {'n':>6} {'d':>4} | {'fwd ms':>8} {'TF/s':>6} | "
             f"{'bwd ms':>8} {'TF/s':>6} | {'f+b ms':>8} {'TF/s':>6} | {'peak MiB':>9}"]
    for r in results:
        head = f"{r['contender']:<15} {r['batch']:>2} {r['heads']:>3} {r['seq']:>6} {r['head_dim']:>4} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']}")
            continue
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:9.1f}"
        lines.append(f"{head} {r['fwd_ms']:8.3f} {r['fwd_tflops']:6.1f} | {r['bwd_ms']:8.3f} {r['bwd_tflops']:6.1f} | "
                     f"{r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:6.1f} | {mem:>9}")
    table = "\n".join(lines)
    print(table)
    if args.table_out:
        with open(args.table_out, "w") as f:
            f.write(table + "\n")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
