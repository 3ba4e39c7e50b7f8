"""stop_graddable_attn against independent references (SPEC 2 and 5).

Every comparison is against something computed without the kernels: the dense autograd
reference in float64 (`reference_attention`), torch's own `scaled_dot_product_attention`,
`torch.autograd.gradcheck`'s finite differences, or an algebraic property of SPEC 2 (a stop mask
scales exactly its own gradient and nothing else).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import self_reasoning_tokens as srt
from self_reasoning_tokens import ReasoningPattern, stop_graddable_attn
from self_reasoning_tokens.reference import reference_attention

MASK_SHAPES = ["bhnm", "hnm", "nm", "b1nm", "1h1m", "scalar", "expanded", "transposed"]
# n < m (KV cache: causal is bottom-right aligned) and n > m (the first rows see nothing when causal)
NM = [(6, 11), (11, 6)]


def make_mask(kind, shape, b, h, n, m, device, p_true=0.3):
    """A random mask of the given kind ("none", "bool", "float") and broadcast shape.

    "expanded" is a stride-0 view of full shape (b, h, n, m); "transposed" is a non-contiguous
    (n, m) view of an (m, n) tensor; "scalar" is a 0-d tensor. Float masks hold gradient factors
    in [0, 1.5) (not only 0 and 1, so the factor really multiplies)."""
    if kind == "none":
        return None

    def base(*s):
        r = torch.rand(tuple(s), device=device, dtype=torch.float64)
        return r < p_true if kind == "bool" else r * 1.5

    if shape == "bhnm":
        return base(b, h, n, m)
    if shape == "hnm":
        return base(h, n, m)
    if shape == "nm":
        return base(n, m)
    if shape == "b1nm":
        return base(b, 1, n, m)
    if shape == "1h1m":
        return base(1, h, 1, m)
    if shape == "scalar":
        return base()
    if shape == "expanded":
        t = base(1, h, 1, m).expand(b, h, n, m)
        assert t.stride(0) == 0 and t.stride(2) == 0
        return t
    if shape == "transposed":
        t = base(m, n).t()
        assert not t.is_contiguous()
        return t
    raise AssertionError(shape)


def attend_mask(shape, b, h, n, m, device):
    """A random bool attn_mask (True = may attend) of the given broadcast shape."""
    return make_mask("bool", shape, b, h, n, m, device, p_true=0.7)


# --------------------------------------------------------------------------------------------
# float64 comparisons with the reference
# --------------------------------------------------------------------------------------------

STOP_CASES = [("none", "bhnm")] + [(kind, shape) for kind in ("bool", "float") for shape in MASK_SHAPES]


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,shape", STOP_CASES)
def test_stop_masks_match_reference(cfg, helpers, kind, shape, causal, n, m):
    b, h = 2, 3
    q, k, v = cfg.qkv(b, h, n, m)
    masks = {f"{x}_stop_grad_mask": make_mask(kind, shape, b, h, n, m, cfg.device) for x in "qkv"}
    helpers.check(cfg, q, k, v, causal=causal, **masks)


@pytest.mark.parametrize("n,m", NM + [(7, 7)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_attn_mask_match_reference(cfg, helpers, shape, causal, n, m):
    b, h = 2, 3
    q, k, v = cfg.qkv(b, h, n, m)
    attn_mask = attend_mask(shape, b, h, n, m, cfg.device)
    helpers.check(cfg, q, k, v, causal=causal, attn_mask=attn_mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad_batch", ["b", "1"])
def test_key_padding_match_reference(cfg, helpers, pad_batch, causal):
    b, h, n, m = 3, 2, 9, 13
    q, k, v = cfg.qkv(b, h, n, m)
    mask = torch.rand(b if pad_batch == "b" else 1, m, device=cfg.device) < 0.7
    mask[:, -1] = True  # every row keeps at least one key (fully masked rows are tested below)
    helpers.check(cfg, q, k, v, mask=mask, causal=causal)
    # all masks together, with different kinds and broadcast shapes
    helpers.check(cfg, q, k, v, mask=mask, causal=causal,
                  attn_mask=attend_mask("hnm", b, h, n, m, cfg.device),
                  q_stop_grad_mask=make_mask("float", "nm", b, h, n, m, cfg.device),
                  k_stop_grad_mask=make_mask("bool", "bhnm", b, h, n, m, cfg.device),
                  v_stop_grad_mask=make_mask("float", "transposed", b, h, n, m, cfg.device))


def test_padded_keys_get_no_gradient(cfg, helpers):
    b, h, n, m = 2, 2, 5, 8
    q, k, v = cfg.qkv(b, h, n, m)
    mask = torch.ones(b, m, dtype=torch.bool, device=cfg.device)
    mask[0, 2] = mask[1, 5:] = False
    out, dq, dk, dv = helpers.check(cfg, q, k, v, mask=mask)
    assert (dk[0, :, 2] == 0).all() and (dv[0, :, 2] == 0).all()
    assert (dk[1, :, 5:] == 0).all() and (dv[1, :, 5:] == 0).all()
    # padded keys do not influence the output at all
    k2, v2 = k.detach().clone(), v.detach().clone()
    pad = (~mask)[:, None, :].expand(b, h, m)
    k2[pad] = 100.0
    v2[pad] = -100.0
    out2 = stop_graddable_attn(q, k2, v2, mask=mask)
    cfg.assert_close(out2, out, what="out with changed padded keys")


@pytest.mark.parametrize("with_stop_masks", [False, True])
def test_fully_masked_rows(cfg, helpers, with_stop_masks):
    """Rows with no allowed key: output 0, zero gradients, no NaN (from attn_mask, from key
    padding of a whole batch entry, and from causal with n > m)."""
    b, h, n, m = 3, 2, 10, 6
    q, k, v = cfg.qkv(b, h, n, m)
    attn_mask = torch.rand(b, h, n, m, device=cfg.device) < 0.8
    attn_mask[..., 0] = True  # every row keeps key 0 (then some rows lose everything below)
    attn_mask[0, 1, 7] = False  # batch 0, head 1, row 7: nothing
    attn_mask[:, :, 8] = False  # row 8 everywhere: nothing
    mask = torch.ones(b, m, dtype=torch.bool, device=cfg.device)
    mask[2] = False  # batch 2: every key is padding
    kw = dict(attn_mask=attn_mask, mask=mask, causal=True)  # causal: rows 0..3 see nothing (n - m = 4)
    if with_stop_masks:
        kw.update(k_stop_grad_mask=make_mask("float", "nm", b, h, n, m, cfg.device),
                  v_stop_grad_mask=make_mask("bool", "hnm", b, h, n, m, cfg.device))
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    out, dq, dk, dv = helpers.check(cfg, q, k, v, grad_out=grad_out, **kw)
    dead = torch.zeros(b, h, n, dtype=torch.bool, device=cfg.device)
    dead[:, :, : n - m] = True
    dead[0, 1, 7] = True
    dead[:, :, 8] = True
    dead[2] = True
    for name, t in (("out", out), ("dq", dq)):
        assert torch.isfinite(t).all(), name
        assert (t[dead] == 0).all(), f"{name} is not zero on fully masked rows"
    assert (out[~dead].abs().sum(-1) > 0).all()
    for name, t in (("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
        assert (t[2] == 0).all(), f"{name} of a fully padded batch entry is not zero"
    # low precision too: no NaN, zeros on dead rows
    for dtype in (torch.bfloat16, torch.float16):
        ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        o = stop_graddable_attn(ql, kl, vl, **kw)
        o.backward(grad_out.to(dtype))
        assert torch.isfinite(o).all() and (o[dead] == 0).all(), dtype
        for t in (ql.grad, kl.grad, vl.grad):
            assert torch.isfinite(t).all(), dtype
        assert (ql.grad[dead] == 0).all(), dtype


def test_backward_is_deterministic_under_use_deterministic_algorithms(cfg, helpers):
    """Under torch.use_deterministic_algorithms(True) the same inputs give the same gradients, bit
    for bit, and they still match the reference. The CPU backward always sums in a fixed order; the
    CUDA backward then takes its deterministic schedule (KernelParams::round_tiles: rounds of key
    tiles, each adding into its own dQ buffer, summed in a fixed order) instead of fp32 atomics from
    every key tile at once, whose order, and so the last bits of dQ, vary between runs. Up to six
    key tiles of 64 (twelve of 32 for float32) add into a dQ row here (causal: the last rows)."""
    b, h, n = 1, 2, 384
    q, k, v = cfg.qkv(b, h, n, n, requires_grad=False)
    grad_out = cfg.randn(b, h, n, q.shape[-1])
    kv_stop = torch.rand(h, n, n, device=cfg.device) < 0.3
    kw = dict(causal=True, k_stop_grad_mask=kv_stop, v_stop_grad_mask=kv_stop)
    with helpers.deterministic():
        runs = [helpers.run_with_grads(stop_graddable_attn, q, k, v, grad_out, **kw) for _ in range(3)]
    for again in runs[1:]:
        for name, a, first in zip(("out", "dq", "dk", "dv"), again, runs[0]):
            assert torch.equal(a, first), f"{name} differs between two runs on the same inputs"
    helpers.check(cfg, q, k, v, grad_out, got=runs[0], **kw)


@pytest.mark.parametrize("scale", [None, 0.0], ids=["default-scale", "zero-scale"])
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_input_propagates(cfg, where, scale):
    """A NaN in q or k of an allowed (query, key) pair makes the affected rows' output and
    gradients NaN, as in the reference: such a row must not pass for one with no allowed key
    (output 0, zero gradients), which would hide a diverging run. Other (batch, head) slices are
    untouched; a NaN under the attention mask does not reach the output."""
    b, h, n, m, row = 2, 2, 20, 20, 5
    q, k, v = cfg.qkv(b, h, n, m, requires_grad=False)
    grad_out = cfg.randn(b, h, n, q.shape[-1])

    def run(nan: bool, **kw):
        qq, kk, vv = (t.clone() for t in (q, k, v))
        if nan:
            (qq if where == "q" else kk)[0, 1, row] = float("nan")
        qq, kk, vv = (t.requires_grad_() for t in (qq, kk, vv))
        out = stop_graddable_attn(qq, kk, vv, causal=True, scale=scale, **kw)  # (0 * NaN is NaN too)
        out.backward(grad_out)
        return out.detach(), qq.grad, kk.grad, vv.grad

    out, dq, dk, dv = run(True)
    clean = run(False)
    # rows that see the NaN: the row itself (q), or every row from the key on (k, causal)
    rows = torch.zeros(n, dtype=torch.bool, device=cfg.device)
    if where == "q":
        rows[row] = True
    else:
        rows[row:] = True
    for name, t in (("out", out), ("dq", dq)):
        assert torch.isnan(t[0, 1][rows]).all(), f"{name}: a row that attends a NaN score is not NaN"
    assert torch.isfinite(out[0, 1][~rows]).all()
    if where == "q":  # (a NaN key also reaches the dQ of earlier rows as 0 * NaN: see below)
        assert torch.isfinite(dq[0, 1][~rows]).all()
    # keys those rows attend get NaN gradients: keys <= row (q), every key (k: row n - 1 sees all)
    keys = torch.arange(m, device=cfg.device) <= (row if where == "q" else m - 1)
    for name, t in (("dk", dk), ("dv", dv)):
        assert torch.isnan(t[0, 1][keys]).all(), f"{name}: a key attended by a NaN row has no NaN gradient"
    for name, t, c in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), clean):
        for bh in ((0, 0), (1, 0), (1, 1)):
            cfg.assert_close(t[bh], c[bh], grad=name != "out", what=f"{name} of untouched head {bh}")
    # the same NaN where the attention mask hides it (the NaN row sees no key, or no row sees the NaN key)
    attn_mask = torch.ones(n, m, dtype=torch.bool, device=cfg.device)
    if where == "q":
        attn_mask[row] = False  # the NaN row sees nothing: output 0, like any empty row
    else:
        attn_mask[:, row] = False  # no row sees the NaN key
    # (out and dV only: dQ = dS K and dK = dS^T Q multiply the masked entries' dS = 0 by the NaN,
    # which is NaN in any matrix-product formulation, the reference's included)
    out, _, _, dv = run(True, attn_mask=attn_mask)
    ref_out, _, _, ref_dv = run(False, attn_mask=attn_mask)
    cfg.assert_close(out, ref_out, what="out with the NaN masked out")
    cfg.assert_close(dv, ref_dv, grad=True, what="dv with the NaN masked out")


def test_a_row_whose_allowed_scores_are_all_minus_inf_counts_as_empty(cfg, helpers):
    """README: a row whose every allowed score is -inf (an -inf in q) gives what a row with no
    allowed key gives (output 0, no dQ, nothing to dV), where the reference's softmax gives NaN.
    Compared with the same row hidden by the attention mask. (dK is left out: dS^T Q multiplies
    that row's dS = 0 by its -inf, NaN in any matrix-product formulation.)"""
    b, h, n, m, row = 1, 2, 9, 9, 4
    q, k, v = cfg.qkv(b, h, n, m, requires_grad=False)
    k[..., 0] = 1.0  # every score of a query with q[..., 0] = -inf is -inf
    grad_out = cfg.randn(b, h, n, q.shape[-1])
    q_inf = q.clone()
    q_inf[0, 1, row, 0] = float("-inf")
    hidden = torch.ones(b, h, n, m, dtype=torch.bool, device=cfg.device)
    hidden[0, 1, row] = False
    got = helpers.run_with_grads(stop_graddable_attn, q_inf, k, v, grad_out, causal=True)
    exp = helpers.run_with_grads(stop_graddable_attn, q, k, v, grad_out, causal=True, attn_mask=hidden)
    assert (got[0][0, 1, row] == 0).all() and (got[1][0, 1, row] == 0).all()
    for name, i in (("out", 0), ("dq", 1), ("dv", 3)):
        cfg.assert_close(got[i], exp[i], grad=i > 0, what=name)


def test_all_rows_masked_and_empty_keys(cfg):
    for m, attn in ((5, False), (0, None)):
        q, k, v = cfg.qkv(1, 2, 4, m)
        am = None if attn is None else torch.zeros(4, m, dtype=torch.bool, device=cfg.device)
        out = stop_graddable_attn(q, k, v, attn_mask=am)
        assert out.shape == q.shape and (out == 0).all()
        out.backward(torch.ones_like(out))
        for t in (q.grad, k.grad, v.grad):
            assert (t == 0).all()


def test_grouped_query_attention_through_repeat_interleave(cfg, helpers):
    """README: GQA/MQA by passing k, v repeated over each group's heads. The result equals SDPA's
    own GQA (enable_gqa, in float64), and each shared head's gradient is the sum of its group's
    gradients in the reference run on the repeated heads (a stop mask differs per query head)."""
    b, h, h_kv, n = 2, 4, 2, 11
    g = h // h_kv
    q = cfg.randn(b, h, n, cfg.head_dim)
    k, v = (cfg.randn(b, h_kv, n, cfg.head_dim) for _ in range(2))
    grad_out = cfg.randn(b, h, n, cfg.head_dim)
    stop = (torch.rand(h, n, n) < 0.4).to(cfg.device)

    def gqa(q, k, v, **kw):
        return stop_graddable_attn(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), **kw)

    out, dq, dk, dv = helpers.run_with_grads(gqa, q, k, v, grad_out, causal=True, k_stop_grad_mask=stop)
    assert dk.shape == k.shape and dv.shape == v.shape
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    exp = helpers.reference64(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), grad_out,
                              causal=True, k_stop_grad_mask=stop)
    grouped = [exp[0], exp[1]] + [t.unflatten(1, (h_kv, g)).sum(2) for t in exp[2:]]
    cfg.assert_close(out, sdpa, what="out vs SDPA's GQA")
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), grouped):
        cfg.assert_close(a, e, grad=name != "out", what=name)


def test_head_dim_zero_on_cpu():
    """head_dim 0: all scores are 0, the outputs and gradients are empty; the op and the reference
    (whose default scale divided by zero) both accept it, and the log-sum-exp counts the allowed keys."""
    q, k, v = (torch.randn(2, 3, 4, 0, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for fn in (stop_graddable_attn, reference_attention):
        out = fn(q, k, v, causal=True)
        assert out.shape == (2, 3, 4, 0)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert all(g.shape == t.shape for g, t in zip(grads, (q, k, v)))
    _, lse = torch.ops.self_reasoning_tokens.attn_fwd(q, k, v, None, None, None, None, None, True, 1.0)
    allowed = torch.arange(1, 5, dtype=torch.float64)  # causal, n = m = 4: row i sees i + 1 keys
    torch.testing.assert_close(lse, allowed.log().expand(2, 3, 4))


# --------------------------------------------------------------------------------------------
# reasoning patterns
# --------------------------------------------------------------------------------------------

def heads_arg(kind, h, device):
    if kind == "all":
        return None
    if kind == "list":
        return [0, h - 1]
    flags = torch.zeros(h, dtype=torch.bool, device=device)
    flags[1] = True
    return flags


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m", [(12, 12), (5, 12)])
@pytest.mark.parametrize("heads", ["all", "list", "tensor"])
@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "hard"])
def test_reasoning_match_reference(cfg, helpers, stop_grad, heads, n, m, causal):
    b, h = 2, 3
    pattern = ReasoningPattern(2, 2, stop_grad=stop_grad, heads=heads_arg(heads, h, cfg.device))
    q, k, v = cfg.qkv(b, h, n, m)
    helpers.check(cfg, q, k, v, causal=causal, reasoning=pattern)
    # with user masks on top
    helpers.check(cfg, q, k, v, causal=causal, reasoning=pattern,
                  attn_mask=attend_mask("nm", b, h, n, m, cfg.device),
                  q_stop_grad_mask=make_mask("float", "hnm", b, h, n, m, cfg.device),
                  k_stop_grad_mask=make_mask("bool", "nm", b, h, n, m, cfg.device),
                  v_stop_grad_mask=make_mask("float", "expanded", b, h, n, m, cfg.device))


def region_by_hand(n, m, R, W):
    """SPEC 3 written out with Python loops (independent of reasoning.py)."""
    reg = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        qi = i + (m - n)
        for j in range(m):
            si, sj = qi // (R + 1), j // (R + 1)
            reg[i, j] = (j % (R + 1) != 0) and si > sj and si - W <= sj
    return reg


@pytest.mark.parametrize("n,m", [(15, 15), (7, 15)])
@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "hard"])
def test_reasoning_equals_dense_masks(cfg, helpers, stop_grad, n, m):
    """The in-kernel pattern gives what the dense masks of SPEC 3 give."""
    b, h, R, W = 1, 2, 2, 1
    region = region_by_hand(n, m, R, W).to(cfg.device)
    q, k, v = cfg.qkv(b, h, n, m)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    user_k = make_mask("bool", "nm", b, h, n, m, cfg.device)
    got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=True, k_stop_grad_mask=user_k,
                                 reasoning=ReasoningPattern(R, W, stop_grad=stop_grad))
    if stop_grad:
        dense = dict(k_stop_grad_mask=user_k | region, v_stop_grad_mask=region)
    else:
        dense = dict(attn_mask=~region, k_stop_grad_mask=user_k)
    exp = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=True, **dense)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp):
        cfg.assert_close(a, e, grad=name != "out", what=name)
    exp_ref = helpers.reference64(q, k, v, g, causal=True, **dense)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp_ref):
        cfg.assert_close(a, e, grad=name != "out", what="reference " + name)
    if stop_grad:  # forward is plain causal attention
        plain = stop_graddable_attn(q, k, v, causal=True)
        cfg.assert_close(got[0], plain, what="stop-grad forward")


def test_reasoning_head_subset_leaves_other_heads_plain(cfg, helpers):
    b, h, n = 1, 3, 12
    q, k, v = cfg.qkv(b, h, n, n)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    for stop_grad in (True, False):
        got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=True,
                                     reasoning=ReasoningPattern(2, 2, stop_grad=stop_grad, heads=[1]))
        plain = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=True)
        full = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=True,
                                      reasoning=ReasoningPattern(2, 2, stop_grad=stop_grad))
        for a, p, f in zip(got, plain, full):
            cfg.assert_close(a[:, [0, 2]], p[:, [0, 2]], grad=True)
            cfg.assert_close(a[:, 1], f[:, 1], grad=True)
        # and the pattern does change head 1 (dk in stop-grad mode, the output in hard mode)
        idx = 2 if stop_grad else 0
        assert (got[idx][:, 1] - plain[idx][:, 1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# sizes that cross the kernels' blocks (query block 128, key block 256)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(300, 600), (600, 300)])
def test_large_all_masks(cfg, helpers, n, m):
    b, h = 1, 2
    q, k, v = cfg.qkv(b, h, n, m)
    mask = torch.rand(b, m, device=cfg.device) < 0.9
    helpers.check(cfg, q, k, v, causal=True, mask=mask,
                  attn_mask=attend_mask("nm", b, h, n, m, cfg.device),
                  q_stop_grad_mask=make_mask("float", "hnm", b, h, n, m, cfg.device),
                  k_stop_grad_mask=make_mask("bool", "transposed", b, h, n, m, cfg.device),
                  v_stop_grad_mask=make_mask("float", "bhnm", b, h, n, m, cfg.device))


def test_large_no_masks(cfg, helpers):
    for causal in (False, True):
        q, k, v = cfg.qkv(1, 2, 300, 600)
        helpers.check(cfg, q, k, v, causal=causal)


def test_large_reasoning(cfg, helpers):
    q, k, v = cfg.qkv(1, 2, 520, 600)
    helpers.check(cfg, q, k, v, causal=True, reasoning=ReasoningPattern(3, 2, stop_grad=True, heads=[1]))
    helpers.check(cfg, q, k, v, causal=True, reasoning=ReasoningPattern(1, 3, stop_grad=False))


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n,m", [(520, 1100), (1100, 520)])
@pytest.mark.parametrize("h", [1, 3])
def test_cpu_backward_split_over_key_groups(helpers, h, threads, n, m):
    """When the (batch, head) pairs do not share out evenly over the threads, the CPU backward
    splits each head's key tiles (256 keys) into G interleaved groups (csrc/cpu/attn_cpu.cpp,
    backward_key_groups), each with its own dQ buffer summed afterwards. One head on 1, 2, 3, 5
    threads: G = 1, 2, 3, 5 (3 where there are only 3 key tiles); 3 heads: G = 1, 2, 1, 5 (3).
    Every split must match the float64 reference and the unsplit run to rounding, with masks,
    padding and the reasoning pattern all in play."""
    cfg = helpers.config_for("cpu")
    q, k, v = cfg.qkv(1, h, n, m)
    kwargs = dict(causal=True, mask=torch.rand(1, m) < 0.9,
                  k_stop_grad_mask=make_mask("bool", "nm", 1, h, n, m, "cpu"),
                  q_stop_grad_mask=make_mask("float", "hnm", 1, h, n, m, "cpu"),
                  reasoning=ReasoningPattern(2, 3, stop_grad=True))
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        unsplit = helpers.run_with_grads(stop_graddable_attn, q, k, v, grad_out, **kwargs)
        torch.set_num_threads(threads)
        got = helpers.check(cfg, q, k, v, grad_out=grad_out, **kwargs)
    finally:
        torch.set_num_threads(before)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, unsplit):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------
# gradcheck where the gradients are true derivatives (float64, CPU: CUDA has no float64 kernels)
# --------------------------------------------------------------------------------------------

def _ones(*s):
    return torch.ones(*s, dtype=torch.float64)


GRADCHECK_CASES = {
    "plain": dict(),
    "causal_n_lt_m": dict(causal=True),
    "causal_n_gt_m": dict(causal=True, _nm=(7, 4)),
    "attn_mask_padding": dict(attn_mask="random", mask="random"),
    "float_ones_masks": dict(causal=True, q_stop_grad_mask=_ones(4, 6), k_stop_grad_mask=_ones(2, 4, 6),
                             v_stop_grad_mask=_ones(1, 2, 1, 6).expand(2, 2, 4, 6)),
    "bool_false_masks": dict(q_stop_grad_mask=torch.zeros(4, 6, dtype=torch.bool),
                             k_stop_grad_mask=torch.zeros(4, 6, dtype=torch.bool)),
    "reasoning_hard": dict(causal=True, reasoning=ReasoningPattern(1, 1, stop_grad=False), _nm=(6, 6)),
    "scale": dict(scale=0.7),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case):
    kw = dict(GRADCHECK_CASES[case])
    n, m = kw.pop("_nm", (4, 6))
    b, h, d = 2, 2, 2
    if kw.get("attn_mask") == "random":
        kw["attn_mask"] = torch.rand(h, n, m) < 0.7
        kw["mask"] = torch.rand(b, m) < 0.8
        kw["mask"][:, 0] = True
    q = torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, m, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, m, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: stop_graddable_attn(q, k, v, **kw), (q, k, v))
    # a second, larger case in fast mode (random projections of the Jacobian)
    q, k, v = (torch.randn(b, h, x, 5, dtype=torch.float64, requires_grad=True) for x in (n, m, m))
    assert torch.autograd.gradcheck(lambda q, k, v: stop_graddable_attn(q, k, v, **kw), (q, k, v),
                                    fast_mode=True)


# --------------------------------------------------------------------------------------------
# torch's scaled_dot_product_attention
# --------------------------------------------------------------------------------------------

def bottom_right_causal(n, m, device):
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + (m - n)


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("n,m", [(16, 16), (9, 20), (20, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(cfg, helpers, causal, n, m, scale):
    q, k, v = cfg.qkv(2, 3, n, m)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=causal, scale=scale)
    if causal and n > m:  # SDPA's causal is top-left aligned; ours (SPEC 2) bottom-right
        n_dead = n - m  # rows that see no key: SDPA gives NaN there, we give 0
        keep = slice(n_dead, None)
        sdpa = helpers.run_with_grads(F.scaled_dot_product_attention, q[:, :, keep], k, v, g[:, :, keep],
                                      attn_mask=bottom_right_causal(n, m, cfg.device)[keep], scale=scale)
        assert (got[0][:, :, :n_dead] == 0).all() and (got[1][:, :, :n_dead] == 0).all()
        got = (got[0][:, :, keep], got[1][:, :, keep], got[2], got[3])
    elif causal and n != m:
        sdpa = helpers.run_with_grads(F.scaled_dot_product_attention, q, k, v, g,
                                      attn_mask=bottom_right_causal(n, m, cfg.device), scale=scale)
    else:
        sdpa = helpers.run_with_grads(F.scaled_dot_product_attention, q, k, v, g, is_causal=causal,
                                      scale=scale)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, sdpa):
        cfg.assert_close(a, e, grad=name != "out", what=name)


def test_matches_sdpa_with_attn_mask(cfg, helpers):
    b, h, n, m = 2, 3, 10, 14
    q, k, v = cfg.qkv(b, h, n, m)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    am = attend_mask("bhnm", b, h, n, m, cfg.device)
    am[..., 0] = True
    got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, attn_mask=am)
    exp = helpers.run_with_grads(F.scaled_dot_product_attention, q, k, v, g, attn_mask=am)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp):
        cfg.assert_close(a, e, grad=name != "out", what=name)


# --------------------------------------------------------------------------------------------
# properties of the stop masks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_each_mask_changes_only_its_own_gradient(cfg, helpers, which, kind):
    b, h, n, m = 2, 2, 8, 10
    q, k, v = cfg.qkv(b, h, n, m)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    stop = make_mask(kind, "hnm", b, h, n, m, cfg.device, p_true=0.5)
    for causal in (False, True):
        base = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=causal)
        got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=causal,
                                     **{f"{which}_stop_grad_mask": stop})
        assert torch.equal(got[0], base[0]), "a stop mask changed the forward"
        idx = "qkv".index(which)
        for i, name in enumerate("qkv"):
            if i == idx:
                diff = (got[1 + i] - base[1 + i]).abs().max().item()
                assert diff > 1e-3 * base[1 + i].abs().max().item(), f"d{name} not changed by its mask"
            else:
                cfg.assert_close(got[1 + i], base[1 + i], grad=True, what=f"d{name} changed by {which} mask")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_constant_float_mask_scales_gradient(cfg, helpers, which):
    b, h, n, m = 2, 2, 7, 9
    q, k, v = cfg.qkv(b, h, n, m)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    idx = 1 + "qkv".index(which)
    key = f"{which}_stop_grad_mask"
    for causal in (False, True):
        base = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=causal)
        for s in (0.5, 2.0, -1.0):
            for mask in (torch.full((n, m), s, dtype=torch.float64, device=cfg.device),
                         torch.tensor(s, dtype=torch.float32, device=cfg.device)):
                got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=causal, **{key: mask})
                for i in range(1, 4):
                    exp = base[i] * s if i == idx else base[i]
                    cfg.assert_close(got[i], exp, grad=True, what=f"{key}={s} grad {i}")
        # a float mask of ones and an all-False bool mask equal no mask; all-True stops everything
        ones = torch.ones(b, h, n, m, dtype=q.dtype, device=cfg.device)
        for mask in (ones, torch.zeros(n, m, dtype=torch.bool, device=cfg.device)):
            got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=causal, **{key: mask})
            for a, e in zip(got, base):
                cfg.assert_close(a, e, grad=True)
        got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, causal=causal,
                                     **{key: torch.ones(h, n, m, dtype=torch.bool, device=cfg.device)})
        assert (got[idx] == 0).all()


def test_stop_mask_of_a_single_entry(cfg, helpers):
    """Stopping k's gradient through one (i, j) removes exactly scale * dS_ij * q_i from dk_j."""
    b, h, n, m, d = 1, 1, 5, 6, cfg.head_dim
    q, k, v = cfg.qkv(b, h, n, m)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    i0, j0 = 3, 2
    stop = torch.zeros(n, m, dtype=torch.bool, device=cfg.device)
    stop[i0, j0] = True
    base = helpers.run_with_grads(stop_graddable_attn, q, k, v, g)
    got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, k_stop_grad_mask=stop)
    # dS_ij by hand, in float64
    q64, k64, v64, g64 = (t.detach().double() for t in (q, k, v, g))
    s = d ** -0.5
    p = torch.softmax(s * q64[0, 0] @ k64[0, 0].T, dim=-1)
    o = p @ v64[0, 0]
    ds = p[i0, j0] * (g64[0, 0, i0] @ v64[0, 0, j0] - g64[0, 0, i0] @ o[i0])
    expected = base[2].double().clone()
    expected[0, 0, j0] -= s * ds * q64[0, 0, i0]
    cfg.assert_close(got[2], expected, grad=True)
    cfg.assert_close(got[1], base[1], grad=True)
    cfg.assert_close(got[3], base[3], grad=True)


def test_masks_receive_no_gradient_and_mixed_mask_dtypes(cfg, helpers):
    b, h, n, m = 1, 2, 6, 6
    q, k, v = cfg.qkv(b, h, n, m)
    fk = (torch.rand(n, m, device=cfg.device) * 1.5).requires_grad_()  # float32 mask, any q dtype
    fv = (torch.rand(h, n, m, device=cfg.device) * 1.5).to(torch.bfloat16)
    helpers.check(cfg, q, k, v, causal=True, k_stop_grad_mask=fk, v_stop_grad_mask=fv)
    out = stop_graddable_attn(q, k, v, k_stop_grad_mask=fk)
    out.sum().backward()
    assert fk.grad is None


# --------------------------------------------------------------------------------------------
# layouts, scale, partial requires_grad
# --------------------------------------------------------------------------------------------

def test_non_contiguous_inputs(cfg, helpers):
    b, h, n, m, d = 2, 3, 9, 11, cfg.head_dim
    q = cfg.randn(b, n, h, d).transpose(1, 2)  # (b, h, n, d) with heads strided
    k = cfg.randn(b, m, h, d).transpose(1, 2)
    v = cfg.randn(b, h, d, m).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    g = cfg.randn(b, h, d, n).transpose(2, 3)
    helpers.check(cfg, q, k, v, grad_out=g, causal=True,
                  k_stop_grad_mask=make_mask("float", "transposed", b, h, n, m, cfg.device))


@pytest.mark.parametrize("scale", [0.05, 1, 2.5, -0.3])
def test_scale_respected(cfg, helpers, scale):
    q, k, v = cfg.qkv(2, 2, 7, 8)
    got = helpers.check(cfg, q, k, v, scale=scale, causal=True,
                        q_stop_grad_mask=make_mask("bool", "nm", 2, 2, 7, 8, cfg.device))
    # the scale is exactly a multiplier on q in the forward; in bfloat16 only where q times the
    # factor is exact (a power of two), since rounding the rescaled q changes the logits by up to
    # 2^-9 of their size (e.g. 0.1 at scale 2.5), more than the comparison allows
    d = q.shape[-1]
    factor = scale / d ** -0.5
    if torch.finfo(q.dtype).bits >= 32 or math.log2(abs(factor)).is_integer():
        rescaled = stop_graddable_attn(q * factor, k, v, causal=True)
        cfg.assert_close(got[0], rescaled, what="out vs rescaled q")


def test_default_scale_is_inverse_sqrt_head_dim(cfg):
    q, k, v = cfg.qkv(1, 2, 5, 5)
    d = q.shape[-1]
    a = stop_graddable_attn(q, k, v)
    c = stop_graddable_attn(q, k, v, scale=1 / math.sqrt(d))
    cfg.assert_close(a, c)
    assert (a - stop_graddable_attn(q, k, v, scale=1.0)).abs().max() > 1e-3


def test_partial_requires_grad_and_no_grad(cfg, helpers):
    b, h, n, m = 1, 2, 6, 8
    q, k, v = cfg.qkv(b, h, n, m, requires_grad=False)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    kw = dict(causal=True, v_stop_grad_mask=make_mask("float", "nm", b, h, n, m, cfg.device))
    full = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, **kw)
    with torch.no_grad():
        cfg.assert_close(stop_graddable_attn(q, k, v, **kw), full[0])
    for i, name in enumerate("qkv"):
        ins = [q, k, v]
        ins[i] = ins[i].clone().requires_grad_()
        out = stop_graddable_attn(*ins, **kw)
        (grad,) = torch.autograd.grad(out, ins[i], g)
        cfg.assert_close(grad, full[1 + i], grad=True, what=name)


def test_batch_heads_independent(cfg, helpers):
    """Per-(batch, head) masks are applied to their own slice only."""
    b, h, n, m = 2, 2, 6, 7
    q, k, v = cfg.qkv(b, h, n, m)
    g = torch.randn(q.shape, dtype=q.dtype, device=cfg.device)
    masks = {f"{x}_stop_grad_mask": make_mask("float", "bhnm", b, h, n, m, cfg.device) for x in "qkv"}
    am = attend_mask("bhnm", b, h, n, m, cfg.device)
    full = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, attn_mask=am, causal=True, **masks)
    for bi in range(b):
        for hi in range(h):
            sl = (slice(bi, bi + 1), slice(hi, hi + 1))
            one = helpers.run_with_grads(stop_graddable_attn, q[sl], k[sl], v[sl], g[sl], attn_mask=am[sl],
                                         causal=True, **{kk: t[sl] for kk, t in masks.items()})
            for a, e in zip(one, full):
                cfg.assert_close(a, e[sl], grad=True)


# --------------------------------------------------------------------------------------------
# low precision: FlashAttention's rule against the float64 reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,m,masks", [(70, 90, True), (33, 33, False), (300, 600, True)])
def test_low_precision_close_to_reference(cfg, helpers, dtype, n, m, masks):
    """Error of the kernel in low precision vs the float64 reference is at most 2x (3x for
    gradients) the error of the reference itself run in that dtype (no upcast), plus a floor;
    and the low-precision result is close to the kernel's float32 result."""
    b, h = 1, 2
    q, k, v = cfg.qkv(b, h, n, m, dtype=dtype)
    g = cfg.randn(b, h, n, q.shape[-1], dtype=dtype)
    kw = dict(causal=True)
    if masks:
        kw.update(attn_mask=attend_mask("nm", b, h, n, m, cfg.device),
                  k_stop_grad_mask=make_mask("float", "hnm", b, h, n, m, cfg.device),
                  v_stop_grad_mask=make_mask("bool", "nm", b, h, n, m, cfg.device))
    got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, **kw)
    exact = helpers.reference64(q, k, v, g, **kw)
    low = helpers.run_with_grads(reference_attention, q, k, v, g, upcast=False, **kw)
    f32 = helpers.run_with_grads(stop_graddable_attn, q.float(), k.float(), v.float(), g.float(), **kw)
    for name, a, lo, e, f in zip(("out", "dq", "dk", "dv"), got, low, exact, f32):
        assert a.dtype == dtype, name
        helpers.flash_rule(a, e, lo, grad=name != "out", what=name)
        # and close to float32 in absolute terms
        rel = (a.double() - f.double()).abs().max().item() / max(f.abs().max().item(), 1e-6)
        assert rel < 3e-2, f"{name}: {dtype} vs float32 relative error {rel:.3e}"


def test_float32_close_to_float64(device, helpers):
    """float32 kernels (both devices) against the float64 reference."""
    cfg = helpers.config_for(device)
    d = cfg.head_dim
    q, k, v = cfg.qkv(2, 2, 150, 290, d=d, dtype=torch.float32)
    g = cfg.randn(2, 2, 150, d, dtype=torch.float32)
    kw = dict(causal=True, k_stop_grad_mask=make_mask("float", "nm", 2, 2, 150, 290, device))
    got = helpers.run_with_grads(stop_graddable_attn, q, k, v, g, **kw)
    exp = helpers.reference64(q, k, v, g, **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp):
        assert a.dtype == torch.float32
        tol = (5e-3 if device == "cuda" else 1e-5) * max(1.0, e.abs().max().item())
        assert (a.double() - e).abs().max().item() <= tol, name


def test_public_names():
    assert srt.stop_graddable_attn is stop_graddable_attn
    assert srt.ReasoningPattern is ReasoningPattern
