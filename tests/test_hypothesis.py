"""Property test: random shapes, flags, masks (kinds and broadcast shapes) and reasoning patterns,
kernel vs the float64 autograd reference, output and all three gradients.

At least 200 examples when the environment variable CI is set (`.ci/run`), fewer locally."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from self_reasoning_tokens import ReasoningPattern, stop_graddable_attn

settings.register_profile(
    "srt-ci", max_examples=250, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile(
    "srt-local", max_examples=80, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROFILE = "srt-ci" if os.environ.get("CI") else "srt-local"

MASK_SHAPES = ["bhnm", "hnm", "nm", "b1nm", "1h1m", "n1", "m", "scalar", "expanded", "transposed"]


def mask_shape(shape, b, h, n, m):
    return {"bhnm": (b, h, n, m), "hnm": (h, n, m), "nm": (n, m), "b1nm": (b, 1, n, m), "1h1m": (1, h, 1, m),
            "n1": (n, 1), "m": (m,), "scalar": ()}[shape]


def build_mask(kind, shape, b, h, n, m, gen, device, p):
    """A mask of kind "bool" (True with probability p) or "float" (factors in [-0.5, 1.5))."""
    def base(s):
        r = torch.rand(s, generator=gen, dtype=torch.float64)
        t = r < p if kind == "bool" else r * 2 - 0.5
        return t.to(device)

    if shape == "expanded":
        return base((1, h, 1, m)).expand(b, h, n, m)
    if shape == "transposed":
        return base((m, n)).t()
    return base(mask_shape(shape, b, h, n, m))


@st.composite
def problems(draw, device):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    n = draw(st.integers(1, 24))
    m = draw(st.sampled_from([n, draw(st.integers(1, 24))]))
    d = draw(st.sampled_from([32, 64] if device == "cuda" else [1, 4, 8, 16, 24]))
    kw = dict(causal=draw(st.booleans()))
    spec = dict(b=b, h=h, n=n, m=m, d=d, seed=draw(st.integers(0, 2**32 - 1)), masks={})
    for name in ("q_stop_grad_mask", "k_stop_grad_mask", "v_stop_grad_mask"):
        kind = draw(st.sampled_from(["none", "bool", "float"]))
        if kind != "none":
            spec["masks"][name] = (kind, draw(st.sampled_from(MASK_SHAPES)),
                                   draw(st.sampled_from([0.0, 0.3, 1.0])) if kind == "bool" else 0.0)
    if draw(st.booleans()):
        spec["masks"]["attn_mask"] = ("bool", draw(st.sampled_from(MASK_SHAPES)),
                                      draw(st.sampled_from([0.6, 0.9, 1.0])))
    spec["padding"] = draw(st.sampled_from([None, "b", "1"]))
    if draw(st.booleans()):
        heads = draw(st.one_of(st.none(), st.lists(st.integers(0, h - 1), min_size=0, max_size=h, unique=True)))
        kw["reasoning"] = ReasoningPattern(draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                                           stop_grad=draw(st.booleans()), heads=heads)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 2.0))
    return spec, kw


def materialise(cfg, spec, kw):
    b, h, n, m, d = spec["b"], spec["h"], spec["n"], spec["m"], spec["d"]
    gen = torch.Generator().manual_seed(spec["seed"])
    q, k, v = cfg.qkv(b, h, n, m, d=d, generator=gen)
    grad_out = cfg.randn(b, h, n, d, generator=gen)
    kw = dict(kw)
    for name, (kind, shape, p) in spec["masks"].items():
        # p: probability of True (for attn_mask, of "may attend"; for bool stop masks, of "stop")
        kw[name] = build_mask(kind, shape, b, h, n, m, gen, cfg.device, p)
    if spec["padding"] is not None:
        rows = b if spec["padding"] == "b" else 1
        kw["mask"] = (torch.rand(rows, m, generator=gen) < 0.8).to(cfg.device)
    return q, k, v, grad_out, kw


@pytest.mark.parametrize("device_name", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_kernel_matches_reference_property(device_name, helpers):
    cfg = helpers.config_for(device_name)

    @settings(settings.get_profile(PROFILE))
    @given(problem=problems(device_name))
    def check(problem):
        spec, kw = problem
        q, k, v, grad_out, kw = materialise(cfg, spec, kw)
        out, dq, dk, dv = helpers.check(cfg, q, k, v, grad_out=grad_out, **kw)
        # stop masks never change the forward
        plain = {key: val for key, val in kw.items() if not key.endswith("_stop_grad_mask")}
        if "reasoning" in plain and plain["reasoning"].stop_grad:
            del plain["reasoning"]  # stop-grad mode: the forward is the plain one too
        again = stop_graddable_attn(q, k, v, **plain)
        cfg.assert_close(out, again, what="forward without stop masks")

    check()
