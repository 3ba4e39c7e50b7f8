"""self_reasoning_tokens: exact O(n)-memory attention with per-element q/k/v stop-gradient
masks (fused CPU and CUDA kernels), and a Transformer that trains self reasoning tokens."""
import torch as _torch

if not hasattr(_torch.library, "register_vmap"):  # torch.library's op API as of torch 2.5
    raise ImportError(f"self_reasoning_tokens needs torch >= 2.5 (this is torch {_torch.__version__}): "
                      "it registers its ops' autograd, fake and vmap rules through torch.library")

from ._ops import HAS_EXTENSION, cuda_kernels_available  # noqa: E402
from .attention import stop_graddable_attn  # noqa: E402
from .reasoning import ReasoningPattern, reasoning_stop_grad_mask  # noqa: E402
from .reference import reference_attention  # noqa: E402
from .transformer import CausalAttention, Transformer  # noqa: E402

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
