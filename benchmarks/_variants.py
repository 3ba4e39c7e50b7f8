"""What the GPU benchmark and the profile share (bench_gpu.py, profile_gpu.py): the reasoning pattern
of the contenders and the kernel variants they compare."""
import contextlib
import os

import torch

import self_reasoning_tokens as srt

R, W = 3, 4  # the reasoning pattern of contenders (b), (c), (e), (f): ReasoningPattern(R, W), stop-grad

# The float16/bfloat16 CUDA kernels' tile variants (csrc/cuda/kernel_traits.h), chosen by environment
# variables that the op reads at every call; unset means 64 for both.
FWD_BLOCK_M = "SRT_CUDA_FWD_BLOCK_M"  # the forward's query rows per block, 64 or 128
BWD_BLOCK_N = "SRT_CUDA_BWD_BLOCK_N"  # the backward's keys per block, 64 or 128


@contextlib.contextmanager
def tile_setting(name, value):
    """Environment variable `name` (FWD_BLOCK_M or BWD_BLOCK_N) set to `value` inside the block,
    its previous value (or absence) after."""
    before = os.environ.get(name)
    os.environ[name] = str(value)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def clear_inherited_settings():
    """Removes FWD_BLOCK_M and BWD_BLOCK_N from the environment and returns what they were: the
    contenders other than the A/B variants must run the default tiles (an inherited
    SRT_CUDA_BWD_BLOCK_N=128 would make (a) the variant and "(a3) vs (a)" a kernel against itself).
    The benchmark and the profile call it at start and record the result."""
    return {name: os.environ.pop(name) for name in (FWD_BLOCK_M, BWD_BLOCK_N) if name in os.environ}


def fwd_block_m(rows):
    """SRT_CUDA_FWD_BLOCK_M=rows inside the block."""
    return tile_setting(FWD_BLOCK_M, rows)


def bwd_block_n(keys):
    """SRT_CUDA_BWD_BLOCK_N=keys inside the block."""
    return tile_setting(BWD_BLOCK_N, keys)


def ours_fwd128(q, k, v):
    """Contender (a2): (a), the op without masks, with the forward's 128-row query tiles."""
    def run():
        with fwd_block_m(128):
            return srt.stop_graddable_attn(q, k, v, causal=True)
    return run


_open_settings = []  # settings entered by (a3)'s or (a4)'s backward hooks and not yet left


def close_stale_settings():
    """Leave the settings of (a3) or (a4) backward calls that raised (their closing hook never ran),
    so that the contenders measured after it run with the default tiles and schedule. The benchmark
    calls it after every contender."""
    while _open_settings:
        _open_settings.pop().__exit__(None, None, None)


def _setting_for_backward(out, setting, who):
    """out, with hooks on its grad_fn (the attention's backward node) that enter `setting()` for the
    attention's backward call and leave it after: the backward runs when autograd calls it, after
    the contender's run() has returned, so the setting must hold then."""
    if out.grad_fn is not None:
        # the hooks must sit on the attention's own node: on a node after it (a view, a cast)
        # they would close before the attention's backward runs
        if "attn_fwd" not in out.grad_fn.name():
            raise RuntimeError(f"{who}: the output's grad_fn is {out.grad_fn.name()}, not the attention's "
                               "backward node; the setting would not cover the attention backward")

        def pre(grad_outputs):
            ctx = setting()
            ctx.__enter__()
            _open_settings.append(ctx)

        def post(grad_inputs, grad_outputs):
            _open_settings.pop().__exit__(None, None, None)

        out.grad_fn.register_prehook(pre)
        out.grad_fn.register_hook(post)
    return out


def ours_bwd128(q, k, v):
    """Contender (a3): (a) with the backward's 128-key tiles (set for the backward call only)."""
    def run():
        return _setting_for_backward(srt.stop_graddable_attn(q, k, v, causal=True), lambda: bwd_block_n(128), "(a3)")
    return run


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside the block; the previous setting after it."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def ours_deterministic(q, k, v):
    """Contender (a4): (a) with the backward's deterministic schedule (torch.use_deterministic_algorithms
    during the attention's backward call only; README "Determinism"): what determinism costs."""
    def run():
        return _setting_for_backward(srt.stop_graddable_attn(q, k, v, causal=True), deterministic_algorithms, "(a4)")
    return run


# The A/B contenders of the benchmark and the profile: name -> fn(q, k, v) giving run().
AB_VARIANTS = {"ours-fwd128": ours_fwd128, "ours-bwd128": ours_bwd128, "ours-det": ours_deterministic}
# the variants that pick between the float16/bfloat16 kernels' tiles (float32 has one kernel each way)
TILE_VARIANTS = ("ours-fwd128", "ours-bwd128")
