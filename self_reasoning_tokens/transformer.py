"""A small decoder-only Transformer that trains self reasoning tokens (SPEC 4).

Same constructor and forward as the seed (lucidrains' self-reasoning-tokens-pytorch), without its
bugs: attention stays causal in the stop-gradient path, and no mask is written in place (the
seed's in-place writes into a shared mask mixed the q, k and v masks).
R learned reasoning tokens follow every real token (SPEC 3 layout); the reasoning pattern is
evaluated inside the attention kernels by default (`attend_impl="kernel"`, O(N) memory), or
built as dense (N, N) masks for the compiled op (`"dense"`) or for the autograd reference
(`"reference"`), which is what the tests and the benchmark compare against.

    model = Transformer(dim=512, depth=4, num_tokens=256, stop_grad_next_tokens_to_reason=True)
    loss = model(x, num_reason_tokens=4, num_steps_future_can_use_reason=16, return_loss=True)
    tokens = model.generate(prompt, 32, num_reason_tokens=4, temperature=0.)
"""
from __future__ import annotations

import math
import numbers
import warnings
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Module, ModuleList
from torch.utils.checkpoint import checkpoint

from .attention import _autocast_on, stop_graddable_attn
from .reasoning import ReasoningPattern, _check_bool, _check_count, reasoning_region, reasoning_stop_grad_mask
from .reference import reference_attention

__all__ = ["CausalAttention", "Transformer", "FeedForward", "ATTEND_IMPLS"]

# kernel:    stop_graddable_attn(..., reasoning=ReasoningPattern)  - pattern from indices, O(N) memory
# dense:     stop_graddable_attn with dense (N, N) masks from reasoning_stop_grad_mask
# reference: the O(N^2) autograd reference_attention with the same dense masks
ATTEND_IMPLS = ("kernel", "dense", "reference")

KVCache = Tuple[torch.Tensor, torch.Tensor]  # k, v: (b, h, m, d) each

# helpers


def exists(v):
    return v is not None


def default(v, d):
    return v if exists(v) else d


def _check_attend_impl(impl):
    if impl not in ATTEND_IMPLS:
        raise ValueError(f"attend_impl must be one of {', '.join(map(repr, ATTEND_IMPLS))}, got {impl!r}")


def dense_reasoning_masks(reasoning: Optional[ReasoningPattern], n: int, m: int, heads: int,
                          device) -> dict:
    """The pattern as dense bool masks (keyword arguments of the attention), for n queries at
    absolute positions m - n .. m - 1 over m keys. Stop-grad mode: k and v stop masks; hard
    mode: attn_mask = ~region. O(n m) memory: this is what the in-kernel pattern avoids."""
    if not exists(reasoning) or reasoning.num_reason_tokens == 0:
        return {}
    R, W = reasoning.num_reason_tokens, reasoning.num_steps_future_can_use_reason
    if n == m and n % (R + 1) == 0:
        region = reasoning_stop_grad_mask(n // (R + 1), R, W, device=device)  # (N, N)
    else:
        region = reasoning_region(n, m, R, W, device=device)                 # (n, m), KV cache
    flags = reasoning.head_flags(heads, device)
    if exists(flags):
        region = region[None] & flags[:, None, None]                           # (h, n, m)
    if reasoning.stop_grad:  # read-only and shared by k and v: the kernels never write to masks
        return dict(k_stop_grad_mask=region, v_stop_grad_mask=region)
    return dict(attn_mask=~region)


# modules


def FeedForward(dim, mult=4):
    dim_inner = int(dim * mult)
    return nn.Sequential(
        nn.RMSNorm(dim),
        nn.Linear(dim, dim_inner),
        nn.GELU(),
        nn.Linear(dim_inner, dim)
    )


class CausalAttention(Module):
    """Pre-norm causal multi-head attention; the reasoning pattern (if any) is applied by
    `attend_impl`. With a cache of earlier keys / values the new positions are the last ones
    (absolute query position i + m - n), as in KV-cached decoding."""

    def __init__(self, dim, *, dim_head=64, heads=8, attend_impl="kernel"):
        super().__init__()
        _check_attend_impl(attend_impl)
        self.heads, self.dim_head = heads, dim_head
        self.attend_impl = attend_impl
        dim_inner = dim_head * heads

        self.norm = nn.RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, dim_inner * 3, bias=False)
        self.to_out = nn.Linear(dim_inner, dim, bias=False)

    def attend(self, q, k, v, reasoning=None, dense_masks=None):
        # q (b, h, n, d), k v (b, h, m, d) -> (b, h, n, d); always causal
        if self.attend_impl == "kernel":
            return stop_graddable_attn(q, k, v, causal=True, reasoning=reasoning)
        masks = dense_masks
        if not exists(masks):
            masks = dense_reasoning_masks(reasoning, q.shape[-2], k.shape[-2], q.shape[1], q.device)
        attn_fn = stop_graddable_attn if self.attend_impl == "dense" else reference_attention
        return attn_fn(q, k, v, causal=True, **masks)

    def forward(self, x, reasoning: Optional[ReasoningPattern] = None,
                cache: Optional[KVCache] = None, return_cache=False, dense_masks=None):
        # x (b, n, dim) -> (b, n, dim); dense_masks: precomputed dense_reasoning_masks (shared by layers)
        dim = self.to_qkv.in_features
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CausalAttention expects x of shape (batch, positions, {dim}), got {shape}")
        if x.dtype != self.to_qkv.weight.dtype and not _autocast_on(x.device.type):
            raise TypeError(f"x is {x.dtype} but the module's weights are {self.to_qkv.weight.dtype}: "
                            "convert one to the other (or run under torch.autocast)")
        qkv = self.to_qkv(self.norm(x))                                  # (b, n, 3 h d)
        qkv = qkv.unflatten(-1, (3, self.heads, self.dim_head))          # (b, n, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # (b, h, n, d) each

        if exists(cache):
            cached_k, cached_v = cache
            k = torch.cat((cached_k, k), dim=-2)                         # (b, h, m, d)
            v = torch.cat((cached_v, v), dim=-2)

        out = self.attend(q, k, v, reasoning, dense_masks)              # (b, h, n, d)
        out = self.to_out(out.transpose(1, 2).flatten(2))               # (b, n, dim)

        if not return_cache:
            return out
        return out, (k, v)


def _under_vmap() -> bool:
    """Inside torch.vmap (e.g. per-sample gradients with torch.func), where a check that
    depends on the tokens' values cannot run."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


class Transformer(Module):
    """Decoder-only Transformer with interleaved self reasoning tokens.

    Args (seed's, pinned): dim, num_tokens, depth, max_seq_len (real tokens, not positions),
        max_reason_seq_len (largest R), dim_head, heads, ignore_index,
        stop_grad_next_tokens_to_reason (True: stop-grad mode; False, the seed's default and so
        the default here: hard mode, the region masked out of attention; SPEC 3. The CLI and
        ReasoningPattern default to stop-grad mode.)
    Extra args: ff_mult; attend_impl ("kernel" | "dense" | "reference", also settable later);
        reason_heads (head indices the pattern applies to; None = all heads);
        activation_checkpointing (also settable later): the forward keeps only each layer's input
        for the backward and recomputes the layer's activations there
        (`torch.utils.checkpoint`, non-reentrant): about one layer's activations in memory
        instead of every layer's, for one more forward pass of compute. The same loss and
        gradients. It applies where gradients are recorded, and not under torch.func
        transforms (they cannot run checkpointing's saved-tensor hooks; the layers then run
        without it, with a warning); generate never needs it. Forward hooks on the layers run
        again in the backward (the recompute).
    """

    def __init__(
        self,
        *,
        dim,
        num_tokens,
        depth,
        max_seq_len=2048,
        max_reason_seq_len=4,
        dim_head=64,
        heads=8,
        ignore_index=-1,
        stop_grad_next_tokens_to_reason=False,
        ff_mult=4,
        attend_impl="kernel",
        reason_heads: Optional[Sequence[int]] = None,
        activation_checkpointing=False
    ):
        super().__init__()
        # (NumPy ints and bools are taken as Python ones, as ReasoningPattern takes them)
        dim, num_tokens, depth, max_seq_len, max_reason_seq_len, dim_head, heads, ignore_index = (
            _check_count(name, value, minimum) for name, value, minimum in (
                ("dim", dim, 1), ("num_tokens", num_tokens, 1), ("depth", depth, 0),
                ("max_seq_len", max_seq_len, 1), ("max_reason_seq_len", max_reason_seq_len, 0),
                ("dim_head", dim_head, 1), ("heads", heads, 1), ("ignore_index", ignore_index, -2**63)))
        stop_grad_next_tokens_to_reason = _check_bool("stop_grad_next_tokens_to_reason", stop_grad_next_tokens_to_reason)
        _check_attend_impl(attend_impl)
        if exists(reason_heads):
            reason_heads = tuple(_check_count("reason_heads entries", h, 0) for h in reason_heads)
            for h in reason_heads:
                if h >= heads:
                    raise ValueError(f"reason_heads entry {h} is out of range for heads={heads}")

        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.max_reason_seq_len = max_reason_seq_len
        self.ignore_index = ignore_index
        self.stop_grad_next_tokens_to_reason = stop_grad_next_tokens_to_reason
        self.reason_heads = reason_heads
        self.activation_checkpointing = activation_checkpointing

        # embed: tokens, absolute positions (one per step), reasoning tokens

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.reason_tokens = nn.Parameter(torch.randn(max_reason_seq_len, dim) * 0.02)

        # layers

        self.layers = ModuleList([])
        for _ in range(depth):
            self.layers.append(ModuleList([
                CausalAttention(dim, dim_head=dim_head, heads=heads, attend_impl=attend_impl),
                FeedForward(dim, ff_mult)
            ]))

        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        self._attend_impl = attend_impl

    @property
    def activation_checkpointing(self) -> bool:
        return getattr(self, "_activation_checkpointing", False)  # a model pickled before it existed

    @activation_checkpointing.setter
    def activation_checkpointing(self, on):
        self._activation_checkpointing = _check_bool("activation_checkpointing", on)

    @property
    def attend_impl(self):
        return self._attend_impl

    @attend_impl.setter
    def attend_impl(self, impl):
        _check_attend_impl(impl)
        self._attend_impl = impl
        for attn, _ in self.layers:
            attn.attend_impl = impl

    # argument checks

    def _check_reasoning_args(self, num_reason_tokens, num_steps_future_can_use_reason) -> Tuple[int, int]:
        """(R, W) as Python ints."""
        num_reason_tokens = _check_count("num_reason_tokens", num_reason_tokens, 0)
        num_steps_future_can_use_reason = _check_count("num_steps_future_can_use_reason",
                                                       num_steps_future_can_use_reason, 0)
        if num_reason_tokens > self.max_reason_seq_len:
            raise ValueError(f"num_reason_tokens={num_reason_tokens} exceeds max_reason_seq_len="
                             f"{self.max_reason_seq_len} the model was built with")
        return num_reason_tokens, num_steps_future_can_use_reason

    def _check_tokens(self, name, x, allow_ignore_index=False) -> torch.Tensor:
        """x, checked, as int64. Any integer dtype is taken: widening is exact, and comparing a
        uint8 tensor with num_tokens or ignore_index would wrap the other side around instead."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of token ids, got {type(x).__name__}")
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must hold integer token ids, got dtype {x.dtype}")
        if x.dim() != 2 or x.numel() == 0:
            raise ValueError(f"{name} must have shape (batch, seq) with batch, seq >= 1, got {tuple(x.shape)}")
        if x.device != self.token_emb.weight.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {self.token_emb.weight.device}")
        x = x.long()
        if torch.compiler.is_compiling():
            # the value check below depends on the data (a graph break, or an error under
            # fullgraph=True); compiled, an out-of-range id is still caught by the embedding lookup
            return x
        valid = (x >= 0) & (x < self.num_tokens)
        if allow_ignore_index:
            valid = valid | (x == self.ignore_index)
        if _under_vmap():
            # vmap cannot raise on values. An invalid id becomes one no embedding table has, so
            # that the lookup fails (IndexError on the CPU, a device-side assertion on CUDA): left
            # as it is, it could land in another vmapped model's rows (vmap over stacked
            # parameters flattens the tables and offsets the ids)
            return torch.where(valid, x, torch.full_like(x, 2 ** 62))
        if not bool(valid.all()):
            bad = x[~valid][0].item()
            extra = f" or ignore_index={self.ignore_index}" if allow_ignore_index else ""
            raise ValueError(f"{name} holds token id {bad}; ids must be in [0, {self.num_tokens}){extra}")
        return x

    # building blocks

    def reasoning_pattern(self, num_reason_tokens, num_steps_future_can_use_reason) -> Optional[ReasoningPattern]:
        if num_reason_tokens == 0:
            return None
        return ReasoningPattern(num_reason_tokens, num_steps_future_can_use_reason,
                                stop_grad=self.stop_grad_next_tokens_to_reason, heads=self.reason_heads)

    def embed(self, tokens, num_reason_tokens, start_step=0):
        # tokens (b, l) -> (b, l * (R + 1), dim): [x_t, r_1 .. r_R] per step t, all at position t
        batch, seq = tokens.shape
        x = self.token_emb(tokens)[:, :, None]                                       # (b, l, 1, d)

        if num_reason_tokens > 0:
            reason = self.reason_tokens[:num_reason_tokens]                          # (R, d)
            reason = reason.expand(batch, seq, *reason.shape)                        # (b, l, R, d)
            x = torch.cat((x, reason), dim=2)                                        # (b, l, R + 1, d)

        steps = torch.arange(start_step, start_step + seq, device=tokens.device)
        x = x + self.pos_emb(steps)[:, None]                                         # (l, 1, d) broadcast
        return x.flatten(1, 2)

    def _checkpointing_now(self) -> bool:
        """Whether this forward checkpoints its layers (see activation_checkpointing)."""
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return False
        if torch._C._are_functorch_transforms_active():
            warnings.warn("activation_checkpointing is not applied under torch.func transforms (they "
                          "cannot run its saved-tensor hooks): the layers keep their activations")
            return False
        return True

    @staticmethod
    def _layer(attn, ff, x, reasoning, cache, dense_masks, need_cache):
        # one layer: x and its kv cache (None unless need_cache, so that a training forward keeps
        # no k and v alive, and what a checkpointed forward recomputes is the layer alone)
        out = attn(x, reasoning, cache=cache, return_cache=need_cache, dense_masks=dense_masks)
        attn_out, kv = out if need_cache else (out, None)
        x = x + attn_out
        return x + ff(x), kv

    def transform(self, x, reasoning=None, caches: Optional[List[KVCache]] = None, need_caches=True):
        # x (b, n, dim) -> logits (b, n, num_tokens), and the layers' kv caches (b, h, m, d)
        # (None for each layer when not need_caches: then the layers may be checkpointed)
        caches = default(caches, [None] * len(self.layers))
        new_caches = []
        layer = self._layer
        if not need_caches and self._checkpointing_now():
            layer = partial(checkpoint, self._layer, use_reentrant=False)

        # dense impls: the (n, m) masks are built once per call and shared by all layers
        dense_masks = None
        if self.attend_impl != "kernel" and len(self.layers) > 0:
            n, m = x.shape[1], x.shape[1] + (caches[0][0].shape[-2] if exists(caches[0]) else 0)
            dense_masks = dense_reasoning_masks(reasoning, n, m, self.layers[0][0].heads, x.device)

        for (attn, ff), cache in zip(self.layers, caches):
            x, kv = layer(attn, ff, x, reasoning, cache, dense_masks, need_caches)
            new_caches.append(kv)

        return self.to_logits(self.norm(x)), new_caches

    def forward(
        self,
        x,
        num_reason_tokens=0,
        num_steps_future_can_use_reason=2,     # reason tokens are kept from (stop-grad: trained by) the next W steps
        remove_reason_tokens_at_end=False,
        return_loss=False
    ):
        """x (b, l) token ids -> logits (b, l * (R + 1), num_tokens), or (b, l, num_tokens) with
        remove_reason_tokens_at_end. With return_loss, x (b, l + 1) is split into inputs and
        next-token labels (repeated over each step's reasoning positions unless they are removed)
        and the mean cross entropy is returned; labels equal to ignore_index are skipped (inputs
        equal to an out-of-vocabulary ignore_index, i.e. padding, are embedded as token 0; an
        in-vocabulary ignore_index is a token like any other as an input)."""
        num_reason_tokens, num_steps_future_can_use_reason = self._check_reasoning_args(
            num_reason_tokens, num_steps_future_can_use_reason)
        x = self._check_tokens("x", x, allow_ignore_index=return_loss)

        if return_loss:
            if x.shape[1] < 2:
                raise ValueError(f"return_loss needs at least 2 tokens per row (inputs and labels), got {x.shape[1]}")
            x, labels = x[:, :-1], x[:, 1:]
            if not 0 <= self.ignore_index < self.num_tokens:  # padding; an in-vocabulary id stays itself
                x = x.masked_fill(x == self.ignore_index, 0)

        seq = x.shape[1]
        if seq > self.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len={self.max_seq_len}")

        period = num_reason_tokens + 1
        reasoning = self.reasoning_pattern(num_reason_tokens, num_steps_future_can_use_reason)

        logits, _ = self.transform(self.embed(x, num_reason_tokens), reasoning,    # (b, l * (R + 1), c)
                                   need_caches=False)

        if remove_reason_tokens_at_end:
            logits = logits[:, ::period]                                             # (b, l, c)

        if not return_loss:
            return logits

        labels = labels.long()
        if not remove_reason_tokens_at_end:
            labels = labels.repeat_interleave(period, dim=1)                         # (b, l * (R + 1))

        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.ignore_index)

    @torch.no_grad()
    def generate(
        self,
        prompt,
        max_new_tokens,
        num_reason_tokens=0,
        num_steps_future_can_use_reason=2,
        temperature=1.0,
        top_k=None,
        *,
        on_token: Optional[Callable[[torch.Tensor], None]] = None
    ):
        """prompt (b, l) -> (b, l + max_new_tokens) token ids, with a KV cache.

        The prompt (real and reasoning tokens) is prefilled once; each new token and its R
        reasoning tokens then attend to the cache (n = R + 1 queries over m keys, pattern at
        absolute positions), so a step costs O(current length). The next token is drawn from the
        logits of the last position - the last reasoning token of the last step - exactly what
        `model(seq, ...)[:, -1]` gives (so train that position: the default loss, or the last
        position only; a model trained with remove_reason_tokens_at_end=True alone has not learned
        to predict from it). temperature 0 = greedy; top_k keeps the k likeliest.
        on_token, if given, is called with each new token (b,) as soon as it is drawn (for
        streaming output). The prompt plus max_new_tokens may not exceed max_seq_len, so that
        the model can read back the whole sequence it returns (the last token itself is never
        fed to the model during generation)."""
        out_dtype = prompt.dtype if isinstance(prompt, torch.Tensor) else None
        prompt = self._check_tokens("prompt", prompt)
        if torch.iinfo(out_dtype).max < self.num_tokens - 1:
            raise TypeError(f"prompt has dtype {out_dtype}, which cannot hold the token ids up to "
                            f"{self.num_tokens - 1} that generate returns in it; pass int32 or int64 ids")
        num_reason_tokens, num_steps_future_can_use_reason = self._check_reasoning_args(
            num_reason_tokens, num_steps_future_can_use_reason)
        max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 0)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        temperature = float(temperature)
        if exists(top_k):
            top_k = _check_count("top_k", top_k, 1)

        total = prompt.shape[1] + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                             f"exceeds max_seq_len={self.max_seq_len} (the model must be able to read back "
                             "the sequence it returns)")

        out = prompt
        if max_new_tokens == 0:  # a new tensor all the same: editing the result must not edit the prompt
            return out.to(out_dtype, copy=True)

        reasoning = self.reasoning_pattern(num_reason_tokens, num_steps_future_can_use_reason)
        logits, caches = self.transform(self.embed(prompt, num_reason_tokens), reasoning)  # prefill

        for i in range(max_new_tokens):
            token = sample(logits[:, -1], temperature, top_k)                        # (b,) int64
            out = torch.cat((out, token[:, None]), dim=1)
            if exists(on_token):
                on_token(token.to(out_dtype))

            if i == max_new_tokens - 1:
                break

            x = self.embed(token[:, None], num_reason_tokens, start_step=out.shape[1] - 1)  # (b, R + 1, d)
            logits, caches = self.transform(x, reasoning, caches)

        return out.to(out_dtype)


def sample(logits, temperature=1.0, top_k=None):
    # logits (b, c) -> (b,) token ids
    if temperature == 0:
        return logits.argmax(dim=-1)

    logits = logits.float()
    # top-k before the temperature: a positive temperature keeps the order, but a huge one would
    # round every scaled logit to the same value and the filter would keep them all
    if exists(top_k) and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))

    # relative to the row max (so the likeliest token's scaled logit is exactly 0) and in float64,
    # so that a tiny temperature gives -inf (probability 0) for the others instead of inf - inf;
    # an infinite one is uniform over the kept tokens
    logits = (logits - logits.amax(dim=-1, keepdim=True)).double()
    if math.isinf(temperature):
        logits = torch.where(torch.isfinite(logits), torch.zeros_like(logits), logits)
    else:
        logits = logits / temperature
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)
