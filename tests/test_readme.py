"""The README's Python examples run as written, in order, in one namespace (a later block may use
what an earlier one defined, as a reader would), and give what their comments say."""
import os
import re

import torch

import self_reasoning_tokens as srt

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def check_attention_example(ns):
    # gradients reached every input, finite; the forward is plain causal attention
    for name in ("q", "k", "v"):
        g = ns[name].grad
        assert g is not None and torch.isfinite(g).all(), name
    q, k, v = (ns[name].detach() for name in ("q", "k", "v"))
    torch.testing.assert_close(ns["out"].detach(), srt.stop_graddable_attn(q, k, v, causal=True))


def check_func_example(ns):
    # one gradient per sample, each the eager gradient of that sample
    qs, ks, vs = ns["qs"], ns["ks"], ns["vs"]
    assert ns["dq"].shape == ns["dk"].shape == ns["dv"].shape == qs.shape
    s = 3
    q1, k1, v1 = (t[s].clone().requires_grad_() for t in (qs, ks, vs))
    ns["loss"](q1, k1, v1).backward()
    for got, leaf in zip((ns["dq"], ns["dk"], ns["dv"]), (q1, k1, v1)):
        torch.testing.assert_close(got[s], leaf.grad, rtol=1e-4, atol=1e-4)


def check_transformer_example(ns):
    # the shapes its comments give; the loss trained something
    assert ns["logits"].shape == (1, 128, 256)
    assert ns["out"].shape == (1, 8 + 32)
    assert all(p.grad is not None for p in ns["model"].parameters() if p.requires_grad)


# how each example is recognised, and what must then hold
CHECKS = {"q_scale": check_attention_example, "vmap(": check_func_example, "Transformer(": check_transformer_example}


def test_readme_python_examples_run_as_written():
    ns, checked = {}, []
    for block in python_blocks():
        try:
            code = compile(block, README, "exec")
        except SyntaxError:
            # the pinned signature, written as a stub with a return annotation, is not meant to run
            assert "stop_graddable_attn(" in block and ") -> Tensor" in block, block
            continue
        torch.manual_seed(0)
        exec(code, ns)  # the README's own code
        for marker, check in CHECKS.items():
            if marker in block:
                check(ns)
                checked.append(marker)
    assert sorted(checked) == sorted(CHECKS), f"examples found and checked: {checked}"
