"""What the GPU benchmark and the profile share (bench_gpu.py, profile_gpu.py): the reasoning pattern
of the contenders and the kernel variants they compare."""
import contextlib
import os

import self_reasoning_tokens as srt

R, W = 3, 4  # the reasoning pattern of contenders (b), (c), (e), (f): ReasoningPattern(R, W), stop-grad


@contextlib.contextmanager
def fwd_block_m(rows):
    """SRT_CUDA_FWD_BLOCK_M=rows inside the block (the op reads it at every call: the
    float16/bfloat16 CUDA forward's query rows per block, 64 or 128), the previous value after."""
    before = os.environ.get("SRT_CUDA_FWD_BLOCK_M")
    os.environ["SRT_CUDA_FWD_BLOCK_M"] = str(rows)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SRT_CUDA_FWD_BLOCK_M", None)
        else:
            os.environ["SRT_CUDA_FWD_BLOCK_M"] = before


def ours_fwd128(q, k, v):
    """Contender (a2): (a), the op without masks, with the forward's 128-row query tiles."""
    def run():
        with fwd_block_m(128):
            return srt.stop_graddable_attn(q, k, v, causal=True)
    return run
