"""The CUDA build of the extension (csrc/cuda).

Without a GPU: when the extension was compiled with its CUDA kernels, both ops must have a
kernel registered for the CUDA dispatch key (CI's .ci/cuda_build_check.sh runs this file against
the CUDA build). With a GPU: the CUDA ops are compared directly with the CPU ops, run in float64
on the same (rounded) inputs, for every supported dtype and head dim, with bool and floating
masks of several broadcast shapes, causal with n != m, fully masked rows, and the reasoning
pattern in both modes. The backward is compared given the same saved (out, lse), so a mismatch
points at one kernel. Tolerances only allow for fp32 accumulation and the final rounding to the
input dtype.
"""
from __future__ import annotations

import pytest
import torch

import self_reasoning_tokens as srt

OPS = ("attn_fwd", "attn_bwd")
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 96, 128)

NO_CUDA_BUILD = ("the extension was built without its CUDA kernels (CPU-only torch or no nvcc); "
                 "build it with FORCE_CUDA=1 against a CUDA build of torch to run these checks")
needs_cuda_build = pytest.mark.skipif(not srt.cuda_kernels_available(), reason=NO_CUDA_BUILD)
needs_gpu = pytest.mark.skipif(
    not (srt.cuda_kernels_available() and torch.cuda.is_available()),
    reason=NO_CUDA_BUILD if not srt.cuda_kernels_available() else "no CUDA GPU visible")


@needs_cuda_build
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"self_reasoning_tokens::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"self_reasoning_tokens::{op}", "CPU")


@needs_cuda_build
def test_compiled_with_cuda_flag():
    assert torch.ops.self_reasoning_tokens.compiled_with_cuda() is True


# --------------------------------------------------------------------------------------------
# GPU: CUDA op against CPU op.

# Relative tolerance (times the largest |expected| of the tensor) per input dtype. fp32 math in
# both kernels; the CUDA results are rounded once to the input dtype (bf16: 2^-9 relative).
RTOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
ATOL = 1e-6

ops = torch.ops.self_reasoning_tokens if srt.HAS_EXTENSION else None


def _rand(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _cases(gen):
    """(name, (b, h, n, m), kwargs builder) triples; masks are created on the CPU here and moved
    to the GPU by the caller."""
    def bool_mask(*shape, p_true):
        return torch.rand(*shape, generator=gen) < p_true

    def plain(b, h, n, m):
        return dict(causal=False)

    def causal_masks(b, h, n, m):
        kp = torch.ones(b, m, dtype=torch.bool)
        kp[-1, : max(m - n, 0) + 3] = False  # with causality: rows 0..2 of the last batch see no key
        return dict(
            causal=True,
            key_padding=kp,
            attn_mask=bool_mask(h, n, m, p_true=0.85),                 # (h, n, m) broadcast
            q_stop=bool_mask(b, 1, n, m, p_true=0.3),                 # (b, 1, n, m) bool
            k_stop=torch.rand(n, m, generator=gen, dtype=torch.float32),  # (n, m) float factor
            v_stop=bool_mask(b, h, n, m, p_true=0.5),                 # dense bool
        )

    def float_masks(b, h, n, m):
        return dict(
            causal=True,
            q_stop=torch.rand(1, h, 1, m, generator=gen, dtype=torch.float64),  # row-broadcast
            k_stop=torch.rand(n, m, generator=gen).to(torch.float16),
            v_stop=torch.rand(h, n, 1, generator=gen).to(torch.bfloat16),       # column-broadcast
        )

    def dense_kv(b, h, n, m):
        stop = bool_mask(h, n, m, p_true=0.5)
        return dict(causal=True, k_stop=stop, v_stop=stop)

    def reasoning_stop(b, h, n, m):
        return dict(causal=True, reasoning=(3, 4, True, torch.tensor([True, False, True])[:h]),
                    v_stop=bool_mask(n, m, p_true=0.2))

    def reasoning_hard(b, h, n, m):
        return dict(causal=True, reasoning=(2, 2, False, None))

    def reasoning_hard_skip(b, h, n, m):
        # R = 40, W = 3: key tile [128, 160) lies inside step 3's reasoning tokens, and query
        # tiles of steps 4..6 have it entirely in their region: the kernels skip such tiles.
        return dict(causal=True, reasoning=(40, 3, False, None))

    def causal_only(b, h, n, m):
        return dict(causal=True)

    def reasoning_stop_only(b, h, n, m):
        # no stop masks: the tensor-core backward evaluates factors only on tiles that may
        # touch the region (tile_may_touch_region), and must not miss any
        return dict(causal=True, reasoning=(3, 4, True, None))

    def reasoning_stop_period3(b, h, n, m):
        # R = 2: a period of 3 keys, which divides no tile width, so every key tile and chunk has
        # its own pattern of reasoning columns
        return dict(causal=True, reasoning=(2, 3, True, None))

    return [
        ("plain n>m", (2, 3, 70, 45), plain),
        # several full 64 x 64 tiles with nothing to mask: the kernels' unchecked fast path
        ("plain, multi-tile", (1, 1, 130, 190), plain),
        ("causal only, multi-tile", (1, 2, 200, 200), causal_only),
        ("reasoning stop-grad only, multi-tile", (1, 1, 203, 203), reasoning_stop_only),
        ("reasoning stop-grad R=2, multi-tile", (1, 1, 190, 190), reasoning_stop_period3),
        ("causal n<m, masks, empty rows", (2, 3, 37, 83), causal_masks),
        ("causal n>m, masks, empty rows", (2, 2, 90, 41), causal_masks),
        ("float masks", (1, 3, 65, 65), float_masks),
        ("causal, tile-aligned, dense k/v stop", (1, 2, 128, 128), dense_kv),
        ("reasoning stop-grad, head subset, kv cache", (2, 3, 40, 96), reasoning_stop),
        ("reasoning hard", (1, 2, 99, 99), reasoning_hard),
        ("reasoning hard, skipped tiles", (1, 1, 256, 256), reasoning_hard_skip),
    ]


def _run_ops(q, k, v, do, kw, device, out_lse=None):
    """attn_fwd and attn_bwd on `device`, masks moved there. With out_lse, the backward uses
    that (out, lse) instead of the forward's own."""
    def mv(t):
        return None if t is None else t.to(device)

    R, W, stop, heads = kw.get("reasoning") or (0, 0, True, None)
    masks = [mv(kw.get(name)) for name in ("key_padding", "attn_mask", "q_stop", "k_stop", "v_stop")]
    scale = q.shape[-1] ** -0.5
    args = (kw["causal"], scale, R, W, stop, mv(heads))
    out, lse = ops.attn_fwd(q, k, v, *masks, *args)
    o_b, l_b = (out, lse) if out_lse is None else out_lse
    dq, dk, dv = ops.attn_bwd(do, q, k, v, o_b, l_b, *masks, *args)
    return out, lse, dq, dk, dv


def _assert_close(name, got, exp, dtype, what):
    got = got.detach().double().cpu()
    exp = exp.detach().double().cpu()
    assert got.shape == exp.shape, (what, name, got.shape, exp.shape)
    assert not torch.isnan(got).any(), f"{what}: {name} has NaN"
    if name == "lse":  # -inf exactly where the reference has -inf (rows with no allowed key)
        inf_g, inf_e = torch.isinf(got), torch.isinf(exp)
        assert torch.equal(inf_g, inf_e), f"{what}: lse -inf rows differ"
        got, exp = got[~inf_g], exp[~inf_e]
    assert torch.isfinite(got).all(), f"{what}: {name} not finite"
    if exp.numel() == 0:
        return
    err = (got - exp).abs().max().item()
    tol = ATOL + RTOL[dtype] * exp.abs().max().item()
    assert err <= tol, f"{what}: {name} max abs err {err:.3e} > tol {tol:.3e}"


# The float16/bfloat16 kernels' tile variants (kernel_traits.h): the defaults, then each
# environment setting that picks the other size.
TILE_VARS = ("SRT_CUDA_FWD_BLOCK_M", "SRT_CUDA_BWD_BLOCK_N")
TILE_SETTINGS = {"default": {}, "fwd128": {"SRT_CUDA_FWD_BLOCK_M": "128"}, "bwd128": {"SRT_CUDA_BWD_BLOCK_N": "128"}}


def use_tiles(monkeypatch, tiles):
    """The environment of tile setting `tiles` (a TILE_SETTINGS key), the other variable unset."""
    for var in TILE_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in TILE_SETTINGS[tiles].items():
        monkeypatch.setenv(var, value)


@needs_gpu
@pytest.mark.parametrize("tiles", TILE_SETTINGS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_matches_cpu(dtype, head_dim, tiles, monkeypatch):
    if tiles != "default" and dtype == torch.float32:
        pytest.skip("the tile settings select between float16/bfloat16 kernels only")
    use_tiles(monkeypatch, tiles)
    gen = torch.Generator().manual_seed(1234 + head_dim)
    for name, (b, h, n, m), build in _cases(gen):
        kw = build(b, h, n, m)
        what = f"{dtype} d={head_dim} tiles {tiles} {name}"
        q, k, v, do = (_rand(b, h, rows, head_dim, dtype=dtype, device="cuda", gen=gen)
                       for rows in (n, m, m, n))
        out, lse, dq, dk, dv = _run_ops(q, k, v, do, kw, "cuda")
        torch.cuda.synchronize()
        assert out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
        assert lse.dtype == torch.float32
        # The CPU op in float64 on the same rounded inputs; its backward gets the CUDA forward's
        # saved (out, lse), exactly what autograd would hand to the CUDA backward.
        c64 = [t.double().cpu() for t in (q, k, v, do)]
        ref = _run_ops(*c64, kw, "cpu", out_lse=(out.double().cpu(), lse.double().cpu()))
        for tname, got, exp in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
            _assert_close(tname, got, exp, dtype, what)
        # Rows with no allowed key: O = 0 exactly and zero gradients (never NaN).
        empty = torch.isinf(lse)
        if empty.any():
            assert (out[empty] == 0).all() and (dq[empty] == 0).all(), what


@needs_gpu
def test_cuda_noncontiguous_and_empty():
    gen = torch.Generator().manual_seed(7)
    dt = torch.bfloat16
    base = _rand(2, 40, 3, 64, dtype=dt, device="cuda", gen=gen)
    q = base.transpose(1, 2)  # (2, 3, 40, 64) view with non-unit head stride
    k, v, do = (_rand(2, 3, 40, 64, dtype=dt, device="cuda", gen=gen) for _ in range(3))
    kw = dict(causal=True)
    got = _run_ops(q, k, v, do, kw, "cuda")
    ref = _run_ops(q.contiguous(), k, v, do, kw, "cuda")
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        _assert_close(name, a, e, dt, "non-contiguous q")  # dQ's fp32 atomics: order may vary
    # No keys: O = 0, lse = -inf, zero gradients; no queries: empty outputs.
    k0 = torch.empty(2, 3, 0, 64, dtype=dt, device="cuda")
    out, lse, dq, dk, dv = _run_ops(q.contiguous(), k0, k0, do, kw, "cuda")
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all() and (dq == 0).all()
    assert dk.shape == k0.shape and dv.shape == k0.shape
    q0 = torch.empty(2, 3, 0, 64, dtype=dt, device="cuda")
    out, lse, dq, dk, dv = _run_ops(q0, k, v, q0, kw, "cuda")
    assert out.shape == q0.shape and lse.shape == (2, 3, 0) and (dk == 0).all() and (dv == 0).all()


@needs_gpu
@pytest.mark.parametrize("tiles", TILE_SETTINGS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_deterministic_backward(dtype, tiles, monkeypatch, helpers):
    """Under torch.use_deterministic_algorithms(True) the CUDA backward's deterministic schedule
    (KernelParams::round_tiles) gives the same bits in every run, at a size where the default
    schedule's atomics add 32 key tiles into each dQ row at once, with enough (batch, head) pairs
    and SMs for several dQ buffers; and it matches the default schedule within the tolerance."""
    if tiles != "default" and dtype == torch.float32:
        pytest.skip("the tile settings select between float16/bfloat16 kernels only")
    use_tiles(monkeypatch, tiles)
    gen = torch.Generator().manual_seed(11)
    b, h, n, d = 2, 4, 2048, 128
    q, k, v, do = (_rand(b, h, n, d, dtype=dtype, device="cuda", gen=gen) for _ in range(4))
    kw = dict(causal=True, reasoning=(3, 4, True, None))
    default = _run_ops(q, k, v, do, kw, "cuda")
    with helpers.deterministic():
        runs = [_run_ops(q, k, v, do, kw, "cuda") for _ in range(4)]
    for again in runs[1:]:
        for name, a, first in zip(("out", "lse", "dq", "dk", "dv"), again, runs[0]):
            assert torch.equal(a, first), f"{name} differs between two deterministic runs"
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), runs[0], default):
        _assert_close(name, a, e, dtype, f"deterministic vs default schedule ({tiles} tiles)")


@needs_gpu
def test_cuda_rejects_unsupported_head_dim_and_dtype():
    q = torch.randn(1, 1, 8, 48, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="32, 64, 96, 128"):
        ops.attn_fwd(q, q, q, None, None, None, None, None, False, 1.0)
    q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.attn_fwd(q, q, q, None, None, None, None, None, False, 1.0)


@needs_gpu
def test_cuda_autograd_path_matches_reference():
    """stop_graddable_attn on CUDA (autograd through the registered ops) against the float64
    reference, with the reasoning pattern and a dense k/v stop mask."""
    gen = torch.Generator().manual_seed(3)
    b, h, n, d = 1, 2, 48, 64
    q, k, v, do = (_rand(b, h, n, d, dtype=torch.float32, device="cuda", gen=gen) for _ in range(4))
    stop = torch.rand(h, n, n, generator=gen) < 0.5
    pattern = srt.ReasoningPattern(3, 2)
    kwargs = dict(causal=True, k_stop_grad_mask=stop.cuda(), v_stop_grad_mask=stop.cuda(), reasoning=pattern)

    def grads(fn, tensors, **kw):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = fn(*leaves, **kw)
        return (out.detach(), *torch.autograd.grad(out, leaves, do.to(out)))

    got = grads(srt.stop_graddable_attn, (q, k, v), **kwargs)
    exp = grads(srt.reference_attention, (q.double(), k.double(), v.double()), **kwargs)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp):
        _assert_close(name, a, e, torch.float32, "autograd path")
