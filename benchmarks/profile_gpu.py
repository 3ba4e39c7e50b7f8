"""Kernel profile at the issue-6 target shape, under Nsight Compute (run by benchmarks/gpu_check.sh).

The benchmark says how fast each contender is; this says why. It profiles one forward+backward of
(a) ours, (a2) ours with the forward's 128-row tiles (SRT_CUDA_FWD_BLOCK_M=128), (a3) ours with the
backward's 128-key tiles (SRT_CUDA_BWD_BLOCK_N=128), (b) ours with the reasoning pattern and (d)
SDPA's flash backend (the ceiling) at seq 8k,
d=128, causal, bfloat16, and tabulates per kernel: duration, compute and memory throughput (% of
peak), tensor-pipe utilisation, issue-slot use, achieved occupancy, registers, shared-memory bank
conflicts, global-memory sectors per request (cp.async reads, atomics, stores) and the largest
warp-stall reasons. Our kernels sit next to FlashAttention-2's own (which
SDPA runs) on the same inputs, so the next tuning step can be read off the table.

    ncu --target-processes all --profile-from-start off -k 'regex:attn_|flash_' \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats ... \\
        --page raw --csv --log-file raw.csv  python benchmarks/profile_gpu.py run
    python benchmarks/profile_gpu.py summarize raw.csv --out profile.txt

`run` warms every contender up, then brackets one fwd+bwd per contender with cudaProfilerStart /
cudaProfilerStop, so with --profile-from-start off only those launches are profiled. Without a GPU
(`run --device cpu`, tiny shapes) it runs the same code paths and profiles nothing.

`summarize` reads ncu's CSV in either layout (--page raw: one row per kernel, a column per metric,
maybe a units row; --page details: one row per metric), skips ncu's ==PROF== lines, and assigns the
kernels to contenders in launch order (each contender's launches begin with its forward kernel).
Metrics a given ncu version does not collect are shown as '-'. gpu_check.sh runs ncu with
`--clock-control none` (ncu would otherwise lock the card's clocks to base, and the lent machines'
rules say to leave clocks alone), so the card runs at its own clocks; profiled launches still
run one at a time with caches flushed, so compare ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import self_reasoning_tokens as srt  # noqa: E402
from _variants import AB_VARIANTS, R, W, clear_inherited_settings  # noqa: E402

CONTENDERS = ("ours", "ours-fwd128", "ours-bwd128", "ours+reasoning", "sdpa-flash")
NCU_SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis",
                "MemoryWorkloadAnalysis_Tables", "Occupancy", "LaunchStats", "WarpStateStats",
                "SchedulerStats")
KERNEL_REGEX = "regex:attn_|flash_"  # ours (attn_*_kernel) and FlashAttention-2's (flash_*)


# ------------------------------------------------------------------------------------ run
def contender_fn(name, q, k, v):
    if name == "ours":
        return lambda: srt.stop_graddable_attn(q, k, v, causal=True)
    if name in AB_VARIANTS:  # the forward's 128-row or the backward's 128-key tile variant
        return AB_VARIANTS[name](q, k, v)
    if name == "ours+reasoning":
        pattern = srt.ReasoningPattern(R, W, stop_grad=True)
        return lambda: srt.stop_graddable_attn(q, k, v, causal=True, reasoning=pattern)
    if name == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sdpa
    raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")


def run(args):
    inherited = clear_inherited_settings()  # (a) runs the default tiles; (a2), (a3) set their own
    if inherited:
        print(f"profile_gpu: ignoring the inherited tile settings {inherited}", file=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("profile_gpu: no CUDA device visible (use --device cpu for a dry run)")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    b, h, n, d = args.batch, args.hidden // args.head_dim, args.seq, args.head_dim

    def rnd():
        return torch.randn(b, h, n, d, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v, do = rnd().requires_grad_(), rnd().requires_grad_(), rnd().requires_grad_(), rnd()
    names = [c for c in args.contenders.split(",") if c]
    fns = {name: contender_fn(name, q, k, v) for name in names}

    def fwd_bwd(fn):
        q.grad = k.grad = v.grad = None
        fn().backward(do)

    for name in names:  # warm-up: allocator, SDPA's backend selection, first-launch costs
        for _ in range(args.warmup):
            fwd_bwd(fns[name])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for name in names:
        if cuda:
            torch.cuda.nvtx.range_push(name)
        fwd_bwd(fns[name])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
    if cuda:
        torch.cuda.profiler.stop()
    print(f"profile_gpu: profiled one fwd+bwd each of {', '.join(names)} at b={b} h={h} n={n} d={d} "
          f"{args.dtype} causal on {torch.cuda.get_device_name(device) if cuda else 'cpu (nothing profiled)'}")


# ------------------------------------------------------------------------------ summarize
def number(text):
    """ncu's value text as a float (thousands separators dropped), or None."""
    text = (text or "").strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def read_ncu_csv(text):
    """[(kernel name, {metric: (value text, unit)})] in launch order, from either CSV layout."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"') or line.startswith("ID,")), None)
    if start is None:
        raise ValueError("no ncu CSV header (a line starting with \"ID\") in the input")
    rows = list(csv.reader(io.StringIO("\n".join(l for l in lines[start:] if not l.startswith("==")))))
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    if "Kernel Name" not in col:
        raise ValueError("ncu CSV without a 'Kernel Name' column")
    kernels, by_id = [], {}

    def kernel(row):
        key = row[col["ID"]]
        if key not in by_id:
            by_id[key] = (row[col["Kernel Name"]], {})
            kernels.append(by_id[key])
        return by_id[key][1]

    if "Metric Name" in col:  # details layout: one row per metric
        for row in body:
            if len(row) < len(header) or not row[col["ID"]].strip().isdigit():
                continue
            kernel(row)[row[col["Metric Name"]]] = (row[col["Metric Value"]], row[col["Metric Unit"]])
        return kernels
    units = {}
    for row in body:  # raw layout: one row per kernel; a row whose ID is not a number holds units
        if len(row) < len(header):
            continue
        if not row[col["ID"]].strip().isdigit():
            units = dict(zip(header, row))
            continue
        metrics = kernel(row)
        for name, value in zip(header, row):
            metrics[name] = (value, units.get(name, ""))
    return kernels


def short_kernel_name(name):
    name = re.sub(r"^void\s+", "", name.strip())
    base = re.split(r"[<(]", name, maxsplit=1)[0]
    return base.split("::")[-1]


def is_forward(name):
    s = short_kernel_name(name)
    return "fwd" in s and "bwd" not in s


def duration_ms(metrics):
    value, unit = metrics.get("gpu__time_duration.sum", (None, ""))
    x = number(value)
    if x is None:
        return None
    scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
             "second": 1e3, "s": 1e3}.get(unit.strip().lower(), 1e-6)  # ncu's default unit is ns
    return x * scale


def first_metric(metrics, *patterns):
    """The value of the first metric whose name matches one of the regexes, in pattern order."""
    for pattern in patterns:
        for name, (value, _) in sorted(metrics.items()):
            if re.fullmatch(pattern, name) and number(value) is not None:
                return number(value)
    return None


def sum_metrics(metrics, pattern):
    vals = [number(v) for name, (v, _) in metrics.items() if re.fullmatch(pattern, name)]
    vals = [x for x in vals if x is not None]
    return sum(vals) if vals else None


# Global-memory ops of the L1/TEX table (MemoryWorkloadAnalysis_Tables): LDGSTS is cp.async's
# global read (access: through L1, bypass: .cg, the 16-byte copies), RED/ATOM the atomics.
GLOBAL_OPS = {"cp.async": ("ldgsts_cache_access", "ldgsts_cache_bypass"), "atomic": ("red", "atom"), "store": ("st",)}


def sectors_per_request(metrics, ops):
    """32-byte sectors per warp-level request of these global ops, summed over the ops (per op the
    hardware counter l1tex__t_..., else its SASS-patched twin sm__sass_l1tex_t_...); None if ncu
    did not collect them or there was no request. tests/test_cuda_bank_conflicts.py counts the
    same per access on the CPU (there: 16 a cp.async and 8 a float2 atomic at best)."""
    sectors = requests = 0.0
    seen = False
    for op in ops:
        sec = first_metric(metrics, rf"l1tex__t_sectors_pipe_lsu_mem_global_op_{op}\.sum",
                           rf"sm__sass_l1tex_t_sectors_pipe_lsu_mem_global_op_{op}\.sum")
        req = first_metric(metrics, rf"l1tex__t_requests_pipe_lsu_mem_global_op_{op}\.sum",
                           rf"sm__sass_l1tex_t_requests_pipe_lsu_mem_global_op_{op}\.sum")
        if sec is not None and req is not None:
            sectors, requests, seen = sectors + sec, requests + req, True
    return sectors / requests if seen and requests > 0 else None


def top_stalls(metrics, count=4):
    """The largest warp-stall reasons, as fractions of all stall cycles per issued instruction."""
    stalls = {}
    for name, (value, _) in metrics.items():
        m = re.fullmatch(r"smsp__average_warps?_(?:latency_)?issue_stalled_([a-z0-9_]+?)_per_issue_active\.ratio", name)
        # "selected" (about 1 per issue by definition) and "not_selected" are not stalls
        if m and not m.group(1).endswith("_not_issued") and m.group(1) not in ("selected", "not_selected"):
            x = number(value)
            if x is not None:
                stalls[m.group(1)] = x
    total = sum(stalls.values())
    if not total:
        return []
    return [(k, x / total) for k, x in sorted(stalls.items(), key=lambda kv: -kv[1])[:count]]


COLUMNS = [  # (heading, width, function of the metrics dict -> value or None, format)
    ("ms", 8, duration_ms, "{:.3f}"),
    ("SM%", 5, lambda m: first_metric(m, r"sm__throughput\.avg\.pct_of_peak_sustained_elapsed"), "{:.0f}"),
    ("mem%", 5, lambda m: first_metric(m, r"gpu__compute_memory_throughput\.avg\.pct_of_peak_sustained_elapsed"),
     "{:.0f}"),
    ("tensor%", 7, lambda m: first_metric(
        m, r"sm__pipe_tensor_op_hmma_cycles_active\.avg\.pct_of_peak_sustained_active",
        r"sm__pipe_tensor_cycles_active\.avg\.pct_of_peak_sustained_active",
        r"sm__inst_executed_pipe_tensor_op_hmma\.avg\.pct_of_peak_sustained_active",
        r"sm__pipe_tensor.*cycles_active\.avg\.pct_of_peak_sustained_active"), "{:.0f}"),
    ("issue%", 6, lambda m: first_metric(m, r"smsp__issue_active\.avg\.pct_of_peak_sustained_active",
                                         r"sm__inst_issued\.avg\.pct_of_peak_sustained_active"), "{:.0f}"),
    ("occ%", 5, lambda m: first_metric(m, r"sm__warps_active\.avg\.pct_of_peak_sustained_active"), "{:.0f}"),
    ("regs", 4, lambda m: first_metric(m, r"launch__registers_per_thread"), "{:.0f}"),
    ("smem KiB", 8, lambda m: (lambda x: None if x is None else x / 1024)(
        first_metric(m, r"launch__shared_mem_per_block_dynamic")), "{:.0f}"),
    ("bank confl.", 11, lambda m: sum_metrics(m, r"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_(ld|st)\.sum"),
     "{:.3g}"),
    # global sectors per request: cp.async reads, atomics, stores
    ("cpa s/r", 7, lambda m: sectors_per_request(m, GLOBAL_OPS["cp.async"]), "{:.1f}"),
    ("atom s/r", 8, lambda m: sectors_per_request(m, GLOBAL_OPS["atomic"]), "{:.1f}"),
    ("st s/r", 6, lambda m: sectors_per_request(m, GLOBAL_OPS["store"]), "{:.1f}"),
]


def summarize(text, contenders):
    kernels = read_ncu_csv(text)
    out = []
    heading = f"{'contender':<15} {'kernel':<44} " + " ".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS) + "  top stalls"
    out += [heading, "-" * len(heading)]
    ci, totals = -1, {}
    for name, metrics in kernels:
        if is_forward(name) or ci < 0:
            ci += 1
        who = contenders[ci] if ci < len(contenders) else f"(extra {ci})"
        cells = []
        for _, width, fn, fmt in COLUMNS:
            x = fn(metrics)
            cells.append(f"{'-' if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x):>{width}}")
        stalls = ", ".join(f"{k} {x:.0%}" for k, x in top_stalls(metrics))
        out.append(f"{who:<15} {short_kernel_name(name)[:44]:<44} " + " ".join(cells) + f"  {stalls or '-'}")
        ms = duration_ms(metrics)
        if ms is not None:
            totals[who] = totals.get(who, 0.0) + ms
    if totals:
        out.append("")
        base = totals.get("sdpa-flash")
        out.append("fwd+bwd kernel time (ncu, one launch at a time): " + ", ".join(
            f"{who} {t:.3f} ms" + (f" ({t / base:.2f}x sdpa-flash)" if base and who != "sdpa-flash" else "")
            for who, t in totals.items()))
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the workload to run under ncu")
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--seq", type=int, default=8192)
    r.add_argument("--head-dim", type=int, default=128)
    r.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim (FlashAttention's setting)")
    r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    r.add_argument("--contenders", default=",".join(CONTENDERS))
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--device", default="cuda")
    s = sub.add_parser("summarize", help="tabulate ncu's CSV")
    s.add_argument("csv")
    s.add_argument("--contenders", default=",".join(CONTENDERS))
    s.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        if args.hidden % args.head_dim:
            ap.error("--hidden must be a multiple of --head-dim")
        run(args)
        return 0
    with open(args.csv, encoding="utf-8", errors="replace") as f:
        table = summarize(f.read(), [c for c in args.contenders.split(",") if c])
    sys.stdout.write(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
