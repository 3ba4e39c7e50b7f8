"""Exact key/value stop-gradients with FlexAttention: the "detached-KV" construction.

FlexAttention (``torch.nn.attention.flex_attention``) takes a mask and a score modification but
no gradient masks. Per-element k/v stop-gradients can still be expressed exactly by doubling the
keys and values::

    K' = [k ; k.detach()]        V' = [v ; v.detach()]        (2m positions)

and a ``mask_mod`` that shows every visible key j to query i exactly once: through its live copy
(index j) where the gradient flows, through its detached copy (index m + j) where it is stopped.
Each query then sees the same set of (score, value) pairs as plain attention, so the forward and
the query gradient are unchanged, while dK_j and dV_j only collect the terms of the queries that
use the live copy. This is SPEC 2 with Fq = 1 and Fk = Fv = not stopped(i, j).

The stop pattern is a predicate ``stopped(b, h, q_idx, kv_idx)`` written as index arithmetic (it
is evaluated on index tensors, never materialised as an n x n tensor by this module):
:func:`reasoning_stopped` is the reasoning region of SPEC 3, the pattern that
``stop_graddable_attn(..., reasoning=ReasoningPattern(R, W, stop_grad=True))`` applies.
:func:`build_block_mask` makes the ``BlockMask`` by evaluating the mask_mod in bounded row chunks
(no dense Q x KV mask, unlike an uncompiled ``create_block_mask``).

    stopped = reasoning_stopped(3, 4)
    mask_mod = stopgrad_mask_mod(stopped, n, n)
    block_mask = build_block_mask(mask_mod, n, 2 * n, device="cuda")
    attn = torch.compile(flex_stopgrad_attention)
    out = attn(q, k, v, block_mask)          # forward = causal attention; k/v grads stopped

Used by benchmarks/bench_gpu.py (contender (e)); its exactness is tested on the CPU in
tests/test_flex_stopgrad.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["reasoning_stopped", "stopgrad_mask_mod", "detached_kv", "flex_stopgrad_attention",
           "build_block_mask", "evaluate_mask_mod"]

Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reasoning_stopped(num_reason_tokens: int, num_steps_future_can_use_reason: int,
                      q_offset: int = 0) -> Predicate:
    """``stopped(b, h, q_idx, kv_idx)`` = the reasoning region of SPEC 3 by index arithmetic.

    Query ``q_idx`` sits at absolute position ``q_idx + q_offset`` (``q_offset = m - n`` with a
    KV cache, as in the op). True where the key/value gradient is stopped.
    """
    period = num_reason_tokens + 1
    window = num_steps_future_can_use_reason

    def stopped(b, h, q_idx, kv_idx):
        q_step = (q_idx + q_offset) // period
        kv_step = kv_idx // period
        return (kv_idx % period != 0) & (q_step > kv_step) & (q_step - window <= kv_step)

    return stopped


def stopgrad_mask_mod(stopped: Predicate, n_queries: int, n_keys: int, causal: bool = True):
    """mask_mod over the doubled keys [0, 2 * n_keys): index j < n_keys is key j's live copy,
    index n_keys + j its detached copy. Key j is visible to query i when causal allows it
    (``j <= i + n_keys - n_queries``, bottom-right aligned as the op); it is shown through the
    detached copy iff ``stopped(b, h, i, j)``, else through the live copy."""
    offset = n_keys - n_queries

    def mask_mod(b, h, q_idx, kv_idx):
        live = kv_idx < n_keys
        j = torch.where(live, kv_idx, kv_idx - n_keys)
        st = stopped(b, h, q_idx, j)
        through_this_copy = torch.where(live, ~st, st)
        if not causal:
            return through_this_copy
        return through_this_copy & (j <= q_idx + offset)

    return mask_mod


def detached_kv(k: torch.Tensor, v: torch.Tensor):
    """K' = [k; k.detach()], V' = [v; v.detach()] along the sequence dimension."""
    return torch.cat([k, k.detach()], dim=-2), torch.cat([v, v.detach()], dim=-2)


def flex_unavailable_reason() -> Optional[str]:
    """None when this torch's FlexAttention has what this construction uses, else why not:
    torch.nn.attention.flex_attention (torch 2.5 on), and BlockMask.from_kv_blocks taking
    seq_lengths, which build_block_mask passes (torch 2.5.1 has no such argument)."""
    import inspect

    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as e:
        return f"torch {torch.__version__} has no FlexAttention ({e})"
    if "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        return (f"torch {torch.__version__}'s FlexAttention is too old for this construction "
                "(BlockMask.from_kv_blocks takes no seq_lengths)")
    return None


def flex_stopgrad_attention(q, k, v, block_mask, scale: Optional[float] = None, attention=None):
    """flex_attention on the doubled keys/values with ``block_mask`` (from :func:`build_block_mask`
    over :func:`stopgrad_mask_mod`). Wrap in ``torch.compile`` for the fused kernels; ``attention``
    replaces ``flex_attention`` (tests pass a dense implementation)."""
    if attention is None:
        from torch.nn.attention.flex_attention import flex_attention as attention
    k2, v2 = detached_kv(k, v)
    return attention(q, k2, v2, block_mask=block_mask, scale=scale)


def evaluate_mask_mod(mask_mod, q_idx: torch.Tensor, kv_idx: torch.Tensor, b=0, h=0) -> torch.Tensor:
    """The mask_mod on the broadcast grid q_idx[:, None] x kv_idx[None, :] (bool)."""
    dev = q_idx.device
    bt = torch.as_tensor(b, device=dev)
    ht = torch.as_tensor(h, device=dev)
    out = mask_mod(bt, ht, q_idx[:, None], kv_idx[None, :])
    return torch.broadcast_to(out, (q_idx.numel(), kv_idx.numel()))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def build_block_mask(mask_mod, Q_LEN: int, KV_LEN: int, device=None, B: Optional[int] = None,
                     H: Optional[int] = None, BLOCK_SIZE: int = 128, max_chunk_elems: int = 1 << 28):
    """A FlexAttention ``BlockMask`` for ``mask_mod``, classifying every (q block, kv block) as
    empty, partial or full like ``create_block_mask(..., separate_full_blocks=True)``, but
    evaluating the mask_mod a chunk of query rows at a time (at most ``max_chunk_elems`` grid
    entries at once), so no Q_LEN x KV_LEN tensor is ever held. B / H None: one mask shared by
    all batches / heads (the mask_mod is evaluated with b = h = 0)."""
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device) if device is not None else torch.device("cpu")
    nb, nh = B or 1, H or 1
    qbs = kbs = int(BLOCK_SIZE)
    n_qb, n_kb = _ceil_div(Q_LEN, qbs), _ceil_div(KV_LEN, kbs)
    kv_pad = n_kb * kbs
    rows = max(1, max_chunk_elems // (kv_pad * qbs)) * qbs
    kv_idx = torch.arange(kv_pad, device=device)
    kv_valid = kv_idx < KV_LEN
    counts = torch.empty(nb, nh, n_qb, n_kb, dtype=torch.int32, device=device)
    for b in range(nb):
        for h in range(nh):
            for r0 in range(0, n_qb * qbs, rows):
                r1 = min(r0 + rows, n_qb * qbs)
                q_idx = torch.arange(r0, r1, device=device)
                m = evaluate_mask_mod(mask_mod, q_idx, kv_idx, b, h)
                m = m & (q_idx < Q_LEN)[:, None] & kv_valid[None, :]
                counts[b, h, r0 // qbs:r1 // qbs] = (
                    m.view((r1 - r0) // qbs, qbs, n_kb, kbs).sum(dim=(1, 3), dtype=torch.int32))
                del m
    full = counts == qbs * kbs  # padded entries count as masked, so edge blocks are never full
    partial = (counts > 0) & ~full

    def ordered(blocks):  # (num blocks per row, their kv block indices first)
        num = blocks.sum(dim=-1, dtype=torch.int32)
        idx = torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_ind = ordered(partial)
    full_num, full_ind = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_ind, full_num, full_ind, BLOCK_SIZE=(qbs, kbs),
                                    mask_mod=mask_mod, seq_lengths=(Q_LEN, KV_LEN))
