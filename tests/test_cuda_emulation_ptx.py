"""The emulated PTX layer (tests/cuda_emulation/ptx.cuh) on its own, against torch.

tests/test_cuda_emulation.py trusts tests/cuda_emulation/ptx.cuh to behave like the GPU's
mma.sync / ldmatrix / cp.async. Here small kernels (tests/cuda_emulation/ptx_unit.cpp, compiled
against the emulator without torch headers, called through ctypes) check it directly:
- a 16x16 A times a 16x16 B (two m16n8k16 n-tiles) plus C, for float16 and bfloat16, with A
  loaded by ldmatrix_x4, by ldmatrix_x4_trans from a transposed copy, or packed into registers
  with pack2 per the fragment layout, and B by ldmatrix_x4 (stored n x k) or ldmatrix_x4_trans
  (stored k x n), the result stored per the accumulator layout: equal to torch's matmul;
- every register of ldmatrix_x4 (and .trans) for scattered row addresses;
- pack2 against torch's round-to-nearest-even conversions, bit for bit;
- cp.async in both timing modes: zero fill, group accounting (wait<N>, empty and uncommitted
  groups), a missing wait (late mode reads poison), pending copies at exit, misaligned or
  out-of-range addresses, and a cross-warp race that the warp-by-warp schedule exposes;
- warp-collective misuse (lanes skipping an mma, lanes in different collectives) is reported.
"""
import ctypes
import os
import platform
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emulation")
POISON = 0x7FFF7FFF  # the emulator's shared-memory poison, per 32-bit word
EARLY, LATE = 0, 1

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the fiber emulator uses Linux ucontext")


class Lib:
    def __init__(self, path):
        self.dll = ctypes.CDLL(path)
        self.err = ctypes.create_string_buffer(4096)

    def call(self, name, *args):
        rc = getattr(self.dll, name)(*args, self.err, len(self.err))
        if rc != 0:
            raise RuntimeError(self.err.value.decode())


def build_ptx_lib(work, name="srt_ptx_emulation", extra_cflags=()):
    """Compiles ptx_unit.cpp with the emulator in `work` (a new folder) and returns its Lib."""
    from torch.utils.cpp_extension import load

    shutil.copytree(os.path.join(EMU, "stubs"), work / "stubs")
    sources = ("ptx_unit.cpp", "emu_runtime.cpp", "emu_racecheck.cpp", "emu_banks.cpp")
    for f in ("ptx.cuh", *sources):
        shutil.copy(os.path.join(EMU, f), work / f)
    os.makedirs(work / "build")
    load(name, [str(work / f) for f in sources], extra_include_paths=[str(work), str(work / "stubs")],
         extra_cflags=["-O2", *extra_cflags], build_directory=str(work / "build"), is_python_module=False,
         verbose=False)
    return Lib(str(work / "build" / f"{name}.so"))


def shared_ptx_lib(name, extra_cflags=()):
    """build_ptx_lib's library, built once for all pytest processes and files that ask for the same
    flags (the racecheck and bank-conflict tests), under a file lock, in a folder named by a hash
    of the sources, the flags and the torch version."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_cuda_emulation as emulation  # (its build folders and lock; imported here only)

    files = {}
    for f in ["ptx.cuh", "ptx_unit.cpp", "emu_runtime.cpp", "emu_racecheck.cpp", "emu_banks.cpp"] + [
            os.path.join("stubs", f) for f in sorted(os.listdir(os.path.join(EMU, "stubs")))]:
        with open(os.path.join(EMU, f)) as fh:
            files[f] = fh.read()
    work = emulation.shared_workdir(files, name, extra_cflags)
    with emulation.build_lock(work):
        so = work / "lib" / "build" / f"{name}.so"
        if not so.exists():
            shutil.rmtree(work / "lib", ignore_errors=True)
            (work / "lib").mkdir()
            return build_ptx_lib(work / "lib", name, extra_cflags)
        return Lib(str(so))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_ptx_lib(tmp_path_factory.mktemp("ptx_emulation"))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


# ---------------------------------------------------------------------------------------------
# mma_16816 with ldmatrix / pack2 operands, against torch


@pytest.mark.parametrize("b_trans", (0, 1), ids=("B_ldmatrix", "B_ldmatrix_trans"))
@pytest.mark.parametrize("a_src", (0, 1, 2), ids=("A_ldmatrix", "A_ldmatrix_trans", "A_pack2"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
def test_mma_matches_torch_matmul(lib, dtype, a_src, b_trans):
    gen = torch.Generator().manual_seed(17 + 3 * a_src + b_trans)
    # values exactly representable in dtype, all different, so any misplaced element shows
    A = torch.randn(16, 16, generator=gen).to(dtype).float()
    B = torch.randn(16, 16, generator=gen).to(dtype).float()
    C = torch.randn(16, 16, generator=gen)
    D = torch.full((16, 16), float("nan"))
    lib.call("ptx_mma", int(dtype == torch.bfloat16), a_src, b_trans, _ptr(A), _ptr(B), _ptr(C), _ptr(D))
    ref = (A.double() @ B.double() + C.double()).float()
    torch.testing.assert_close(D, ref, rtol=1e-6, atol=1e-6)


def test_mma_accumulates_in_fp32_not_in_the_input_type(lib):
    # 1 + 2^-12 is not a float16 (nor bfloat16) number, but the fp32 accumulator keeps it
    A = torch.zeros(16, 16)
    B = torch.zeros(16, 16)
    A[0, 0] = 2.0 ** -6
    B[0, 0] = 2.0 ** -6
    C = torch.ones(16, 16)
    D = torch.empty(16, 16)
    lib.call("ptx_mma", 0, 2, 1, _ptr(A), _ptr(B), _ptr(C), _ptr(D))
    assert D[0, 0].item() == 1 + 2.0 ** -12
    assert (D.flatten()[1:] == 1).all()


# ---------------------------------------------------------------------------------------------
# ldmatrix, register by register


def _expected_ldmatrix(rows, trans):
    """Shared memory holds element e (16-bit) at element index e; rows[l] is the 16-byte row lane
    l addresses. PTX: threads 8i..8i+7 address the rows of matrix i; lane l receives row l // 4,
    elements 2 (l % 4), 2 (l % 4) + 1 of matrix i in register i (with .trans: the same of the
    transposed matrix)."""
    out = torch.zeros(32, 4, dtype=torch.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            if not trans:
                lo = 8 * rows[8 * i + g] + 2 * t
                hi = lo + 1
            else:
                lo = 8 * rows[8 * i + 2 * t] + g
                hi = 8 * rows[8 * i + 2 * t + 1] + g
            out[lane, i] = lo | (hi << 16)
    return out


@pytest.mark.parametrize("trans", (0, 1), ids=("x4", "x4_trans"))
def test_ldmatrix_registers(lib, trans):
    rows = torch.randperm(64, generator=torch.Generator().manual_seed(5 + trans))[:32].to(torch.int32)
    out32 = torch.zeros(32 * 4, dtype=torch.int32)
    lib.call("ptx_ldmatrix", trans, -1, 0, _ptr(rows), _ptr(out32))
    out = out32.view(32, 4).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(out, _expected_ldmatrix(rows.tolist(), trans))


@pytest.mark.parametrize("bad_kind, message", ((0, "not 16-byte aligned"), (1, "outside the launch")))
def test_ldmatrix_rejects_bad_row_addresses(lib, bad_kind, message):
    rows = torch.arange(32, dtype=torch.int32)
    out = torch.zeros(32 * 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message) as e:
        lib.call("ptx_ldmatrix", 0, 5, bad_kind, _ptr(rows), _ptr(out))
    assert "lane 5" in str(e.value)
    lib.call("ptx_ldmatrix", 1, -1, 0, _ptr(rows), _ptr(out))  # the emulator recovered


# ---------------------------------------------------------------------------------------------
# pack2


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
def test_pack2_rounds_to_nearest_even_lo_in_low_half(lib, dtype):
    gen = torch.Generator().manual_seed(3)
    one_ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    special = [1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2), 1 + one_ulp / 2 + 2.0 ** -20,
               0.0, -0.0, 1e-7, -3e-5, 65504.0, 65520.0, 1e5, 3e38, float("inf"), float("-inf")]
    lo = torch.cat([torch.tensor(special), torch.randn(2000, generator=gen) * 10.0 ** torch.randint(-6, 6, (2000,), generator=gen)]).float()
    hi = torch.randn(lo.numel(), generator=gen).float()
    out = torch.zeros(lo.numel(), dtype=torch.int32)
    lib.dll.ptx_pack2(int(dtype == torch.bfloat16), _ptr(lo), _ptr(hi), lo.numel(), _ptr(out))
    u = out.to(torch.int64) & 0xFFFFFFFF
    want_lo = lo.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    want_hi = hi.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(u & 0xFFFF, want_lo)
    assert torch.equal(u >> 16, want_hi)


# ---------------------------------------------------------------------------------------------
# warp-collective misuse


def test_mma_skipped_by_some_lanes_is_a_deadlock(lib):
    with pytest.raises(RuntimeError, match=r"DEADLOCK(.|\n)*lanes 0-15 waiting in mma_16816<__half>(.|\n)*lanes 16-31 exited"):
        lib.call("ptx_diverge", 0)


def test_lanes_in_different_collectives_are_reported(lib):
    with pytest.raises(RuntimeError, match="different warp-collective operations"):
        lib.call("ptx_diverge", 1)


# ---------------------------------------------------------------------------------------------
# cp.async


def _src():
    # 65 chunks of 4 floats: chunk c holds c + 0.25 k; chunk 64 is the "X" of the race test
    return torch.arange(65 * 4, dtype=torch.float32).view(65, 4) / 4 + 1


def _cp(lib, mode, scenario, blocks=1):
    src = _src()
    out = torch.full((blocks, 128, 4), -1.0)
    lib.call("ptx_cp_async", mode, scenario, blocks, _ptr(src), _ptr(out))
    return src, out


def _poisoned(t):
    return (t.view(torch.int32) == POISON).all().item()


ROLL = (torch.arange(64) + 1) % 64  # each thread reads the next thread's chunk


@pytest.mark.parametrize("mode", (EARLY, LATE), ids=("early", "late"))
def test_cp_async_copies_and_zero_fills(lib, mode):
    src, out = _cp(lib, mode, 0)
    assert torch.equal(out[0, :64], src[ROLL])
    src, out = _cp(lib, mode, 1)  # copies with valid=false (and a null source) write zeros
    want = src[ROLL].clone()
    want[ROLL % 3 == 0] = 0
    assert torch.equal(out[0, :64], want)


@pytest.mark.parametrize("mode", (EARLY, LATE), ids=("early", "late"))
def test_cp_async_destination_is_undefined_until_the_wait(lib, mode):
    # a destination holding valid data: read back between the copy's issue and its wait
    src, out = _cp(lib, mode, 13)
    if mode == LATE:
        assert _poisoned(out[0, :64])  # not the old data: in flight, its contents are undefined
    else:
        assert torch.equal(out[0, :64], src[:64])
    assert torch.equal(out[0, 64:], src[:64])  # after the wait: the copy


def test_cp_async_missing_wait_reads_poison_in_late_mode(lib):
    src, out = _cp(lib, LATE, 2)
    # every chunk whose copying thread has not reached its (late) wait yet reads as poison: all
    # but the last, chunk 0, copied by thread 0 which waited before thread 63 ran
    assert _poisoned(out[0, :63])
    src, out = _cp(lib, EARLY, 2)  # early mode copies at issue: this bug only shows in late mode
    assert torch.equal(out[0, :64], src[ROLL])


@pytest.mark.parametrize("mode", (EARLY, LATE), ids=("early", "late"))
def test_cp_async_wait_group_semantics(lib, mode):
    # (in late mode thread 0 performs its last copies at its final wait<0>, before thread 63
    # reads chunk 0: the poison shows in the 63 other chunks)
    src, out = _cp(lib, mode, 3)  # two groups, wait<1>: the older one has landed
    assert torch.equal(out[0, :64], src[ROLL])
    if mode == LATE:
        assert _poisoned(out[0, 64:127])  # the newer one may still be in flight
    else:
        assert torch.equal(out[0, 64:], src[(ROLL + 1) % 64])
    src, out = _cp(lib, mode, 10)  # an empty group is among the newest N: wait<1> covers the copy
    assert torch.equal(out[0, :64], src[ROLL])
    src, out = _cp(lib, mode, 4)  # wait<0> does not cover copies never committed
    if mode == LATE:
        assert _poisoned(out[0, :63])
    else:
        assert torch.equal(out[0, :64], src[ROLL])


@pytest.mark.parametrize("mode", (EARLY, LATE), ids=("early", "late"))
def test_cp_async_misuse_is_reported(lib, mode):
    with pytest.raises(RuntimeError, match=r"exited with 1 cp.async copies not waited for \(0 of them never committed\)"):
        _cp(lib, mode, 5)
    with pytest.raises(RuntimeError, match=r"exited with 1 cp.async copies not waited for \(1 of them never committed\)"):
        _cp(lib, mode, 6)
    with pytest.raises(RuntimeError, match="shared destination.*not 16-byte aligned"):
        _cp(lib, mode, 7)
    with pytest.raises(RuntimeError, match="global source .* not 16-byte aligned"):
        _cp(lib, mode, 8)
    with pytest.raises(RuntimeError, match="outside the launch's 2048 bytes"):
        _cp(lib, mode, 9)
    src, out = _cp(lib, mode, 0)  # and the emulator still works afterwards
    assert torch.equal(out[0, :64], src[ROLL])


def test_cp_async_mode_is_checked(lib):
    with pytest.raises(RuntimeError, match="mode must be 0"):
        _cp(lib, 2, 0)


@pytest.mark.parametrize("mode", (EARLY, LATE), ids=("early", "late"))
def test_missing_barrier_before_buffer_reuse_shows(lib, mode):
    # warp 1 refills a buffer warp 0 still reads: the warps run one after the other between
    # barriers, in ascending order in block 0 and descending in block 1, so block 1 reads the new data
    src, out = _cp(lib, mode, 11, blocks=2)
    x = src[64].expand(32, 4)
    assert torch.equal(out[0, :32], x)
    assert not torch.equal(out[1, :32], x)
    src, out = _cp(lib, mode, 12, blocks=2)  # with the barrier: both blocks read X
    assert torch.equal(out[0, :32], x) and torch.equal(out[1, :32], x)
