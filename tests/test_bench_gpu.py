"""benchmarks/bench_gpu.py without a GPU: the dry run exercises every contender, the cross-check,
the longest-sequence search and the targets on the CPU (tiny shapes); the search, the targets
and the budget cut are also checked on synthetic inputs, so their logic cannot drift unnoticed
before the one GPU run."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_gpu  # noqa: E402
from flex_stopgrad import flex_unavailable_reason  # noqa: E402
from self_reasoning_tokens.reasoning import reasoning_region  # noqa: E402

LETTERS = {"ours": "a", "ours-fwd128": "a2", "ours-bwd128": "a3", "ours-det": "a4", "ours+reasoning": "b",
           "ours+kv-mask": "c", "sdpa-flash": "d", "flex-stopgrad": "e", "reference": "f"}
FLEX_MISSING = flex_unavailable_reason()  # None with the torch this project pins


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out, table = d / "bench.json", d / "table.txt"
    rc = bench_gpu.main(["--dry-run", "--device", "cpu", "--out", str(out), "--table-out", str(table)])
    return rc, json.loads(out.read_text()), table.read_text()


def test_dry_run_covers_every_contender(dry_run):
    rc, data, table = dry_run
    assert rc == 0, data["errors"]
    assert data["errors"] == [] and data["meta"]["finished"]
    meta = data["meta"]
    for key in ("device", "torch", "cuda", "git_commit", "dtype", "python"):
        assert key in meta
    assert meta["torch"] == torch.__version__
    assert set(meta["contenders"]) == set(LETTERS) and meta["reasoning_pattern"]["stop_grad"]
    shapes = {(r["batch"], r["seq"], r["head_dim"]) for r in data["results"]}
    assert shapes == {(2, 128, 32), (1, 256, 32), (2, 128, 64), (1, 256, 64)}
    # the target shape (2, 128, 32) and its (batch, seq) with the other head dim: every contender;
    # elsewhere not the A/B variants
    for shape in shapes:
        rows = {r["contender"]: r for r in data["results"] if (r["batch"], r["seq"], r["head_dim"]) == shape}
        assert len(rows) == len([r for r in data["results"] if (r["batch"], r["seq"], r["head_dim"]) == shape])
        assert set(rows) == set(LETTERS) - (set() if shape[:2] == (2, 128) else set(bench_gpu.AB_VARIANTS))
        assert all(r["target_shape"] == (shape == (2, 128, 32)) for r in rows.values())
        for name, r in rows.items():
            assert r["letter"] == LETTERS[name]
            if name == "flex-stopgrad" and FLEX_MISSING:  # an older torch: (e) is left out, saying why
                assert r["skipped"] == FLEX_MISSING and "fwd_ms" not in r, r
                continue
            assert "skipped" not in r and "error" not in r, r
            assert r["fwd_ms"] > 0 and len(r["fwd_times_ms"]) == r["repeats"]
            if name == "flex-stopgrad":  # FlexAttention has no CPU backward
                assert r["note_forward_only"] and "bwd_ms" not in r and r["block_mask_build_s"] >= 0
            else:
                assert r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_bwd_tflops"] > 0
                assert len(r["bwd_times_ms"]) == len(r["fwd_bwd_times_ms"]) == r["repeats"]
        assert rows["ours+kv-mask"]["mask_bytes"] == rows["ours"]["heads"] * shape[1] ** 2


def test_dry_run_cross_check_longest_and_targets(dry_run):
    _, data, table = dry_run
    cc = data["cross_check"]
    assert cc["ours vs sdpa-flash"]["ok"] and cc["ours+kv-mask vs ours+reasoning"]["ok"]
    # on the CPU the same kernels: the variants' plumbing
    assert cc["ours-fwd128 vs ours"]["ok"] and cc["ours-bwd128 vs ours"]["ok"] and cc["ours-det vs ours"]["ok"]
    if not FLEX_MISSING:
        assert cc["flex-stopgrad vs ours+reasoning"]["ok"]  # forward only on the CPU
    assert cc["ours+reasoning vs ours (dk, dv must differ)"]["ok"]
    assert set(data["longest_seq"]) == set(LETTERS) - set(bench_gpu.AB_VARIANTS)  # no search for the A/B variants
    for name, res in data["longest_seq"].items():
        if name == "flex-stopgrad" and FLEX_MISSING:
            assert res["longest"] is None and FLEX_MISSING in res["stopped_by"]
            continue
        assert res["longest"] == 512 and res["lower_bound"]
    assert [t["target"] for t in data["targets"]] == [
        "(a) >= 60% of (d) TFLOP/s", "(b) within 10% of (a)", "(b) >= 1.5x faster than (e)",
        "(b) >= 10x faster than (f)", "longest (b) >= 8x longest (f)"]
    for section in ("fwd ms", "cross-check", "longest sequence", "targets"):
        assert section in table


def test_zero_budget_skips_cleanly(tmp_path):
    out = tmp_path / "b.json"
    rc = bench_gpu.main(["--dry-run", "--device", "cpu", "--budget-s", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["errors"] == []
    assert all("budget" in r["skipped"] for r in data["results"])
    assert data["skipped"] and all("budget" in s for s in data["skipped"])
    assert all(t["pass"] is None for t in data["targets"])


class FakeBudget:
    def __init__(self, left=math.inf):
        self._left = left

    def left(self):
        return self._left


def fake_trial(oom_from=None, error_at=None, seconds=lambda n: (n / 16384) ** 2 * 0.1):
    tried = []

    def trial(n):
        tried.append(n)
        if error_at is not None and n == error_at:
            return {"n": n, "ok": False, "error": "RuntimeError: boom"}
        if oom_from is not None and n >= oom_from:
            return {"n": n, "ok": False, "oom": True, "error": "out of memory"}
        return {"n": n, "ok": True, "fwd_bwd_s": seconds(n)}

    return trial, tried


def search(trial, predict=None, cap_s=100.0, budget=None, start=16384, max_n=131072):
    return bench_gpu.longest_sequence(trial, start, max_n, 1024, cap_s, budget or FakeBudget(), 1.0,
                                      predict_s=predict)


def test_longest_doubles_until_out_of_memory():
    trial, tried = fake_trial(oom_from=65536)
    res = search(trial)
    assert res["longest"] == 32768 and not res["lower_bound"] and tried == [16384, 32768, 65536]
    assert res["stopped_by"] == "out of memory at n=65536"


def test_longest_halves_when_the_start_fails_and_never_retries_a_failure():
    trial, tried = fake_trial(oom_from=16384)
    res = search(trial)
    assert res["longest"] == 8192 and tried == [16384, 8192] and not res["lower_bound"]
    trial, tried = fake_trial(oom_from=1)
    res = search(trial)
    assert res["longest"] is None and tried == [16384, 8192, 4096, 2048, 1024]


def test_longest_tries_the_cap_first_when_predicted_cheap():
    trial, tried = fake_trial()
    res = search(trial, predict=lambda n: 1.0)
    assert res["longest"] == 131072 and res["lower_bound"] and tried == [131072]
    trial, tried = fake_trial(oom_from=65536)  # the cap fails: double from the start
    res = search(trial, predict=lambda n: 1.0)
    assert res["longest"] == 32768 and tried == [131072, 16384, 32768, 65536]
    trial, tried = fake_trial()  # predicted too slow for the per-trial cap: no probe
    res = search(trial, predict=lambda n: 1e3)
    assert tried[0] == 16384 and res["longest"] == 131072


def test_longest_time_cap_budget_and_errors():
    trial, tried = fake_trial(seconds=lambda n: (n / 16384) ** 2)  # 1 s, 4 s, 16 s, ...
    res = search(trial, cap_s=10.0)
    assert res["longest"] == 32768 and res["lower_bound"] and "time cap" in res["stopped_by"]
    trial, tried = fake_trial()
    res = search(trial, budget=FakeBudget(0.5))
    assert res["longest"] is None and tried == [] and res["stopped_by"].startswith("budget")
    trial, tried = fake_trial(error_at=65536)
    res = search(trial)
    assert res["longest"] == 32768 and res["lower_bound"] and "boom" in res["stopped_by"]


def row(name, tflops, batch=2, batch_measured=None, seq=8192, d=128):
    return {"contender": name, "batch": batch, "batch_measured": batch_measured or batch, "seq": seq,
            "head_dim": d, "fwd_bwd_tflops": tflops}


def targets(rows, longest):
    return {t["target"]: t for t in bench_gpu.evaluate_targets(rows, longest, 2, 8192, 128)}


def test_targets_pass_and_fail():
    rows = [row("ours", 300.0), row("ours+reasoning", 290.0), row("sdpa-flash", 450.0),
            row("flex-stopgrad", 150.0), row("reference", 10.0, batch_measured=1), row("ours", 1.0, seq=4096)]
    longest = {"ours+reasoning": {"longest": 131072, "lower_bound": True, "stopped_by": "cap"},
               "reference": {"longest": 8192, "lower_bound": False}}
    t = targets(rows, longest)
    assert t["(a) >= 60% of (d) TFLOP/s"]["pass"] and t["(a) >= 60% of (d) TFLOP/s"]["value"] == pytest.approx(300 / 450)
    assert t["(b) within 10% of (a)"]["pass"] and t["(b) within 10% of (a)"]["value"] == pytest.approx(300 / 290)
    assert t["(b) >= 1.5x faster than (e)"]["pass"]
    assert t["(b) >= 10x faster than (f)"]["pass"] and "batch 1" in t["(b) >= 10x faster than (f)"]["detail"]
    assert t["longest (b) >= 8x longest (f)"]["pass"] and t["longest (b) >= 8x longest (f)"]["value"] == 16

    rows = [row("ours", 200.0), row("ours+reasoning", 150.0), row("sdpa-flash", 450.0),
            row("flex-stopgrad", 120.0), row("reference", 20.0)]
    longest = {"ours+reasoning": {"longest": 32768, "lower_bound": False},
               "reference": {"longest": 8192, "lower_bound": False}}
    t = targets(rows, longest)
    assert [v["pass"] for v in t.values()] == [False, False, False, False, False]


def test_targets_not_measured():
    t = targets([row("ours", 300.0)], {})
    assert all(v["pass"] is None and v["value"] is None for v in t.values())
    assert "(d) sdpa-flash" in t["(a) >= 60% of (d) TFLOP/s"]["detail"]
    # a lower bound that does not reach the target is not a failure
    longest = {"ours+reasoning": {"longest": 32768, "lower_bound": True, "stopped_by": "time cap"},
               "reference": {"longest": 8192, "lower_bound": False}}
    assert targets([], longest)["longest (b) >= 8x longest (f)"]["pass"] is None


@pytest.mark.parametrize("h,n,m,rows", [(3, 40, 40, 7), (2, 24, 56, 5), (1, 64, 64, 64)])
def test_dense_region_mask_is_the_reasoning_region(h, n, m, rows):
    mask = bench_gpu.dense_region_mask(h, n, m, "cpu", rows_per_chunk=rows)
    assert mask.shape == (h, n, m) and mask.is_contiguous()
    assert torch.equal(mask, reasoning_region(n, m, bench_gpu.R, bench_gpu.W).expand(h, n, m))


@pytest.mark.parametrize("var", ("SRT_CUDA_FWD_BLOCK_M", "SRT_CUDA_BWD_BLOCK_N"))
def test_tile_setting_restores_the_environment(var, monkeypatch):
    import _variants

    setting = _variants.fwd_block_m if var == _variants.FWD_BLOCK_M else _variants.bwd_block_n
    monkeypatch.delenv(var, raising=False)
    with setting(128):
        assert os.environ[var] == "128"
    assert var not in os.environ
    monkeypatch.setenv(var, "64")
    with pytest.raises(ZeroDivisionError):
        with setting(128):
            1 / 0
    assert os.environ[var] == "64"


def _check_setting_for_backward_only(contender, observe, off, on):
    """The A/B contender's setting, as observe() reads it, must be `on` when the attention's
    backward op is dispatched (autograd calls it after the contender's function returned) and
    `off` for its forward and after (watched at the dispatcher, where the op reads it); the CPU op
    has one kernel and schedule, so the gradients are the plain op's bit for bit; and a backward
    that raises never reaches the closing hook: the setting stays until the benchmark's free()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ns, _, name = func._schema.name.partition("::")
            if ns == "self_reasoning_tokens":
                self.seen.setdefault(name, []).append(observe())
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 2, 16, 32, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, 16, 32)
    with Spy() as spy:
        out = contender(q, k, v)()
        assert observe() == off
        grads = torch.autograd.grad(out, (q, k, v), do)
    assert spy.seen == {"attn_fwd": [off], "attn_bwd": [on]}, spy.seen
    assert observe() == off
    ref = torch.autograd.grad(bench_gpu.srt.stop_graddable_attn(q, k, v, causal=True), (q, k, v), do)
    for g, r in zip(grads, ref):
        assert torch.equal(g, r)
    out = contender(q, k, v)()
    out.grad_fn.register_prehook(lambda grads: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        torch.autograd.grad(out, (q, k, v), do)
    assert observe() == on
    bench_gpu.Device(torch.device("cpu")).free()
    assert observe() == off
    return q, k, v


def test_bwd128_contender_sets_the_tile_for_its_backward_only(monkeypatch):
    import _variants
    from _variants import BWD_BLOCK_N, ours_bwd128

    monkeypatch.delenv(BWD_BLOCK_N, raising=False)
    q, k, v = _check_setting_for_backward_only(ours_bwd128, lambda: os.environ.get(BWD_BLOCK_N), None, "128")
    # hooks on a node after the attention's (here a multiplication) would close too early: refused
    plain = _variants.srt.stop_graddable_attn
    monkeypatch.setattr(_variants.srt, "stop_graddable_attn", lambda *a, **kw: plain(*a, **kw) * 1)
    with pytest.raises(RuntimeError, match="not the attention's backward node"):
        ours_bwd128(q, k, v)()


def test_deterministic_contender_sets_the_mode_for_its_backward_only():
    # (a4) measures the backward under torch.use_deterministic_algorithms(True), and only it
    from _variants import ours_deterministic

    assert not torch.are_deterministic_algorithms_enabled()
    _check_setting_for_backward_only(ours_deterministic, torch.are_deterministic_algorithms_enabled, False, True)


def test_inherited_tile_settings_are_cleared_and_recorded(monkeypatch, dry_run):
    from _variants import BWD_BLOCK_N, FWD_BLOCK_M, clear_inherited_settings

    monkeypatch.setenv(BWD_BLOCK_N, "128")
    monkeypatch.delenv(FWD_BLOCK_M, raising=False)
    assert clear_inherited_settings() == {BWD_BLOCK_N: "128"}
    assert BWD_BLOCK_N not in os.environ and clear_inherited_settings() == {}
    assert dry_run[1]["meta"]["args"]["inherited_tile_settings"] == {}


def test_ab_lines_call_faster_only_beyond_the_spread():
    def row(who, d, fwd, bwd, fb, jitter):
        times = lambda m: [m * (1 + jitter * k) for k in (-1, -0.5, 0, 0.5, 1)]  # noqa: E731
        return {"contender": who, "batch": 2, "seq": 8192, "head_dim": d,
                "fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": fb,
                "fwd_times_ms": times(fwd), "bwd_times_ms": times(bwd), "fwd_bwd_times_ms": times(fb)}

    results = [row("ours", 128, 1.0, 3.0, 4.0, 0.01), row("ours-fwd128", 128, 0.8, 3.0, 3.8, 0.01),
               row("ours-bwd128", 128, 1.0, 3.03, 4.03, 0.01),
               row("ours-bwd128", 64, 1.0, 2.0, 3.0, 0.01)]  # no (a) at d=64: no line
    lines = bench_gpu.ab_lines(results)
    ab = [x for x in lines if x.startswith("  A/B ")]
    assert len(ab) == 2, lines
    fwd, bwd = ab
    assert "ours-fwd128 vs ours, d=128 b=2 n=8192" in fwd
    assert "fwd 0.800x (0.800 vs 1.000 ms, spread 1.5%/1.5%: faster)" in fwd  # IQR of the 5 times
    assert "fwd+bwd 0.950x" in fwd and "faster" in fwd.split("fwd+bwd")[1]
    # 1% slower with 1.5% spreads on each side: within the noise, not "slower"
    assert "bwd 1.010x" in bwd and "within noise" in bwd and "slower" not in bwd
    assert bench_gpu.ab_lines([row("ours", 128, 1.0, 3.0, 4.0, 0.01)]) == []


def test_allocation_failures_count_as_out_of_memory(monkeypatch):
    # at the edge of memory cuBLAS fails to allocate its handle or workspace with its own words; such
    # a contender has run out of memory (a size limit), not failed, as long as the CUDA context
    # still works (the same words follow an earlier kernel fault, which must stop the benchmark)
    alloc = ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "cudaErrorMemoryAllocation")
    monkeypatch.setattr(bench_gpu, "cuda_context_error", lambda: None)
    for text in ("CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA error: out of memory", *alloc):
        assert bench_gpu.is_oom(RuntimeError(text)), text
    assert not bench_gpu.is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not bench_gpu.is_oom(ValueError("out of memory"))
    monkeypatch.setattr(bench_gpu, "cuda_context_error", lambda: "an illegal memory access")
    for text in alloc:
        assert not bench_gpu.is_oom(RuntimeError(text)), text


def test_dry_run_plot(dry_run, tmp_path):
    # benchmarks/plot_bench.py on the GPU benchmark's JSON (gpu_check.sh's bench.png): one
    # TFLOP/s panel per head dim holding every measured row's fwd+bwd TFLOP/s, the rows without
    # a backward (FlexAttention on the CPU) marked as not run, and the longest-sequence bars
    import plot_bench

    _, data, _ = dry_run
    title, panels = plot_bench.panels_of(data)
    assert data["meta"]["device"] in title
    by_title = {p.title: p for p in panels}
    for d in sorted({r["head_dim"] for r in data["results"]}):
        p = by_title[f"fwd+bwd TFLOP/s, head dim {d}"]
        for r in (r for r in data["results"] if r["head_dim"] == d):
            label = f"({r['letter']}) {r['contender']}"
            if "fwd_bwd_tflops" not in r:  # FlexAttention: no backward on the CPU
                assert r["seq"] in [x for x, _ in p.missing[label]]
                assert r["seq"] not in [x for x, _ in p.series.get(label, [])]
            else:
                assert (r["seq"], r["fwd_bwd_tflops"]) in p.series[label]
    bars = by_title["longest sequence that ran (b=1, h=2, d=32)"].bars
    assert bars == {f"({v['letter']}) {k}": v["longest"] for k, v in data["longest_seq"].items() if v["longest"]}
    png = tmp_path / "bench.png"
    (tmp_path / "bench.json").write_text(json.dumps(data))
    assert plot_bench.main([str(tmp_path / "bench.json"), "--out", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
