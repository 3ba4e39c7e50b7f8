"""Loads the compiled library and registers fake kernels and autograd for its ops.

The ops themselves (schemas and CPU/CUDA kernels) are defined in C++ (csrc/ops.cpp); importing
the pybind11 module `self_reasoning_tokens._C` loads the shared library, which registers them in
the dispatcher as torch.ops.self_reasoning_tokens.attn_fwd / attn_bwd.
"""
from __future__ import annotations

import importlib.machinery
import warnings
from pathlib import Path

import torch


def _why_not_loaded(error: ImportError) -> str:
    """Python's ImportError for a missing extension reads like a circular import ("cannot import
    name '_C' from partially initialized module"); say plainly when the library is simply not built."""
    here = Path(__file__).parent
    if not any((here / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return f"it is not built: no _C{importlib.machinery.EXTENSION_SUFFIXES[0]} in {here}"
    return f"{type(error).__name__}: {error}"  # built, but it does not load (e.g. built against another torch)


try:
    from . import _C  # noqa: F401  (loading registers the ops)

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as e:  # the package still imports; calling an op then raises a clear error
    HAS_EXTENSION = False
    EXTENSION_ERROR = _why_not_loaded(e)
    warnings.warn(
        "self_reasoning_tokens: the compiled extension self_reasoning_tokens._C could not be "
        f"loaded ({EXTENSION_ERROR}). Build it with `pip install --no-build-isolation .` or "
        "`python setup.py build_ext --inplace`. Only the pure-PyTorch reference is available.",
        RuntimeWarning,
        stacklevel=2,
    )


def require_extension() -> None:
    if not HAS_EXTENSION:
        raise RuntimeError(
            "self_reasoning_tokens: the compiled extension is not available "
            f"({EXTENSION_ERROR}); build it with `pip install --no-build-isolation .`"
        )


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_kernels_available() -> bool:
    """Whether the library was compiled with its CUDA kernels."""
    return HAS_EXTENSION and bool(torch.ops.self_reasoning_tokens.compiled_with_cuda())


if HAS_EXTENSION:
    ops = torch.ops.self_reasoning_tokens

    @torch.library.register_fake("self_reasoning_tokens::attn_fwd")
    def _attn_fwd_fake(q, k, v, key_padding, attn_mask, q_stop_grad_mask, k_stop_grad_mask,
                       v_stop_grad_mask, causal, scale, num_reason_tokens=0, reason_window=0,
                       reason_stop_grad=True, reason_heads=None):
        torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=lse_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("self_reasoning_tokens::attn_bwd")
    def _attn_bwd_fake(grad_out, q, k, v, out, lse, key_padding, attn_mask, q_stop_grad_mask,
                       k_stop_grad_mask, v_stop_grad_mask, causal, scale, num_reason_tokens=0,
                       reason_window=0, reason_stop_grad=True, reason_heads=None):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format))

    def _setup_context(ctx, inputs, output):
        (q, k, v, key_padding, attn_mask, q_stop, k_stop, v_stop, causal, scale,
         num_reason_tokens, reason_window, reason_stop_grad, reason_heads) = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, key_padding, attn_mask, q_stop, k_stop, v_stop,
                              reason_heads)
        ctx.flags = (causal, scale, num_reason_tokens, reason_window, reason_stop_grad)

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, key_padding, attn_mask, q_stop, k_stop, v_stop, reason_heads = ctx.saved_tensors
        causal, scale, num_reason_tokens, reason_window, reason_stop_grad = ctx.flags
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = attn_bwd(grad_out.contiguous(), q, k, v, out, lse, key_padding,
                              attn_mask, q_stop, k_stop, v_stop, causal, scale,
                              num_reason_tokens, reason_window, reason_stop_grad, reason_heads)
        # Masks (even floating ones) are constants: they receive no gradient.
        return (dq, dk, dv) + (None,) * 11

    torch.library.register_autograd("self_reasoning_tokens::attn_fwd", _backward,
                                    setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError("self_reasoning_tokens: double backward through attention is not supported")

    def _bwd_setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd("self_reasoning_tokens::attn_bwd", _no_double_backward,
                                    setup_context=_bwd_setup_context)

    from . import _batching

    _batching.register()

    # torch.func (grad, vjp, jacrev, vmap of a gradient) refuses the autograd.Function that
    # register_autograd generates, because it has no setup_context ("In order to use an
    # autograd.Function with functorch transforms ..."). While a torch.func transform is active
    # the ops therefore run through these two Functions, which carry the same autograd formulas
    # in the setup_context form. Everywhere else (eager autograd, torch.compile, opcheck) the ops
    # are called directly, through the dispatcher's registered autograd.
    class _AttnFwdForFunc(torch.autograd.Function):
        generate_vmap_rule = True  # under vmap, forward and backward call the ops' vmap rules (_batching)

        @staticmethod
        def forward(*inputs):
            return ops.attn_fwd(*inputs)

        setup_context = staticmethod(_setup_context)
        backward = staticmethod(_backward)

    class _AttnBwdForFunc(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*inputs):
            return ops.attn_bwd(*inputs)

        setup_context = staticmethod(_bwd_setup_context)
        backward = staticmethod(_no_double_backward)

    # Under torch.compile, Dynamo traces these Functions inside a torch.func transform into an
    # internal error (torch 2.13), so there the call is left to eager mode: a graph break, after
    # which the transform runs eagerly around it. Without a transform nothing changes.
    @torch.compiler.disable
    def _fwd_for_func(*inputs):
        return _AttnFwdForFunc.apply(*inputs)

    @torch.compiler.disable
    def _bwd_for_func(*inputs):
        return _AttnBwdForFunc.apply(*inputs)

    def _refuse_forward_ad(q, k, v) -> None:
        # The op has no forward-mode formula, and a register_autograd op drops tangents without a
        # word (torch.autograd.forward_ad, torch.func.linearize): refuse instead. torch.func.jvp,
        # jacfwd and hessian make dual tensors too, so they stop here with the same message.
        if torch.autograd.forward_ad._current_level >= 0 and any(
                torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in (q, k, v)):
            raise NotImplementedError(
                "self_reasoning_tokens: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp, "
                "jacfwd, linearize, hessian) through attention is not supported; use reverse mode "
                "(backward, torch.autograd.grad, torch.func.grad/vjp/jacrev)")

    def attn_fwd(*inputs):
        """torch.ops.self_reasoning_tokens.attn_fwd, usable inside torch.func transforms too."""
        _refuse_forward_ad(*inputs[:3])
        if torch._C._are_functorch_transforms_active():
            return _fwd_for_func(*inputs)
        return ops.attn_fwd(*inputs)

    def attn_bwd(*inputs):
        """torch.ops.self_reasoning_tokens.attn_bwd, usable inside torch.func transforms too."""
        if torch._C._are_functorch_transforms_active():
            return _bwd_for_func(*inputs)
        return ops.attn_bwd(*inputs)
