"""CPU benchmark: forward+backward time and peak memory of the attention contenders.

Contenders, alternated round by round in one process so that they see the same machine state:
  ours          stop_graddable_attn, causal, no masks
  ours+kv-mask  stop_graddable_attn, causal, dense (h, n, n) bool k and v stop masks
  reference     the O(n^2) autograd reference (self_reasoning_tokens.reference), no masks
  sdpa          torch.nn.functional.scaled_dot_product_attention (PyTorch's CPU flash kernel)

Peak memory is the process's peak resident set size during one fwd+bwd minus the resident size
just before it (Linux: the peak is reset through /proc/self/clear_refs), so it counts everything
the call allocates, the n x n matrices of the reference included, but not the inputs.

    python benchmarks/bench_attention.py                 # n = 1024, 4096, 8192
    python benchmarks/bench_attention.py --n 1024 --repeats 2 --out /tmp/a.json
    python benchmarks/bench_attention.py --dtype bfloat16   # q, k, v and the output in bfloat16

The JSON goes to runs/bench/attention_cpu.json unless --out says otherwise, with its plot
(time and peak memory against n, benchmarks/plot_bench.py) beside it as .png; the committed
results the README's tables come from are regenerated with
--out benchmarks/results/attention_cpu.json (and --heads 1 --out .../attention_cpu_1head.json,
--dtype bfloat16 --out .../attention_cpu_bf16_avx2.json).
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
from self_reasoning_tokens.cli import _positive_int  # noqa: E402
from self_reasoning_tokens.reference import reference_attention  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name  # noqa: E402
from _memory import proc_status_bytes, reset_peak_rss, return_freed_memory_to_os  # noqa: E402
from plot_bench import plot_after_benchmark  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "runs", "bench", "attention_cpu.json")  # not the committed results
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_contenders(b, h, n, d, dtype):
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, n, d, dtype=dtype)
    stop = torch.rand(h, n, n) < 0.5  # dense per-head bool masks, as a user would build them

    def run(fn):
        def step():
            out = fn()
            out.backward(do)
        return step

    def clear_grads():
        q.grad = k.grad = v.grad = None

    return clear_grads, {
        "ours": run(lambda: srt.stop_graddable_attn(q, k, v, causal=True)),
        "ours+kv-mask": run(lambda: srt.stop_graddable_attn(q, k, v, causal=True, k_stop_grad_mask=stop,
                                                            v_stop_grad_mask=stop)),
        "reference": run(lambda: reference_attention(q, k, v, causal=True)),
        "sdpa": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }


def reference_bytes_estimate(b, h, n):
    # the reference keeps about ten (b, h, n, n) matrices alive at its peak, counted at 4 bytes
    # per entry for bfloat16 inputs too (a bound on the safe side)
    return 10 * b * h * n * n * 4


def measure(step, clear_grads, can_reset):
    clear_grads()  # the gradients of the last round are not part of this one's baseline
    gc.collect()
    base = proc_status_bytes("VmRSS")
    if can_reset:
        reset_peak_rss()
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    peak = proc_status_bytes("VmHWM") - base if can_reset else float("nan")
    return dt, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=_positive_int, nargs="+", default=[1024, 4096, 8192],
                    help="sequence lengths (queries = keys; default 1024 4096 8192)")
    ap.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    ap.add_argument("--heads", type=_positive_int, default=8, help="heads (default 8)")
    ap.add_argument("--head-dim", type=_positive_int, default=64, help="head dim (default 64)")
    ap.add_argument("--repeats", type=_positive_int, default=3, help="timed rounds per size (median reported)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="dtype of q, k, v for every contender (default float32)")
    ap.add_argument("--max-reference-gb", type=float, default=12.0,
                    help="skip the reference where its estimated memory exceeds this")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="JSON output (default runs/bench/attention_cpu.json; the committed "
                    "benchmarks/results/attention_cpu.json, which the README's table comes from, is "
                    "written only when named here)")
    args = ap.parse_args(argv)

    dtype = DTYPES[args.dtype]
    return_freed_memory_to_os()
    can_reset = reset_peak_rss()
    results = []
    for n in args.n:
        clear_grads, contenders = make_contenders(args.batch, args.heads, n, args.head_dim, dtype)
        est = reference_bytes_estimate(args.batch, args.heads, n)
        skip = {}
        if est > args.max_reference_gb * 2**30:
            skip["reference"] = f"estimated {est / 2**30:.0f} GB > --max-reference-gb {args.max_reference_gb:g}"
        times = {name: [] for name in contenders}
        peaks = {name: [] for name in contenders}
        for name, step in contenders.items():  # warm-up round
            if name not in skip:
                step()
                clear_grads()
        for r in range(args.repeats):
            for name, step in contenders.items():
                if name in skip:
                    continue
                dt, pk = measure(step, clear_grads, can_reset)
                times[name].append(dt)
                peaks[name].append(pk)
                print(f"  n={n:<6d} round {r + 1}/{args.repeats} {name:<13s} {dt:8.3f} s  peak +{pk / 2**20:8.1f} MiB",
                      file=sys.stderr, flush=True)
        sdpa_t = statistics.median(times["sdpa"])
        sdpa_m = max(peaks["sdpa"])
        for name in contenders:
            if name in skip:
                results.append({"n": n, "contender": name, "skipped": skip[name]})
                continue
            t = statistics.median(times[name])
            m = max(peaks[name])
            results.append({"n": n, "contender": name, "fwd_bwd_s": t, "times_s": times[name],
                            "peak_mem_bytes": m, "time_vs_sdpa": t / sdpa_t,
                            "mem_vs_sdpa": m / sdpa_m if sdpa_m > 0 else None})
        del contenders
        gc.collect()

    print()
    print(f"fwd+bwd, b={args.batch}, h={args.heads}, d={args.head_dim}, {args.dtype}, causal, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'n':>6}  {'contender':<13} {'time (s)':>9} {'x sdpa':>7} {'peak mem (MiB)':>15} {'x sdpa':>7}")
    for r in results:
        if "skipped" in r:
            print(f"{r['n']:>6}  {r['contender']:<13} {'skipped: ' + r['skipped']}")
        else:
            mv = f"{r['mem_vs_sdpa']:.2f}" if r["mem_vs_sdpa"] is not None else "-"
            print(f"{r['n']:>6}  {r['contender']:<13} {r['fwd_bwd_s']:>9.3f} {r['time_vs_sdpa']:>7.2f} "
                  f"{r['peak_mem_bytes'] / 2**20:>15.1f} {mv:>7}")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": cpu_name(), "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
            "dtype": args.dtype, "causal": True, "repeats": args.repeats,
            "memory": "peak RSS during one fwd+bwd minus RSS before it" if can_reset else "unavailable"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")
    plot_after_benchmark(args.out)


if __name__ == "__main__":
    main()
