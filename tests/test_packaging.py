"""The source distribution: an sdist (what `python -m build` makes first, and what PyPI serves)
must hold every file the build reads, or a wheel built from it fails on a missing header."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted(f for f in out.stdout.decode().split("\0") if f)


def test_the_sdist_holds_every_tracked_file(tmp_path):
    files = tracked_files()
    if not files:
        pytest.skip("needs a git checkout to know which files the project has")
    src = tmp_path / "src"
    for f in files:  # a copy of the tracked files: the build writes egg-info beside setup.py
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    # setuptools' PEP 517 hook, as pip and `python -m build` call it; CPU-only, as on a machine
    # without nvcc (then setup.py names no .cu source, and only MANIFEST.in brings them in)
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FORCE_CUDA": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / name) as tar:
        held = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    missing = [f for f in files if f not in held and f != ".gitignore"]
    assert not missing, f"not in the sdist: {missing}"
    assert {"csrc/mask_semantics.h", "csrc/cuda/attn_fwd_bf16.cu", "csrc/cuda/tile_utils.cuh"} <= held


def test_a_build_that_cannot_import_torch_says_how_to_build(tmp_path):
    # pip's build isolation runs setup.py in a fresh environment without torch (the project does
    # not list it as a build requirement, so that the build uses the installed one): one clear line
    code = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "the build needs torch" in proc.stderr and "pip install --no-build-isolation ." in proc.stderr
