"""CPU benchmark: one training step of a small reasoning-token Transformer at growing lengths.

One step = forward + backward of `Transformer(dim=256, depth=4, heads=4, dim_head=64)` with R=3
reasoning tokens per real token, W=4, stop-grad mode, batch 1, at N positions (N / 4 real
tokens). The attention contenders (Transformer's `attend_impl`):

  kernel     the reasoning pattern evaluated inside the compiled kernels (no mask memory)
  dense      the compiled kernels with dense (N, N) masks from reasoning_stop_grad_mask
  reference  the O(N^2) autograd reference attention with the same dense masks

and, when named in --impls (not run by default):

  kernel-ckpt  kernel with the Transformer's activation_checkpointing (each layer recomputed
               in the backward from its input: less memory, one more forward of compute)

Every (contender, N) runs in a fresh subprocess whose address space may grow by at most
--mem-cap-gb (default 8 GB, through RLIMIT_AS) beyond what it holds after start-up; a run that
cannot allocate is reported as "OOM". The peak memory of a step is the process's peak resident
set size during the step minus its resident size just before (Linux: the peak is reset through
/proc/self/clear_refs; elsewhere ru_maxrss is used), read in a second fresh process whose glibc
malloc hands freed memory back at once, so that the peak counts live memory, not blocks kept
for reuse (the timed steps run with the default: handing memory back costs time). Once a
contender fails at some N (memory,
timeout or the time budget), it is skipped at larger N.

    python benchmarks/bench_transformer.py                  # N = 512 .. 32768, ~15 min budget
    python benchmarks/bench_transformer.py --quick          # N = 256, 512, 1024
    python benchmarks/bench_transformer.py --n 1024 4096 --impls kernel dense --out /tmp/t.json
    python benchmarks/bench_transformer.py --impls kernel kernel-ckpt   # what checkpointing saves

The JSON goes to runs/bench/transformer_cpu.json unless --out says otherwise, with its plot
(seconds per step and peak memory against N, benchmarks/plot_bench.py) beside it as .png; the
committed results the README's table comes from are regenerated with
--out benchmarks/results/transformer_cpu.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name  # noqa: E402
from _memory import proc_status_bytes, reset_peak_rss, return_freed_memory_to_os, ru_maxrss_bytes  # noqa: E402
from plot_bench import plot_after_benchmark  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(ROOT, "runs", "bench", "transformer_cpu.json")  # not the committed results
IMPLS = ("kernel", "dense", "reference")  # the default contenders
# contender -> (the Transformer's attend_impl, activation_checkpointing)
CONTENDERS = {"kernel": ("kernel", False), "kernel-ckpt": ("kernel", True),
              "dense": ("dense", False), "reference": ("reference", False)}
MODEL = dict(dim=256, depth=4, heads=4, dim_head=64, num_tokens=256)
R, W = 3, 4
GB = 2**30
MIB = 2**20


# ------------------------------------------------------------------------------------------
# child: one (impl, N) configuration in a fresh process


def run_child(impl, n_positions, repeats, mem_cap_gb, threads, measure):
    """measure "time": `repeats` timed steps, with glibc's malloc as every program has it.
    measure "memory": the peak memory of one step, in a process whose malloc hands freed memory
    back from its start. glibc's default keeps freed blocks of up to its (growing) mmap
    threshold, 32 MiB, resident for reuse, and the peak RSS then counts them (N=16384 measured
    1658 MiB for `kernel` and 814 MiB for `kernel-ckpt` so, against 1316 and 437 MiB); handing
    memory back costs time (14-39% of a step at N=2048), and it must hold from the start: set
    after timed steps, the heap they grew serves the next step as before (762 MiB for
    `kernel-ckpt` at N=16384). Hence two processes per configuration."""
    import torch

    sys.path.insert(0, ROOT)
    import self_reasoning_tokens as srt

    if threads:
        torch.set_num_threads(threads)
    if measure == "memory":
        return_freed_memory_to_os()
    period = R + 1
    seq = n_positions // period
    torch.manual_seed(0)
    attend_impl, checkpointing = CONTENDERS[impl]
    model = srt.Transformer(**MODEL, max_seq_len=max(seq, 16), max_reason_seq_len=R,
                            stop_grad_next_tokens_to_reason=True, attend_impl=attend_impl,
                            activation_checkpointing=checkpointing)
    x = torch.randint(0, MODEL["num_tokens"], (1, seq + 1))  # inputs x[:, :-1], labels x[:, 1:]

    def step(tokens):
        model.zero_grad(set_to_none=True)
        loss = model(tokens, num_reason_tokens=R, num_steps_future_can_use_reason=W, return_loss=True)
        loss.backward()

    step(x[:, :17])  # warm-up at a tiny size: thread pool, allocator, first-call costs
    model.zero_grad(set_to_none=True)
    gc.collect()

    if mem_cap_gb > 0:
        cap = proc_status_bytes("VmSize") + int(mem_cap_gb * GB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def out_of_memory(e):
        msg = str(e)
        if isinstance(e, MemoryError) or "alloc" in msg.lower() or "memory" in msg.lower():
            return dict(status="OOM", error=msg.splitlines()[0][:200] if msg else "MemoryError")
        raise e

    can_reset = reset_peak_rss()
    base = proc_status_bytes("VmRSS")
    if not can_reset:
        base = max(base, ru_maxrss_bytes())
    times = []
    try:
        for _ in range(repeats if measure == "time" else 1):
            t0 = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - t0)
    except (MemoryError, RuntimeError) as e:
        return out_of_memory(e)
    if measure == "time":
        return dict(status="ok", times_s=times, time_s=statistics.median(times))
    peak = (proc_status_bytes("VmHWM") if can_reset else ru_maxrss_bytes()) - base
    return dict(status="ok", peak_bytes=peak)


# ------------------------------------------------------------------------------------------
# parent: schedule the configurations, print progress, table and JSON


def launch(impl, n, repeats, args, timeout):
    """Times the configuration in one fresh process and reads its peak memory in another
    (run_child says why); one result."""
    t0 = time.perf_counter()
    res = launch_child(impl, n, repeats, args, timeout, "time")
    if res["status"] == "ok":
        memory = launch_child(impl, n, 1, args, max(10.0, timeout - (time.perf_counter() - t0)), "memory")
        res = {**res, **memory} if memory["status"] == "ok" else memory
    res["wall_s"] = time.perf_counter() - t0
    return res


def launch_child(impl, n, repeats, args, timeout, measure):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", measure, "--impls", impl, "--n", str(n),
           "--repeats", str(repeats), "--mem-cap-gb", str(args.mem_cap_gb), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", error=f"no result within {timeout:.0f} s")
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        status = "OOM" if proc.returncode < 0 or "memory" in tail.lower() else "error"
        return dict(status=status, error=f"exit code {proc.returncode}: {tail[:200]}", wall_s=wall)
    res = json.loads(lines[-1])
    res["wall_s"] = wall
    return res


def cell(res):
    if res is None:
        return "-"
    if res["status"] == "ok":
        return f"{res['time_s']:7.2f} s {res['peak_bytes'] / MIB:8.0f} MiB"
    return res["status"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.path.insert(0, ROOT)
    from self_reasoning_tokens.cli import _positive_int

    ap.add_argument("--n", type=_positive_int, nargs="+", default=None,
                    help="sequence lengths in positions (multiples of R+1=4); default 512 .. 32768")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(CONTENDERS),
                    help=f"contenders (default: {' '.join(IMPLS)})")
    ap.add_argument("--quick", action="store_true", help="N = 256, 512, 1024, one timed step each")
    ap.add_argument("--repeats", type=_positive_int, default=None,
                    help="timed steps per configuration (median); default 3 up to N=2048, else 1")
    ap.add_argument("--mem-cap-gb", type=float, default=8.0, help="address-space growth allowed per run (0 = none)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole run (default 900, quick 120); a configuration predicted "
                         "to overrun it is skipped")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="JSON output (default runs/bench/transformer_cpu.json; the committed "
                    "benchmarks/results/transformer_cpu.json, which the README's table comes from, is "
                    "written only when named here)")
    ap.add_argument("--child", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        res = run_child(args.impls[0], args.n[0], args.repeats, args.mem_cap_gb, args.threads, args.child)
        print(json.dumps(res), flush=True)
        return 0

    sizes = args.n or ([256, 512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768])
    for n in sizes:
        if n <= 0 or n % (R + 1):
            ap.error(f"--n values must be positive multiples of R+1={R + 1}, got {n}")
    sizes = sorted(set(sizes))
    budget = args.time_budget if args.time_budget is not None else (120.0 if args.quick else 900.0)

    def repeats_for(n):
        if args.repeats is not None:
            return args.repeats
        return 1 if args.quick or n > 2048 else 3

    start = time.perf_counter()
    results = {impl: {} for impl in args.impls}
    last_ok = {}     # impl -> (n, seconds per step)
    failed = {}      # impl -> why later sizes are skipped
    total = len(sizes) * len(args.impls)
    k = 0
    for n in sizes:
        for impl in args.impls:
            k += 1
            elapsed = time.perf_counter() - start
            label = f"[{k:2d}/{total}] {impl:<11s} N={n:<6d}"
            if impl in failed:
                results[impl][n] = dict(status="skipped", error=failed[impl])
                print(f"{label} skipped ({failed[impl]})", file=sys.stderr, flush=True)
                continue
            reps = repeats_for(n)
            if impl in last_ok:  # attention is quadratic in N: predict from the last size
                n0, t0 = last_ok[impl]
                predicted = t0 * (n / n0) ** 2 * (reps + 1) + 5.0  # + the memory process's step
                if elapsed + predicted > budget:
                    failed[impl] = f"time budget: ~{predicted:.0f} s predicted, {budget - elapsed:.0f} s left"
                    results[impl][n] = dict(status="skipped", error=failed[impl])
                    print(f"{label} skipped ({failed[impl]})", file=sys.stderr, flush=True)
                    continue
            timeout = max(10.0, min(args.timeout, budget - elapsed + 30.0))
            res = launch(impl, n, reps, args, timeout)
            results[impl][n] = res
            if res["status"] == "ok":
                last_ok[impl] = (n, res["time_s"])
                print(f"{label} {res['time_s']:8.2f} s/step  peak +{res['peak_bytes'] / MIB:8.1f} MiB  "
                      f"(elapsed {time.perf_counter() - start:5.0f} s)", file=sys.stderr, flush=True)
            else:
                failed[impl] = f"{res['status']} at N={n}"
                print(f"{label} {res['status']}: {res.get('error', '')}  (elapsed "
                      f"{time.perf_counter() - start:5.0f} s)", file=sys.stderr, flush=True)

    # table
    import torch

    width = 24
    print(f"\nTransformer training step (forward+backward), CPU, {torch.get_num_threads()} threads, float32: "
          f"dim {MODEL['dim']}, depth {MODEL['depth']}, heads {MODEL['heads']}, dim_head {MODEL['dim_head']}, "
          f"R={R}, W={W}, stop-grad mode, batch 1")
    print(f"cell: seconds per step (median) and peak memory of the step; cap {args.mem_cap_gb:g} GB per run\n")
    print(f"{'N positions':>11s} {'tokens':>7s} " + " ".join(f"{impl:>{width}s}" for impl in args.impls))
    for n in sizes:
        print(f"{n:>11d} {n // (R + 1):>7d} " + " ".join(f"{cell(results[impl].get(n)):>{width}s}" for impl in args.impls))
    longest = {}
    for impl in args.impls:
        ok = [n for n in sizes if results[impl].get(n, {}).get("status") == "ok"]
        longest[impl] = max(ok) if ok else None
        why = failed.get(impl)
        fits = (f"{longest[impl]}" if ok else "none") + (f" ({why})" if why else " (largest size tried)")
        print(f"longest N that ran within the cap, {impl}: {fits}")

    out = dict(
        benchmark="transformer_train_step_cpu",
        model=dict(MODEL, num_reason_tokens=R, num_steps_future_can_use_reason=W,
                   stop_grad_next_tokens_to_reason=True, batch=1, dtype="float32"),
        mem_cap_gb=args.mem_cap_gb,
        machine=dict(platform=platform.platform(), processor=cpu_name(), python=platform.python_version(), torch=torch.__version__,
                     threads=torch.get_num_threads(), cpus=os.cpu_count()),
        note="time_s: median of the timed steps (glibc's default malloc); peak_bytes: peak resident "
             "memory of one step minus the resident size before it, in another process whose glibc "
             "malloc hands freed memory back at once",
        results=[dict(impl=impl, n_positions=n, n_tokens=n // (R + 1), **res)
                 for impl in args.impls for n, res in sorted(results[impl].items())],
        longest_ok=longest,
        wall_s=time.perf_counter() - start,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.out} ({out['wall_s']:.0f} s)")
    plot_after_benchmark(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
