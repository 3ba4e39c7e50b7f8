"""torch.func through the op: grad, vjp, jacrev, vmap and per-sample gradients (vmap of grad).

Each transform's result is compared with the same quantity computed without transforms (eager
autograd, one sample at a time) and, where the reference supports it, with the pure-PyTorch
reference under the same transform.
"""
import warnings

import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

from self_reasoning_tokens import ReasoningPattern, reference_attention, stop_graddable_attn

ops = torch.ops.self_reasoning_tokens


def _eager_grads(q, k, v, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = stop_graddable_attn(q, k, v, **kwargs)
    return torch.autograd.grad((out.double() ** 2).sum(), (q, k, v))


def _loss(fn, **kwargs):
    return lambda q, k, v: (fn(q, k, v, **kwargs).double() ** 2).sum()


def _masks(cfg, n, m, h):
    g = torch.Generator().manual_seed(3)
    stop_q = (torch.rand(n, m, generator=g) < 0.3).to(cfg.device)
    stop_k = (torch.rand(h, n, m, generator=g) < 0.5).to(cfg.device)
    scale_v = torch.rand(1, h, n, m, generator=g, dtype=torch.float64).to(cfg.device, cfg.dtype)
    return dict(q_stop_grad_mask=stop_q, k_stop_grad_mask=stop_k, v_stop_grad_mask=scale_v)


@pytest.mark.parametrize("case", ["plain", "masks", "reasoning"])
def test_func_grad_equals_autograd(cfg, case):
    q, k, v = cfg.qkv(2, 2, 7, 9, requires_grad=False)
    kwargs = dict(causal=True)
    if case == "masks":
        kwargs.update(_masks(cfg, 7, 9, 2))
        kwargs["mask"] = torch.tensor([[True] * 9, [True] * 6 + [False] * 3], device=cfg.device)
    elif case == "reasoning":
        kwargs["reasoning"] = ReasoningPattern(num_reason_tokens=2, num_steps_future_can_use_reason=3)
    got = grad(_loss(stop_graddable_attn, **kwargs), argnums=(0, 1, 2))(q, k, v)
    exp = _eager_grads(q, k, v, **kwargs)
    for name, a, e in zip("qkv", got, exp):
        cfg.assert_close(a, e, grad=True, what=f"d{name}")
    if cfg.device == "cpu":  # the reference supports torch.func natively: an independent check
        ref = grad(_loss(reference_attention, **kwargs), argnums=(0, 1, 2))(q, k, v)
        for name, a, e in zip("qkv", got, ref):
            cfg.assert_close(a, e, grad=True, what=f"d{name} vs the reference")


def test_func_vjp_and_jacrev(cfg):
    q, k, v = cfg.qkv(1, 2, 4, 5, requires_grad=False)
    stop_k = torch.zeros(4, 5, dtype=torch.bool, device=cfg.device)
    stop_k[:, 1] = True
    f = lambda q, k, v: stop_graddable_attn(q, k, v, causal=True, k_stop_grad_mask=stop_k)  # noqa: E731
    out, pullback = vjp(f, q, k, v)
    cot = torch.randn_like(out)
    got = pullback(cot)
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    out2 = f(q2, k2, v2)
    cfg.assert_close(out, out2, what="out")
    for name, a, e in zip("qkv", got, torch.autograd.grad(out2, (q2, k2, v2), cot, retain_graph=True)):
        cfg.assert_close(a, e, grad=True, what=f"vjp d{name}")
    # the Jacobian of the output with respect to k: its rows are the vjps of the unit cotangents,
    # so column 1 of every key's gradient is zero where the stop mask says so
    jac = jacrev(f, argnums=1)(q, k, v)
    assert jac.shape == out.shape + k.shape
    for idx in [(0, 0, 3, 2), (0, 1, 2, 0)]:
        unit = torch.zeros_like(out)
        unit[idx] = 1
        (dk,) = torch.autograd.grad(out2, k2, unit, retain_graph=True)
        cfg.assert_close(jac[idx], dk, grad=True, what=f"jacobian row {idx}")
    assert not jac[..., 1, :].any(), "the stopped key 1 got a gradient"


def _per_sample(q, k, v, q_dim, kv_dim, kwargs_of):
    """Eager per-sample gradients, the sample taken along q_dim (and kv_dim, None = shared)."""
    grads = []
    for s in range(q.shape[q_dim]):
        ks = k if kv_dim is None else k.select(kv_dim, s)
        vs = v if kv_dim is None else v.select(kv_dim, s)
        grads.append(_eager_grads(q.select(q_dim, s), ks, vs, **kwargs_of(s)))
    return grads


@pytest.mark.parametrize("layout", ["all-batched", "kv-shared", "dim1-masks-batched"])
def test_per_sample_gradients_vmap_of_grad(cfg, layout):
    """vmap(grad(loss)): one gradient per sample, each equal to the eager gradient of that sample."""
    S, b, h, n, m = 3, 2, 2, 6, 8
    q = cfg.randn(S, b, h, n, cfg.head_dim)
    k = cfg.randn(S, b, h, m, cfg.head_dim)
    v = cfg.randn(S, b, h, m, cfg.head_dim)
    g = torch.Generator().manual_seed(5)
    pad = torch.ones(b, m, dtype=torch.bool)
    pad[1, -2:] = False
    pad = pad.to(cfg.device)
    q_dim, kv_dim = 0, 0
    if layout == "kv-shared":
        k, v, kv_dim = k[0], v[0], None
        stop_v = (torch.rand(b, h, n, m, generator=g) < 0.5).to(cfg.device)  # unbatched, batch b
        masks, mask_dims = (pad, stop_v), (None, None)
        kwargs_of = lambda s: dict(mask=pad, v_stop_grad_mask=stop_v)  # noqa: E731
    else:
        if layout == "dim1-masks-batched":
            q, q_dim = q.movedim(0, 1), 1  # the vmapped dimension of q is its second
        stop_v = (torch.rand(b, h, n, m, S, generator=g) < 0.5).to(cfg.device)  # batched along its last dim
        stop_k = (torch.rand(S, n, m, generator=g) < 0.5).to(cfg.device)  # batched, 2-d per sample
        masks, mask_dims = (stop_v, stop_k), (4, 0)
        kwargs_of = lambda s: dict(v_stop_grad_mask=stop_v[..., s], k_stop_grad_mask=stop_k[s])  # noqa: E731

    def loss(q, k, v, first, second):
        if layout == "kv-shared":
            return _loss(stop_graddable_attn, causal=True, mask=first, v_stop_grad_mask=second)(q, k, v)
        return _loss(stop_graddable_attn, causal=True, v_stop_grad_mask=first, k_stop_grad_mask=second)(q, k, v)

    with warnings.catch_warnings():
        # a vmap rule is registered: no per-sample fallback ("There is a performance drop ...")
        warnings.filterwarnings("error", message=".*performance drop.*")
        got = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(q_dim, kv_dim, kv_dim) + mask_dims)(q, k, v, *masks)
    exp = _per_sample(q, k, v, q_dim, kv_dim, lambda s: dict(causal=True, **kwargs_of(s)))
    for s in range(S):
        for name, i in (("q", 0), ("k", 1), ("v", 2)):
            a = got[i][s]
            e = exp[s][i]
            if name != "q" and kv_dim is None:
                continue  # a shared k/v has one gradient per sample too, compared below
            cfg.assert_close(a, e, grad=True, what=f"sample {s} d{name}")
        if kv_dim is None:
            cfg.assert_close(got[1][s], exp[s][1], grad=True, what=f"sample {s} dk (shared k)")
            cfg.assert_close(got[2][s], exp[s][2], grad=True, what=f"sample {s} dv (shared v)")


def test_vmap_forward_matches_a_loop(cfg):
    S, b, h, n, m = 4, 1, 2, 5, 7
    q = cfg.randn(b, h, n, cfg.head_dim, S)  # vmapped along the last dimension
    k = cfg.randn(S, b, h, m, cfg.head_dim)
    v = cfg.randn(b, h, m, cfg.head_dim)  # shared
    attn = torch.rand(S, 1, h, n, m, device=cfg.device) < 0.7  # batched, per-sample batch 1
    pad = torch.rand(m, S, device=cfg.device) < 0.8  # batched key padding, along its last dim
    pad[0] = True
    out = vmap(lambda q, k, am, p: stop_graddable_attn(q, k, v, attn_mask=am, mask=p[None]),
               in_dims=(4, 0, 0, 1))(q, k, attn, pad)
    assert out.shape == (S, b, h, n, cfg.head_dim)
    for s in range(S):
        exp = stop_graddable_attn(q[..., s], k[s], v, attn_mask=attn[s], mask=pad[None, :, s])
        cfg.assert_close(out[s], exp, what=f"sample {s}")
    # the raw op, lse included
    out2, lse = vmap(lambda q, k: ops.attn_fwd(q, k, v, None, None, None, None, None, True, 0.5),
                     in_dims=(4, 0))(q, k)
    for s in range(S):
        o, l_ = ops.attn_fwd(q[..., s], k[s], v, None, None, None, None, None, True, 0.5)
        cfg.assert_close(out2[s], o, what="out")
        cfg.assert_close(lse[s], l_, what="lse")


def test_double_backward_through_func_says_so():
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64) for _ in range(3))
    inner = lambda q: grad(_loss(stop_graddable_attn, causal=True))(q, k, v).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="double backward through attention is not supported"):
        grad(inner)(q)


def test_vmap_over_head_flags_is_refused_clearly():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    heads = torch.tensor([[True, False], [False, True]])
    with pytest.raises(NotImplementedError, match="head flags"):
        vmap(lambda hf: ops.attn_fwd(q, k, v, None, None, None, None, None, True, 1.0, 1, 2, True, hf))(heads)


def test_eager_autograd_still_uses_the_registered_op():
    """Outside torch.func the op is called directly (its dispatcher autograd), not the Function."""
    q, k, v = (torch.randn(1, 1, 4, 8, requires_grad=True) for _ in range(3))
    out = stop_graddable_attn(q, k, v)
    assert "attn_fwd" in out.grad_fn.name() and "ForFunc" not in out.grad_fn.name()


def test_torch_compile_around_a_transform(cfg):
    """torch.compile(vmap(grad(f))): the op's call inside the transform runs eagerly (a graph
    break), so the compiled function gives the eager transform's result."""
    q, k, v = cfg.qkv(3, 2, 6, 6, requires_grad=False)
    per_sample = vmap(grad(_loss(stop_graddable_attn, causal=True), argnums=(0, 1)))
    expected = per_sample(q[:, None], k[:, None], v[:, None])
    torch._dynamo.reset()
    got = torch.compile(per_sample)(q[:, None], k[:, None], v[:, None])
    for name, a, e in zip("qk", got, expected):
        cfg.assert_close(a, e, grad=True, what=f"d{name}")


def test_vmap_over_zero_samples(cfg):
    """A vmap dimension of size 0 gives empty results of the right shapes, as the reference does."""
    q, k, v = (cfg.randn(0, 1, 2, 4, cfg.head_dim) for _ in range(3))
    assert vmap(stop_graddable_attn)(q, k, v).shape == q.shape
    grads = vmap(grad(_loss(stop_graddable_attn, causal=True), argnums=(0, 1, 2)))(q, k, v)
    assert [g.shape for g in grads] == [q.shape] * 3


def test_forward_mode_ad_is_refused_not_silently_zero():
    """The op has no forward-mode formula: every forward-mode entry point raises, instead of the
    zero tangent a register_autograd op gives under torch.autograd.forward_ad or linearize."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jacfwd, jvp, linearize

    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    f = lambda q: stop_graddable_attn(q, k, v, causal=True)  # noqa: E731
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            f(fwAD.make_dual(q, torch.randn_like(q)))
    for run in (lambda: jvp(f, (q,), (torch.randn_like(q),)), lambda: linearize(f, q)[1](q),
                lambda: jacfwd(f)(q)):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            run()
    # a dual level with no tangent on q, k or v is not forward-mode AD through the op
    with fwAD.dual_level():
        torch.testing.assert_close(f(q), stop_graddable_attn(q, k, v, causal=True))
