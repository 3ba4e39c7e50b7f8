"""The compiled ops in the dispatcher: registration, torch.library.opcheck, torch.compile, and the
O(n) memory claim (issue 2, items 2 and 3)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import self_reasoning_tokens as srt
from self_reasoning_tokens import ReasoningPattern, stop_graddable_attn

ops = torch.ops.self_reasoning_tokens


def test_ops_registered_with_cpu_kernels():
    assert srt.HAS_EXTENSION
    for name in ("attn_fwd", "attn_bwd"):
        assert hasattr(ops, name)
        qualname = f"self_reasoning_tokens::{name}"
        # the C++ CPU kernel; the fake (Meta) kernel and autograd from torch.library registrations
        for key in ("CPU", "Meta", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (name, key)
        if srt.cuda_kernels_available():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), name
    schema = str(ops.attn_fwd.default._schema)
    for arg in ("q", "k", "v", "key_padding", "attn_mask", "q_stop_grad_mask", "k_stop_grad_mask",
                "v_stop_grad_mask", "causal", "scale"):
        assert f" {arg}" in schema, arg
    assert isinstance(srt.cuda_kernels_available(), bool)


def test_forward_returns_out_and_lse(cfg):
    q, k, v = cfg.qkv(2, 3, 6, 9, requires_grad=False)
    am = torch.rand(6, 9, device=cfg.device) < 0.6
    am[:, 0] = True
    am[2] = False
    scale = 0.4
    out, lse = ops.attn_fwd(q, k, v, None, am, None, None, None, False, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    s = scale * (q.double() @ k.double().transpose(-1, -2))
    exp_lse = s.masked_fill(~am, float("-inf")).logsumexp(-1)
    assert torch.isneginf(lse[:, :, 2]).all()  # the fully masked row
    keep = torch.ones(6, dtype=torch.bool)
    keep[2] = False
    tol = 1e-10 if q.dtype == torch.float64 else 1e-3
    assert (lse[:, :, keep].double() - exp_lse[:, :, keep]).abs().max() < tol


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------

def _fwd_samples(requires_grad, device="cpu"):
    """Representative argument lists for attn_fwd: no masks, causal, every mask kind and broadcast
    shape (strided, stride-0 and transposed views), reasoning with and without a head subset, and
    the other dtypes of the device."""
    torch.manual_seed(0)
    b, h, n, m = 2, 3, 9, 13
    d = 32 if device == "cuda" else 8

    def qkv(dtype=torch.float32):
        return [torch.randn(b, h, x, d, device=device, dtype=dtype, requires_grad=requires_grad)
                for x in (n, m, m)]

    def rand(*s, dtype=torch.float32):
        return torch.rand(*s, device=device, dtype=dtype)

    pad = rand(b, m) < 0.8
    pad[:, 0] = True
    am = rand(h, n, m) < 0.7
    samples = [
        (*qkv(), None, None, None, None, None, False, 0.35),
        (*qkv(), None, None, None, None, None, True, 0.35),
        (*qkv(), pad, am, rand(n, m) < 0.3, rand(b, h, n, m), rand(m, n).t(), True, 0.2),
        (*qkv(), None, None, None, rand(1, h, 1, m).expand(b, h, n, m), rand(n, m) < 0.5, False, 1.0),
        (*qkv(), None, None, None, None, None, True, 0.35, 2, 1, True, None),
        (*qkv(), pad, None, rand(n, m), None, None, True, 0.35, 1, 2, False,
         torch.tensor([True, False, True], device=device)),
    ]
    if device == "cpu":  # float64 and bfloat16 CPU kernels
        samples.append((*qkv(torch.float64), None, am, None, rand(n, m, dtype=torch.float64), None, True, 0.5))
        samples.append((*qkv(torch.bfloat16), pad, None, None, rand(n, m) < 0.5, rand(h, n, m), True, 0.5))
    return samples


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_attn_fwd(device, requires_grad):
    for args in _fwd_samples(requires_grad, device):
        torch.library.opcheck(ops.attn_fwd.default, args)


def test_opcheck_attn_bwd(device):
    for args in _fwd_samples(False, device):
        q, k, v = args[:3]
        masks = args[3:8]
        rest = args[8:]
        out, lse = ops.attn_fwd(*args)
        g = torch.randn_like(out)
        torch.library.opcheck(ops.attn_bwd.default, (g, q, k, v, out, lse, *masks, *rest))


def test_backward_op_matches_autograd(cfg):
    """attn_bwd called directly gives what autograd through attn_fwd gives."""
    args = list(_fwd_samples(True, cfg.device)[2])
    q, k, v = args[:3]
    out, lse = ops.attn_fwd(*args)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    dq2, dk2, dv2 = ops.attn_bwd(g, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:])
    for a, e in ((dq, dq2), (dk, dk2), (dv, dv2)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bh", [(1, 1), (1, 3), (2, 3)])
def test_cpu_half_precision_is_the_float32_computation_rounded(dtype, threads, bh):
    """The CPU kernels compute bfloat16/float16 in float32: out, lse, dQ, dK and dV are bit for
    bit the float32 op's on the upcast tensors, rounded to the input dtype. One head (the forward
    through one float32 copy of k and v; on 2 threads the backward's key tiles split into two
    groups, each converting its own tiles, packed, with their own dQ rows), three heads (the
    forward through per-thread copies of one head's k and v; on 2 threads in two key groups, so a
    thread goes through (head, group) tasks of several heads) and six; key tiles of 256, so 600
    keys make three (group 0 packs tiles 0 and 2, the partial one); query blocks of 128, so 300
    queries make three; non-contiguous q and dO; causal, masks, reasoning tokens."""
    b, h = bh
    n, m, d = 300, 600, 32
    torch.manual_seed(3)
    q = torch.randn(b, n, h, d).to(dtype).transpose(1, 2)  # a strided view
    k, v = (torch.randn(b, h, m, d).to(dtype) for _ in range(2))
    g = torch.randn(b, h, d, n).to(dtype).transpose(-1, -2)
    pad = torch.rand(b, m) < 0.9
    pad[:, 0] = True
    masks = (pad, torch.rand(n, m) < 0.8, torch.rand(h, n, m) < 0.2, torch.rand(n, m), None)
    rest = (True, 0.3, 2, 3, True, None)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = ops.attn_fwd(q, k, v, *masks, *rest)
        out32, lse32 = ops.attn_fwd(q.float(), k.float(), v.float(), *masks, *rest)
        grads = ops.attn_bwd(g, q, k, v, out, lse, *masks, *rest)
        grads32 = ops.attn_bwd(g.float(), q.float(), k.float(), v.float(), out.float(), lse, *masks, *rest)
    finally:
        torch.set_num_threads(old)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(out, out32.to(dtype)) and torch.equal(lse, lse32)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads32):
        assert got.dtype == dtype, name
        assert torch.equal(got, want.to(dtype)), name
        assert got.abs().max() > 0, name


def test_double_backward_is_refused():
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = stop_graddable_attn(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

def _compile_inputs(device):
    torch.manual_seed(1)
    b, h, n, m = 2, 2, 20, 28
    d = 32 if device == "cuda" else 16
    q, k, v = (torch.randn(b, h, x, d, device=device) for x in (n, m, m))
    masks = dict(k_stop_grad_mask=torch.rand(h, n, m, device=device) < 0.4,
                 v_stop_grad_mask=torch.rand(n, m, device=device),
                 q_stop_grad_mask=torch.rand(m, n, device=device).t() < 0.3,
                 attn_mask=torch.rand(n, m, device=device) < 0.8,
                 mask=torch.rand(b, m, device=device) < 0.9)
    return q, k, v, masks


def fn(q, k, v, masks, w):
    # some ordinary ops around the attention, so that the graph is not just the op
    out = stop_graddable_attn(q * 1.5, k, v.relu(), causal=True, **masks,
                              reasoning=ReasoningPattern(1, 2, heads=[1]))
    return (out * w).sum(dim=-1).tanh().sum()


def _values_and_grads(f, q, k, v, masks, w):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    loss = f(q, k, v, masks, w)
    loss.backward()
    return loss.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    q, k, v, masks = _compile_inputs(device)
    w = torch.randn(q.shape[-1], device=device)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager = _values_and_grads(fn, q, k, v, masks, w)
    got = _values_and_grads(compiled, q, k, v, masks, w)
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    # the stop masks must still be in effect under compile: gradients differ from no masks
    plain = _values_and_grads(fn, q, k, v, {}, w)
    assert (got[2] - plain[2]).abs().max() > 1e-4
    torch._dynamo.reset()


def test_torch_compile_fullgraph_with_a_scale_that_varies(device):
    """A Python float scale that changes between calls becomes a symbolic float when Dynamo
    recompiles, and one computed from a dynamic shape is one from the start: the eager-only
    finiteness check must not break the graph (it raised Unsupported on math.isfinite)."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 9, 8, device=device, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v, s: stop_graddable_attn(q, k, v, causal=True, scale=s),
                             fullgraph=True, backend="aot_eager")
    for scale in (0.3, 0.7, 1.1):
        got = compiled(q, k, v, scale)
        expected = stop_graddable_attn(q, k, v, causal=True, scale=scale)
        torch.testing.assert_close(got, expected)
        for a, e in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
            torch.testing.assert_close(a, e)
    by_shape = torch.compile(lambda q, k, v: stop_graddable_attn(q, k, v, causal=True, scale=q.shape[-1] ** -0.25),
                             fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (9, 13):
        q, k, v = (torch.randn(1, 2, n, 8, device=device) for _ in range(3))
        torch.testing.assert_close(by_shape(q, k, v), stop_graddable_attn(q, k, v, causal=True, scale=8 ** -0.25))
    with pytest.raises(ValueError, match="finite"):  # eager calls still check
        stop_graddable_attn(q, k, v, scale=float("inf"))
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# memory: O(n), never an n x n matrix
# --------------------------------------------------------------------------------------------

RSS_HELPERS = textwrap.dedent("""
    import resource, sys, time
    import torch
    import self_reasoning_tokens as srt

    def status_kb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def start():
        # Linux: reset the peak RSS (VmHWM) so it measures this region only; else ru_maxrss
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return ("proc", status_kb("VmRSS"))
        except (OSError, KeyError):
            return ("rusage", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def growth_mb(token):
        how, base = token
        peak = status_kb("VmHWM") if how == "proc" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - base) / 1024.0
""")

MEMORY_SCRIPT = RSS_HELPERS + textwrap.dedent("""
    n, d = int(sys.argv[1]), 32
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    stop = torch.zeros(n, 1, dtype=torch.bool)  # a (n, 1) k stop mask broadcast over keys: O(n)
    # warm up threads and allocator at a small size
    x = [t.detach()[:, :, :512].clone().requires_grad_() for t in (q, k, v)]
    srt.stop_graddable_attn(*x, causal=True, k_stop_grad_mask=stop[:512]).sum().backward()

    token = start()
    t0 = time.time()
    out = srt.stop_graddable_attn(q, k, v, causal=True, k_stop_grad_mask=stop)
    out.sum().backward()
    elapsed = time.time() - t0
    used = growth_mb(token)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    del out

    # control: the same measurement does see a quarter of an n x n float32 matrix
    token = start()
    big = torch.ones(n, n // 4)
    control = growth_mb(token)
    del big
    print(f"{used:.1f} {control:.1f} {elapsed:.2f}")
""")



def _run_in_fresh_python(script, *args):
    """Runs `script` in a fresh python with OMP_NUM_THREADS=1 (one thread unless the script
    says otherwise: the time stays predictable on a busy machine); returns its stdout."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # import the package from wherever this process imported it (installed or a checkout)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(srt.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_memory_is_linear_in_n():
    """Forward + backward at n = 16384 (an n x n float32 matrix would be 1 GiB): the peak RSS of
    the process grows by far less than that."""
    n = 16384
    growth_mb, control_mb, seconds = map(float, _run_in_fresh_python(MEMORY_SCRIPT, n).split()[-3:])
    nxn_mb = n * n * 4 / 2**20
    print(f"peak RSS growth {growth_mb:.1f} MiB at n={n} ({seconds:.2f} s); n x n float32 = {nxn_mb:.0f} MiB; "
          f"control {control_mb:.0f} MiB")
    assert control_mb > 0.8 * nxn_mb / 4, f"the RSS measurement missed a {nxn_mb / 4:.0f} MiB tensor"
    assert growth_mb < 64, f"peak RSS grew by {growth_mb:.1f} MiB (n x n would be {nxn_mb:.0f} MiB)"


HALF_MEMORY_SCRIPT = RSS_HELPERS + textwrap.dedent("""
    threads, h, n, d = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 64
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    x = [t.detach()[:, :, :512].clone().requires_grad_() for t in (q, k, v)]  # warm-up
    srt.stop_graddable_attn(*x, causal=True).sum().backward()
    g = torch.randn_like(q)
    token = start()
    srt.stop_graddable_attn(q, k, v, causal=True).backward(g)
    print(f"{growth_mb(token):.1f}")
""")


@pytest.mark.parametrize("threads, heads, n, bound", [(1, 16, 4096, 7), (1, 1, 16384, 15), (8, 1, 16384, 50)])
def test_cpu_half_precision_memory(threads, heads, n, bound):
    """bfloat16 forward + backward allocate the results (the bfloat16 output and dQ, dK, dV: 4
    tensors of q's size) plus float32 working memory, bounded here in multiples of q's size.
    - 16 heads on one thread: each thread converts what it works on (a query block; one head's k
      and v in the forward, its key tiles in the backward), not float32 copies of the whole
      tensors (five inputs and three gradients: 16 more q's; 152 MiB, 19 q's, measured with such
      copies; 4.6 q's measured with per-thread ones).
    - One head on one thread: the backward's float32 rows of k, v, dK and dV (8 q's), never whole
      float32 copies of its inputs and gradients (20 q's measured with them; 12 q's now).
    - One head on 8 threads: one float32 copy of k and v shared by the forward's threads (4 q's)
      and the 8 key groups' dQ buffers (16 q's), not 8 threads' copies of the head (262 MiB, 131
      q's, measured with per-thread head copies in the forward and backward; 30 q's now)."""
    q_mb = heads * n * 64 * 2 / 2**20  # one bfloat16 tensor of q's shape
    growth_mb = float(_run_in_fresh_python(HALF_MEMORY_SCRIPT, threads, heads, n).split()[-1])
    print(f"peak RSS growth {growth_mb:.1f} MiB; q is {q_mb:.0f} MiB")
    assert growth_mb < bound * q_mb, f"peak RSS grew by {growth_mb:.1f} MiB = {growth_mb / q_mb:.1f}x q's size"


if torch.cuda.is_available():  # the same claim for the CUDA kernels, where a GPU exists

    @pytest.mark.gpu
    def test_cuda_memory_is_linear_in_n():
        n, d = 16384, 64
        q, k, v = (torch.randn(1, 1, n, d, device="cuda", dtype=torch.float16, requires_grad=True)
                   for _ in range(3))
        stop = torch.zeros(n, 1, dtype=torch.bool, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = stop_graddable_attn(q, k, v, causal=True, k_stop_grad_mask=stop)
        out.sum().backward()
        torch.cuda.synchronize()
        growth_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        assert torch.isfinite(q.grad).all()
        assert growth_mb < 64, f"peak CUDA memory grew by {growth_mb:.1f} MiB (n x n fp16 = 512 MiB)"


def test_too_old_a_torch_is_named_on_import():
    # torch 2.4 has no torch.library.register_vmap (measured with 2.4.1): the import says which
    # torch the package needs instead of failing inside the registration
    code = ("import torch\ndel torch.library.register_vmap\n"
            "import self_reasoning_tokens\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert f"self_reasoning_tokens needs torch >= 2.5 (this is torch {torch.__version__})" in proc.stderr
