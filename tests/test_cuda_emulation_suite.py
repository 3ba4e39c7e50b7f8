"""The attention suite's reference comparisons, run through the CUDA kernels' source on the CPU.

tests/test_cuda_emulation.py checks the emulated CUDA kernels on the GPU test's twelve cases. Here
the whole cfg-parametrised part of tests/test_attention.py (every stop-mask kind and broadcast
shape, attention masks, key padding, empty rows and -inf rows, the reasoning pattern in both modes
and with head flags, scales, non-contiguous layouts, partial requires_grad, mixed mask dtypes:
about 200 tests) and of tests/test_func_transforms.py (grad, vjp, jacrev, vmap through the op) runs
in a subprocess with the op's CPU kernels replaced by the emulated ones
(tests/emulated_cuda_op.py), in two configurations:

- "cpu-bf16" (bfloat16, the tolerances the "cuda-bf16" configuration uses on a GPU): the
  float16/bfloat16 tensor-core kernels, at the default tiles and with both 128-wide variants;
- "cpu-fp32" (float32, the "cuda" configuration's tolerances): the float32 CUDA-core kernels.

So each kernel meets the references a GPU run holds it to, with cp.async completing late.
"""
import os
import platform
import re
import subprocess
import sys

import pytest

import self_reasoning_tokens as srt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_build as gpu_cases  # noqa: E402
import test_cuda_emulation as emulation  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))

pytestmark = [
    pytest.mark.skipif(not srt.HAS_EXTENSION, reason="the compiled extension is missing"),
    pytest.mark.skipif(platform.system() != "Linux", reason="the fiber emulator uses Linux ucontext"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(emulation.ROOT, "csrc", "cuda")),
                       reason="csrc/ is not next to the tests (installed package)"),
    pytest.mark.skipif(not emulation.TENSOR_CORE_KERNELS, reason="no tensor-core kernels in csrc/cuda"),
]


# (configuration, tile setting): the tile settings select between tensor-core kernels only.
RUNS = [("cpu-bf16", "default"), ("cpu-bf16", "fwd128+bwd128"), ("cpu-fp32", "default")]
SUITES = ("test_attention.py", "test_func_transforms.py")


@pytest.mark.parametrize("config,tiles", RUNS, ids=[f"{c}-{t}" for c, t in RUNS])
def test_attention_suite_through_emulated_cuda_kernels(config, tiles):
    emulation.shared_emulation()  # built here (under the shared lock), not inside the subprocess's timeout
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SRT_", "PYTEST_"))}
    for setting in tiles.split("+"):
        env.update(gpu_cases.TILE_SETTINGS[setting])
    env.update(SRT_TEST_CONFIGS=config, SRT_EMU_CP_ASYNC="late",
               PYTHONPATH=os.pathsep.join([TESTS, emulation.ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    run = subprocess.run([sys.executable, "-m", "pytest", *(os.path.join(TESTS, f) for f in SUITES), "-q",
                          "-p", "no:cacheprovider", "-p", "emulated_cuda_op", "-k", config],
                         cwd=emulation.ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 200, out[-3000:]  # the cfg tests of both files really ran
    assert " failed" not in out and " error" not in out, out[-3000:]
    calls = re.search(r"emulated CUDA kernel calls: attn_fwd (\d+), attn_bwd (\d+)", out)
    assert calls and int(calls.group(1)) >= 150 and int(calls.group(2)) >= 150, out[-3000:]
