"""Bad input (SPEC 5): every case raises ValueError / TypeError / RuntimeError, before any kernel
runs, with a message that names the offending argument."""
import math

import numpy as np
import pytest
import torch

from self_reasoning_tokens import ReasoningPattern, stop_graddable_attn

B, H, N, M, D = 2, 3, 5, 7, 8
ERRORS = (ValueError, TypeError, RuntimeError)


def good(device="cpu", dtype=torch.float32):
    q = torch.randn(B, H, N, D, device=device, dtype=dtype)
    k = torch.randn(B, H, M, D, device=device, dtype=dtype)
    v = torch.randn(B, H, M, D, device=device, dtype=dtype)
    return q, k, v


def rep(t, **changes):
    """(q, k, v) with some of them replaced."""
    q, k, v = t
    return changes.get("q", q), changes.get("k", k), changes.get("v", v)


def bmask(*shape):
    return torch.rand(*shape) < 0.5


# (id, args builder from good (q, k, v) -> (args, kwargs), exception types, regex naming the argument)
CASES = [
    # q, k, v rank / shape
    ("q_rank3", lambda t: (rep(t, q=t[0][0]), {}), ValueError, r"^q\b"),
    ("q_rank5", lambda t: (rep(t, q=t[0][None]), {}), ValueError, r"^q\b"),
    ("k_rank3", lambda t: (rep(t, k=t[1][0]), {}), ValueError, r"^k\b"),
    ("v_rank2", lambda t: (rep(t, v=t[2][0, 0]), {}), ValueError, r"^v\b"),
    ("k_batch", lambda t: (rep(t, k=torch.randn(B + 1, H, M, D)), {}), ValueError, r"\bk\b.*batch|batch.*\bk\b"),
    ("v_batch", lambda t: (rep(t, v=torch.randn(1, H, M, D)), {}), ValueError, r"\bv\b"),
    ("k_heads", lambda t: (rep(t, k=torch.randn(B, H + 1, M, D)), {}), ValueError, r"\bk\b.*head|head.*\bk\b"),
    ("v_heads", lambda t: (rep(t, v=torch.randn(B, 1, M, D)), {}), ValueError, r"\bv\b"),
    ("k_head_dim", lambda t: (rep(t, k=torch.randn(B, H, M, D + 1)), {}), ValueError, r"head_dim"),
    ("v_head_dim", lambda t: (rep(t, v=torch.randn(B, H, M, D - 1)), {}), ValueError, r"head_dim"),
    ("v_len", lambda t: (rep(t, v=torch.randn(B, H, M + 1, D)), {}), ValueError, r"^v\b"),
    ("v_len_short", lambda t: (rep(t, v=torch.randn(B, H, M - 1, D)), {}), ValueError, r"^v\b"),
    # dtypes
    ("dtype_mismatch_k", lambda t: (rep(t, k=t[1].double()), {}), TypeError, r"dtype"),
    ("dtype_mismatch_v", lambda t: (rep(t, v=t[2].bfloat16()), {}), TypeError, r"dtype"),
    ("int_q", lambda t: (rep(t, q=t[0].long()), {}), TypeError, r"^q\b"),
    ("int_all", lambda t: (tuple(x.int() for x in t), {}), TypeError, r"^q\b"),
    ("int_k", lambda t: (rep(t, k=t[1].to(torch.int32)), {}), TypeError, r"^k\b"),
    ("bool_v", lambda t: (rep(t, v=t[2] > 0), {}), TypeError, r"^v\b"),
    ("complex_q", lambda t: (rep(t, q=t[0].to(torch.complex64)), {}), TypeError, r"^q\b"),
    ("complex_all", lambda t: (tuple(x.to(torch.complex64) for x in t), {}), TypeError, r"^q\b"),
    # non-Tensor arguments
    ("q_list", lambda t: (rep(t, q=t[0].tolist()), {}), TypeError, r"^q\b"),
    ("k_numpy", lambda t: (rep(t, k=t[1].detach().numpy()), {}), TypeError, r"^k\b"),
    ("v_none", lambda t: (rep(t, v=None), {}), TypeError, r"^v\b"),
    ("mask_list", lambda t: (t, {"mask": [[True] * M] * B}), TypeError, r"^mask\b"),
    ("attn_mask_numpy", lambda t: (t, {"attn_mask": np.ones((N, M), dtype=bool)}), TypeError, r"attn_mask"),
    ("q_stop_float", lambda t: (t, {"q_stop_grad_mask": 0.5}), TypeError, r"q_stop_grad_mask"),
    ("k_stop_list", lambda t: (t, {"k_stop_grad_mask": [[0.5] * M] * N}), TypeError, r"k_stop_grad_mask"),
    ("v_stop_str", lambda t: (t, {"v_stop_grad_mask": "all"}), TypeError, r"v_stop_grad_mask"),
    # attn_mask must be bool
    ("attn_mask_float", lambda t: (t, {"attn_mask": torch.ones(N, M)}), TypeError, r"attn_mask"),
    ("attn_mask_int", lambda t: (t, {"attn_mask": torch.ones(N, M, dtype=torch.int64)}), TypeError, r"attn_mask"),
    ("attn_mask_uint8", lambda t: (t, {"attn_mask": torch.ones(N, M, dtype=torch.uint8)}), TypeError, r"attn_mask"),
    # stop masks: bool or floating, never integer / complex
    ("q_stop_int", lambda t: (t, {"q_stop_grad_mask": torch.ones(N, M, dtype=torch.int64)}), TypeError,
     r"q_stop_grad_mask"),
    ("k_stop_uint8", lambda t: (t, {"k_stop_grad_mask": torch.ones(N, M, dtype=torch.uint8)}), TypeError,
     r"k_stop_grad_mask"),
    ("v_stop_int32", lambda t: (t, {"v_stop_grad_mask": torch.zeros(H, N, M, dtype=torch.int32)}), TypeError,
     r"v_stop_grad_mask"),
    ("v_stop_complex", lambda t: (t, {"v_stop_grad_mask": torch.ones(N, M, dtype=torch.complex64)}), TypeError,
     r"v_stop_grad_mask"),
    # non-broadcastable masks
    ("attn_mask_nm_swapped", lambda t: (t, {"attn_mask": bmask(M, N)}), ValueError, r"attn_mask"),
    ("attn_mask_5d", lambda t: (t, {"attn_mask": bmask(1, B, H, N, M)}), ValueError, r"attn_mask"),
    ("attn_mask_batch", lambda t: (t, {"attn_mask": bmask(B + 1, H, N, M)}), ValueError, r"attn_mask"),
    ("q_stop_heads", lambda t: (t, {"q_stop_grad_mask": bmask(H + 1, N, M)}), ValueError, r"q_stop_grad_mask"),
    ("k_stop_rows", lambda t: (t, {"k_stop_grad_mask": torch.rand(N + 1, M)}), ValueError, r"k_stop_grad_mask"),
    ("v_stop_cols", lambda t: (t, {"v_stop_grad_mask": bmask(N, M - 1)}), ValueError, r"v_stop_grad_mask"),
    ("v_stop_1d_wrong", lambda t: (t, {"v_stop_grad_mask": bmask(M + 1)}), ValueError, r"v_stop_grad_mask"),
    # key padding
    ("mask_wrong_m", lambda t: (t, {"mask": bmask(B, M + 1)}), ValueError, r"^mask\b"),
    ("mask_wrong_b", lambda t: (t, {"mask": bmask(B + 1, M)}), ValueError, r"^mask\b"),
    ("mask_3d", lambda t: (t, {"mask": bmask(B, 1, M)}), ValueError, r"^mask\b"),
    ("mask_1d", lambda t: (t, {"mask": bmask(M)}), ValueError, r"^mask\b"),
    ("mask_float", lambda t: (t, {"mask": torch.ones(B, M)}), TypeError, r"^mask\b"),
    ("mask_int", lambda t: (t, {"mask": torch.ones(B, M, dtype=torch.int64)}), TypeError, r"^mask\b"),
    # scale
    ("scale_str", lambda t: (t, {"scale": "0.5"}), TypeError, r"scale"),
    ("scale_bool", lambda t: (t, {"scale": True}), TypeError, r"scale"),
    ("scale_complex", lambda t: (t, {"scale": 1j}), TypeError, r"scale"),
    ("scale_list", lambda t: (t, {"scale": [0.5]}), TypeError, r"scale"),
    ("scale_nan", lambda t: (t, {"scale": float("nan")}), ValueError, r"scale"),
    ("scale_inf", lambda t: (t, {"scale": math.inf}), ValueError, r"scale"),
    ("scale_neg_inf", lambda t: (t, {"scale": -math.inf}), ValueError, r"scale"),
    # causal must be a bool
    ("causal_int", lambda t: (t, {"causal": 1}), TypeError, r"causal"),
    ("causal_str", lambda t: (t, {"causal": "yes"}), TypeError, r"causal"),
    ("causal_none", lambda t: (t, {"causal": None}), TypeError, r"causal"),
    ("causal_tensor", lambda t: (t, {"causal": torch.tensor(True)}), TypeError, r"causal"),
    ("causal_numpy_int", lambda t: (t, {"causal": np.int64(1)}), TypeError, r"causal must be a bool, got numpy\.int64"),
    # sparse tensors: named, not the dispatcher's "Could not run ... SparseCPU"
    ("q_sparse", lambda t: (rep(t, q=t[0].to_sparse()), {}), TypeError, r"^q must be a dense \(strided\) tensor"),
    ("attn_mask_sparse", lambda t: (t, {"attn_mask": bmask(N, M).to_sparse()}), TypeError,
     r"^attn_mask must be a dense"),
    ("k_stop_sparse", lambda t: (t, {"k_stop_grad_mask": torch.rand(N, M).to_sparse()}), TypeError,
     r"^k_stop_grad_mask must be a dense"),
    ("mask_sparse", lambda t: (t, {"mask": bmask(B, M).to_sparse()}), TypeError, r"^mask must be a dense"),
    # reasoning
    ("reasoning_int", lambda t: (t, {"reasoning": 2}), TypeError, r"reasoning"),
    ("reasoning_dict", lambda t: (t, {"reasoning": {"num_reason_tokens": 1}}), TypeError, r"reasoning"),
    ("reasoning_tuple", lambda t: (t, {"reasoning": (1, 2)}), TypeError, r"reasoning"),
    ("reasoning_head_out_of_range", lambda t: (t, {"reasoning": ReasoningPattern(1, 1, heads=[H])}), ValueError,
     r"heads"),
    ("reasoning_heads_tensor_shape",
     lambda t: (t, {"reasoning": ReasoningPattern(1, 1, heads=torch.ones(H + 1, dtype=torch.bool))}), ValueError,
     r"heads"),
    ("reasoning_heads_tensor_dtype",
     lambda t: (t, {"reasoning": ReasoningPattern(1, 1, heads=torch.ones(H, dtype=torch.int64))}), ValueError,
     r"heads"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, build, exc, pattern = case
    args, kwargs = build(good())
    with pytest.raises(exc, match=pattern):
        stop_graddable_attn(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_before_autograd(case):
    """With requires_grad inputs too: the error comes from validation, not from a kernel."""
    _, build, exc, pattern = case
    args, kwargs = build(tuple(x.requires_grad_() for x in good()))
    with pytest.raises(ERRORS, match=pattern):
        stop_graddable_attn(*args, **kwargs)


@pytest.mark.parametrize("kw, pattern", [
    (dict(num_reason_tokens=-1, num_steps_future_can_use_reason=2), r"num_reason_tokens"),
    (dict(num_reason_tokens=1, num_steps_future_can_use_reason=-2), r"num_steps_future_can_use_reason"),
    (dict(num_reason_tokens=1.5, num_steps_future_can_use_reason=2), r"num_reason_tokens"),
    (dict(num_reason_tokens=1, num_steps_future_can_use_reason="2"), r"num_steps_future_can_use_reason"),
    (dict(num_reason_tokens=True, num_steps_future_can_use_reason=2), r"num_reason_tokens"),
    (dict(num_reason_tokens=1, num_steps_future_can_use_reason=2, stop_grad="yes"), r"stop_grad"),
    (dict(num_reason_tokens=1, num_steps_future_can_use_reason=2, heads=[-1]), r"heads"),
    (dict(num_reason_tokens=1, num_steps_future_can_use_reason=2, heads=[0.5]), r"heads"),
    (dict(num_reason_tokens=1, num_steps_future_can_use_reason=2, heads=0), r"heads must be a sequence"),
    (dict(num_reason_tokens=1, num_steps_future_can_use_reason=2, heads="01"), r"heads must be a sequence"),
    (dict(num_reason_tokens=np.float64(1), num_steps_future_can_use_reason=2), r"num_reason_tokens.*numpy\.float64"),
])
def test_bad_reasoning_pattern(kw, pattern):
    with pytest.raises(ERRORS, match=pattern):
        ReasoningPattern(**kw)


# --------------------------------------------------------------------------------------------
# devices ("meta" tensors stand in for a second device on a CPU-only machine)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_qkv_on_different_devices(which):
    t = dict(zip("qkv", good()))
    t[which] = t[which].to("meta")
    with pytest.raises(ERRORS, match=r"device"):
        stop_graddable_attn(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("name", ["mask", "attn_mask", "q_stop_grad_mask", "k_stop_grad_mask", "v_stop_grad_mask"])
def test_mask_on_another_device(name):
    shape = (B, M) if name == "mask" else (N, M)
    m = torch.ones(shape, dtype=torch.bool, device="meta")
    with pytest.raises(ERRORS, match=rf"^{name}\b.*device"):
        stop_graddable_attn(*good(), **{name: m})


def test_unsupported_device():
    with pytest.raises(ERRORS, match=r"device"):
        stop_graddable_attn(*good(device="meta"))


if torch.cuda.is_available():  # GPU-only checks exist only where a GPU does (no skips on CPU)

    @pytest.mark.gpu
    def test_cpu_cuda_mixture():
        q, k, v = good(device="cuda", dtype=torch.float16)
        with pytest.raises(ERRORS, match=r"device"):
            stop_graddable_attn(q, k.cpu(), v)
        with pytest.raises(ERRORS, match=r"attn_mask.*device"):
            stop_graddable_attn(q, k, v, attn_mask=torch.ones(N, M, dtype=torch.bool))

    @pytest.mark.gpu
    @pytest.mark.parametrize("d, dtype, pattern", [(48, torch.float16, r"head_dim"), (64, torch.float64, r"dtype"),
                                                   (16, torch.bfloat16, r"head_dim")])
    def test_cuda_unsupported_dtype_or_head_dim(d, dtype, pattern):
        q = torch.randn(1, 2, 4, d, device="cuda", dtype=dtype)
        with pytest.raises(ERRORS, match=pattern):
            stop_graddable_attn(q, q, q)


# --------------------------------------------------------------------------------------------
# the ops called directly (no Python validation): the C++ checks name the argument too
# --------------------------------------------------------------------------------------------

def fwd_args(**over):
    q, k, v = good()
    args = dict(q=q, k=k, v=v, key_padding=None, attn_mask=None, q_stop=None, k_stop=None, v_stop=None,
                causal=False, scale=0.3, R=0, W=0, stop_grad=True, heads=None)
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize("over, pattern", [
    (dict(attn_mask=torch.ones(N, M)), r"attn_mask"),
    (dict(attn_mask=bmask(M, N)), r"attn_mask"),
    (dict(attn_mask=bmask(1, 1, 1, N, M)), r"attn_mask"),
    (dict(q_stop=torch.ones(N, M, dtype=torch.int64)), r"q_stop_grad_mask"),
    (dict(k_stop=bmask(H + 1, N, M)), r"k_stop_grad_mask"),
    (dict(v_stop=torch.rand(N, M + 2)), r"v_stop_grad_mask"),
    (dict(key_padding=bmask(B, M + 1)), r"mask"),
    (dict(key_padding=torch.ones(B, M)), r"mask"),
    (dict(q=torch.randn(B, H, N)), r"\bq\b"),
    (dict(v=torch.randn(B, H, M + 1, D)), r"\bv\b"),
    (dict(k=torch.randn(B, H, M, D).double()), r"dtype"),
    (dict(R=-1), r"num_reason_tokens"),
    (dict(W=-1), r"num_steps_future_can_use_reason|reason_window"),
    (dict(R=1, W=1, heads=torch.ones(H + 1, dtype=torch.bool)), r"heads"),
])
def test_op_direct_bad_inputs(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.self_reasoning_tokens.attn_fwd(*fwd_args(**over))


def test_op_bwd_direct_bad_inputs():
    q, k, v = good()
    out, lse = torch.ops.self_reasoning_tokens.attn_fwd(q, k, v, None, None, None, None, None, False, 0.3)
    g = torch.randn_like(out)
    common = (None, None, None, None, None, False, 0.3)
    with pytest.raises(RuntimeError, match=r"lse"):
        torch.ops.self_reasoning_tokens.attn_bwd(g, q, k, v, out, lse[:, :, :-1], *common)
    with pytest.raises(RuntimeError, match=r"lse"):
        torch.ops.self_reasoning_tokens.attn_bwd(g, q, k, v, out, lse.double(), *common)
    with pytest.raises(RuntimeError, match=r"grad_out"):
        torch.ops.self_reasoning_tokens.attn_bwd(g[:, :, :-1], q, k, v, out, lse, *common)
    with pytest.raises(RuntimeError, match=r"k_stop_grad_mask"):
        torch.ops.self_reasoning_tokens.attn_bwd(g, q, k, v, out, lse, None, None, None,
                                                 torch.ones(N, M, dtype=torch.int32), None, False, 0.3)


def test_numpy_scalars_are_taken_as_python_ones():
    """NumPy bools and ints (a config loaded with NumPy, say) mean what the Python values mean."""
    q, k, v = good()
    pattern = ReasoningPattern(np.int64(1), np.int32(1), stop_grad=np.bool_(False), heads=np.array([0, 1]))
    assert pattern == ReasoningPattern(1, 1, stop_grad=False, heads=(0, 1))
    assert type(pattern.num_reason_tokens) is int and type(pattern.stop_grad) is bool
    assert all(type(h) is int for h in pattern.heads)
    for causal in (True, False):
        torch.testing.assert_close(stop_graddable_attn(q, k, v, causal=np.bool_(causal), reasoning=pattern),
                                   stop_graddable_attn(q, k, v, causal=causal, reasoning=pattern), rtol=0, atol=0)


def test_good_inputs_pass():
    """The fixtures above are valid: only the changed argument makes a case fail."""
    q, k, v = good()
    out = stop_graddable_attn(q, k, v, mask=bmask(B, M) | True, attn_mask=bmask(N, M) | True, causal=True,
                              q_stop_grad_mask=bmask(H, N, M), k_stop_grad_mask=torch.rand(N, M),
                              v_stop_grad_mask=bmask(B, H, N, M), scale=0.5,
                              reasoning=ReasoningPattern(1, 1, heads=[0]))
    assert out.shape == q.shape and torch.isfinite(out).all()
    out = stop_graddable_attn(q, k, v, mask=bmask(1, M) | True, scale=2)
    assert torch.isfinite(out).all()
