"""Transformer, CausalAttention and KV-cache generation (SPEC 4).

The model is checked against `manual_forward`, an independent dense re-computation written here
from SPEC 3 with plain torch ops (explicit interleaving, element-wise region, the stop-gradient
written with .detach()), for every attention implementation and both modes."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

import self_reasoning_tokens as srt
from self_reasoning_tokens import transformer as transformer_module
from self_reasoning_tokens import CausalAttention, Transformer

import test_ops  # noqa: E402  (its fresh-process memory measurement)

IMPLS = ["kernel", "dense", "reference"]
MODES = [True, False]
MODE_IDS = ["stop_grad", "hard"]


def small_model(stop_grad=True, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {**dict(dim=32, num_tokens=29, depth=2, heads=4, dim_head=8, max_seq_len=64,
                     max_reason_seq_len=3), **kwargs}
    model = Transformer(stop_grad_next_tokens_to_reason=stop_grad, **kwargs).to(dtype)
    with torch.no_grad():  # reasoning tokens as large as real embeddings, so they matter
        model.reason_tokens.normal_()
    return model


def region_by_definition(N, R, W):
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    P = R + 1
    return (j % P != 0) & (i // P > j // P) & (i // P - W <= j // P)


def manual_forward(model, x, R, W, stop_grad, reason_heads=None):
    """Independent dense forward: logits (b, N, c); gradients by autograd through .detach()."""
    b, L = x.shape
    P = R + 1
    rows = []
    for t in range(L):  # [x_t, r_1 .. r_R] per step, all at position t
        pos = model.pos_emb.weight[t]
        rows.append(model.token_emb.weight[x[:, t]] + pos)
        rows.extend(model.reason_tokens[r].expand(b, -1) + pos for r in range(R))
    h = torch.stack(rows, dim=1)                                        # (b, N, dim)
    N = h.shape[1]

    attn0 = model.layers[0][0]
    H, D = attn0.heads, attn0.dim_head
    region = region_by_definition(N, R, W) if R > 0 else torch.zeros(N, N, dtype=torch.bool)
    region = region.expand(H, N, N).clone()
    if reason_heads is not None:
        for head in range(H):
            if head not in reason_heads:
                region[head] = False
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    allowed = causal & ~region if not stop_grad else causal.expand(H, N, N)

    for attn, ff in model.layers:
        qkv = attn.norm(h) @ attn.to_qkv.weight.t()                     # (b, N, 3 H D)
        q, k, v = qkv.view(b, N, 3, H, D).permute(2, 0, 3, 1, 4)      # (b, H, N, D)
        s = torch.where(region, q @ k.detach().transpose(-1, -2), q @ k.transpose(-1, -2)) * D ** -0.5
        p = s.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out = torch.where(region, p, 0.) @ v.detach() + torch.where(region, 0., p) @ v
        h = h + out.transpose(1, 2).reshape(b, N, H * D) @ attn.to_out.weight.t()
        h = h + ff(h)
    return model.to_logits(model.norm(h))


def assert_per_sample_gradients_match_eager(model, x):
    """vmap(grad(loss)) over x's rows through torch.func.functional_call equals each row's loss
    in eager autograd; returns the per-row loss function (params, seq) -> loss."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, seq):
        return functional_call(model, p, (seq[None],), dict(return_loss=True, num_reason_tokens=2))

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for s in range(x.shape[0]):
        model.zero_grad()
        model(x[s:s + 1], return_loss=True, num_reason_tokens=2).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][s], p.grad, atol=1e-12, rtol=1e-10, msg=name)
    return params, loss


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------
# The seed's README example, adapted only in the import name


def test_readme_usage_example():
    import torch
    from self_reasoning_tokens import Transformer

    model = Transformer(
        dim = 512,
        depth = 4,
        num_tokens = 256,
        stop_grad_next_tokens_to_reason = True
    )

    x = torch.randint(0, 256, (1, 4))

    loss = model(
        x,
        num_reason_tokens = 4,                # number of reasoning tokens per time step
        num_steps_future_can_use_reason = 16, # say you wish for reason tokens to be only attended to by tokens 16 time steps into the future
        return_loss = True
    )

    loss.backward()

    logits = model(x, num_reason_tokens = 4)

    assert loss.dim() == 0 and torch.isfinite(loss)
    assert logits.shape == (1, 4 * 5, 256)
    assert model.reason_tokens.grad is not None


# ------------------------------------------------------------------------------------------
# Whole-model equivalence: every impl == the independent dense forward (logits and all grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("R,W,reason_heads", [(0, 2, None), (2, 2, None), (3, 1, None), (2, 2, (1, 3))],
                         ids=["R0", "R2W2", "R3W1", "R2W2_heads13"])
def test_model_matches_manual_forward(impl, stop_grad, R, W, reason_heads):
    model = small_model(stop_grad, attend_impl=impl, reason_heads=reason_heads)
    x = torch.randint(0, 29, (2, 7))
    target = torch.randn(2, 7 * (R + 1), 29, dtype=torch.float64)

    logits = model(x, num_reason_tokens=R, num_steps_future_can_use_reason=W)
    expected = manual_forward(model, x, R, W, stop_grad, reason_heads)
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=1e-9)

    got = grads_of(model, (logits * target).sum())
    want = grads_of(model, (manual_forward(model, x, R, W, stop_grad, reason_heads) * target).sum())
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=1e-8, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["kernel", "dense"])
@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
def test_activation_checkpointing_matches_manual_forward_and_recomputes_each_layer(impl, stop_grad):
    """With activation_checkpointing the logits and every gradient still equal the independent
    dense forward's, and the backward runs each layer's attention a second time (the recompute):
    the layers' activations were not kept."""
    R, W = 2, 2
    model = small_model(stop_grad, attend_impl=impl, reason_heads=(1, 3), depth=3,
                        activation_checkpointing=True)
    calls = []
    for attn, _ in model.layers:
        attn.register_forward_hook(lambda module, args, out: calls.append(module))
    x = torch.randint(0, 29, (2, 7))
    target = torch.randn(2, 7 * (R + 1), 29, dtype=torch.float64)

    logits = model(x, num_reason_tokens=R, num_steps_future_can_use_reason=W)
    assert len(calls) == 3
    torch.testing.assert_close(logits, manual_forward(model, x, R, W, stop_grad, (1, 3)), atol=1e-10, rtol=1e-9)
    got = grads_of(model, (logits * target).sum())
    assert [id(m) for m in calls[3:]] == [id(a) for a, _ in reversed(model.layers)]  # recomputed, last layer first
    want = grads_of(model, (manual_forward(model, x, R, W, stop_grad, (1, 3)) * target).sum())
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=1e-8, msg=lambda m: f"{name}: {m}")

    # off (settable later): no recompute; without gradients (generate, no_grad) nothing to recompute
    calls.clear()
    model.activation_checkpointing = False
    model(x, num_reason_tokens=R).sum().backward()
    assert len(calls) == 3
    model.activation_checkpointing = True
    with torch.no_grad():
        model(x, num_reason_tokens=R)
    model.generate(x, 2, num_reason_tokens=R)
    with pytest.raises(TypeError, match="activation_checkpointing"):
        model.activation_checkpointing = 1
    with pytest.raises(TypeError, match="activation_checkpointing"):
        small_model(activation_checkpointing="yes")


def test_activation_checkpointing_under_torch_func_runs_without_it_and_says_so():
    """torch.func transforms cannot run checkpointing's saved-tensor hooks (torch raises); the
    model runs its layers without it there, with a warning, and the gradients are the usual."""
    model = small_model(True, activation_checkpointing=True)
    with pytest.warns(UserWarning, match="not applied under torch.func"):
        assert_per_sample_gradients_match_eager(model, torch.randint(0, 29, (2, 9)))


CHECKPOINT_MEMORY_SCRIPT = test_ops.RSS_HELPERS + textwrap.dedent("""
    import os
    # the benchmarks' glibc setting: freed memory is handed back at once, so that the peak
    # counts live memory only
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(srt.__file__)), "benchmarks"))
    from _memory import return_freed_memory_to_os
    return_freed_memory_to_os()
    checkpointing, seq, R = sys.argv[1] == "1", int(sys.argv[2]), 3
    torch.manual_seed(0)
    model = srt.Transformer(dim=256, num_tokens=256, depth=4, heads=4, dim_head=64, max_seq_len=seq,
                            stop_grad_next_tokens_to_reason=True, activation_checkpointing=checkpointing)
    x = torch.randint(0, 256, (1, seq + 1))
    model(x[:, :33], num_reason_tokens=R, return_loss=True).backward()  # warm-up
    model.zero_grad(set_to_none=False)  # the gradients stay allocated: not part of the growth
    token = start()
    model(x, num_reason_tokens=R, return_loss=True).backward()
    print(f"{growth_mb(token):.1f}")
""")


def test_activation_checkpointing_lowers_the_peak_memory_of_a_training_step():
    """A training step at N = 2048 positions (dim 256, depth 4): with activation_checkpointing the
    peak resident memory grows by at most 0.5x what it grows by without (measured: 0.34x, 57 of
    165 MiB; 0.53-0.56x with glibc's default malloc, which keeps freed blocks resident), each in
    a fresh process."""
    plain, checkpointed = (float(test_ops._run_in_fresh_python(CHECKPOINT_MEMORY_SCRIPT, on, 512).split()[-1])
                           for on in (0, 1))
    print(f"peak RSS growth: {plain:.1f} MiB plain, {checkpointed:.1f} MiB with activation_checkpointing")
    assert checkpointed < 0.5 * plain, (plain, checkpointed)


@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
def test_impls_agree_across_kernel_tiles(stop_grad):
    # 70 steps x 4 positions = 280 > one 256-key tile: the pattern crosses tile boundaries
    model = small_model(stop_grad, dtype=torch.float32, max_seq_len=80)
    x = torch.randint(0, 29, (1, 70))
    results = {}
    for impl in IMPLS:
        model.attend_impl = impl
        logits = model(x, num_reason_tokens=3, num_steps_future_can_use_reason=4)
        results[impl] = (logits.detach(), grads_of(model, logits.square().mean()))
    for impl in ("dense", "reference"):
        torch.testing.assert_close(results[impl][0], results["kernel"][0], atol=2e-5, rtol=1e-4)
        for name, g in results["kernel"][1].items():
            torch.testing.assert_close(results[impl][1][name], g, atol=2e-5, rtol=1e-3, msg=lambda m: f"{impl} {name}: {m}")


# ------------------------------------------------------------------------------------------
# Causality and the stop-gradient properties


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("R", [0, 2])
def test_future_tokens_never_change_earlier_logits(impl, stop_grad, R):
    model = small_model(stop_grad, dtype=torch.float32, attend_impl=impl)
    P = R + 1
    x = torch.randint(0, 29, (2, 8))
    base = model(x, num_reason_tokens=R, num_steps_future_can_use_reason=2)
    for t in (1, 4, 7):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 29
        logits = model(changed, num_reason_tokens=R, num_steps_future_can_use_reason=2)
        assert torch.equal(logits[:, :t * P], base[:, :t * P]), f"step {t} leaked into earlier positions"
        assert not torch.allclose(logits[:, t * P:], base[:, t * P:])  # the change itself is seen


@pytest.mark.parametrize("impl", IMPLS)
def test_stop_grad_forward_equals_unmasked_forward(impl):
    model = small_model(True, attend_impl=impl)
    x = torch.randint(0, 29, (2, 6))
    stopped = model(x, num_reason_tokens=3, num_steps_future_can_use_reason=2)
    unmasked = model(x, num_reason_tokens=3, num_steps_future_can_use_reason=0)  # W = 0: empty region
    # the kernels apply the pattern to gradients only: bit-identical forward; the reference's
    # detach formulation (sum of four products) is equal up to rounding
    tol = 1e-12 if impl == "reference" else 0
    torch.testing.assert_close(stopped, unmasked, atol=tol, rtol=tol)
    torch.testing.assert_close(stopped, manual_forward(model, x, 3, 0, True), atol=1e-10, rtol=1e-9)
    model.stop_grad_next_tokens_to_reason = False  # same weights, hard mode: a different forward
    assert not torch.allclose(model(x, num_reason_tokens=3, num_steps_future_can_use_reason=2), stopped)


@pytest.mark.parametrize("impl", ["kernel", "dense"])
@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("R,W", [(2, 2), (3, 1), (1, 3)])
def test_reason_tokens_trained_only_by_steps_beyond_the_window(impl, stop_grad, R, W):
    model = small_model(stop_grad, dtype=torch.float32, attend_impl=impl)
    L = W + 4
    x = torch.randint(0, 29, (2, L + 1))
    inputs, labels = x[:, :-1], x[:, 1:]

    def real_token_loss(steps):
        logits = model(inputs, num_reason_tokens=R, num_steps_future_can_use_reason=W,
                       remove_reason_tokens_at_end=True)                   # (b, L, c)
        return F.cross_entropy(logits[:, steps].transpose(1, 2), labels[:, steps])

    near = grads_of(model, real_token_loss(slice(0, W + 1)))["reason_tokens"]
    assert torch.count_nonzero(near) == 0, "the first W + 1 steps must not train the reasoning tokens"
    far = grads_of(model, real_token_loss(slice(W + 1, W + 2)))["reason_tokens"]
    assert far[:R].abs().sum() > 0, "a step beyond the window must train the reasoning tokens"
    assert torch.count_nonzero(far[R:]) == 0  # unused reasoning slots (R < max_reason_seq_len)


def test_stop_grad_mode_trains_the_rest_like_the_unmasked_model():
    # the stop only cuts the region's k/v paths: the loss on step 0's real token (no region
    # at all) gives the same gradients with and without the pattern
    model = small_model(True)
    x = torch.randint(0, 29, (1, 6))
    g = lambda W: grads_of(model, model(x, 2, W, remove_reason_tokens_at_end=True)[:, 0].square().sum())
    with_pattern, without = g(3), g(0)
    for name in without:
        torch.testing.assert_close(with_pattern[name], without[name], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("R", [0, 2])
@pytest.mark.parametrize("remove", [False, True])
def test_return_loss_is_next_token_cross_entropy(R, remove):
    model = small_model(True)
    x = torch.randint(0, 29, (2, 9))
    loss = model(x, num_reason_tokens=R, remove_reason_tokens_at_end=remove, return_loss=True)
    assert loss.dim() == 0
    logits = model(x[:, :-1], num_reason_tokens=R, remove_reason_tokens_at_end=remove)
    P = 1 if remove else R + 1
    assert logits.shape == (2, 8 * P, 29)
    labels = x[:, 1:].repeat_interleave(P, dim=1)  # every reasoning position predicts the next real token
    expected = F.cross_entropy(logits.reshape(-1, 29), labels.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_remove_reason_tokens_at_end_keeps_real_positions():
    model = small_model(False)
    x = torch.randint(0, 29, (2, 5))
    full = model(x, num_reason_tokens=3)
    real = model(x, num_reason_tokens=3, remove_reason_tokens_at_end=True)
    assert full.shape == (2, 20, 29) and real.shape == (2, 5, 29)
    torch.testing.assert_close(real, full[:, ::4], atol=0, rtol=0)


@pytest.mark.parametrize("R", [0, 2])
def test_ignore_index(R):
    model = small_model(True, ignore_index=-100)
    x = torch.randint(0, 29, (2, 7))
    masked = x.clone()
    masked[0, 3] = masked[1, 6] = -100  # labels 2 (row 0) and 5 (row 1) are ignored
    loss = model(masked, num_reason_tokens=R, return_loss=True)
    # a label set to ignore_index is dropped; its input (row 0, position 3) is embedded as 0
    inputs = masked[:, :-1].clamp(min=0)
    logits = model(inputs, num_reason_tokens=R)
    labels = masked[:, 1:].repeat_interleave(R + 1, dim=1)
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(loss, expected)
    assert keep.sum() == 2 * 6 * (R + 1) - 2 * (R + 1)


def test_an_in_vocabulary_ignore_index_is_still_a_token_as_input():
    """Only an out-of-vocabulary ignore_index is padding to embed as 0: id 5 as ignore_index drops
    the labels equal to 5, but an input 5 is embedded as 5 (it used to become token 0)."""
    model = small_model(True, ignore_index=5)
    x = torch.tensor([[1, 5, 7, 5, 3, 2], [4, 4, 5, 9, 8, 5]])
    loss = model(x, return_loss=True)
    logits = model(x[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], ignore_index=5)
    torch.testing.assert_close(loss, expected)


def test_trailing_padding_equals_the_unpadded_loss():
    model = small_model(True)  # ignore_index = -1 by default
    x = torch.randint(0, 29, (1, 5))
    padded = torch.cat((x, torch.full((1, 3), -1)), dim=1)
    for R in (0, 2):
        torch.testing.assert_close(model(padded, num_reason_tokens=R, return_loss=True),
                                   model(x, num_reason_tokens=R, return_loss=True))


# ------------------------------------------------------------------------------------------
# Generation with a KV cache


def greedy_by_full_forward(model, prompt, steps, R, W):
    seq = prompt
    for _ in range(steps):
        logits = model(seq, num_reason_tokens=R, num_steps_future_can_use_reason=W)
        seq = torch.cat((seq, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return seq


@pytest.mark.parametrize("impl", ["kernel", "dense"])
@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("R,W", [(0, 2), (2, 2), (3, 1)])
def test_greedy_generate_equals_full_forward(impl, stop_grad, R, W):
    model = small_model(stop_grad, attend_impl=impl, max_seq_len=16)
    prompt = torch.randint(0, 29, (2, 3))
    out = model.generate(prompt, 10, num_reason_tokens=R, num_steps_future_can_use_reason=W, temperature=0.)
    assert out.shape == (2, 13) and out.dtype == prompt.dtype
    assert torch.equal(out[:, :3], prompt)
    with torch.no_grad():
        assert torch.equal(out, greedy_by_full_forward(model, prompt, 10, R, W))


def test_greedy_generate_float32_reference_impl():
    model = small_model(True, dtype=torch.float32, attend_impl="reference")
    prompt = torch.randint(0, 29, (1, 2))
    out = model.generate(prompt, 8, num_reason_tokens=2, temperature=0.)
    with torch.no_grad():
        assert torch.equal(out, greedy_by_full_forward(model, prompt, 8, 2, 2))


def test_generate_feeds_one_step_at_a_time_through_the_cache(monkeypatch):
    calls = []
    original = transformer_module.stop_graddable_attn

    def recording(q, k, v, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(transformer_module, "stop_graddable_attn", recording)
    model = small_model(True, depth=1)
    R = 2
    model.generate(torch.randint(0, 29, (1, 4)), 5, num_reason_tokens=R, temperature=0.)
    P = R + 1
    # prefill: 4 steps at once; then 4 more steps (the 5th token is sampled, never fed)
    assert calls == [(4 * P, 4 * P)] + [(P, (4 + s) * P) for s in range(1, 5)]


def test_generate_sampling():
    model = small_model(True, dtype=torch.float32, max_seq_len=24)
    prompt = torch.randint(0, 29, (3, 4))
    greedy = model.generate(prompt, 6, num_reason_tokens=1, temperature=0.)
    assert torch.equal(model.generate(prompt, 6, num_reason_tokens=1, temperature=1., top_k=1), greedy)
    torch.manual_seed(123)
    a = model.generate(prompt, 6, num_reason_tokens=1, temperature=0.8, top_k=5)
    torch.manual_seed(123)
    b = model.generate(prompt, 6, num_reason_tokens=1, temperature=0.8, top_k=5)
    assert torch.equal(a, b) and a.shape == (3, 10)
    assert ((a >= 0) & (a < 29)).all()
    assert torch.equal(model.generate(prompt, 0), prompt)
    assert not a.requires_grad and all(p.grad is None for p in model.parameters())
    # on_token sees each new token as it is drawn: the same ones generate returns
    seen = []
    torch.manual_seed(123)
    c = model.generate(prompt, 6, num_reason_tokens=1, temperature=0.8, top_k=5, on_token=seen.append)
    assert torch.equal(c, a) and torch.equal(torch.stack(seen, dim=1), a[:, 4:])


def test_generate_top_k_only_draws_from_the_k_likeliest():
    model = small_model(True, dtype=torch.float32)
    prompt = torch.randint(0, 29, (64, 3))
    with torch.no_grad():
        top3 = model(prompt, num_reason_tokens=2)[:, -1].topk(3, dim=-1).indices
    torch.manual_seed(0)
    out = model.generate(prompt, 1, num_reason_tokens=2, temperature=5., top_k=3)
    assert (out[:, -1:] == top3).any(dim=-1).all()


def test_sampling_at_extreme_temperatures():
    torch.manual_seed(0)
    logits = torch.randn(64, 29) * 3
    best = logits.argmax(-1)
    # a temperature too small for float32 arithmetic is greedy, not a NaN error
    for t in (1e-40, 1e-300):
        assert torch.equal(transformer_module.sample(logits, t), best)
    # top_k holds at any temperature: a huge (or infinite) one used to round every logit to the
    # same value, and the filter then kept all of them
    for t in (1e300, float("inf")):
        assert torch.equal(transformer_module.sample(logits, t, top_k=1), best)
    # an infinite temperature is uniform over the kept tokens
    top2 = logits.topk(2, dim=-1).indices
    draws = torch.stack([transformer_module.sample(logits, float("inf"), top_k=2) for _ in range(40)])
    assert (draws[..., None] == top2).any(-1).all()
    assert (draws == top2[:, 0]).any() and (draws == top2[:, 1]).any()


def test_any_integer_dtype_of_token_ids():
    model = small_model(True, dtype=torch.float64, num_tokens=256)
    model.ignore_index = -1
    x = torch.tensor([[255, 3, 200, 7, 255]])  # 255: an id a uint8 comparison with -1 would take for ignore_index
    want_logits = model(x[:, :-1], num_reason_tokens=1)
    want_loss = model(x, num_reason_tokens=1, return_loss=True)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        xs = x.clamp(max=torch.iinfo(dtype).max).to(dtype)
        ref = x.clamp(max=torch.iinfo(dtype).max)
        assert torch.equal(model(xs[:, :-1], num_reason_tokens=1), model(ref[:, :-1], num_reason_tokens=1))
        assert torch.equal(model(xs, num_reason_tokens=1, return_loss=True),
                           model(ref, num_reason_tokens=1, return_loss=True))
        if dtype == torch.int8:  # cannot hold the ids up to 255 that generate could return
            with pytest.raises(TypeError, match="int8.*up to 255"):
                model.generate(xs[:, :3], 2)
            continue
        out = model.generate(xs[:, :3], 2, num_reason_tokens=1, temperature=0.)
        assert out.dtype == dtype and torch.equal(out.long(), model.generate(ref[:, :3], 2, num_reason_tokens=1,
                                                                              temperature=0.))
    assert torch.equal(model(x.to(torch.uint8)[:, :-1], num_reason_tokens=1), want_logits)
    assert torch.equal(model(x.to(torch.uint8), num_reason_tokens=1, return_loss=True), want_loss)
    # ids above 255 cannot come back in a uint8 prompt's dtype: said before generating
    big = small_model(True, dtype=torch.float64, num_tokens=300)
    with pytest.raises(TypeError, match="uint8.*up to 299"):
        big.generate(x.to(torch.uint8)[:, :3], 2)
    with pytest.raises(ValueError, match="token id 255; ids must be in \\[0, 29\\)"):
        small_model(True, dtype=torch.float64)(x.to(torch.uint8)[:, :3])  # num_tokens 29


# ------------------------------------------------------------------------------------------
# CausalAttention on its own, and errors


def test_causal_attention_cache_equals_full():
    torch.manual_seed(0)
    attn = CausalAttention(32, dim_head=8, heads=4).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    pattern = srt.ReasoningPattern(2, 2, stop_grad=False)
    full = attn(x, pattern)
    first, cache = attn(x[:, :6], pattern, return_cache=True)
    rest = attn(x[:, 6:], pattern, cache=cache)
    torch.testing.assert_close(torch.cat((first, rest), dim=1), full, atol=1e-12, rtol=1e-10)


def test_bad_arguments_raise_clear_errors():
    model = small_model(True, max_seq_len=8)
    x = torch.randint(0, 29, (2, 5))
    with pytest.raises(ValueError, match="max_reason_seq_len"):
        model(x, num_reason_tokens=4)
    with pytest.raises(ValueError, match="num_reason_tokens"):
        model(x, num_reason_tokens=-1)
    with pytest.raises(ValueError, match="num_steps_future_can_use_reason"):
        model(x, num_reason_tokens=2, num_steps_future_can_use_reason=-1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 29, (1, 9)))
    with pytest.raises(ValueError, match="token id 29"):
        model(torch.tensor([[1, 29]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))  # ignore_index is only allowed in the loss path
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randint(0, 29, (5,)))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(torch.randint(0, 29, (2, 1)), return_loss=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.randint(0, 29, (1, 5)), 4)
    full = model.generate(torch.randint(0, 29, (1, 5)), 3, temperature=0)  # exactly max_seq_len
    assert full.shape == (1, 8) and model(full).shape == (1, 8, 29)  # and the model reads it back
    with pytest.raises(ValueError, match="temperature"):
        model.generate(x, 1, temperature=-1.)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(x, 1, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, -1)
    with pytest.raises(ValueError, match="max_reason_seq_len"):
        model.generate(x, 1, num_reason_tokens=5)
    with pytest.raises(ValueError, match="attend_impl"):
        Transformer(dim=16, num_tokens=10, depth=1, attend_impl="flash")
    with pytest.raises(ValueError, match="attend_impl"):
        model.attend_impl = "flash"
    with pytest.raises(ValueError, match="reason_heads"):
        Transformer(dim=16, num_tokens=10, depth=1, heads=2, reason_heads=[2])
    with pytest.raises(ValueError, match="dim"):
        Transformer(dim=0, num_tokens=10, depth=1)


def test_numpy_scalars_are_taken_as_python_ones():
    """NumPy ints and bools (a config read with NumPy) work wherever Python ones do."""
    np = pytest.importorskip("numpy")
    model = small_model(True)
    same = Transformer(dim=np.int64(32), num_tokens=np.int64(29), depth=np.int32(2), heads=np.int64(4),
                       dim_head=np.int64(8), max_seq_len=np.int64(64), max_reason_seq_len=np.int64(3),
                       stop_grad_next_tokens_to_reason=np.bool_(True), reason_heads=np.array([0, 2]))
    assert type(same.max_seq_len) is int and same.reason_heads == (0, 2)
    x = torch.randint(0, 29, (2, 6))
    torch.testing.assert_close(model(x, num_reason_tokens=np.int64(2), num_steps_future_can_use_reason=np.int64(1)),
                               model(x, num_reason_tokens=2, num_steps_future_can_use_reason=1), rtol=0, atol=0)
    torch.manual_seed(1)
    a = model.generate(x, np.int64(3), num_reason_tokens=np.int64(1), temperature=np.float32(0.5), top_k=np.int64(4))
    torch.manual_seed(1)
    b = model.generate(x, 3, num_reason_tokens=1, temperature=0.5, top_k=4)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="num_reason_tokens must be an int, got numpy.float64"):
        model(x, num_reason_tokens=np.float64(2))


@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
def test_torch_compile_fullgraph_matches_eager(stop_grad):
    """torch.compile(model, fullgraph=True) traces the whole forward and backward (no graph break
    from the token-id check) and gives eager's loss and gradients."""
    model = small_model(stop_grad, dtype=torch.float32)
    x = torch.randint(0, 29, (2, 6))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    kw = dict(num_reason_tokens=2, num_steps_future_can_use_reason=1, return_loss=True)
    loss = compiled(x, **kw)
    got = grads_of(model, loss)
    ref_loss = model(x, **kw)
    ref = grads_of(model, ref_loss)
    torch.testing.assert_close(loss, ref_loss)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)


@pytest.mark.parametrize("stop_grad", MODES, ids=MODE_IDS)
def test_per_sample_gradients_with_torch_func(stop_grad):
    """vmap(grad(loss)) over the batch through torch.func.functional_call: each sample's parameter
    gradients equal those of that sample's loss in eager autograd (the kernel's vmap rule, and the
    token check, which under vmap cannot raise and leaves valid ids alone; an ignored target
    included)."""
    from torch.func import grad

    model = small_model(stop_grad)
    x = torch.randint(0, 29, (3, 9))
    x[1, 4] = model.ignore_index  # an ignored target in one sample
    params, loss = assert_per_sample_gradients_match_eager(model, x)
    # outside vmap the token check still runs
    with pytest.raises(ValueError, match="token id 29"):
        grad(loss)(params, torch.tensor([1, 29]))


def test_vmap_over_stacked_models_and_its_bad_token_ids():
    """Model ensembling with torch.func (vmap over stacked parameters): each member's logits equal
    that model's eager forward; an invalid id in one member's input raises (under vmap the range
    check cannot raise, so the id is made one no table has), instead of being looked up in
    another member's embedding rows."""
    from torch.func import functional_call, stack_module_state, vmap

    models = [small_model(True, seed=s) for s in range(2)]
    params, buffers = stack_module_state(models)
    base = small_model(True)
    run = vmap(lambda p, b, seq: functional_call(base, (p, b), (seq[None],), dict(num_reason_tokens=1)))
    x = torch.randint(0, 29, (2, 6))
    out = run(params, buffers, x)
    for i, model in enumerate(models):
        torch.testing.assert_close(out[i], model(x[i:i + 1], num_reason_tokens=1), atol=1e-12, rtol=1e-10)
    for bad in (-1, 29):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(IndexError):
            run(params, buffers, y)


# ------------------------------------------------------------------------------------------
# from a fresh-eyes trial of the Python API


def test_generate_with_no_new_tokens_returns_a_new_tensor():
    model = Transformer(dim=32, depth=1, num_tokens=11, heads=2, dim_head=16, max_seq_len=16)
    prompt = torch.randint(0, 11, (2, 4))
    out = model.generate(prompt, 0)
    assert torch.equal(out, prompt) and out is not prompt
    out[0, 0] = (prompt[0, 0] + 1) % 11  # editing the result leaves the caller's prompt alone
    assert not torch.equal(out, prompt)


def test_causal_attention_names_a_wrong_input():
    attn = CausalAttention(32, dim_head=16, heads=2)
    with pytest.raises(ValueError, match=r"shape \(batch, positions, 32\), got \(12, 32\)"):
        attn(torch.randn(12, 32))
    with pytest.raises(ValueError, match=r"got \(1, 12, 16\)"):
        attn(torch.randn(1, 12, 16))
    with pytest.raises(TypeError, match="x is torch.float64 but the module's weights are torch.float32"):
        attn(torch.randn(1, 12, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's mixed dtypes are fine
        assert attn(torch.randn(1, 12, 32)).dtype == torch.bfloat16


def test_a_window_or_count_past_int64_is_the_same_pattern():
    # Python ints have no bound; the op takes int64 (W = 2**63 used to fail with "Expected a value of
    # type 'int' ... but instead found type 'int'"). Past the positions there are, every W (every R)
    # gives the same pattern.
    q = torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True)
    outs = {}
    for R, W in ((2, 50), (2, 2**63), (2, 2**80), (60, 3), (2**64, 3)):
        for stop_grad in (True, False):
            out = srt.stop_graddable_attn(q, q, q, causal=True, reasoning=srt.ReasoningPattern(R, W, stop_grad=stop_grad))
            grad, = torch.autograd.grad(out.square().sum(), q)
            outs[R >= 60, W >= 50, stop_grad] = outs.get((R >= 60, W >= 50, stop_grad), []) + [(out, grad)]
    for results in outs.values():
        assert len(results) >= 2
        for out, grad in results[1:]:
            assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
