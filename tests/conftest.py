"""Shared test setup: import path, seeds, and the per-device configuration.

The same suite runs on a CPU-only machine and on a GPU machine. Tests that take the ``device``
fixture run once per available device: "cpu" always, "cuda" when ``torch.cuda.is_available()``.
Tests that take ``cfg`` run once per configuration (a device and the dtype the kernel runs in),
which carries what differs between them:

- "cpu": float64 for exact comparison with the float64 reference, any head_dim;
- "cuda": float32 (the CUDA-core kernels), head_dim 64, tolerances of fp32 arithmetic;
- "cuda-bf16": bfloat16 (the tensor-core kernels), head_dim 64: comparisons with the reference
  follow FlashAttention's rule (assert_within_flash_rule: at most 2x, 3x for gradients, the error
  of PyTorch's own math path in bfloat16), other comparisons bounds of about 10x bfloat16's
  rounding;
- "cpu-bf16" (not run by default; ``SRT_TEST_CONFIGS=cpu,cpu-bf16``): the CPU kernel's bfloat16 path
  with the "cuda-bf16" tolerances;
- "cpu-fp32" (not run by default): the CPU kernel's float32 path with the "cuda" tolerances and
  head_dim.

tests/test_cuda_emulation_suite.py runs "cpu-bf16" and "cpu-fp32" with the op's CPU kernels
replaced by the emulated CUDA kernels (tests/emulated_cuda_op.py), so that the tests a GPU runs in
"cuda-bf16" and "cuda" meet the same kernels' source on the CPU.

The reference always runs in float64 on the same (rounded) inputs. ``SRT_TEST_CONFIGS`` (a comma
list) replaces the default set: "cpu", plus "cuda" and "cuda-bf16" when a GPU is there.

Tests that use the GPU carry the ``gpu`` marker (added here for the "cuda" parametrisations and
tests/test_cuda_build.py; module-level CUDA tests set it themselves); with a GPU they run first, and
``SRT_GPU_TESTS_ONLY=1`` deselects every other test (benchmarks/gpu_check.sh: the CPU-only tests
are what CI runs). The junit XML marks each with the property ``gpu``.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass

import pytest
import torch

# Tests must work both on an installed package (`pip install --no-build-isolation .`) and on an
# in-place build in a checkout: only fall back to the repo root when nothing is installed.
try:
    import self_reasoning_tokens  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the package was made available
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import self_reasoning_tokens  # noqa: F401

from self_reasoning_tokens.reference import reference_attention  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CONFIGS = [c.strip() for c in os.environ.get("SRT_TEST_CONFIGS", "").split(",") if c.strip()] or (
    ["cpu"] + (["cuda", "cuda-bf16"] if torch.cuda.is_available() else []))
GPU_TESTS_ONLY = os.environ.get("SRT_GPU_TESTS_ONLY", "") not in ("", "0")

# A time-limited run (benchmarks/gpu_check.sh on a lent GPU) sets SRT_TEST_DEADLINE to a Unix
# time: tests that would start after it are skipped with a reason saying so, so that pytest still
# ends normally and reports what ran. With a GPU, the CUDA tests go first, so they are the ones
# that run when the deadline cuts the suite short.
TEST_DEADLINE = float(os.environ.get("SRT_TEST_DEADLINE", "inf"))
DEADLINE_SKIP = "SRT_TEST_DEADLINE passed: not started in this time-limited run"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: the test runs on the GPU (sorted first, counted as a GPU test)")


def _runs_on_gpu(item) -> bool:
    """Tests that use the GPU: the ones marked ``gpu``, the device-parametrised ones on "cuda"
    (``device``, ``device_name``, ``cfg``) and tests/test_cuda_build.py (not the CPU emulation of
    the CUDA kernels, which only shares the name)."""
    if item.get_closest_marker("gpu") is not None:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(str(params.get(key, "")).startswith("cuda") for key in ("device", "device_name", "cfg")):
        return True
    return os.path.basename(str(item.fspath)) == "test_cuda_build.py"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _runs_on_gpu(item):
            if item.get_closest_marker("gpu") is None:
                item.add_marker(pytest.mark.gpu)
            item.user_properties.append(("gpu", "1"))  # in the junit XML: the one list of GPU tests
    if GPU_TESTS_ONLY:
        dropped = [item for item in items if item.get_closest_marker("gpu") is None]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if item.get_closest_marker("gpu") is not None]
    if torch.cuda.is_available():
        items.sort(key=lambda item: 0 if item.get_closest_marker("gpu") is not None else 1)  # stable sort


def pytest_runtest_setup(item):
    if math.isfinite(TEST_DEADLINE) and time.time() > TEST_DEADLINE:
        pytest.skip(DEADLINE_SKIP)


@dataclass(frozen=True)
class DeviceConfig:
    """What a test needs to know about the device it runs on."""

    device: str
    dtype: torch.dtype  # dtype the kernel is run in for comparisons with the float64 reference
    head_dim: int  # a head dim the device's kernels support
    atol: float  # output tolerance: |err| <= atol + rtol * max|ref|
    rtol: float
    grad_atol: float
    grad_rtol: float

    def randn(self, *shape, dtype=None, requires_grad=False, generator=None):
        t = torch.randn(*shape, dtype=torch.float64, generator=generator)
        t = t.to(device=self.device, dtype=dtype or self.dtype)
        return t.requires_grad_(requires_grad)

    def qkv(self, b, h, n, m, d=None, dtype=None, requires_grad=True, generator=None):
        d = d or self.head_dim
        q = self.randn(b, h, n, d, dtype=dtype, requires_grad=requires_grad, generator=generator)
        k = self.randn(b, h, m, d, dtype=dtype, requires_grad=requires_grad, generator=generator)
        v = self.randn(b, h, m, d, dtype=dtype, requires_grad=requires_grad, generator=generator)
        return q, k, v

    def assert_close(self, actual, expected, grad=False, what=""):
        """Max-abs error against the expected tensor, scaled by its magnitude; no NaN/inf."""
        assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
        a, e = actual.detach().double(), expected.detach().double()
        atol, rtol = (self.grad_atol, self.grad_rtol) if grad else (self.atol, self.rtol)
        err = (a - e).abs().max().item() if a.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        assert err <= atol + rtol * scale, f"{what}: max abs err {err:.3e} (max |expected| {scale:.3e})"


def config_for(name: str) -> DeviceConfig:
    """The configuration named "cpu", "cuda", "cuda-bf16", "cpu-bf16" or "cpu-fp32" (see the module
    docstring)."""
    if name in ("cuda", "cpu-fp32"):
        # the float32 CUDA-core kernels (expf, fp32 sums in another order than the reference's)
        return DeviceConfig(name.split("-")[0], torch.float32, 64, atol=2e-3, rtol=5e-3, grad_atol=5e-3, grad_rtol=1e-2)
    if name in ("cuda-bf16", "cpu-bf16"):
        # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3): the output, P and dS
        # are rounded once each; sums stay in fp32. The bounds are about 10x those roundings,
        # relative to the largest expected value, as tests/test_cuda_build.py's are.
        return DeviceConfig(name.split("-")[0], torch.bfloat16, 64, atol=1e-3, rtol=2e-2, grad_atol=2e-3,
                            grad_rtol=3e-2)
    if name == "cpu":
        return DeviceConfig("cpu", torch.float64, 16, atol=1e-10, rtol=1e-9, grad_atol=1e-10, grad_rtol=1e-9)
    raise ValueError(f"unknown test configuration {name!r} (SRT_TEST_CONFIGS): cpu, cuda, cuda-bf16, cpu-bf16, "
                     "cpu-fp32")


def run_with_grads(fn, q, k, v, grad_out, **kwargs):
    """out, dq, dk, dv of fn(q, k, v, **kwargs) for the given output gradient (fresh leaves)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), dq, dk, dv


def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside a with-block, the previous setting after it:
    benchmarks/_variants.py's context manager (one copy; the GPU benchmark's (a4) uses it)."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import _variants

    return _variants.deterministic_algorithms()


def reference64(q, k, v, grad_out, **kwargs):
    """The float64 reference on float64 copies of the inputs (masks kept as they are)."""
    return run_with_grads(reference_attention, q.double(), k.double(), v.double(), grad_out.double(),
                          **kwargs)


def assert_within_flash_rule(actual, exact, low, grad, what=""):
    """FlashAttention's rule for float16/bfloat16 (issue 3): the error against the float64 result
    is at most 2x (3x for gradients) the error of PyTorch's own math path run in that dtype (the
    reference without upcast, `low`), plus a floor of 1e-3 x max(1, largest |expected|) (for
    results the low-precision path happens to get exactly, e.g. a gradient every mask stops), as
    tests/test_attention.py's test_low_precision_close_to_reference does."""
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if not actual.numel():
        return
    e = exact.detach().double()
    err = (actual.detach().double() - e).abs().max().item()
    ref_err = (low.detach().double() - e).abs().max().item()
    assert math.isfinite(ref_err), f"{what}: the reference in {actual.dtype} is not finite (overflow?)"
    factor, floor = (3 if grad else 2), 1e-3 * max(1.0, e.abs().max().item())
    assert err <= factor * ref_err + floor, (
        f"{what}: max abs err {err:.3e} > {factor} x {ref_err:.3e} (the reference in {actual.dtype}) + {floor:.1e}")


def check_against_reference(cfg: DeviceConfig, q, k, v, grad_out=None, got=None, **kwargs):
    """Runs the kernel (or takes its (out, dq, dk, dv) as `got`) and the float64 reference on the
    same inputs and compares all results: within the configuration's tolerances, or, for
    float16/bfloat16, by FlashAttention's rule (assert_within_flash_rule). Returns the kernel's
    (out, dq, dk, dv)."""
    from self_reasoning_tokens import stop_graddable_attn

    if grad_out is None:
        grad_out = torch.randn(q.shape, dtype=torch.float64).to(device=q.device, dtype=q.dtype)
    if got is None:
        got = run_with_grads(stop_graddable_attn, q, k, v, grad_out, **kwargs)
    exp = reference64(q, k, v, grad_out, **kwargs)
    low = None
    if q.dtype in (torch.float16, torch.bfloat16):
        low = run_with_grads(reference_attention, q, k, v, grad_out, upcast=False, **kwargs)
    for i, (name, a, e) in enumerate(zip(("out", "dq", "dk", "dv"), got, exp)):
        assert a.dtype == q.dtype, (name, a.dtype)
        if low is None:
            cfg.assert_close(a, e, grad=name != "out", what=name)
        else:
            assert_within_flash_rule(a, e, low[i], grad=name != "out", what=name)
    return got


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session", params=CONFIGS)
def cfg(request) -> DeviceConfig:
    return config_for(request.param)


@pytest.fixture(scope="session")
def helpers():
    """The comparison helpers above, for test modules (conftest is not imported directly)."""

    class H:
        run_with_grads = staticmethod(run_with_grads)
        reference64 = staticmethod(reference64)
        check = staticmethod(check_against_reference)
        flash_rule = staticmethod(assert_within_flash_rule)
        deterministic = staticmethod(deterministic_algorithms)
        config_for = staticmethod(config_for)

    return H


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    yield
