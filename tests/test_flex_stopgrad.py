"""The FlexAttention detached-KV construction (benchmarks/flex_stopgrad.py, contender (e) of the
GPU benchmark) is exact: same forward as causal attention, and the k/v gradients of the reasoning
pattern in stop-grad mode, equal to ``stop_graddable_attn(..., reasoning=...)`` and to the
reference. FlexAttention has no CPU backward, so the gradients are checked by running the
construction's own mask (its mask_mod evaluated on index grids, also through flex's
``create_mask``) as dense masked softmax attention over [k; k.detach()], [v; v.detach()] in
float64 with autograd; flex_attention's CPU forward is compared as well."""
import os
import sys
import warnings

import pytest
import torch

import self_reasoning_tokens as srt
from self_reasoning_tokens.reasoning import reasoning_region
from self_reasoning_tokens.reference import reference_attention

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from flex_stopgrad import (build_block_mask, detached_kv, evaluate_mask_mod,  # noqa: E402
                           flex_stopgrad_attention, flex_unavailable_reason, reasoning_stopped,
                           stopgrad_mask_mod)

if flex_unavailable_reason():  # the GPU benchmark leaves contender (e) out for the same reason
    pytest.skip(flex_unavailable_reason(), allow_module_level=True)
flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")

# (n queries, m keys, R, W): square, a KV-cache-like suffix of queries, sizes that are not
# multiples of the block size, W reaching past the start.
CASES = [(64, 64, 3, 4), (45, 45, 2, 2), (24, 72, 3, 4), (40, 40, 1, 10), (32, 32, 0, 2)]


def dense_attention(q, k, v, block_mask, scale=None):
    """What flex_attention computes, written densely: softmax over the keys the block mask's
    mask_mod allows (evaluated on the full index grid), with autograd."""
    n, m2 = block_mask.seq_lengths
    allowed = evaluate_mask_mod(block_mask.mask_mod, torch.arange(n), torch.arange(m2))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return p @ v


def make_inputs(n, m, d=8, b=2, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, x, d, generator=g, dtype=torch.float64) for x in (n, m, m))
    do = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return q, k, v, do


def grads(fn, q, k, v, do):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), do)


def construction(n, m, R, W, stopped=None, block_size=16):
    stopped = stopped or reasoning_stopped(R, W, q_offset=m - n)
    mask_mod = stopgrad_mask_mod(stopped, n, m)
    return build_block_mask(mask_mod, n, 2 * m, BLOCK_SIZE=block_size, max_chunk_elems=700)


def assert_all_close(got, exp, names=("out", "dq", "dk", "dv"), tol=1e-10):
    for name, a, e in zip(names, got, exp):
        err = (a - e).abs().max().item()
        assert err <= tol * (1 + e.abs().max().item()), f"{name}: max abs err {err:.3e}"


@pytest.mark.parametrize("n,m,R,W", CASES)
def test_mask_shows_each_visible_key_exactly_once(n, m, R, W):
    mask_mod = stopgrad_mask_mod(reasoning_stopped(R, W, q_offset=m - n), n, m)
    # through flex's own (vmap) evaluation, as the kernels see it
    mask = flex_mod.create_mask(mask_mod, None, None, n, 2 * m, device="cpu")[0, 0]
    assert torch.equal(mask, evaluate_mask_mod(mask_mod, torch.arange(n), torch.arange(2 * m)))
    live, det = mask[:, :m], mask[:, m:]
    causal = torch.ones(n, m, dtype=torch.bool).tril(diagonal=m - n)
    assert not (live & det).any(), "a key is shown through both copies"
    assert torch.equal(live | det, causal), "visible set differs from causal attention"
    assert torch.equal(det, causal & reasoning_region(n, m, R, W)), "detached copies != the region"


@pytest.mark.parametrize("n,m,bs", [(64, 64, 16), (45, 45, 16), (24, 72, 8), (130, 130, 32)])
def test_chunked_block_mask_equals_create_block_mask(n, m, bs):
    mask_mod = stopgrad_mask_mod(reasoning_stopped(3, 4, q_offset=m - n), n, m)
    ours = build_block_mask(mask_mod, n, 2 * m, BLOCK_SIZE=bs, max_chunk_elems=3 * bs * bs)
    ref = flex_mod.create_block_mask(mask_mod, None, None, n, 2 * m, device="cpu", BLOCK_SIZE=bs)
    assert ours.seq_lengths == ref.seq_lengths == (n, 2 * m)
    for attr in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, attr), getattr(ref, attr)), attr


@pytest.mark.parametrize("n,m,R,W", CASES)
def test_gradients_equal_the_op_and_the_reference(n, m, R, W):
    q, k, v, do = make_inputs(n, m)
    bm = construction(n, m, R, W)
    pattern = srt.ReasoningPattern(R, W, stop_grad=True)
    flex = grads(lambda q, k, v: flex_stopgrad_attention(q, k, v, bm, attention=dense_attention), q, k, v, do)
    op = grads(lambda q, k, v: srt.stop_graddable_attn(q, k, v, causal=True, reasoning=pattern), q, k, v, do)
    ref = grads(lambda q, k, v: reference_attention(q, k, v, causal=True, reasoning=pattern), q, k, v, do)
    assert_all_close(flex, op)
    assert_all_close(flex, ref)
    # the forward and dq are those of plain causal attention (the pattern only stops k/v grads)
    plain = grads(lambda q, k, v: reference_attention(q, k, v, causal=True), q, k, v, do)
    assert_all_close(flex[:2], plain[:2])


def test_the_comparison_can_fail():
    """Wrong constructions give different k/v gradients, so the checks above discriminate."""
    n = m = 64
    q, k, v, do = make_inputs(n, m)
    pattern = srt.ReasoningPattern(3, 4, stop_grad=True)
    op = grads(lambda q, k, v: srt.stop_graddable_attn(q, k, v, causal=True, reasoning=pattern), q, k, v, do)
    wrong = {
        "never stopped": lambda b, h, i, j: j < 0,
        "window W-1": reasoning_stopped(3, 3),
        "copies swapped": lambda b, h, i, j: ~reasoning_stopped(3, 4)(b, h, i, j),
    }
    for what, stopped in wrong.items():
        bm = construction(n, m, 3, 4, stopped=stopped)
        got = grads(lambda q, k, v: flex_stopgrad_attention(q, k, v, bm, attention=dense_attention), q, k, v, do)
        assert_all_close(got[:2], op[:2])  # forward and dq never see the stop pattern
        for name, a, e in zip(("dk", "dv"), got[2:], op[2:]):
            assert (a - e).abs().max().item() > 1e-3, f"{what}: {name} did not change"


def test_detached_copies_carry_no_gradient():
    k = torch.randn(1, 1, 5, 4, requires_grad=True)
    v = torch.randn(1, 1, 5, 4, requires_grad=True)
    k2, v2 = detached_kv(k, v)
    assert k2.shape == (1, 1, 10, 4) and torch.equal(k2[..., 5:, :], k.detach())
    gk, gv = torch.autograd.grad((k2.sum(dim=-1) * torch.arange(10.0)).sum() + v2.sum(), (k, v))
    assert torch.equal(gk[0, 0, :, 0], torch.arange(5.0)) and torch.equal(gv, torch.ones_like(v))


@pytest.mark.parametrize("n,m,R,W", [(64, 64, 3, 4), (45, 45, 2, 2), (24, 72, 3, 4)])
def test_flex_attention_cpu_forward(n, m, R, W):
    """flex_attention itself (CPU, forward only: it has no CPU backward) on the construction."""
    q, k, v, _ = make_inputs(n, m)
    q, k, v = q.float(), k.float(), v.float()
    bm = construction(n, m, R, W)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_stopgrad_attention(q, k, v, bm)
    except (NotImplementedError, RuntimeError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"flex_attention forward unavailable on this CPU build: {e}")
    exp = srt.stop_graddable_attn(q, k, v, causal=True, reasoning=srt.ReasoningPattern(R, W))
    assert (out - exp).abs().max().item() < 1e-5
