"""``stop_graddable_attn``: attention whose backward takes per-element q/k/v stop-gradient masks.

Semantics (SPEC 2). Allowed(i, j) = causal(i, j) and attn_mask(i, j) and mask(b, j), where
causal(i, j) = ``j <= i + (m - n)`` (bottom-right aligned). Forward is ordinary softmax attention
over allowed keys; a row with no allowed key outputs 0 and gets zero gradients (a NaN score of
an allowed pair is not such a row: it propagates, as in the reference). In the backward,
each of q, k and v has its own pass-through factor per element (i, j): for a bool stop mask
F = 0 where True (stop) and 1 where False; for a floating mask F is the mask value (a gradient
scale); without a mask F = 1::

    dV_j = sum_i Fv_ij P_ij dO_i
    dS_ij = P_ij (dO_i . v_j - D_i),   D_i = dO_i . O_i
    dQ_i = scale sum_j Fq_ij dS_ij k_j
    dK_j = scale sum_i Fk_ij dS_ij q_i
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _ops
from .reasoning import ReasoningPattern, _check_bool, _type_name

__all__ = ["stop_graddable_attn"]

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_HEAD_DIMS = (32, 64, 96, 128)


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_dense_tensor(name: str, t, optional: bool = False) -> None:
    """t is a strided torch.Tensor (sparse layouts would reach the dispatcher's "Could not run")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {_type_name(t)}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                        "convert it with .to_dense()")


def _autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is on for one of the op's device types (torch raises for some others)."""
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _autocast_inputs(q, k, v):
    """q, k, v as the op computes them under ``torch.autocast``: like SDPA's (which autocast runs
    in the lower-precision dtype on CPU and CUDA), every floating tensor other than float64 on the
    autocast-enabled device type of q is cast to the autocast dtype, so that q, k and v of mixed
    dtypes (e.g. float32 q and k from a rotary embedding, bfloat16 v) work as they do with SDPA.
    Outside autocast nothing is cast (mixed dtypes then raise). The casts are differentiable:
    the gradients come back in the inputs' own dtypes."""
    if not isinstance(q, torch.Tensor) or not _autocast_on(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.device.type == q.device.type
                 and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (q, k, v))


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_dense_tensor(name, t)
    for name, t, letter in (("q", q, "n"), ("k", k, "m"), ("v", v, "m")):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, {letter}, head_dim), "
                             f"got a {t.dim()}-d tensor of shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (float32, float64, bfloat16 or "
                            f"float16), got {t.dtype}")
    if not (q.device == k.device == v.device):  # (first: autocast casts only q's device type)
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        after = " (after torch.autocast's cast, which leaves float64 as it is)" if _autocast_on(q.device.type) else ""
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}{after}")
    b, h, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k and v must have q's batch size {b}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != h or v.shape[1] != h:
        raise ValueError(f"k and v must have q's number of heads {h}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"k and v must have q's head_dim {d}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many positions as k ({k.shape[2]}), got v {tuple(v.shape)}")
    if q.device.type == "cpu":
        if q.dtype not in _CPU_DTYPES:
            raise TypeError(f"q, k, v dtype {q.dtype} is not supported on CPU; supported: {_names(_CPU_DTYPES)}")
    elif q.device.type == "cuda":
        if q.dtype not in _CUDA_DTYPES:
            raise TypeError(f"q, k, v dtype {q.dtype} is not supported on CUDA; supported: {_names(_CUDA_DTYPES)}")
        if d not in CUDA_HEAD_DIMS:
            raise ValueError(f"head_dim {d} of q, k, v is not supported on CUDA; supported head dims: "
                             f"{', '.join(map(str, CUDA_HEAD_DIMS))}")
    else:
        raise ValueError(f"q, k, v are on device {q.device}; supported devices: cpu, cuda")


def _check_mask4(name: str, t, q, full, allow_float: bool) -> None:
    if t is None:
        return
    _check_dense_tensor(name, t, optional=True)
    if allow_float:
        if not (t.dtype == torch.bool or t.is_floating_point()):
            raise TypeError(f"{name} must be a bool tensor (True = stop gradient) or a floating tensor "
                            f"(a gradient factor), got {t.dtype}")
    elif t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = may attend), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    shape = tuple(t.shape)
    ok = len(shape) <= 4 and all(s == 1 or s == f for s, f in zip(shape, full[4 - len(shape):]))
    if not ok:
        raise ValueError(f"{name} must broadcast to (batch, heads, n, m) = {tuple(full)}, "
                         f"e.g. (n, m), (heads, n, m) or (batch, heads, n, m); got shape {shape}")


def _check_key_padding(mask, q, b, m) -> None:
    if mask is None:
        return
    _check_dense_tensor("mask", mask, optional=True)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask (key padding) must be a bool tensor (True = real key), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"mask must be on q's device {q.device}, got {mask.device}")
    if mask.dim() != 2 or mask.shape[1] != m or mask.shape[0] not in (1, b):
        raise ValueError(f"mask (key padding) must have shape (batch, m) = ({b}, {m}), got {tuple(mask.shape)}")


def stop_graddable_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor] = None,
                        attn_mask: Optional[torch.Tensor] = None,
                        causal: bool = False,
                        q_stop_grad_mask: Optional[torch.Tensor] = None,
                        k_stop_grad_mask: Optional[torch.Tensor] = None,
                        v_stop_grad_mask: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None,
                        reasoning: Optional[ReasoningPattern] = None) -> torch.Tensor:
    """Attention with separate per-element stop-gradient masks for q, k and v.

    Args:
        q: (batch, heads, n, head_dim) queries.
        k, v: (batch, heads, m, head_dim) keys and values (same dtype and device as q; under
            ``torch.autocast`` they and q are cast to the autocast dtype first, as SDPA's are:
            float64 is not cast, gradients come back in the inputs' dtypes).
        mask: optional bool (batch, m) key padding, True = real key.
        attn_mask: optional bool mask broadcastable to (batch, heads, n, m), True = may attend.
        causal: bottom-right aligned causal masking, ``j <= i + (m - n)``.
        q_stop_grad_mask, k_stop_grad_mask, v_stop_grad_mask: optional masks broadcastable to
            (batch, heads, n, m). bool: True stops the gradient through that (i, j) entry;
            floating: the entry's gradient is multiplied by the value. Read through strides
            (broadcast dims are never expanded in memory). They never change the forward.
        scale: softmax scale, default head_dim ** -0.5.
        reasoning: optional :class:`ReasoningPattern` evaluated inside the kernels (no mask memory).

    Returns:
        (batch, heads, n, head_dim) tensor. Rows with no allowed key are 0 (never NaN).

    The CUDA backward adds dQ from all key tiles at once with fp32 atomics, so dQ's last bits
    vary between runs; under ``torch.use_deterministic_algorithms(True)`` it switches to a
    deterministic schedule (same bits every run, up to 8 fp32 copies of dQ of extra memory). The
    CPU kernels and the forward are always deterministic.

    Works under ``torch.compile`` and ``torch.func`` (grad, vjp, jacrev, vmap; per-sample
    gradients with ``vmap(grad(f))``, one kernel call for the whole vmap batch). Double backward
    and forward-mode AD (jvp, jacfwd, ``torch.autograd.forward_ad``) raise.

    Example::

        q, k, v = (torch.randn(1, 2, 6, 16, requires_grad=True) for _ in range(3))
        stop_v = torch.zeros(6, 6, dtype=torch.bool); stop_v[:, 0] = True  # no dV for key 0
        out = stop_graddable_attn(q, k, v, causal=True, v_stop_grad_mask=stop_v)
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_qkv(q, k, v)
    b, h, n, d = q.shape
    m = k.shape[2]
    causal = _check_bool("causal", causal)
    if scale is None:
        scale = d ** -0.5 if d > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not torch.compiler.is_compiling() and not math.isfinite(float(scale)):
        # eager only: under torch.compile a scale that changes between calls is a symbolic float,
        # which math.isfinite cannot trace (as in Transformer._check_tokens)
        raise ValueError(f"scale must be finite, got {scale}")
    full = (b, h, n, m)
    _check_key_padding(mask, q, b, m)
    _check_mask4("attn_mask", attn_mask, q, full, allow_float=False)
    _check_mask4("q_stop_grad_mask", q_stop_grad_mask, q, full, allow_float=True)
    _check_mask4("k_stop_grad_mask", k_stop_grad_mask, q, full, allow_float=True)
    _check_mask4("v_stop_grad_mask", v_stop_grad_mask, q, full, allow_float=True)
    if reasoning is not None and not isinstance(reasoning, ReasoningPattern):
        raise TypeError(f"reasoning must be a ReasoningPattern or None, got {type(reasoning).__name__}")

    _ops.require_extension()
    if q.device.type == "cuda" and not _ops.cuda_kernels_available():
        raise RuntimeError("self_reasoning_tokens was built without its CUDA kernels; rebuild with a "
                           "CUDA build of torch and nvcc on PATH (or FORCE_CUDA=1)")
    R = W = 0
    stop_grad = True
    heads = None
    if reasoning is not None:
        R, W, stop_grad = reasoning.num_reason_tokens, reasoning.num_steps_future_can_use_reason, reasoning.stop_grad
        # The op takes int64. Any R or W past the positions there can be gives the same pattern
        # (R: every position after the first is step 0's; W: every later step), so a larger one
        # (a Python int has no bound) is taken as 2**62, which R + 1 cannot overflow.
        R, W = min(R, 2**62), min(W, 2**62)
        heads = reasoning.head_flags(h, q.device)
    masks = [None if t is None else t.detach()
             for t in (mask, attn_mask, q_stop_grad_mask, k_stop_grad_mask, v_stop_grad_mask)]
    out, _lse = _ops.attn_fwd(q, k, v, *masks, causal, float(scale), R, W, stop_grad, heads)
    return out
