"""Shared-memory bank conflicts (and global-memory sectors) of the CUDA kernels, counted on the CPU.

Shared memory has 32 banks of 4-byte words; a warp-wide access takes one "wavefront" per word a
single bank must deliver (lanes reading the same word share it), and accesses of 8 and 16 bytes
are served in 2 and 4 phases (16 and 8 lanes), only lanes of one phase competing; an ldmatrix .x4
takes one phase per 8x8 matrix (8 rows of 16 bytes). A conflict-free access takes one wavefront
per phase ("ideal"). tests/cuda_emulation/emu_banks.cpp counts both for every shared-memory access
of the emulated kernels: ldmatrix and cp.async exactly, from the addresses the lanes give, and
plain loads and stores through the racecheck build's instrumentation (there, access widths are the
host compiler's for the same source; the kernels' wide accesses are ldmatrix and cp.async).

The model is checked on known patterns first (tests/cuda_emulation/ptx_unit.cpp's bank_kernel),
then every kernel runs the GPU test's cases with the count on (here at head dims 64 and 96; every
variant at 32 and 128 in tests/test_cuda_racecheck.py's runs, which execute them in the racecheck
build anyway): every access of the tensor-core and float32 kernels must be conflict-free. (It
found two: the 16-byte cp.async tile writes at head dims 32 and 96, where 8 lanes' chunks
straddled two rows; csrc/cuda/tile_utils.cuh's load_tile_async now orders the chunks so that they
do not.) A build without the rows' padding (kernel_traits.h's kTcPad = 0) must show ldmatrix
conflicts.

The same count covers global memory in 32-byte sectors (the unit of a warp's global request):
per warp-wide access the distinct sectors its lanes touch, against the fewest its distinct bytes
could fill. The bulk traffic must be ideal: the Q/K/V/dO tile loads (cp.async sources; load_rows
in the float32 kernels) and the dQ atomics (float2 atomicAdd on sm_90: each row's 4 lanes cover
one sector); every other access outside the masks at most 2x (the tensor-core epilogue stores O,
dK, dV 4 bytes a lane: half a sector per row and instruction). Mask reads are reported only.

`python tests/test_cuda_bank_conflicts.py [--tiles T] [--dtype D] [--head-dims 32,64]` prints the
table per source line (needs the compiled extension, as the tests do).
"""
import argparse
import ctypes
import os
import platform
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_build as gpu_cases  # noqa: E402
import test_cuda_emulation as emulation  # noqa: E402
import test_cuda_emulation_ptx as ptx  # noqa: E402

RACECHECK_CFLAGS = emulation.RACECHECK_CFLAGS

KINDS = {0: "load", 1: "store", 2: "cp.async", 3: "ldmatrix", 4: "ldmatrix.trans",
         # global memory: 32-byte sectors per instruction (emu_banks.cpp's count_global)
         5: "global load", 6: "global store", 7: "global atomic", 8: "cp.async source"}
GLOBAL_KINDS = {"global load", "global store", "global atomic", "cp.async source"}
RACE_BUILD = "srt_cuda_emulation_race"  # the build test_cuda_racecheck.py uses (shared on disk)
# files whose lines are the emulator's, not the kernel's: a site is named by the first other line
# of its inline chain
EMULATOR_FILES = ("ptx.cuh", "cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h")

pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux", reason="the fiber emulator uses Linux ucontext"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(emulation.ROOT, "csrc", "cuda")),
                       reason="csrc/ is not next to the tests (installed package)"),
]


# ---- the model on known patterns ----

# scenario: (kind, bytes, wavefronts per instruction, conflict-free wavefronts per instruction)
PATTERNS = {
    0: ("load", 4, 1, 1),        # lane l reads word l
    1: ("load", 4, 32, 1),       # word 32 l: every lane in bank 0
    2: ("load", 4, 1, 1),        # word 33 l: the padded stride
    3: ("load", 4, 1, 1),        # every lane the same word (broadcast)
    4: ("load", 8, 2, 2),        # 8 bytes each, consecutive: two phases
    5: ("load", 16, 4, 4),       # 16 bytes each, consecutive: four phases
    6: ("load", 16, 16, 4),      # 16 bytes at a 64-byte stride: 4 lanes of a phase per bank
    7: ("ldmatrix", 16, 16, 4),  # rows 64 bytes apart: 4 rows of a matrix in the same banks
    8: ("ldmatrix", 16, 4, 4),   # rows 80 bytes apart (the kernels' padding)
    9: ("cp.async", 16, 4, 4),   # consecutive chunks
    10: ("cp.async", 16, 32, 4),  # chunks 128 bytes apart: all 8 lanes of a phase in 4 banks
    11: ("store", 4, 2, 1),      # word 2 l: two lanes per bank
    12: ("store", 4, 16, 1),     # even lanes only, word 32 l: 16 lanes in bank 0
    # global memory: (kind, bytes, 32-byte sectors per instruction, fewest sectors for its bytes)
    13: ("global load", 4, 4, 4),     # 32 consecutive floats: 128 bytes
    14: ("global load", 4, 32, 4),    # floats 32 bytes apart: a sector each
    15: ("global load", 1, 32, 1),    # bytes 32 apart: 32 bytes in 32 sectors
    16: ("cp.async source", 16, 16, 16),  # 32 consecutive 16-byte chunks
    17: ("global atomic", 8, 8, 8),   # float2 atomics, consecutive (the dQ adds on sm_90)
    18: ("global atomic", 4, 8, 4),   # float atomics 8 bytes apart: half of every sector
}


@pytest.fixture(scope="module")
def bank_lib():
    return ptx.shared_ptx_lib("srt_ptx_racecheck", RACECHECK_CFLAGS)  # (test_cuda_racecheck.py's too)


@pytest.mark.parametrize("scenario", sorted(PATTERNS))
def test_bank_model_on_known_patterns(bank_lib, scenario):
    kind, size, per_instr, ideal = PATTERNS[scenario]
    src, out = torch.arange(256, dtype=torch.float32), torch.zeros(64)
    rows, n = (ctypes.c_int64 * 60)(), ctypes.c_int()
    bank_lib.call("ptx_banks", scenario, ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                  rows, 10, ctypes.byref(n))
    table = [tuple(rows[6 * i:6 * i + 6]) for i in range(n.value)]
    # one access site of that kind (cp.async: its shared-memory write is another row, checked by 9)
    assert sorted(KINDS[r[1]] for r in table) in ([kind], sorted(["cp.async", kind])), table
    _, k, b, instructions, wavefronts, conflict_free = next(r for r in table if KINDS[r[1]] == kind)
    # two warps, each doing the access twice (no barrier between: told apart by occurrence)
    assert (KINDS[k], b, instructions) == (kind, size, 4), table
    assert (wavefronts, conflict_free) == (4 * per_instr, 4 * ideal), table


# ---- the kernels ----

def module_path(name, files=None, cflags=RACECHECK_CFLAGS):
    return str(emulation.shared_workdir(files or emulation.emulation_files(), name, cflags) / "build" / f"{name}.so")


def bank_sites(ops, module):
    """The bank table since the last reset, one dict per (kernel, source line, kind)."""
    t = ops.bank_table()
    raw = [t[i:i + 6] for i in range(0, len(t), 6)]
    # the counts are keyed by return addresses (the instruction after the call or access): one
    # byte back is still inside the access's own instruction, so its line and inline chain
    lines = subprocess.run(["addr2line", "-a", "-i", "-f", "-C", "-e", module, *(hex(r[0] - 1) for r in raw)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    chains, i = [], 0
    for _ in raw:  # "0xADDR", then (function, file:line) per inline level
        assert lines[i].startswith("0x"), lines[i:i + 3]
        i += 1
        chain = []
        while i < len(lines) and not lines[i].startswith("0x"):
            chain.append((lines[i], lines[i + 1]))
            i += 2
        chains.append(chain)
    sites = defaultdict(lambda: dict(instructions=0, wavefronts=0, ideal=0, size=0))
    for (_, kind, size, instructions, wavefronts, ideal), chain in zip(raw, chains):
        places = [loc.split(" ")[0].rsplit("/", 1)[-1] for _, loc in chain]
        place = next((p for p in places if p.split(":")[0] not in EMULATOR_FILES), places[0] if places else "?")
        kernel = chain[-1][0].split("(")[0].removeprefix("void ").replace("srt::cuda::", "") if chain else "?"
        s = sites[(kernel, place, KINDS[kind])]
        s["instructions"] += instructions
        s["wavefronts"] += wavefronts
        s["ideal"] += ideal
        s["size"] = max(s["size"], size)
    return [dict(kernel=k, line=p, kind=kind, **v) for (k, p, kind), v in sorted(sites.items())]


def format_sites(sites):
    """wf/instr: wavefronts (shared memory) or 32-byte sectors (global kinds) per instruction."""
    out = [f"{'kernel':48s} {'line':26s} {'kind':15s} {'B':>3s} {'instr':>9s} {'wf/instr':>8s} {'ideal':>6s}"]
    for s in sites:
        n = max(s["instructions"], 1)
        out.append(f"{s['kernel'][:48]:48s} {s['line'][:26]:26s} {s['kind']:15s} {s['size']:3d} {s['instructions']:9d} "
                   f"{s['wavefronts'] / n:8.2f} {s['ideal'] / n:6.2f}")
    return "\n".join(out)


def count_banks(ops, module, dtype, head_dims):
    """Runs the GPU test's cases (results checked against the CPU op) with the count on; returns
    their bank_sites()."""
    ops.reset_bank_count()
    ops.set_bank_count(True)
    try:
        for head_dim in head_dims:
            emulation._check_cases_against_cpu(ops, dtype, head_dim, "bank count")
    finally:
        ops.set_bank_count(False)
    return bank_sites(ops, module)


@pytest.fixture(scope="module")
def emu_race():
    if not emulation.srt.HAS_EXTENSION:
        pytest.skip("the compiled extension is missing")
    return emulation.shared_emulation(RACE_BUILD, RACECHECK_CFLAGS)


def assert_no_bank_conflicts(sites, dtype, label):
    """The bank_sites() of the kernels' runs must show their shared-memory accesses, all
    conflict-free, and their global accesses as assert_coalesced says."""
    print(f"\n{label}\n{format_sites(sites)}")
    assert_coalesced([s for s in sites if s["kind"] in GLOBAL_KINDS], dtype)
    sites = [s for s in sites if s["kind"] not in GLOBAL_KINDS]
    table = format_sites(sites)
    kinds = {s["kind"] for s in sites}
    # the count saw what the kernels do (not vacuous): the tensor-core kernels stage tiles with
    # cp.async, read them with ldmatrix and store the P/dS tiles; the float32 ones load and store
    expected = {"load", "store"} if dtype == torch.float32 else {"cp.async", "ldmatrix", "ldmatrix.trans", "store"}
    assert expected <= kinds, table
    assert all(s["kernel"].startswith(("attn_fwd", "attn_bwd", "load_tile", "load_rows")) for s in sites), table
    conflicts = [s for s in sites if s["wavefronts"] != s["ideal"]]
    assert not conflicts, "bank conflicts:\n" + format_sites(conflicts) + "\n\nall sites:\n" + table


# Sites allowed up to twice the fewest sectors their bytes could take: the float16/bfloat16
# kernels' stores from mma accumulators (O, dK, dV: 4 bytes a lane, so each row's 16 bytes half a
# sector; LSE) and their per-row LSE/D reads (8 rows of a fragment, a sector or two). Mask reads
# (mask_semantics.h, per element in the fragment layout: bytes of 8 rows in 8 sectors) are only
# reported: the masks are bytes, not the bulk of the traffic, and cached.
def assert_coalesced(sites, dtype):
    """Global accesses of the kernels' runs (racecheck build), in 32-byte sectors: the bulk
    traffic takes the fewest sectors its bytes allow (the Q/K/V/dO tile loads: cp.async in the
    tensor-core kernels, load_rows in the float32 ones; the dQ atomics), and nothing outside the
    masks takes more than twice that (rows of LSE/D that start inside a sector take one more)."""
    table = format_sites(sites)
    kinds = {s["kind"] for s in sites}
    expected = {"global load", "global store", "global atomic"}  # (not vacuous)
    if dtype != torch.float32:
        expected.add("cp.async source")
    assert expected <= kinds, table
    unmasked = [s for s in sites if not s["line"].startswith("mask_semantics.h")]

    def allowed(s):  # sectors allowed: the ideal for the bulk traffic, else twice it
        exact = s["kind"] in ("cp.async source", "global atomic") or (
            dtype == torch.float32 and s["line"].startswith("tile_utils.cuh"))  # load_rows
        return s["ideal"] if exact else 2 * s["ideal"]

    bad = [s for s in unmasked if s["wavefronts"] > allowed(s)]
    assert not bad, "uncoalesced global accesses:\n" + format_sites(bad) + "\n\nall sites:\n" + table


# Every tensor-core kernel variant at head dims 32 and 128 is counted by tests/test_cuda_racecheck.py's
# test_kernels_have_no_hazards (its runs in the early cp.async mode: bf16 and fp16 default tiles,
# the 128-row forward, the 128-key backward) with the same assertion; here the head dims in
# between, whose rows are 64 and 96 elements (12 chunks at 96: the tile loads' chunk order), and
# the float32 kernels (their row strides are the same modulo 32 banks at every head dim).
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 96), (torch.float32, 32)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_have_no_bank_conflicts(emu_race, dtype, head_dim, monkeypatch):
    gpu_cases.use_tiles(monkeypatch, "default")
    sites = count_banks(emu_race, module_path(RACE_BUILD), dtype, (head_dim,))
    assert_no_bank_conflicts(sites, dtype, f"{dtype} default d={head_dim}")


UNPADDED = ("constexpr int kTcPad = 8;", "constexpr int kTcPad = 0;")


@pytest.mark.skipif(not emulation.TENSOR_CORE_KERNELS, reason="no tensor-core kernels in csrc/cuda")
def test_rows_without_padding_show_ldmatrix_conflicts(monkeypatch):
    # the check can fail: without the 16-byte pad per row (kernel_traits.h) the 8 rows of an
    # ldmatrix matrix at head dim 64 are 128 bytes apart, all in the same 4 banks (8 wavefronts a
    # matrix); the results must still be right. The plain (uninstrumented) build counts ldmatrix.
    if not emulation.srt.HAS_EXTENSION:
        pytest.skip("the compiled extension is missing")
    files = emulation.emulation_files()
    padded, unpadded = UNPADDED
    assert files["csrc/cuda/kernel_traits.h"].count(padded) == 1, "kernel_traits.h's pad changed"
    files["csrc/cuda/kernel_traits.h"] = files["csrc/cuda/kernel_traits.h"].replace(padded, unpadded)
    name = "srt_cuda_emulation_unpadded"
    ops = emulation.shared_emulation(name, (), files)
    gpu_cases.use_tiles(monkeypatch, "default")
    sites = count_banks(ops, module_path(name, files, ()), torch.bfloat16, (64,))
    table = format_sites(sites)
    ldm = [s for s in sites if s["kind"].startswith("ldmatrix")]
    assert ldm and all(s["wavefronts"] == 8 * s["ideal"] for s in ldm), table
    assert not any(s["kind"] in ("load", "store") for s in sites), table  # not instrumented


def main(argv=None):
    ap = argparse.ArgumentParser(description="Shared-memory bank conflicts and global-memory sectors of the emulated "
                                             "CUDA kernels, per source line.")
    ap.add_argument("--tiles", choices=sorted(gpu_cases.TILE_SETTINGS), default="default")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--head-dims", default="64", help="comma-separated, from %s" % (gpu_cases.HEAD_DIMS,))
    args = ap.parse_args(argv)
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    for var in gpu_cases.TILE_VARS:
        os.environ.pop(var, None)
    os.environ.update(gpu_cases.TILE_SETTINGS[args.tiles])
    ops = emulation.shared_emulation(RACE_BUILD, RACECHECK_CFLAGS)
    print(format_sites(count_banks(ops, module_path(RACE_BUILD), getattr(torch, args.dtype), head_dims)))


if __name__ == "__main__":
    main()
