"""The CPU benchmark scripts' command lines: they check their arguments and never write over the
committed results unless asked to (--out naming them). Timing itself is not tested here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def run(script, *args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def import_script(script):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(script[:-3])
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.parametrize("script", ["bench_attention.py", "bench_transformer.py"])
def test_default_output_is_not_the_committed_results(script):
    out = Path(import_script(script).DEFAULT_OUT).resolve()
    assert RESULTS not in out.parents and out.parent == REPO / "runs" / "bench"


def test_bad_arguments_are_refused_on_the_command_line(tmp_path):
    proc = run("bench_transformer.py", "--n", "0", "--out", tmp_path / "x.json")
    assert proc.returncode == 2, proc.stderr
    assert "expected a positive integer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("script, args", [
    ("bench_attention.py", ["--n", "64", "--repeats", "0"]),
    ("bench_attention.py", ["--n", "0"]),
    ("bench_attention.py", ["--heads", "-1"]),
    ("bench_transformer.py", ["--repeats", "0"]),
])
def test_bad_arguments_are_refused(script, args, tmp_path, capsys):
    # in this process (a subprocess spends seconds importing torch): argparse's exit status 2
    with pytest.raises(SystemExit) as exit_info:
        import_script(script).main([*args, "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_attention_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "a.json"
    proc = run("bench_attention.py", "--n", 32, "--repeats", 1, "--heads", 1, "--head-dim", 16, "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {r["contender"] for r in data["results"]} == {"ours", "ours+kv-mask", "reference", "sdpa"}
    assert data["meta"]["heads"] == 1 and data["meta"]["head_dim"] == 16
    assert data["meta"]["processor"]  # times depend on it (AVX2 or AVX-512 loops)
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")  # its plot, beside it
    assert data["meta"]["dtype"] == "float32"


def test_attention_benchmark_in_bfloat16(tmp_path, capsys):
    # in this process, as the bad-argument tests (the float32 test above covers the command line)
    out = tmp_path / "b.json"
    import_script("bench_attention.py").main(["--n", "32", "--repeats", "1", "--heads", "1", "--head-dim", "16",
                                              "--dtype", "bfloat16", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["dtype"] == "bfloat16" and "bfloat16, causal" in capsys.readouterr().out
    assert all("fwd_bwd_s" in r for r in data["results"])


def test_transformer_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "t.json"
    proc = run("bench_transformer.py", "--n", 64, "--repeats", 1, "--impls", "kernel", "kernel-ckpt", "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [(r["impl"], r["n_positions"], r["status"]) for r in data["results"]] == [
        ("kernel", 64, "ok"), ("kernel-ckpt", 64, "ok")]
    assert data["machine"]["processor"] and data["longest_ok"] == {"kernel": 64, "kernel-ckpt": 64}
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
