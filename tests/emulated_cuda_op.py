"""pytest plugin: the op's CPU kernels replaced by the CUDA kernels' source run on the CPU emulator.

Loaded with ``-p emulated_cuda_op`` (tests/ on the path) by tests/test_cuda_emulation_suite.py,
which runs the cfg-parametrised tests of tests/test_attention.py and tests/test_func_transforms.py
in a subprocess with ``SRT_TEST_CONFIGS=cpu-bf16`` or ``cpu-fp32``: every mask kind, broadcast
shape, reasoning mode, scale and layout that the suite checks against the float64 reference then
runs through the tensor-core kernels' (bfloat16) or the CUDA-core kernels' (float32) source
(tests/cuda_emulation), not through the CPU kernel. float16/bfloat16/float32 calls go to the
emulated kernels; float64 (which has no CUDA kernel) raises. ``SRT_EMU_CP_ASYNC`` ("early" or
"late", default "late") sets when cp.async copies land. At the end the number of emulated calls
is printed, so that the caller can tell the plugin really ran.
"""
import os

import torch

import self_reasoning_tokens  # noqa: F401  (registers the ops first)
import test_cuda_emulation as emulation

CALLS = {"attn_fwd": 0, "attn_bwd": 0}
_LIB = None  # the torch.library registration, kept alive for the session


def _emulated(name, emu_fn):
    schema = getattr(torch.ops.self_reasoning_tokens, name).default._schema

    def kernel(*args, **kwargs):
        # the dispatcher passes trailing defaulted arguments only when given: complete the call
        full = list(args)
        for arg in schema.arguments[len(args):]:
            full.append(kwargs[arg.name] if arg.name in kwargs else arg.default_value)
        q = full[1] if name == "attn_bwd" else full[0]
        if q.dtype == torch.float64:
            raise RuntimeError(f"emulated {name}: float64 has no CUDA kernel")
        CALLS[name] += 1
        return emu_fn(*full)

    return kernel


def pytest_configure(config):
    global _LIB
    ops = emulation.shared_emulation()
    ops.set_cp_async_mode(emulation.CP_ASYNC_MODES[os.environ.get("SRT_EMU_CP_ASYNC", "late")])
    _LIB = torch.library.Library("self_reasoning_tokens", "IMPL")
    _LIB.impl("attn_fwd", _emulated("attn_fwd", ops.fwd), "CPU")
    _LIB.impl("attn_bwd", _emulated("attn_bwd", ops.bwd), "CPU")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"emulated CUDA kernel calls: attn_fwd {CALLS['attn_fwd']}, attn_bwd {CALLS['attn_bwd']}")
