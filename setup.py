"""Build of the self_reasoning_tokens extension.

Always builds the C++ CPU kernels. Adds the CUDA kernels (csrc/cuda/*.cu) when torch is a CUDA
build and nvcc is found, or when FORCE_CUDA=1; FORCE_CUDA=0 forces a CPU-only build.
Honours TORCH_CUDA_ARCH_LIST (default "9.0" when no GPU is visible) and MAX_JOBS.

Install with `pip install --no-build-isolation .` (build isolation would fetch a second,
ABI-mismatched torch) or build in place with `python setup.py build_ext --inplace`.
"""
import glob
import os
import re
import shutil
import subprocess

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def resolve_cuda_home():
    """The CUDA toolkit home: $CUDA_HOME, else the TOP= that `nvcc --dryrun` prints, else (no nvcc
    on PATH) /usr/local/cuda where it has bin/nvcc, as torch looks too.

    The nvcc on PATH may be a wrapper script outside the toolkit, so torch's guess (the parent
    of the nvcc found) can point to the wrong place and linking then fails on -lcudart.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = "/usr/local/cuda"
        return os.path.realpath(default) if os.path.exists(os.path.join(default, "bin", "nvcc")) else None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m and os.path.isdir(m.group(1)):
            return os.path.realpath(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))


force = os.environ.get("FORCE_CUDA")
cuda_home = resolve_cuda_home()
if cuda_home and force != "0":
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = cuda_home

try:
    import torch  # noqa: E402
except ImportError as e:  # e.g. pip's build isolation, whose fresh environment has no torch
    raise SystemExit(
        f"self_reasoning_tokens: the build needs torch, which this Python cannot import ({e}). Install "
        "torch first, then build against it without build isolation: "
        "`pip install --no-build-isolation .` (isolation would hide your torch)") from None
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = (force == "1") or (force != "0" and torch.version.cuda is not None and cuda_home is not None)
if with_cuda and torch.version.cuda is None:
    raise RuntimeError("FORCE_CUDA=1 but this torch is a CPU-only build: install a CUDA build of torch")
if with_cuda and cuda_home is None:
    raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME")
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # Without a visible GPU torch cannot guess the target architectures.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
# -fno-trapping-math (PyTorch's own builds use it): lets GCC turn the float compares of the row
# loops (csrc/cpu/row_ops.cpp) into vector blends for AVX2; NaN and inf results are unchanged.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
if with_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx_flags.append("-DSRT_WITH_CUDA")
    ext = CUDAExtension(
        "self_reasoning_tokens._C",
        sources,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-DSRT_WITH_CUDA", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension("self_reasoning_tokens._C", sources,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

print(f"self_reasoning_tokens: building {'CPU + CUDA' if with_cuda else 'CPU-only'} extension"
      + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})" if with_cuda else ""))

# The license as setuptools of either generation takes it: an SPDX expression (PEP 639,
# setuptools >= 77), the legacy free-text field before that.
_major = int(setuptools.__version__.split(".")[0])
license_kw = {"license_expression": "MIT"} if _major >= 77 else {"license": "MIT"}

setup(
    **license_kw,
    packages=find_packages(include=["self_reasoning_tokens", "self_reasoning_tokens.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
