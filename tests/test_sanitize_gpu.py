"""benchmarks/sanitize_gpu.py, compute-sanitizer's workload: its cases cover every kernel variant at
shapes with partial tiles, it runs (on the CPU here: the same code paths, the CPU kernels in the
low precisions against float64), and it reports a wrong or failing case with a nonzero exit."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sanitize_gpu  # noqa: E402


def test_cases_cover_every_kernel_variant_with_partial_tiles():
    full = sanitize_gpu.case_list(quick=False)
    variants = {(dtype, tiles) for dtype, tiles, _, _ in full}
    assert variants == {(torch.float16, 64), (torch.float16, 128), (torch.bfloat16, 64),
                        (torch.bfloat16, 128), (torch.float32, None)}
    for variant in variants:
        dims = sorted({d for dtype, tiles, d, _ in full if (dtype, tiles) == variant})
        assert dims == [32, 64, 96, 128]
    assert len(full) == len(variants) * 4 * len(sanitize_gpu.SHAPES)
    for _, _, _, n, m, _ in sanitize_gpu.SHAPES:
        assert n % 64 and m % 64, "every shape must end in partial 64- and 128-row tiles"
    quick = sanitize_gpu.case_list(quick=True)
    assert {(dtype, tiles) for dtype, tiles, _, _ in quick} == variants
    assert len(quick) == len(variants) * 2


def test_list_prints_the_cases_and_runs_nothing(capsys):
    assert sanitize_gpu.main(["--list", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[0].startswith("[ 1/10] float16") and "tiles 64" in lines[0]


def test_cpu_run_of_every_case_passes(capsys):
    assert sanitize_gpu.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sanitize_gpu: 80 of 80 cases ok" in out and "WRONG" not in out


def _perturbed(real, dtype):
    """stop_graddable_attn whose output is off by 0.5 for inputs of `dtype`."""
    def attn(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return out + 0.5 if q.dtype == dtype else out
    return attn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_wrong_result_fails_the_run(monkeypatch, capsys, dtype):
    monkeypatch.setattr(sanitize_gpu.srt, "stop_graddable_attn",
                        _perturbed(sanitize_gpu.srt.stop_graddable_attn, dtype))
    assert sanitize_gpu.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    wrong = [line for line in out.splitlines() if ": WRONG" in line]
    name = str(dtype).replace("torch.", "")
    # exactly the cases of that dtype, and each of them
    assert len(wrong) == (4 if dtype == torch.bfloat16 else 2) and all(name in line for line in wrong), out
    assert f"sanitize_gpu: {10 - len(wrong)} of 10 cases ok" in out


def test_a_raising_case_is_reported_and_the_others_still_run(monkeypatch, capsys):
    real = sanitize_gpu.srt.stop_graddable_attn

    def attn(q, k, v, **kw):
        if q.dtype == torch.float16 and q.shape[-1] == 128:
            raise RuntimeError("planted failure\nsecond line")
        return real(q, k, v, **kw)

    monkeypatch.setattr(sanitize_gpu.srt, "stop_graddable_attn", attn)
    assert sanitize_gpu.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert out.count("RAISED RuntimeError: planted failure") == 2 and "second line" not in out
    assert "sanitize_gpu: 8 of 10 cases ok" in out


def test_tile_settings_are_set_per_case_and_restored(monkeypatch):
    # each tensor-core case runs both passes with its tile setting; nothing leaks to the next case
    seen = []
    real = sanitize_gpu.srt.stop_graddable_attn

    def attn(q, k, v, **kw):
        seen.append((q.dtype, os.environ.get("SRT_CUDA_FWD_BLOCK_M"), os.environ.get("SRT_CUDA_BWD_BLOCK_N")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(sanitize_gpu.srt, "stop_graddable_attn", attn)
    monkeypatch.setenv("SRT_CUDA_BWD_BLOCK_N", "128")  # inherited: removed at start
    assert sanitize_gpu.main(["--device", "cpu", "--quick"]) == 0
    low = [s for s in seen if s[0] in (torch.float16, torch.bfloat16)]
    assert {s[1:] for s in low} == {("64", "64"), ("128", "128")}
    assert {s[1:] for s in seen if s[0] in (torch.float32, torch.float64)} == {(None, None)}
    assert "SRT_CUDA_FWD_BLOCK_M" not in os.environ
