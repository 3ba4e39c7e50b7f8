"""Races in the CUDA kernels, found on the CPU (the emulator's racecheck).

tests/test_cuda_emulation.py shows a missing barrier only where the warp-by-warp schedule changes
the results, and cannot see a plain += where an atomicAdd is needed (its blocks run one after the
other). Here the emulator is built a second time with GCC's -fsanitize=thread instrumentation,
every load and store reporting to tests/cuda_emulation/emu_racecheck.cpp, which flags two accesses
of different threads to the same shared-memory bytes, at least one a write, with no barrier between
them (no __syncthreads; for lanes of one warp, no warp collective either): compute-sanitizer's
racecheck, without a GPU. In the buffers the kernels write (global memory) it also flags two
accesses from different blocks, at least one a plain write (atomicAdd against atomicAdd is fine).
The checker itself is tested first on small planted races and their fixed versions
(tests/cuda_emulation/ptx_unit.cpp: race_kernel, global_race_kernel); then every kernel variant
runs on the GPU test's cases and must have no hazard, in both cp.async timing modes; and a build
with one barrier taken out of each tensor-core kernel, dQ added without atomics and the backward
reading a Q/dO tile whose cp.async may still be in flight must be reported.
"""
import ctypes
import os
import platform
import sys

import pytest
import torch

import self_reasoning_tokens as srt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_build as gpu_cases  # noqa: E402
import test_cuda_emulation as emulation  # noqa: E402
import test_cuda_emulation_ptx as ptx  # noqa: E402

import test_cuda_bank_conflicts as banks  # noqa: E402

RACECHECK_CFLAGS = emulation.RACECHECK_CFLAGS

pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux", reason="the fiber emulator uses Linux ucontext"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(emulation.ROOT, "csrc", "cuda")),
                       reason="csrc/ is not next to the tests (installed package)"),
]


# ---- the checker on planted races (ptx_unit.cpp's race_kernel) ----

@pytest.fixture(scope="module")
def race_lib():
    return ptx.shared_ptx_lib("srt_ptx_racecheck", RACECHECK_CFLAGS)


def _race(lib, mode, scenario):
    src = torch.arange(64, dtype=torch.float32)
    out = torch.zeros(64 * 4)
    lib.call("ptx_race", mode, scenario, ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(out.data_ptr()))
    return out


RACY = {  # scenario: (hazard kinds the report must name, what the threads do)
    1: (("RAW", "WAR"), "write, then read another warp's word, no barrier"),
    2: (("RAW", "WAR"), "after a barrier, read another warp's word, then overwrite one it reads"),
    3: (("WAW",), "two warps write the same words"),
    4: (("RAW", "WAR"), "lanes of one warp exchange words without __syncwarp"),
    6: (("RAW", "WAR"), "cp.async, wait, then read another warp's destination without a barrier"),
    8: (("RAW",), "ldmatrix of rows another warp wrote, no barrier"),
    11: (("cp.async RAW",), "another warp reads a cp.async destination after barriers but before the wait"),
    13: (("RAW",), "another warp reads a cp.async destination after the wait, the only barrier before it"),
}
CLEAN = {0: "barrier between write and read", 5: "__syncwarp between the lanes",
         7: "cp.async, wait, barrier", 9: "ldmatrix after a barrier", 10: "each thread its own word",
         12: "each lane overwrites its own ldmatrix row after the ldmatrix"}


@pytest.mark.parametrize("mode", (ptx.EARLY, ptx.LATE), ids=("early", "late"))
@pytest.mark.parametrize("scenario", sorted(RACY))
def test_planted_races_are_reported(race_lib, scenario, mode):
    kinds, _ = RACY[scenario]
    with pytest.raises(RuntimeError) as e:
        _race(race_lib, mode, scenario)
    msg = str(e.value)
    assert msg.startswith("emu: racecheck: ") and "race_kernel" in msg, msg
    for kind in kinds:
        assert f"{kind} hazard at shared-memory offset" in msg, msg
    in_flight, unordered = "still in flight (its issuer has not waited for it)", "with no barrier between"
    between = {11: (in_flight,), 13: (in_flight, unordered)}.get(scenario, (unordered,))
    assert any(b in msg for b in between) and "(warp " in msg, msg
    if scenario == 11:  # the copy's issue is named, not the wait that completes it
        assert "copies into with cp.async at" in msg and "emu::cp_async_wait" not in msg, msg


@pytest.mark.parametrize("mode", (ptx.EARLY, ptx.LATE), ids=("early", "late"))
@pytest.mark.parametrize("scenario", sorted(CLEAN))
def test_the_fixed_versions_are_clean(race_lib, scenario, mode):
    out = _race(race_lib, mode, scenario)
    if scenario == 0:  # and compute what they should
        assert torch.equal(out[::4], torch.arange(64.0).roll(-32))
    if scenario == 10:
        assert torch.equal(out.view(64, 4)[:, 2], torch.arange(64.0) + 2)
    if scenario == 12:  # the rows as written before the overwrite: register m of lane l holds
        # elements 2 (l % 4), +1 of row l // 4 of matrix m, i.e. the float of lane 8 m + l // 4 if l % 4 == 0
        lane = torch.arange(32)
        for m in range(4):
            expect = torch.where(lane % 4 == 0, (8 * m + lane // 4).float(), torch.zeros(32))
            assert torch.equal(out.view(64, 4)[:32, m], expect), (m, out.view(64, 4)[:32, m])


GLOBAL_RACY = {1: "WAW", 3: "atomic WAW", 4: "RAW", 5: "WAW", 7: "RAW"}
GLOBAL_CLEAN = (0, 2, 6)


@pytest.mark.parametrize("scenario", sorted(GLOBAL_RACY) + list(GLOBAL_CLEAN))
def test_global_memory_between_blocks_and_threads(race_lib, scenario):
    buf = torch.zeros(128)
    call = lambda: race_lib.call("ptx_global_race", scenario, ctypes.c_void_p(buf.data_ptr()))  # noqa: E731
    if scenario in GLOBAL_CLEAN:
        call()
        if scenario == 2:  # both blocks' atomic additions landed
            assert torch.equal(buf[:64], torch.full((64,), 2.0))
        return
    with pytest.raises(RuntimeError) as e:
        call()
    msg = str(e.value)
    assert "global-memory hazard(s)" in msg and f"{GLOBAL_RACY[scenario]} hazard at byte " in msg, msg
    assert "shared-memory hazard" not in msg
    between = "in another block (blocks are unordered)" if scenario != 5 else "with no barrier between"
    assert between in msg, msg


def test_report_names_the_code_of_both_accesses(race_lib):
    with pytest.raises(RuntimeError) as e:
        _race(race_lib, ptx.LATE, 6)
    msg = str(e.value)
    # the read in the kernel, the write in the cp.async wait that completed the copy (late mode)
    assert "reads what block 0 thread 0" in msg and "emu::cp_async_wait" in msg and "module offset 0x" in msg, msg


def test_the_uninstrumented_build_does_not_check(tmp_path):
    # the plain emulation (test_cuda_emulation*.py) pays nothing for the checker: without the
    # instrumentation the planted race runs through (its result then depends on the schedule)
    lib = ptx.build_ptx_lib(tmp_path / "plain", "srt_ptx_uninstrumented")
    assert lib.dll.ptx_racecheck_instrumented() == 0
    _race(lib, ptx.EARLY, 1)


# ---- the real kernels ----

@pytest.fixture(scope="module")
def emu_race():
    if not srt.HAS_EXTENSION:
        pytest.skip("the compiled extension is missing")
    ops = emulation.shared_emulation("srt_cuda_emulation_race", RACECHECK_CFLAGS)
    assert ops.racecheck_instrumented()
    return ops


# (dtype, tile setting, cp.async modes): the float32 kernels use no cp.async, one mode is enough
VARIANTS = [(torch.float32, "default", "early")] + [
    (dtype, tiles, mode) for dtype, tiles in ((torch.bfloat16, "default"), (torch.float16, "default"),
                                              (torch.bfloat16, "fwd128"), (torch.float16, "bwd128"))
    if emulation.TENSOR_CORE_KERNELS for mode in sorted(emulation.CP_ASYNC_MODES)]


@pytest.mark.parametrize("dtype,tiles,cp_mode", VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_have_no_hazards(emu_race, dtype, tiles, cp_mode, monkeypatch):
    # every case of the GPU test, at two head dims (the smallest and the largest tile shapes);
    # a hazard fails the launch with the report, and the results must still be right. In the
    # early cp.async mode the tensor-core kernels' runs also count the shared-memory bank
    # conflicts, which must be none (tests/test_cuda_bank_conflicts.py, which counts the float32
    # kernels itself; the counts do not depend on the mode)
    gpu_cases.use_tiles(monkeypatch, tiles)
    emu_race.set_cp_async_mode(emulation.CP_ASYNC_MODES[cp_mode])
    count_banks = cp_mode == "early" and dtype != torch.float32
    emu_race.reset_bank_count()
    emu_race.set_bank_count(count_banks)
    try:
        for head_dim in (32, 128):
            emulation._check_cases_against_cpu(emu_race, dtype, head_dim, f"racecheck, {tiles}, cp.async {cp_mode}")
    finally:
        emu_race.set_bank_count(False)
        emu_race.set_cp_async_mode(emulation.CP_ASYNC_MODES["early"])
    if count_banks:
        sites = banks.bank_sites(emu_race, banks.module_path(banks.RACE_BUILD))
        banks.assert_no_bank_conflicts(sites, dtype, f"{dtype} {tiles} d=32,128")


# What makes the backward's deterministic schedule deterministic on a GPU: with the order of
# atomicAdds checked too (set_ordered_atomics), the default schedule's dQ additions from several key
# tiles at once are reported ("atomic order"), the deterministic schedule's are not (each block of
# a round adds into its own buffer, each element from one thread, rounds in launch order).
@pytest.mark.parametrize("dtype,tiles", emulation.DETERMINISTIC_VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_deterministic_schedule_fixes_the_dq_additions_order(emu_race, helpers, dtype, tiles, monkeypatch):
    gpu_cases.use_tiles(monkeypatch, tiles)
    emu_race.set_ordered_atomics(True)
    try:
        with pytest.raises(RuntimeError, match=r"atomic order hazard at byte \d+ of a \d+-byte global buffer") as e:
            emulation._check_cases_against_cpu(emu_race, dtype, 64, "default schedule")
        assert "in another block (blocks are unordered)" in str(e.value)
        with helpers.deterministic():
            for sm_count in (3, 1000):
                emu_race.set_sm_count(sm_count)
                emulation._check_cases_against_cpu(emu_race, dtype, 64, f"deterministic schedule, {sm_count} SMs")
    finally:
        emu_race.set_ordered_atomics(False)
        emu_race.set_sm_count(3)


# One barrier taken out of each tensor-core kernel (the text must be there: a changed kernel fails
# this test instead of passing it vacuously): the checker must name the kernel.
PLANTED = {
    "fwd_tc_kernel.cuh": ("    __syncthreads();     // ...for every thread, and every warp is done reading sK\n",
                          "attn_fwd_tc_kernel"),
    "bwd_tc_kernel.cuh": ("    __syncthreads();  // the next steps read every row and key of the three tiles\n",
                          "attn_bwd_tc_kernel"),
}
# and dQ added without atomics (the emulator's atomic_add2, which the tensor-core backward uses)
PLANTED_NON_ATOMIC = ("  emu::race::atomic_add2(dst, a, b);\n", "  dst[0] += a;\n  dst[1] += b;\n")
# and the backward reading a Q/dO tile whose cp.async is still in flight (the wait leaves one group
# too many): with the copies done at issue (early mode) the results are right, only the checker sees it
PLANTED_WAIT = ("    cp_async_wait<1>();  // this tile's Q/dO (and K/V) have landed\n",
                "    cp_async_wait<2>();  // (planted: this tile's Q/dO may still be in flight)\n")


@pytest.mark.skipif(not emulation.TENSOR_CORE_KERNELS, reason="no tensor-core kernels in csrc/cuda")
def test_a_barrier_taken_out_of_a_real_kernel_is_reported(monkeypatch):
    if not srt.HAS_EXTENSION:
        pytest.skip("the compiled extension is missing")
    files = emulation.emulation_files()
    for name, (line, _) in PLANTED.items():
        text = files[f"csrc/cuda/{name}"]
        assert text.count(line) == 1, f"{name}: the planted barrier's line is gone or not unique"
        files[f"csrc/cuda/{name}"] = text.replace(line, "    // (barrier taken out by the test)\n")
    atomic, plain = PLANTED_NON_ATOMIC
    assert files["csrc/cuda/ptx.cuh"].count(atomic) == 1, "the emulator's atomic_add2 changed"
    files["csrc/cuda/ptx.cuh"] = files["csrc/cuda/ptx.cuh"].replace(atomic, plain)
    wait, early_wait = PLANTED_WAIT
    assert files["csrc/cuda/bwd_tc_kernel.cuh"].count(wait) == 1, "the backward's Q/dO wait changed"
    files["csrc/cuda/bwd_tc_kernel.cuh"] = files["csrc/cuda/bwd_tc_kernel.cuh"].replace(wait, early_wait)
    ops = emulation.shared_emulation("srt_cuda_emulation_planted", RACECHECK_CFLAGS, files)
    gpu_cases.use_tiles(monkeypatch, "default")
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 200, 64, generator=gen).to(torch.bfloat16) for _ in range(4))
    a = (True, 0.125, 0, 0, True, None)
    with pytest.raises(RuntimeError, match=r"racecheck: \d+ hazard.* in .*attn_fwd_tc_kernel[^\n]*:\n\d+ shared-memory"):
        ops.fwd(q, k, v, None, None, None, None, None, *a)
    out, lse = torch.ops.self_reasoning_tokens.attn_fwd(q, k, v, None, None, None, None, None, *a)
    with pytest.raises(RuntimeError, match=r"racecheck: \d+ hazard.* in .*attn_bwd_tc_kernel") as e:
        ops.bwd(do, q, k, v, out, lse, None, None, None, None, None, *a)
    msg = str(e.value)
    assert "shared-memory hazard(s)" in msg and "global-memory hazard(s)" in msg, msg
    assert "in another block (blocks are unordered)" in msg, msg  # the dQ additions of two key tiles
    assert "with no barrier between" in msg, msg  # the barrier taken out
    assert "cp.async RAW hazard" in msg and "still in flight" in msg, msg  # the early wait
