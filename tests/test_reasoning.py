"""The reasoning-token pattern (SPEC 3): the dense region, and the in-kernel ReasoningPattern
against dense masks and the independent autograd reference (forward and all gradients)."""
import itertools

import pytest
import torch

import self_reasoning_tokens as srt
from self_reasoning_tokens.reasoning import reasoning_region
from self_reasoning_tokens.reference import reference_attention

# The seed's published picture for seq 4, R = 2, W = 2 (N = 12 positions):
# `causal AND NOT region`, 1 = may attend. Derived by hand from the SPEC 3 definition:
# positions 1, 2 (step 0), 4, 5 (step 1), 7, 8 (step 2), 10, 11 (step 3) are reasoning tokens;
# a query of step s cannot use the reasoning tokens of steps s-2 and s-1.
SEED_MASK_PICTURE = [
    # 0  1  2  3  4  5  6  7  8  9 10 11   <- key
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 0  x0
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 1  r
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 2  r
    [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # 3  x1
    [1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # 4  r
    [1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # 5  r
    [1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # 6  x2
    [1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0],  # 7  r
    [1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0],  # 8  r
    [1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0],  # 9  x3: step 0's reasoning tokens are 3 steps back
    [1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0],  # 10 r
    [1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1],  # 11 r
]


def region_by_definition(n_q, n_k, R, W):
    """SPEC 3 written out element by element; query i sits at absolute position i + n_k - n_q."""
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        p = i + n_k - n_q
        for j in range(n_k):
            si, sj = p // (R + 1), j // (R + 1)
            out[i, j] = (j % (R + 1) != 0) and si > sj and si - W <= sj
    return out


def test_seed_mask_picture():
    region = srt.reasoning_stop_grad_mask(4, 2, 2)
    assert region.shape == (12, 12) and region.dtype == torch.bool
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(causal & ~region, torch.tensor(SEED_MASK_PICTURE, dtype=torch.bool))


@pytest.mark.parametrize("L,R,W", [(1, 0, 2), (5, 0, 3), (4, 1, 1), (6, 3, 2), (5, 2, 0), (7, 2, 10)])
def test_region_matches_definition(L, R, W):
    N = L * (R + 1)
    assert torch.equal(srt.reasoning_stop_grad_mask(L, R, W), region_by_definition(N, N, R, W))


def test_region_kv_cache_rows_are_the_last_rows():
    R, W, L = 2, 2, 5
    full = srt.reasoning_stop_grad_mask(L, R, W)
    N = full.shape[0]
    for n in (1, 3, 7, N):
        assert torch.equal(reasoning_region(n, N, R, W), full[N - n:])
        assert torch.equal(reasoning_region(n, N, R, W), region_by_definition(n, N, R, W))


def test_region_is_strictly_below_the_diagonal_and_only_on_reasoning_keys():
    R, W, L = 3, 2, 6
    region = srt.reasoning_stop_grad_mask(L, R, W)
    assert not region.triu().any()                        # never the diagonal or the future
    assert not region[:, ::R + 1].any()                   # real tokens are never in the region
    assert not region[:R + 1].any()                       # step 0 sees no earlier reasoning token


def test_reasoning_pattern_argument_errors():
    with pytest.raises(ValueError, match="num_reason_tokens"):
        srt.ReasoningPattern(-1, 2)
    with pytest.raises(TypeError, match="num_steps_future_can_use_reason"):
        srt.ReasoningPattern(2, 1.5)
    with pytest.raises(TypeError, match="stop_grad"):
        srt.ReasoningPattern(2, 2, stop_grad=1)
    with pytest.raises(ValueError, match="num_reason_tokens"):
        srt.reasoning_stop_grad_mask(4, -2, 2)
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="out of range"):
        srt.stop_graddable_attn(q, q, q, causal=True, reasoning=srt.ReasoningPattern(2, 2, heads=[3]))
    with pytest.raises(TypeError, match="reasoning"):
        srt.stop_graddable_attn(q, q, q, causal=True, reasoning=(2, 2))


def test_reasoning_pattern_equality_and_hash():
    P = srt.ReasoningPattern
    flags = lambda *f: torch.tensor(f)  # noqa: E731
    # by value, tensors of head flags included (the dataclass's own == raised on them)
    assert P(2, 3, heads=flags(True, False)) == P(2, 3, heads=flags(True, False))
    assert P(2, 3, heads=flags(True, False)) != P(2, 3, heads=flags(False, True))
    assert P(2, 3, heads=flags(True, False)) != P(2, 3, heads=flags(True, False, False))
    assert P(2, 3, heads=flags(True, False)) != P(2, 3, heads=flags(1, 0))  # other dtype
    assert P(2, 3, heads=flags(True, False)) != P(2, 3, heads=[0])  # a tensor is not a sequence
    assert P(2, 3, heads=flags(True, False)) != P(2, 4, heads=flags(True, False))
    assert P(2, 3, heads=[1, 0]) == P(2, 3, heads=(0, 1)) == P(2, 3, heads=(1, 0, 1)) != P(2, 3, heads=(0, 2))
    assert P(2, 3, heads=()) != P(2, 3)  # no head against every head
    assert P(2, 3) == P(2, 3, True) != P(2, 3, False)
    assert P(2, 3) != (2, 3, True, None)
    # equal patterns hash equal, so they work as dict keys and in sets
    assert len({P(2, 3, heads=flags(True, False)), P(2, 3, heads=flags(True, False)), P(2, 3), P(2, 3),
                P(2, 3, heads=[2, 0]), P(2, 3, heads=(0, 2))}) == 3
    a = P(2, 3, heads=flags(True, False))
    assert {a: 1}[P(2, 3, heads=flags(True, False))] == 1


# ------------------------------------------------------------------------------------------
# In-kernel pattern == dense masks == reference, forward and gradients


def dense_masks(R, W, stop_grad, n, m, heads=None, num_heads=None):
    """Dense masks built here from the element-wise definition (independent of the library)."""
    region = region_by_definition(n, m, R, W)
    if heads is not None:
        flags = torch.zeros(num_heads, dtype=torch.bool)
        flags[list(heads)] = True
        region = region[None] & flags[:, None, None]
    if stop_grad:
        return dict(k_stop_grad_mask=region, v_stop_grad_mask=region.clone())
    return dict(attn_mask=~region)


def fwd_bwd(fn, q, k, v, do, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal=True, **kwargs)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def assert_all_close(a, b, atol=1e-10, rtol=1e-8):
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


CASES = [
    # (R, W, num_steps, n_queries or None for n == m)
    (2, 2, 4, None),
    (3, 1, 5, None),
    (1, 3, 9, None),
    (2, 2, 6, 1),        # KV cache: one new query
    (2, 2, 6, 3),        # KV cache: a new step (real token + its R reasoning tokens)
    (3, 2, 7, 10),       # KV cache, queries starting mid-step
    (2, 0, 5, None),     # W = 0: empty region
]


@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "hard"])
@pytest.mark.parametrize("heads", [None, (0, 2)], ids=["all_heads", "head_subset"])
@pytest.mark.parametrize("R,W,L,n_q", CASES)
def test_pattern_equals_dense_masks(R, W, L, n_q, stop_grad, heads):
    torch.manual_seed(R * 100 + W * 10 + L)
    b, h, d = 2, 3, 8
    m = L * (R + 1)
    n = m if n_q is None else n_q
    q = torch.randn(b, h, n, d, dtype=torch.float64)
    k = torch.randn(b, h, m, d, dtype=torch.float64)
    v = torch.randn(b, h, m, d, dtype=torch.float64)
    do = torch.randn(b, h, n, d, dtype=torch.float64)

    pattern = srt.ReasoningPattern(R, W, stop_grad=stop_grad, heads=heads)
    masks = dense_masks(R, W, stop_grad, n, m, heads, h)

    got = fwd_bwd(srt.stop_graddable_attn, q, k, v, do, reasoning=pattern)
    dense = fwd_bwd(srt.stop_graddable_attn, q, k, v, do, **masks)
    ref = fwd_bwd(reference_attention, q, k, v, do, **masks)

    assert_all_close(got, dense)
    assert_all_close(got, ref)


@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "hard"])
def test_pattern_dense_library_mask_and_bool_head_flags(stop_grad):
    # the library's own dense region (reasoning_stop_grad_mask) gives the same as the pattern,
    # and heads given as a bool tensor behave like the index list
    torch.manual_seed(0)
    R, W, L, b, h, d = 2, 2, 6, 1, 4, 16
    N = L * (R + 1)
    q, k, v, do = (torch.randn(b, h, N, d, dtype=torch.float64) for _ in range(4))
    region = srt.reasoning_stop_grad_mask(L, R, W)
    masks = dict(k_stop_grad_mask=region, v_stop_grad_mask=region) if stop_grad else dict(attn_mask=~region)
    assert_all_close(fwd_bwd(srt.stop_graddable_attn, q, k, v, do, reasoning=srt.ReasoningPattern(R, W, stop_grad)),
                     fwd_bwd(srt.stop_graddable_attn, q, k, v, do, **masks))
    flags = torch.tensor([False, True, False, True])
    assert_all_close(
        fwd_bwd(srt.stop_graddable_attn, q, k, v, do, reasoning=srt.ReasoningPattern(R, W, stop_grad, heads=flags)),
        fwd_bwd(srt.stop_graddable_attn, q, k, v, do, reasoning=srt.ReasoningPattern(R, W, stop_grad, heads=[1, 3])))


@pytest.mark.parametrize("n_q", [None, 700], ids=["full", "kv_cache"])
def test_hard_mode_tiles_inside_the_region(n_q):
    # R + 1 = 600 positions per step: whole 256-key tiles of reasoning tokens fall inside the
    # region, so the hard-mode kernels skip them; the result must still equal the dense masks
    torch.manual_seed(1)
    R, W, L, b, h, d = 599, 1, 3, 1, 1, 8
    m = L * (R + 1)
    n = m if n_q is None else n_q
    q = torch.randn(b, h, n, d, dtype=torch.float64)
    k, v = (torch.randn(b, h, m, d, dtype=torch.float64) for _ in range(2))
    do = torch.randn(b, h, n, d, dtype=torch.float64)
    region = reasoning_region(n, m, R, W)
    got = fwd_bwd(srt.stop_graddable_attn, q, k, v, do, reasoning=srt.ReasoningPattern(R, W, stop_grad=False))
    ref = fwd_bwd(reference_attention, q, k, v, do, attn_mask=~region)
    assert_all_close(got, ref)


@pytest.mark.parametrize("n_q", [None, 4])
def test_stop_grad_forward_is_plain_causal_attention(n_q):
    torch.manual_seed(2)
    R, W, L, b, h, d = 3, 2, 5, 2, 2, 8
    m = L * (R + 1)
    n = m if n_q is None else n_q
    q = torch.randn(b, h, n, d)
    k, v = (torch.randn(b, h, m, d) for _ in range(2))
    with_pattern = srt.stop_graddable_attn(q, k, v, causal=True, reasoning=srt.ReasoningPattern(R, W))
    plain = srt.stop_graddable_attn(q, k, v, causal=True)
    assert torch.equal(with_pattern, plain)
    hard = srt.stop_graddable_attn(q, k, v, causal=True, reasoning=srt.ReasoningPattern(R, W, stop_grad=False))
    assert not torch.allclose(hard, plain)  # the hard pattern does change the forward


def test_stop_grad_region_keys_get_no_gradient_from_region_queries():
    # a loss on the outputs of step s only: the reasoning keys/values of steps s-W .. s-1 get
    # exactly zero gradient, those further back a nonzero one
    torch.manual_seed(3)
    R, W, L, b, h, d = 2, 2, 6, 1, 2, 8
    P = R + 1
    N = L * P
    q, k, v = (torch.randn(b, h, N, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s = 4
    out = srt.stop_graddable_attn(q, k, v, causal=True, reasoning=srt.ReasoningPattern(R, W))
    out[:, :, s * P].sum().backward()  # step s's real token only
    for step, r in itertools.product(range(s), range(1, P)):
        j = step * P + r
        gk, gv = k.grad[:, :, j].abs().sum(), v.grad[:, :, j].abs().sum()
        if s - W <= step:
            assert gk == 0 and gv == 0, (step, r)
        else:
            assert gk > 0 and gv > 0, (step, r)
    assert q.grad[:, :, s * P].abs().sum() > 0  # the query gradient is untouched
