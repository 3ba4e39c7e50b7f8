"""The reasoning-token layout and pattern (SPEC 3).

A sequence of L real tokens with R reasoning tokens after each becomes N = L*(R+1) positions
``[x_0, r_1..r_R, x_1, r_1..r_R, ...]``. Position p has step ``p // (R+1)`` and is a reasoning
token iff ``p % (R+1) != 0``. With W = num_steps_future_can_use_reason the *region* is::

    region(i, j) = is_reason(j) and step(i) > step(j) and step(i) - W <= step(j)

i.e. the reasoning tokens of the W steps just before query i's step. In stop-grad mode the keys
and values of region entries get no gradient (the next W steps cannot train a reasoning token);
in hard mode region entries are masked out of attention.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = ["ReasoningPattern", "reasoning_stop_grad_mask", "reasoning_region"]


def reasoning_region(n_queries: int, n_keys: int, num_reason_tokens: int,
                     num_steps_future_can_use_reason: int, device=None) -> torch.Tensor:
    """Dense bool (n_queries, n_keys) region where query i sits at absolute position
    ``i + n_keys - n_queries`` (the KV-cache convention)."""
    period = num_reason_tokens + 1
    qpos = torch.arange(n_queries, device=device) + (n_keys - n_queries)
    kpos = torch.arange(n_keys, device=device)
    qstep = (qpos // period)[:, None]
    kstep = (kpos // period)[None, :]
    is_reason = (kpos % period != 0)[None, :]
    return is_reason & (qstep > kstep) & (qstep - num_steps_future_can_use_reason <= kstep)


def reasoning_stop_grad_mask(seq_len: int, num_reason_tokens: int,
                             num_steps_future_can_use_reason: int, device=None) -> torch.Tensor:
    """The region as a dense bool (N, N) tensor, N = seq_len * (num_reason_tokens + 1).

    True marks (query, key) pairs whose key/value gradient is stopped (stop-grad mode) or that
    are masked out (hard mode). Memory is O(N^2): the kernels evaluate the same pattern from
    indices instead (pass a :class:`ReasoningPattern`).
    """
    _check_count("seq_len", seq_len, minimum=0)
    _check_count("num_reason_tokens", num_reason_tokens, minimum=0)
    _check_count("num_steps_future_can_use_reason", num_steps_future_can_use_reason, minimum=0)
    n = seq_len * (num_reason_tokens + 1)
    return reasoning_region(n, n, num_reason_tokens, num_steps_future_can_use_reason, device)


def _type_name(value) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _check_count(name: str, value, minimum: int) -> int:
    """An integer >= minimum (a Python int or another Integral such as a NumPy int), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_bool(name: str, value) -> bool:
    """A Python bool, or a NumPy bool scalar (taken as one); anything else is a TypeError."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_type_name(value)}")


@dataclass(frozen=True)
class ReasoningPattern:
    """The reasoning-token pattern, evaluated inside the kernels from indices (no mask memory).

    Args:
        num_reason_tokens: R, reasoning tokens after every real token.
        num_steps_future_can_use_reason: W, how many following steps are kept from training a
            reasoning token (stop-grad mode) or from seeing it (hard mode).
        stop_grad: True (default): plain causal forward, k/v gradients stopped on the region.
            False: the region is masked out of attention.
        heads: optional head indices (or a bool mask over heads) the pattern applies to; the
            other heads attend and learn as without reasoning tokens. None = all heads.

    Pass it as ``stop_graddable_attn(..., reasoning=pattern)``; the result equals what dense
    masks from :func:`reasoning_stop_grad_mask` give.
    """

    num_reason_tokens: int
    num_steps_future_can_use_reason: int
    stop_grad: bool = True
    heads: Optional[Union[Sequence[int], torch.Tensor]] = None

    def __post_init__(self):
        set_ = lambda field, value: object.__setattr__(self, field, value)  # noqa: E731 (frozen)
        set_("num_reason_tokens", _check_count("num_reason_tokens", self.num_reason_tokens, minimum=0))
        set_("num_steps_future_can_use_reason", _check_count(
            "num_steps_future_can_use_reason", self.num_steps_future_can_use_reason, minimum=0))
        set_("stop_grad", _check_bool("stop_grad", self.stop_grad))
        if self.heads is not None and not isinstance(self.heads, torch.Tensor):
            if isinstance(self.heads, (str, bytes)) or not isinstance(self.heads, Iterable):
                raise TypeError("heads must be a sequence of head indices or a bool tensor over the heads, "
                                f"got {_type_name(self.heads)} {self.heads!r}")
            set_("heads", tuple(_check_count("heads entries", h, minimum=0) for h in self.heads))

    # Equality and hashing by what the pattern does. The dataclass's own would compare the fields
    # as a tuple, and a tensor of head flags has no single truth value (``==`` raised). Sequences
    # of head indices are equal when they name the same heads (order and repeats aside); tensors
    # of flags when they hold the same values; a tensor and a sequence never (the sequence applies
    # to any head count, the tensor to its own). A tensor hashes by its dtype and shape only: it
    # can be changed in place, and equal patterns must keep equal hashes.
    def _heads_key(self):
        heads = self.heads
        if isinstance(heads, torch.Tensor):
            return ("tensor", heads.dtype, tuple(heads.shape))
        return None if heads is None else frozenset(heads)

    def __eq__(self, other):
        if not isinstance(other, ReasoningPattern):
            return NotImplemented
        if (self.num_reason_tokens, self.num_steps_future_can_use_reason, self.stop_grad,
                self._heads_key()) != (other.num_reason_tokens, other.num_steps_future_can_use_reason,
                                       other.stop_grad, other._heads_key()):
            return False
        a, b = self.heads, other.heads
        return not isinstance(a, torch.Tensor) or torch.equal(a.detach().cpu(), b.detach().cpu())

    def __hash__(self):
        return hash((self.num_reason_tokens, self.num_steps_future_can_use_reason, self.stop_grad,
                     self._heads_key()))

    def head_flags(self, num_heads: int, device) -> Optional[torch.Tensor]:
        """(num_heads,) bool tensor of the heads the pattern applies to, or None for all."""
        if self.heads is None:
            return None
        if isinstance(self.heads, torch.Tensor):
            if self.heads.dtype != torch.bool or self.heads.shape != (num_heads,):
                raise ValueError(f"reasoning.heads as a tensor must be bool of shape ({num_heads},), "
                                 f"got {self.heads.dtype} {tuple(self.heads.shape)}")
            return self.heads.to(device).contiguous()
        flags = torch.zeros(num_heads, dtype=torch.bool)
        for h in self.heads:
            if h >= num_heads:
                raise ValueError(f"reasoning.heads entry {h} is out of range for {num_heads} heads")
            flags[h] = True
        return flags.to(device)

    def region(self, n_queries: int, n_keys: int, num_heads: int, device=None) -> torch.Tensor:
        """Dense region, (n_queries, n_keys) or (num_heads, n_queries, n_keys) with a head subset.
        For references and tests; the kernels never build it."""
        reg = reasoning_region(n_queries, n_keys, self.num_reason_tokens,
                               self.num_steps_future_can_use_reason, device)
        flags = self.head_flags(num_heads, device)
        if flags is None:
            return reg
        return reg[None] & flags[:, None, None]
