"""stop_graddable_attn under torch.autocast: it follows autocast as SDPA does.

Inside an autocast region, q, k and v (every floating one on the autocast device other than
float64) are cast to the autocast dtype before the op, so float32 inputs run the half-precision
kernels and mixed dtypes work; the gradients come back in the inputs' own dtypes. Each case is
compared with the same call made outside autocast on inputs cast by hand (the same kernels, so
the results must be equal bit for bit), and SDPA under the same autocast region shows the dtype
the ecosystem gives.
"""
import pytest
import torch
import torch.nn.functional as F

from self_reasoning_tokens import ReasoningPattern, stop_graddable_attn

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _deterministic(helpers):
    """On a GPU the default backward adds dQ with atomics, so its last bits vary between calls:
    the deterministic schedule makes the bit-for-bit comparisons hold there too."""
    with helpers.deterministic():
        yield


def _inputs(device, dtypes=(torch.float32,) * 3, b=2, h=2, n=9, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(device, dt).requires_grad_(True)
            for dt in dtypes]


def _masks(device, n=9, h=2):
    g = torch.Generator().manual_seed(5)
    return dict(k_stop_grad_mask=(torch.rand(h, n, n, generator=g) < 0.4).to(device),
                v_stop_grad_mask=torch.rand(n, n, generator=g).to(device),  # float32 factors
                q_stop_grad_mask=(torch.rand(n, n, generator=g) < 0.2).to(device))


def _run(q, k, v, grad_out, **kwargs):
    out = stop_graddable_attn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return out, grads


def _by_hand(q, k, v, dtype, grad_out, **kwargs):
    """The same call outside autocast on copies cast by hand to `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    return _run(*leaves, grad_out, **kwargs)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kwargs", [dict(causal=True), "masks", "reasoning"], ids=["causal", "masks", "reasoning"])
def test_float32_inputs_run_in_the_autocast_dtype(device, dtype, kwargs):
    if kwargs == "masks":
        kwargs = dict(causal=True, **_masks(device))
    elif kwargs == "reasoning":
        kwargs = dict(causal=True, reasoning=ReasoningPattern(num_reason_tokens=1, num_steps_future_can_use_reason=2))
    q, k, v = _inputs(device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device)
    with torch.autocast(device, dtype=dtype):
        out, grads = _run(q, k, v, grad_out, **kwargs)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == dtype == sdpa.dtype  # as SDPA under the same region
    exp_out, exp_grads = _by_hand(q, k, v, dtype, grad_out, **kwargs)
    assert torch.equal(out, exp_out)
    for name, got, exp, leaf in zip("qkv", grads, exp_grads, (q, k, v)):
        assert got.dtype == leaf.dtype == torch.float32, name  # back through the cast
        assert torch.equal(got, exp.float()), name


def test_mixed_dtypes_work_under_autocast_and_raise_outside(device):
    q, k, v = _inputs(device, (torch.float32, torch.float32, torch.bfloat16))  # e.g. rotary q, k in fp32
    grad_out = torch.randn(q.shape).to(device)
    with pytest.raises(TypeError, match="same dtype"):
        stop_graddable_attn(q, k, v, causal=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, (dq, dk, dv) = _run(q, k, v, grad_out, causal=True)
    exp_out, exp_grads = _by_hand(q, k, v, torch.bfloat16, grad_out, causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, exp_out)
    assert (dq.dtype, dk.dtype, dv.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    for got, exp in zip((dq, dk, dv), exp_grads):
        assert torch.equal(got, exp.to(got.dtype))


def test_half_inputs_are_cast_to_the_autocast_dtype(device):
    """bfloat16 inputs under a float16 region run in float16, as autocast casts any eligible dtype."""
    q, k, v = _inputs(device, (torch.bfloat16,) * 3)
    with torch.autocast(device, dtype=torch.float16):
        out = stop_graddable_attn(q, k, v, causal=True)
    assert out.dtype == torch.float16
    qh, kh, vh = (t.detach().half() for t in (q, k, v))
    assert torch.equal(out, stop_graddable_attn(qh, kh, vh, causal=True))


def test_float64_and_disabled_autocast_are_left_alone():
    q, k, v = _inputs("cpu", (torch.float64,) * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stop_graddable_attn(q, k, v, causal=True).dtype == torch.float64  # autocast never casts float64
        q32, k32 = q.detach().float(), k.detach().float()
        with pytest.raises(TypeError, match="after torch.autocast's cast"):
            stop_graddable_attn(q32, k32, v, causal=True)  # bfloat16, bfloat16, float64
    q, k, v = _inputs("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert stop_graddable_attn(q, k, v).dtype == torch.float32
    if torch.cuda.is_available():  # a CUDA region does not touch CPU tensors
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert stop_graddable_attn(q, k, v).dtype == torch.float32


def test_torch_compile_under_autocast(device):
    q, k, v = _inputs(device)
    masks = _masks(device)
    fn = torch.compile(lambda q, k, v: stop_graddable_attn(q, k, v, causal=True, **masks), fullgraph=True,
                       backend="aot_eager")
    grad_out = torch.randn(q.shape).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    exp_out, exp_grads = _by_hand(q, k, v, torch.bfloat16, grad_out, causal=True, **masks)
    assert out.dtype == torch.bfloat16 and torch.equal(out, exp_out)
    for got, exp in zip(grads, exp_grads):
        assert got.dtype == torch.float32 and torch.equal(got, exp.float())


def test_other_devices_still_get_the_devices_error():
    """Autocast is asked about q's device only for the op's devices: a meta tensor gets the
    "supported devices" error, not autocast's "unknown device type"."""
    q = torch.randn(1, 1, 4, 16, device="meta")
    with pytest.raises(ValueError, match="supported devices: cpu, cuda"):
        stop_graddable_attn(q, q, q)
    with pytest.raises(TypeError, match="same dtype, got torch.float32, torch.float32, torch.float16$"):
        stop_graddable_attn(q, q, q.half())
    # k on another device under a CPU region: the devices error, not a dtype error (only q's
    # device type is cast)
    q_cpu = torch.randn(1, 1, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="same device"):
        stop_graddable_attn(q_cpu, q, q_cpu)
