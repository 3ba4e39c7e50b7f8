"""vmap rules for the ops: torch.vmap folds its batch dimension into the ops' own batch dimension.

Without these, torch.vmap (and so torch.func's per-sample gradients, vmap(grad(f))) would call the
op once per sample through PyTorch's slow fallback. Here one call covers the whole vmap batch:
a vmapped (B, batch, ...) tensor becomes (B * batch, ...). Unbatched q/k/v-like inputs, and masks
whose batch size is not 1, are expanded over B, which copies them; a mask with batch size 1 (or
fewer than 4 dims) still broadcasts and is not copied.
"""
from __future__ import annotations

import torch


def _logical_batch(q: torch.Tensor, bdim) -> int:
    """The op's batch size: q's first dimension once vmap's is left out (even when B is 0)."""
    return q.shape[0] if bdim is None else q.movedim(bdim, 0).shape[1]


def _fold(x: torch.Tensor, bdim, B: int) -> torch.Tensor:
    """A tensor whose logical shape is (batch, ...) as (B * batch, ...)."""
    x = x.expand(B, *x.shape) if bdim is None else x.movedim(bdim, 0)
    return x.reshape(B * x.shape[1], *x.shape[2:])


def _fold_key_padding(x, bdim, B: int, batch: int):
    """(batch or 1, m) -> (B * batch or 1, m)."""
    if x is None or (bdim is None and x.shape[0] == 1):
        return x
    if bdim is not None:
        x = x.movedim(bdim, 0)
        x = x.expand(B, batch, x.shape[-1])
    else:
        x = x.expand(B, *x.shape)
    return x.reshape(B * batch, x.shape[-1])


def _fold_mask(x, bdim, B: int, batch: int):
    """A mask broadcastable to (batch, heads, n, m): the result broadcasts to (B * batch, ...)."""
    if x is None:
        return x
    if bdim is None:
        if x.dim() < 4 or x.shape[0] == 1:
            return x  # broadcasts over the folded batch as it is
        return x.expand(B, *x.shape).reshape(B * batch, *x.shape[1:])
    x = x.movedim(bdim, 0)
    x = x.reshape(B, *(1,) * (5 - x.dim()), *x.shape[1:])  # (B, batch or 1, heads or 1, n or 1, m or 1)
    return x.expand(B, batch, *x.shape[2:]).reshape(B * batch, *x.shape[2:])


def _check_heads(in_dim) -> None:
    if in_dim is not None:
        raise NotImplementedError("self_reasoning_tokens: torch.vmap over the reasoning pattern's "
                                  "head flags is not supported; vmap over q, k, v or the masks")


def _fwd_rule(info, in_dims, q, k, v, key_padding, attn_mask, q_stop, k_stop, v_stop, causal,
              scale, num_reason_tokens=0, reason_window=0, reason_stop_grad=True, reason_heads=None):
    B = info.batch_size
    _check_heads(in_dims[13] if len(in_dims) > 13 else None)
    batch = _logical_batch(q, in_dims[0])
    q, k, v = (_fold(t, d, B) for t, d in zip((q, k, v), in_dims[:3]))
    key_padding = _fold_key_padding(key_padding, in_dims[3], B, batch)
    masks = [_fold_mask(t, d, B, batch) for t, d in zip((attn_mask, q_stop, k_stop, v_stop), in_dims[4:8])]
    out, lse = torch.ops.self_reasoning_tokens.attn_fwd(
        q, k, v, key_padding, *masks, causal, scale, num_reason_tokens, reason_window,
        reason_stop_grad, reason_heads)
    return (out.unflatten(0, (B, batch)), lse.unflatten(0, (B, batch))), (0, 0)


def _bwd_rule(info, in_dims, grad_out, q, k, v, out, lse, key_padding, attn_mask, q_stop, k_stop,
              v_stop, causal, scale, num_reason_tokens=0, reason_window=0, reason_stop_grad=True,
              reason_heads=None):
    B = info.batch_size
    _check_heads(in_dims[16] if len(in_dims) > 16 else None)
    batch = _logical_batch(q, in_dims[1])
    grad_out, q, k, v, out, lse = (_fold(t, d, B) for t, d in
                                   zip((grad_out, q, k, v, out, lse), in_dims[:6]))
    key_padding = _fold_key_padding(key_padding, in_dims[6], B, batch)
    masks = [_fold_mask(t, d, B, batch) for t, d in zip((attn_mask, q_stop, k_stop, v_stop), in_dims[7:11])]
    grads = torch.ops.self_reasoning_tokens.attn_bwd(
        grad_out.contiguous(), q, k, v, out, lse, key_padding, *masks, causal, scale,
        num_reason_tokens, reason_window, reason_stop_grad, reason_heads)
    return tuple(g.unflatten(0, (B, batch)) for g in grads), (0, 0, 0)


def register() -> None:
    torch.library.register_vmap("self_reasoning_tokens::attn_fwd", _fwd_rule)
    torch.library.register_vmap("self_reasoning_tokens::attn_bwd", _bwd_rule)
