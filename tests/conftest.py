"""Shared test setup: import path, seeds, and the per-device configuration.

The same suite runs on a CPU-only machine and on a GPU machine. Tests that take the ``device``
fixture (or ``cfg``) run once per available device: "cpu" always, "cuda" when
``torch.cuda.is_available()``. ``cfg`` carries what differs per device:

- CPU: float64 for exact comparison with the float64 reference, any head_dim;
- CUDA: float32 (the kernels support float16 / bfloat16 / float32) and head_dim 32 or 64 (the
  CUDA kernels support 32, 64, 96, 128), with looser tolerances; the reference still runs in
  float64 on the same inputs.
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

# A time-limited run (benchmarks/gpu_check.sh on a lent GPU) sets SRT_TEST_DEADLINE to a Unix
# time: tests that would start after it are skipped with a reason saying so, so that pytest still
# ends normally and reports what ran. With a GPU, the CUDA tests go first, so they are the ones
# that run when the deadline cuts the suite short.
TEST_DEADLINE = float(os.environ.get("SRT_TEST_DEADLINE", "inf"))
DEADLINE_SKIP = "SRT_TEST_DEADLINE passed: not started in this time-limited run"


def _runs_on_gpu(item) -> bool:
    """Tests that use the GPU: the device-parametrised ones on "cuda" and tests/test_cuda_build.py
    (not the CPU emulation of the CUDA kernels, which only shares the name)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("device") == "cuda" or item.nodeid.startswith("tests/test_cuda_build.py") \
        or os.path.basename(str(item.fspath)) == "test_cuda_build.py"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        items.sort(key=lambda item: 0 if _runs_on_gpu(item) else 1)  # stable sort


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


def config_for(device: str) -> DeviceConfig:
    if device == "cuda":
        # float32 kernels may use TF32 tensor cores: errors up to ~1e-3 relative.
        return DeviceConfig("cuda", torch.float32, 64, atol=2e-3, rtol=5e-3, grad_atol=5e-3, grad_rtol=1e-2)
    return DeviceConfig("cpu", torch.float64, 16, atol=1e-10, rtol=1e-9, grad_atol=1e-10, grad_rtol=1e-9)


def run_with_grads(fn, q, k, v, grad_out, **kwargs):
    """out, dq, dk, dv of fn(q, k, v, **kwargs) for the given output gradient (fresh leaves)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), dq, dk, dv


def reference64(q, k, v, grad_out, **kwargs):
    """The float64 reference on float64 copies of the inputs (masks kept as they are)."""
    return run_with_grads(reference_attention, q.double(), k.double(), v.double(), grad_out.double(),
                          **kwargs)


def check_against_reference(cfg: DeviceConfig, q, k, v, grad_out=None, **kwargs):
    """Runs the kernel and the float64 reference on the same inputs and compares all results.
    Returns the kernel's (out, dq, dk, dv)."""
    from self_reasoning_tokens import stop_graddable_attn

    if grad_out is None:
        grad_out = torch.randn(q.shape, dtype=torch.float64).to(device=q.device, dtype=q.dtype)
    got = run_with_grads(stop_graddable_attn, q, k, v, grad_out, **kwargs)
    exp = reference64(q, k, v, grad_out, **kwargs)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp):
        assert a.dtype == q.dtype, (name, a.dtype)
        cfg.assert_close(a, e, grad=name != "out", what=name)
    return got


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def cfg(device) -> DeviceConfig:
    return config_for(device)


@pytest.fixture(scope="session")
def helpers():
    """The comparison helpers above, for test modules (conftest is not imported directly)."""

    class H:
        run_with_grads = staticmethod(run_with_grads)
        reference64 = staticmethod(reference64)
        check = staticmethod(check_against_reference)
        config_for = staticmethod(config_for)

    return H


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    yield
