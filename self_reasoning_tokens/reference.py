"""O(n^2) reference of ``stop_graddable_attn``, written from the math of SPEC 2 with autograd.

It is independent of the kernels: it materialises the full (b, h, n, m) score matrix and gets
its gradients from autograd through an *equivalent* formulation whose forward is plain
attention and whose gradients are the masked ones:

    S = scale * sum over (a, c) in {live, detached}^2 of  Fq^a Fk^c  * (q^a  k^c^T)
        with Fq^live = Fq, Fq^detached = 1 - Fq (same for k),
    O = (P * Fv) v + (P * (1 - Fv)) v.detach().

For tests and small problems only; memory grows as n * m.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reasoning import ReasoningPattern

__all__ = ["reference_attention", "stop_factor"]


def stop_factor(mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """Pass-through factor of a stop-gradient mask: bool True -> 0, False -> 1; floats as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return (~mask).to(dtype)
    return mask.to(dtype)


def reference_attention(q, k, v, mask=None, attn_mask=None, causal=False, q_stop_grad_mask=None,
                        k_stop_grad_mask=None, v_stop_grad_mask=None, scale=None,
                        reasoning: Optional[ReasoningPattern] = None, upcast: bool = False):
    """Same arguments and result as :func:`stop_graddable_attn`, computed densely.

    With ``upcast=True`` the math runs in float32 and the result is cast back (the "PyTorch
    low-precision math path" used for tolerance baselines is ``upcast=False`` on half inputs).
    """
    in_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    b, h, n, d = q.shape
    m = k.shape[2]
    dt = q.dtype
    if scale is None:
        scale = d ** -0.5 if d > 0 else 1.0  # as the op: head_dim 0 has all-zero scores
    dev = q.device

    allowed = torch.ones(b, h, n, m, dtype=torch.bool, device=dev)
    if causal:
        i = torch.arange(n, device=dev)[:, None]
        j = torch.arange(m, device=dev)[None, :]
        allowed = allowed & (j <= i + (m - n))
    if attn_mask is not None:
        allowed = allowed & attn_mask
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]

    fq = stop_factor(q_stop_grad_mask, dt)
    fk = stop_factor(k_stop_grad_mask, dt)
    fv = stop_factor(v_stop_grad_mask, dt)
    if reasoning is not None:
        region = reasoning.region(n, m, h, device=dev)
        if reasoning.stop_grad:
            keep = (~region).to(dt)
            fk = keep if fk is None else fk * keep
            fv = keep if fv is None else fv * keep
        else:
            allowed = allowed & ~region

    qd, kd = q.detach(), k.detach()
    fq1 = torch.ones((), dtype=dt, device=dev) if fq is None else fq
    fk1 = torch.ones((), dtype=dt, device=dev) if fk is None else fk
    qk = lambda a, c: torch.einsum("bhid,bhjd->bhij", a, c)  # noqa: E731
    s = (fq1 * fk1 * qk(q, k) + fq1 * (1 - fk1) * qk(q, kd)
         + (1 - fq1) * fk1 * qk(qd, k) + (1 - fq1) * (1 - fk1) * qk(qd, kd))
    s = s * scale

    any_allowed = allowed.any(dim=-1, keepdim=True)
    # rows with no allowed key: fill with 0 (not -inf) so softmax stays finite, then zero them
    s = s.masked_fill(~allowed & any_allowed, float("-inf")).masked_fill(~any_allowed, 0.0)
    p = torch.softmax(s, dim=-1) * any_allowed.to(dt)

    if fv is None:
        out = p @ v
    else:
        out = (p * fv) @ v + (p * (1 - fv)) @ v.detach()
    return out.to(in_dtype)
