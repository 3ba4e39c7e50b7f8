"""Small forward+backward launches of every CUDA kernel variant, as the workload for NVIDIA's
compute-sanitizer (run by benchmarks/gpu_check.sh when a GPU test failed, or on request).

The test suite says whether the results are right; the sanitizer says what the emulator in
tests/cuda_emulation cannot: out-of-bounds or misaligned global/shared accesses (memcheck),
shared-memory races between threads of a block (racecheck) and barriers not reached by every
thread (synccheck). Each case runs the op forward and backward on the GPU at shapes that end in
partial tiles, with every kind of mask read through strides, and checks the outputs and gradients
against the CPU kernels on the same inputs in float64, so that a wrong result is named here too.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python3 benchmarks/sanitize_gpu.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 benchmarks/sanitize_gpu.py --quick
    python3 benchmarks/sanitize_gpu.py --list            # the cases, nothing run
    python3 benchmarks/sanitize_gpu.py --device cpu --quick   # the same code paths on the CPU

(Without PYTORCH_NO_CUDA_MEMORY_CACHING=1, PyTorch's caching allocator hands out pieces of larger
blocks, and memcheck cannot see a read past a tensor's end that stays inside its block.)

Cases: float16 and bfloat16 with both tile settings of the tensor-core kernels (64, and 128 for both
the forward's query rows and the backward's keys: SRT_CUDA_FWD_BLOCK_M / SRT_CUDA_BWD_BLOCK_N) and
float32, at head dims 32, 64, 96 and 128; --quick keeps head dims 64 and 128 and the first shape.
Exit status 1 when a case raised or its results are off by more than a loose bound (gross errors
only; the test suite holds the precise tolerances).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import self_reasoning_tokens as srt  # noqa: E402
from _variants import bwd_block_n, clear_inherited_settings, fwd_block_m  # noqa: E402

HEAD_DIMS = srt.attention.CUDA_HEAD_DIMS  # every head dim with kernels
QUICK_HEAD_DIMS = (64, 128)
# Largest error allowed, relative to the largest reference magnitude of that tensor. Loose on
# purpose (a few times what rounding P and dS to 8 or 11 bits gives): a missing key tile, a missed
# mask or a race is off by a good fraction of the tensor's scale.
BOUND = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}

# (name, batch, heads, queries, keys, what): the queries and keys are not multiples of any tile
# (64 or 128), so every kernel meets partial query and key tiles.
SHAPES = (
    ("masks, n<m", 2, 2, 70, 130, "causal, key padding, dense k/v stop masks, a broadcast float q factor"),
    ("attn_mask, n>m", 1, 2, 130, 70, "attention mask (rows with no key), v stop mask broadcast over heads"),
    ("pattern, hard", 1, 2, 136, 136, "causal, ReasoningPattern(R=3, W=2) in hard mode on head 1 only"),
    ("pattern, stop-grad", 1, 1, 200, 200, "causal, ReasoningPattern(R=3, W=4) stop-grad, q stop mask"),
)


def case_list(quick):
    """(dtype, tiles or None, head_dim, shape) for every case, in run order."""
    cases = []
    head_dims = QUICK_HEAD_DIMS if quick else HEAD_DIMS
    shapes = SHAPES[:1] if quick else SHAPES
    for dtype, tile_settings in ((torch.float16, (64, 128)), (torch.bfloat16, (64, 128)), (torch.float32, (None,))):
        for tiles in tile_settings:
            for d in head_dims:
                for shape in shapes:
                    cases.append((dtype, tiles, d, shape))
    return cases


def case_label(dtype, tiles, d, shape):
    tile = f"tiles {tiles}" if tiles else "CUDA cores"
    return f"{str(dtype).replace('torch.', ''):8s} {tile:10s} d={d:<3d} {shape[0]}"


def make_inputs(shape, d, seed):
    """float64 CPU inputs and op keyword arguments (masks on the CPU) for one shape."""
    name, b, h, n, m, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    grad = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    kw = {}
    if name == "masks, n<m":
        pad = torch.ones(b, m, dtype=torch.bool)
        pad[0, -9:] = False
        pad[1, 3:20] = False
        kw = dict(causal=True, mask=pad,
                  k_stop_grad_mask=torch.rand(b, h, n, m, generator=g) < 0.3,
                  v_stop_grad_mask=torch.rand(b, h, n, m, generator=g) < 0.3,
                  q_stop_grad_mask=torch.rand(n, m, generator=g, dtype=torch.float64))
    elif name == "attn_mask, n>m":
        am = torch.rand(b, 1, n, m, generator=g) < 0.7
        am[:, :, 5] = False  # a query with no key: output and gradients 0
        kw = dict(attn_mask=am, v_stop_grad_mask=(torch.rand(n, m, generator=g) < 0.5)[None, None])
    elif name == "pattern, hard":
        kw = dict(causal=True, reasoning=srt.ReasoningPattern(3, 2, stop_grad=False, heads=[1]))
    elif name == "pattern, stop-grad":
        kw = dict(causal=True, reasoning=srt.ReasoningPattern(3, 4),
                  q_stop_grad_mask=torch.rand(n, m, generator=g) < 0.2)
    return (q, k, v, grad), kw


def on(kw, device, dtype):
    """The keyword arguments with their tensors on `device`; float factors in `dtype`."""
    out = {}
    for key, val in kw.items():
        if isinstance(val, torch.Tensor):
            val = val.to(device=device, dtype=dtype if val.is_floating_point() else val.dtype)
        out[key] = val
    return out


def fwd_bwd(q, k, v, grad, kw):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = srt.stop_graddable_attn(q, k, v, **kw)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def run_case(dtype, tiles, d, shape, device, seed):
    """(largest error of out, dq, dk, dv as a fraction of the bound, which of them); raises on a
    failure to run."""
    (q, k, v, grad), kw = make_inputs(shape, d, seed)
    ref = fwd_bwd(q, k, v, grad, kw)  # the CPU kernels in float64
    dev = [t.to(device=device, dtype=dtype) for t in (q, k, v, grad)]
    if tiles:
        with fwd_block_m(tiles), bwd_block_n(tiles):
            got = fwd_bwd(*dev, on(kw, device, dtype))
    else:
        got = fwd_bwd(*dev, on(kw, device, dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()
    worst = (0.0, "out")
    for name, r, x in zip(("out", "dq", "dk", "dv"), ref, got):
        x = x.to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            return float("inf"), name
        scale = max(r.abs().max().item(), 1e-6)
        worst = max(worst, ((x - r).abs().max().item() / scale / BOUND[dtype], name))
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="head dims 64 and 128, the first shape only")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (same code paths, no GPU kernels)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    args = ap.parse_args(argv)

    cases = case_list(args.quick)
    if args.list:
        for i, case in enumerate(cases):
            print(f"[{i + 1:2d}/{len(cases)}] {case_label(*case)}: {case[3][5]}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_gpu: no CUDA device visible (use --device cpu to run the code paths on the CPU)")
        return 2
    inherited = clear_inherited_settings()
    if inherited:
        print(f"sanitize_gpu: removed inherited tile settings {inherited}; each case sets its own")
    print(f"sanitize_gpu: {len(cases)} cases on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    bad = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        label = f"[{i + 1:2d}/{len(cases)}] {case_label(*case)}"
        try:
            worst, where = run_case(*case, device=device, seed=i)
        except Exception as e:  # noqa: BLE001 - reported per case, the other cases still run
            bad.append(label)
            print(f"{label}: RAISED {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}", flush=True)
            if device.type == "cuda" and "CUDA error" in str(e):
                print("sanitize_gpu: stopping (a CUDA error leaves the context unusable)", flush=True)
                break
            continue
        ok = worst <= 1.0
        if not ok:
            bad.append(label)
        print(f"{label}: {'ok' if ok else 'WRONG'} (largest error {worst:.3f} of the bound, in {where})", flush=True)
    print(f"sanitize_gpu: {len(cases) - len(bad)} of {len(cases)} cases ok in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {len(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
