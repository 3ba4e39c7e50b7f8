"""self_reasoning_tokens: exact O(n)-memory attention with per-element q/k/v stop-gradient
masks (fused CPU and CUDA kernels), and a Transformer that trains self reasoning tokens."""
from ._ops import HAS_EXTENSION, cuda_kernels_available
from .attention import stop_graddable_attn
from .reasoning import ReasoningPattern, reasoning_stop_grad_mask
from .reference import reference_attention
from .transformer import CausalAttention, Transformer

__version__ = "0.1.0"

__all__ = [
    "stop_graddable_attn",
    "ReasoningPattern",
    "reasoning_stop_grad_mask",
    "reference_attention",
    "CausalAttention",
    "Transformer",
    "HAS_EXTENSION",
    "cuda_kernels_available",
]
