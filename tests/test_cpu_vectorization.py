"""The CPU kernels' row loops (csrc/cpu/row_ops.cpp) are compiled in several versions, one per
instruction set, and the loader picks one for the CPU it runs on. This reads the built library's
machine code and checks that the AVX2 and AVX-512 versions really are vector loops.

Why a test: the AVX2 version once came out scalar twice over (the clone list "avx2,fma" made an
AVX2 clone without FMA and an FMA clone without AVX2, and without -fno-trapping-math GCC kept
exp_approx's clamps as branches), and on an AVX2-only CPU (AMD EPYC here) the forward took 2.4x
as long. Nothing else fails when that happens: the results are the same, only slower.
"""
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import self_reasoning_tokens as srt

ROW_OPS = ("exp_sub_sum", "row_max", "softmax_grad_row", "stop_row", "dot_row", "scale_row")
PACKED = re.compile(r"\bv\w+ps\b.*%(ymm|zmm)\d+")  # packed single-precision vector instructions
FMA = re.compile(r"\bvfn?m(add|sub)\w*ps\b.*%ymm\d+")


@pytest.fixture(scope="module")
def clones():
    """{function: {clone suffix: [instruction lines]}} for the float row ops of the built library."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("the instruction-set clones are built for x86-64 Linux only")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    if not srt.HAS_EXTENSION:
        pytest.skip("the extension is not built")
    from self_reasoning_tokens import _C

    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", str(Path(_C.__file__))],
                          check=True, capture_output=True, text=True).stdout
    header = re.compile(r"^[0-9a-f]+ <srt::cpu::(\w+)\(float[^>]*\) \[clone \.(\w+)\]>:$")
    found, current = {}, None
    for line in text.splitlines():
        m = header.match(line)
        if m:
            current = found.setdefault(m.group(1), {}).setdefault(m.group(2), [])
        elif not line.strip():
            current = None
        elif current is not None:
            current.append(line)
    if "resolver" not in found.get("exp_sub_sum", {}):
        pytest.skip("built without GCC target_clones (another compiler): one version of each loop")
    return found


@pytest.fixture(scope="module")
def gcc_major(clones):
    """The newest GCC major version in the library's .comment strings ("GCC: (...) 12.2.0")."""
    from self_reasoning_tokens import _C

    found = re.findall(rb"GCC: \([^)]*\) (\d+)\.", Path(_C.__file__).read_bytes())
    return max((int(v) for v in found), default=0)


def _avx2_clone(versions):
    names = [name for name in versions if name in ("arch_x86_64_v3", "avx2")]
    assert len(names) == 1, f"expected one AVX2-level clone, found {sorted(versions)}"
    return names[0]


@pytest.mark.parametrize("op", ROW_OPS)
def test_avx2_and_avx512_clones_use_vector_registers(clones, op):
    versions = clones[op]
    assert {"avx512f", "default", "resolver"} <= set(versions), sorted(versions)
    avx2 = _avx2_clone(versions)
    ymm = [line for line in versions[avx2] if PACKED.search(line) and "%ymm" in line]
    # AVX-512F has no byte compares on 512-bit registers, so stop_row's bool loads keep it on ymm
    wide = [line for line in versions["avx512f"] if PACKED.search(line)]
    assert ymm, f"{op}: the {avx2} clone has no packed 256-bit instruction (scalar loop)"
    assert wide, f"{op}: the avx512f clone has no packed vector instruction (scalar loop)"


def test_avx2_clone_of_exp_uses_fma(clones, gcc_major):
    """GCC 12 and newer name the AVX2 level x86-64-v3, which includes FMA: the exp polynomial's
    multiply-adds are fused. (An older GCC builds a plain AVX2 clone, vectorised but unfused.)"""
    if gcc_major < 12:
        pytest.skip(f"built by GCC {gcc_major or '?'}: before GCC 12 the AVX2 clone has no FMA")
    versions = clones["exp_sub_sum"]
    assert _avx2_clone(versions) == "arch_x86_64_v3", sorted(versions)
    assert any(FMA.search(line) for line in versions["arch_x86_64_v3"])
