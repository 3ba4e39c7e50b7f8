"""The CUDA kernels' logic on the CPU, so that CI (no GPU) checks it on every change.

Builds the kernel headers of csrc/cuda (every *.h and *.cuh: the fp32 CUDA-core kernels, the
float16/bfloat16 tensor-core kernels and their launchers) as plain C++ against the emulation in
tests/cuda_emulation/ (threads as fibers, real barriers, poisoned shared memory and outputs, and
its own implementation of the PTX layer in place of csrc/cuda/ptx.cuh; see its README) and
compares them with the CPU op in float64 on the same cases as the GPU test
(tests/test_cuda_build.py), in both cp.async timing modes. GPU-only problems (atomics, bank
conflicts, shared-memory limits, real timing) still need a GPU run.
"""
import contextlib
import fcntl
import hashlib
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

import pytest
import torch

import self_reasoning_tokens as srt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_build as gpu_cases  # noqa: E402  (the shared cases and comparison)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emulation")
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
LAUNCH = re.compile(r"^( *)(.*)<<<(.*)>>>\(p\);", re.M)
CP_ASYNC_MODES = {"early": 0, "late": 1}  # emu::CpAsyncMode
TENSOR_CORE_KERNELS = os.path.exists(os.path.join(CUDA_DIR, "fwd_tc_kernel.cuh"))

pytestmark = [
    pytest.mark.skipif(not srt.HAS_EXTENSION, reason="the compiled extension is missing"),
    pytest.mark.skipif(platform.system() != "Linux", reason="the fiber emulator uses Linux ucontext"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "csrc", "cuda")),
                       reason="csrc/ is not next to the tests (installed package)"),
]


def kernel_headers():
    """The kernel sources the emulation compiles: every header of csrc/cuda (not the .cu host and
    instantiation files), ptx.cuh excepted (tests/cuda_emulation/ptx.cuh replaces it)."""
    return sorted(f for f in os.listdir(CUDA_DIR) if f.endswith((".h", ".cuh")) and f != "ptx.cuh")


# The racecheck build's flags (tests/test_cuda_racecheck.py; tests/test_cuda_bank_conflicts.py counts
# plain shared-memory accesses through the same instrumentation): -g1 for addr2line's lines, GCC's
# auto-vectorisation off so that plain accesses keep the source's widths.
RACECHECK_CFLAGS = ("-fsanitize=thread", "-DEMU_RACECHECK", "-g1", "-fno-tree-vectorize")
EMU_SOURCES = ("emu_ops.cpp", "emu_runtime.cpp", "emu_racecheck.cpp", "emu_banks.cpp", "emu_kernels_fp16.cpp",
               "emu_kernels_bf16.cpp", "emu_kernels_fp32.cpp")


def emulation_files():
    """{relative path: text} of the tree the emulation compiles: the kernel headers of csrc/cuda
    (launch sites rewritten to emu::launch), ptx.cuh replaced by the emulator's, the csrc headers
    and attn_params.cpp, the emulator's sources and stubs."""
    files = {}
    for f in os.listdir(os.path.join(ROOT, "csrc")):
        if f.endswith(".h") or f == "attn_params.cpp":
            with open(os.path.join(ROOT, "csrc", f)) as fh:
                files[f"csrc/{f}"] = fh.read()
    launches = 0
    headers = kernel_headers()
    for f in headers:
        with open(os.path.join(CUDA_DIR, f)) as fh:
            text, n = LAUNCH.subn(r"\1emu::launch(\2, \3, p);", fh.read())
        launches += n
        files[f"csrc/cuda/{f}"] = text
    assert launches >= 1, "expected the kernel launch line (kernel<<<...>>>(p);, launch_blocks in tile_utils.cuh)"
    # emu_kernels.inc includes this: every kernel header, so it sees the launchers wherever they are
    files["csrc/cuda/emu_all_kernels.h"] = "#pragma once\n" + "".join(
        f'#include "{f}"\n' for f in headers if f.endswith(".cuh"))
    emu_files = ["ptx.cuh", "emu_kernels.inc", *EMU_SOURCES] + [
        os.path.join("stubs", f) for f in sorted(os.listdir(os.path.join(EMU, "stubs")))]
    for f in emu_files:
        with open(os.path.join(EMU, f)) as fh:
            files[f"csrc/cuda/ptx.cuh" if f == "ptx.cuh" else f] = fh.read()
    return files


def build_emulation(work, files, name="srt_cuda_emulation", extra_cflags=()):
    """Writes `files` (emulation_files()) into `work` (a pathlib.Path; only those whose text
    changed, so that an existing build is reused), compiles them and returns the ops namespace
    torch.ops.<name> (fwd, bwd, set_cp_async_mode, ...)."""
    from torch.utils.cpp_extension import load

    for rel, text in files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    os.makedirs(work / "build", exist_ok=True)
    load(name, [str(work / f) for f in EMU_SOURCES] + [str(work / "csrc" / "attn_params.cpp")],
         extra_include_paths=[str(work), str(work / "stubs")],
         extra_cflags=["-O2", f"-DEMU_OPS_NAMESPACE={name}", *extra_cflags],
         build_directory=str(work / "build"), is_python_module=False, verbose=False)
    return getattr(torch.ops, name)


def shared_workdir(files, name="srt_cuda_emulation", extra_cflags=()):
    """One build per source text, flags and torch version, shared by every pytest process
    (pytest-xdist workers would otherwise each compile their own copy, minutes of CPU on a busy
    machine): a folder under the temp dir named by a hash of what it compiles (`files`) and how."""
    h = hashlib.sha256(f"{torch.__version__} {sys.version} {extra_cflags}".encode())
    for rel, text in sorted(files.items()):
        h.update(rel.encode() + b"\0" + text.encode() + b"\0")
    return pathlib.Path(tempfile.gettempdir()) / f"{name}_{h.hexdigest()[:16]}"


@contextlib.contextmanager
def build_lock(work):
    """Holds `work`'s file lock (created with the folder if needed): one process writes and
    builds there, the others wait and then reuse what it built."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shared_emulation(name="srt_cuda_emulation", extra_cflags=(), files=None):
    """The emulated kernels' ops, built once for all pytest processes (under a file lock), from
    `files` (default: emulation_files())."""
    t0 = time.time()
    files = files or emulation_files()
    work = shared_workdir(files, name, extra_cflags)
    with build_lock(work):
        ops = build_emulation(work, files, name, extra_cflags)
    print(f"emulated CUDA kernels ({name}) ready in {time.time() - t0:.0f} s ({work})")
    return ops


@pytest.fixture(scope="module")
def emu():
    return shared_emulation()


@pytest.fixture(params=sorted(CP_ASYNC_MODES))
def cp_async_mode(request, emu):
    emu.set_cp_async_mode(CP_ASYNC_MODES[request.param])
    assert emu.cp_async_mode() == CP_ASYNC_MODES[request.param]
    yield request.param
    emu.set_cp_async_mode(CP_ASYNC_MODES["early"])


def _run_emu(emu, q, k, v, do, kw):
    R, W, stop, heads = kw.get("reasoning") or (0, 0, True, None)
    masks = [kw.get(n) for n in ("key_padding", "attn_mask", "q_stop", "k_stop", "v_stop")]
    args = (kw["causal"], q.shape[-1] ** -0.5, R, W, stop, heads)
    out, lse = emu.fwd(q, k, v, *masks, *args)
    dq, dk, dv = emu.bwd(do, q, k, v, out, lse, *masks, *args)
    return out, lse, dq, dk, dv


def _check_case_against_cpu(emu, q, k, v, do, kw, what):
    """The emulated kernels on one case against the CPU op in float64."""
    out, lse, dq, dk, dv = _run_emu(emu, q, k, v, do, kw)
    c64 = [t.double() for t in (q, k, v, do)]
    # the backward is compared given the emulated forward's (out, lse), as autograd would pass
    ref = gpu_cases._run_ops(*c64, kw, "cpu", out_lse=(out.double(), lse.double()))
    for tname, got, exp in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
        gpu_cases._assert_close(tname, got, exp, q.dtype, what)
    empty = torch.isinf(lse)
    if empty.any():
        assert (out[empty] == 0).all() and (dq[empty] == 0).all(), f"{what}: empty rows not zero"


def _check_cases_against_cpu(emu, dtype, head_dim, label):
    gen = torch.Generator().manual_seed(1234 + head_dim)
    emu.reset_op_counts()
    for name, (b, h, n, m), build in gpu_cases._cases(gen):
        q, k, v, do = (gpu_cases._rand(b, h, rows, head_dim, dtype=dtype, device="cpu", gen=gen)
                       for rows in (n, m, m, n))
        _check_case_against_cpu(emu, q, k, v, do, build(b, h, n, m), f"{dtype} d={head_dim} {label}: {name}")
    # the kernels the launchers picked really ran: tensor cores (mma, ldmatrix, cp.async) for
    # float16 / bfloat16 once csrc/cuda has them, never for float32
    counts = emu.op_counts()
    mma = counts.get("mma_16816<__half>", 0) + counts.get("mma_16816<__nv_bfloat16>", 0)
    if dtype == torch.float32:
        assert mma == 0, counts
    elif TENSOR_CORE_KERNELS:
        assert mma > 0 and counts.get("ldmatrix_x4", 0) > 0 and counts.get("ldmatrix_x4_trans", 0) > 0, counts
        assert counts.get("cp_async_16", 0) > 0, counts


@pytest.mark.parametrize("head_dim", gpu_cases.HEAD_DIMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16),
                         ids=lambda d: str(d).replace("torch.", ""))
def test_emulated_cuda_kernels_match_cpu_op(emu, cp_async_mode, dtype, head_dim, monkeypatch):
    gpu_cases.use_tiles(monkeypatch, "default")  # 64-row forward, 64-key backward
    _check_cases_against_cpu(emu, dtype, head_dim, f"cp.async {cp_async_mode}")


# The tensor-core kernels' other tile variants (kernel_traits.h), each with cp.async completing late
# (the stricter of the two emulation modes): the forward with 128-row query tiles (8 warps per
# block) and the backward with 128-key tiles (two 64-key chunks in the S/dP step, two 16-key m-tiles
# per warp in the dK/dV step).
TILE_VARIANTS = {"fwd128": "128-row forward tiles", "bwd128": "128-key backward tiles"}  # labels of TILE_SETTINGS keys


# The backward's deterministic schedule (torch.use_deterministic_algorithms; KernelParams::round_tiles
# in csrc/cuda/kernel_params.h): the key tiles in rounds, each tile of a round adding into its own
# dQ buffer, the buffers summed in a fixed order. Sized for 3 emulated multiprocessors, the GPU
# test's cases take 1 to 3 buffers and up to 7 rounds, the last one often partial (blocks past
# the last key tile return at once); for 1000, one buffer per key tile up to kMaxDqSplits. A
# ragged 513-key case adds a partial last round for the 128-key tiles too. (That no two blocks of
# a round add into the same dQ element is tests/test_cuda_racecheck.py's
# test_deterministic_schedule_fixes_the_dq_additions_order.)
DETERMINISTIC_VARIANTS = [(torch.float32, "default"), (torch.bfloat16, "default"), (torch.float16, "bwd128")]


@pytest.mark.parametrize("dtype,tiles", DETERMINISTIC_VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_emulated_deterministic_backward_schedule(emu, helpers, dtype, tiles, monkeypatch):
    gpu_cases.use_tiles(monkeypatch, tiles)
    gen = torch.Generator().manual_seed(5)
    q, do = (gpu_cases._rand(1, 1, 130, 64, dtype=dtype, device="cpu", gen=gen) for _ in range(2))
    k, v = (gpu_cases._rand(1, 1, 513, 64, dtype=dtype, device="cpu", gen=gen) for _ in range(2))
    kw = dict(causal=True)
    try:
        with helpers.deterministic():
            for sm_count in (3, 1000):
                emu.set_sm_count(sm_count)
                what = f"{tiles} tiles, deterministic schedule, {sm_count} SMs"
                _check_cases_against_cpu(emu, dtype, 64, what)
                _check_case_against_cpu(emu, q, k, v, do, kw, f"{what}: 130 x 513 keys")
    finally:
        emu.set_sm_count(3)


def test_deterministic_dq_split_count(emu):
    # host_glue.h's deterministic_dq_splits(batch*heads, key tiles, SMs, bytes per buffer): about
    # one block per SM per round, at most one buffer per key tile, at most 8 buffers, at most
    # 2 GiB of them together, never fewer than one
    MiB = 1 << 20
    cases = [((16, 128, 132, 64 * MiB), 8), ((32, 128, 132, 64 * MiB), 4), ((1, 3, 132, MiB), 3),
             ((256, 16, 132, MiB), 1), ((1, 128, 132, 512 * MiB), 4), ((1, 128, 132, 4096 * MiB), 1),
             ((2, 128, 3, MiB), 1), ((1, 1, 1, 1), 1), ((0, 4, 132, MiB), 1)]
    for args, splits in cases:
        assert emu.deterministic_dq_splits(*args) == splits, args


@pytest.mark.parametrize("variant", TILE_VARIANTS)
@pytest.mark.parametrize("head_dim", gpu_cases.HEAD_DIMS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=lambda d: str(d).replace("torch.", ""))
def test_emulated_tc_tile_variants(emu, dtype, head_dim, variant, monkeypatch):
    if not TENSOR_CORE_KERNELS:
        pytest.skip("no tensor-core kernels in csrc/cuda")
    gpu_cases.use_tiles(monkeypatch, variant)
    emu.set_cp_async_mode(CP_ASYNC_MODES["late"])
    try:
        _check_cases_against_cpu(emu, dtype, head_dim, f"{TILE_VARIANTS[variant]}, cp.async late")
    finally:
        emu.set_cp_async_mode(CP_ASYNC_MODES["early"])


@pytest.mark.parametrize("variant", TILE_VARIANTS)
def test_emulated_tc_tile_variants_skip_whole_hard_mode_tiles(emu, variant, monkeypatch):
    """Hard mode skips a tile that lies entirely inside the reasoning region of every row that
    sees it; with 128-wide tiles that needs more than 128 reasoning tokens per step. R = 255: the
    key tile [384, 512) holds only step 1's reasoning tokens, and the query tiles of steps 2 and 3
    skip it. The skips must leave the results exact (the tiles hold only masked pairs)."""
    if not TENSOR_CORE_KERNELS:
        pytest.skip("no tensor-core kernels in csrc/cuda")
    gen = torch.Generator().manual_seed(5)
    b, h, n, d = 1, 1, 800, 32
    q, k, v, do = (gpu_cases._rand(b, h, n, d, dtype=torch.bfloat16, device="cpu", gen=gen) for _ in range(4))
    kw = dict(causal=True, reasoning=(255, 2, False, None))
    ref = gpu_cases._run_ops(*(t.double() for t in (q, k, v, do)), kw, "cpu")
    mma = {}
    for setting in ("default", variant):
        gpu_cases.use_tiles(monkeypatch, setting)
        emu.reset_op_counts()
        got = _run_emu(emu, q, k, v, do, kw)
        mma[setting] = emu.op_counts().get("mma_16816<__nv_bfloat16>", 0)
        out, lse = got[0], got[1]
        exp = gpu_cases._run_ops(*(t.double() for t in (q, k, v, do)), kw, "cpu",
                                 out_lse=(out.double(), lse.double()))
        for tname, g, e, r in zip(("out", "lse", "dq", "dk", "dv"), got, exp, ref):
            gpu_cases._assert_close(tname, g, e, torch.bfloat16, f"{variant}={setting} hard-mode skips")
            gpu_cases._assert_close(tname, g, r, torch.bfloat16, f"{variant}={setting} vs the CPU forward")
    assert mma["default"] > 0 and mma[variant] > 0, mma


def test_tile_settings_are_checked(emu, monkeypatch):
    q = torch.randn(1, 2, 70, 64, dtype=torch.bfloat16)
    do = torch.randn_like(q)
    a = (True, 0.125, 0, 0, True, None)
    monkeypatch.setenv("SRT_CUDA_FWD_BLOCK_M", "96")
    with pytest.raises(RuntimeError, match="SRT_CUDA_FWD_BLOCK_M must be 64 or 128.*got '96'"):
        emu.fwd(q, q, q, None, None, None, None, None, *a)
    monkeypatch.delenv("SRT_CUDA_FWD_BLOCK_M")
    out, lse = emu.fwd(q, q, q, None, None, None, None, None, *a)
    monkeypatch.setenv("SRT_CUDA_BWD_BLOCK_N", "256")
    with pytest.raises(RuntimeError, match="SRT_CUDA_BWD_BLOCK_N must be 64 or 128.*got '256'"):
        emu.bwd(do, q, q, q, out, lse, None, None, None, None, None, *a)
    monkeypatch.delenv("SRT_CUDA_BWD_BLOCK_N")
    ref = torch.ops.self_reasoning_tokens.attn_fwd(q.float(), q.float(), q.float(), None, None, None, None, None,
                                                   *a)
    ref_grads = torch.ops.self_reasoning_tokens.attn_bwd(do.float(), q.float(), q.float(), q.float(), out.float(),
                                                         lse, None, None, None, None, None, *a)
    # both sizes and the empty string (the default) give the same result
    for var in gpu_cases.TILE_VARS:
        for value in ("64", "128", ""):
            monkeypatch.setenv(var, value)
            got = emu.fwd(q, q, q, None, None, None, None, None, *a)
            for x, y in zip(got, ref):
                torch.testing.assert_close(x.float(), y, rtol=2e-2, atol=2e-2)
            grads = emu.bwd(do, q, q, q, out, lse, None, None, None, None, None, *a)
            for x, y in zip(grads, ref_grads):
                torch.testing.assert_close(x.float(), y, rtol=3e-2, atol=3e-2)
        monkeypatch.delenv(var)


def test_kernel_head_dims_are_one_list():
    """The head dims with kernels (kernel_params.h's kSupportedHeadDims, which the C++ error names)
    are the ones the Python wrapper accepts on CUDA and the GPU tests cover."""
    with open(os.path.join(CUDA_DIR, "kernel_params.h")) as fh:
        m = re.search(r"kSupportedHeadDims\[\]\s*=\s*\{([^}]*)\}", fh.read())
    assert m, "kSupportedHeadDims not found in csrc/cuda/kernel_params.h"
    compiled = tuple(int(d) for d in m.group(1).split(","))
    assert compiled == srt.attention.CUDA_HEAD_DIMS == gpu_cases.HEAD_DIMS


def test_emulated_ops_reject_unsupported_head_dim_and_dtype(emu):
    """The raw ops' own check (host_glue.h, which attn_cuda.cu calls too): a head dim or dtype
    without kernels is an error naming what is supported, in the forward and the backward,
    before anything runs."""
    a = (False, 1.0, 0, 0, True, None)
    for d in (16, 48, 256):
        q = torch.randn(1, 1, 8, d, dtype=torch.float16)
        with pytest.raises(RuntimeError, match=f"attn_fwd on CUDA: head_dim {d} is not supported; "
                                               "supported head dims: 32, 64, 96, 128"):
            emu.fwd(q, q, q, None, None, None, None, None, *a)
        lse = torch.zeros(1, 1, 8)
        with pytest.raises(RuntimeError, match=f"attn_bwd on CUDA: head_dim {d} is not supported"):
            emu.bwd(q, q, q, q, q, lse, None, None, None, None, None, *a)
    q = torch.randn(1, 1, 8, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="attn_fwd on CUDA: q, k and v must be float16, bfloat16 or float32; "
                                           "got Double"):
        emu.fwd(q, q, q, None, None, None, None, None, *a)
    with pytest.raises(RuntimeError, match="attn_bwd on CUDA: q, k and v must be float16, bfloat16 or float32"):
        emu.bwd(q, q, q, q, q, torch.zeros(1, 1, 8, dtype=torch.float64), None, None, None, None, None, *a)


def test_emulated_cuda_edge_shapes(emu):
    a = (True, 0.125, 0, 0, True, None)
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 3, 40, 64, dtype=dt)
        k0 = torch.empty(2, 3, 0, 64, dtype=dt)
        out, lse = emu.fwd(q, k0, k0, None, None, None, None, None, *a)  # no keys at all
        assert (out == 0).all() and torch.isinf(lse).all()
        dq, dk, dv = emu.bwd(q, q, k0, k0, out, lse, None, None, None, None, None, *a)
        assert (dq == 0).all() and dk.shape == k0.shape
        # a single decode query over a long cache equals the CPU op
        q1 = torch.randn(1, 2, 1, 64, dtype=torch.float32)
        kk, vv = torch.randn(1, 2, 77, 64), torch.randn(1, 2, 77, 64)
        out, lse = emu.fwd(q1, kk, vv, None, None, None, None, None, *a)
        ref, ref_lse = torch.ops.self_reasoning_tokens.attn_fwd(q1, kk, vv, None, None, None, None, None, *a)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).replace("torch.", ""))
def test_emulated_nan_input_propagates(emu, dtype, where):
    """A NaN in q (a whole row of NaN scores) or in k: the CUDA-core (float32) and tensor-core
    (bfloat16) forwards give the affected rows NaN output and lse, so the backward gives NaN
    gradients, as the CPU op and the reference do (tests/test_attention.py). fmaxf ignores NaN, so
    a row of NaN scores keeps a max of -inf: the kernels must not take it for an empty row."""
    a = (True, 0.125, 0, 0, True, None)
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, 20, 64, generator=gen).to(dtype) for _ in range(4))
    (q if where == "q" else k)[0, 1, 5] = float("nan")
    out, lse = emu.fwd(q, k, v, None, None, None, None, None, *a)
    dq, dk, dv = emu.bwd(do, q, k, v, out, lse, None, None, None, None, None, *a)
    rows = torch.zeros(20, dtype=torch.bool)  # the NaN row (q), or every row from the NaN key on (k, causal)
    rows[5:6 if where == "q" else 20] = True
    assert torch.isnan(out[0, 1][rows]).all() and torch.isfinite(out[0, 1][~rows]).all()
    assert torch.isnan(lse[0, 1][rows]).all() and torch.isfinite(lse[0, 1][~rows]).all()
    assert torch.isnan(dq[0, 1][rows]).all()
    assert torch.isnan(dv[0, 1, :6]).all() and torch.isnan(dk[0, 1, :6]).all()  # keys the NaN rows attend
    # head 0 has no NaN: as the CPU op gives
    ref = torch.ops.self_reasoning_tokens.attn_fwd(*(t[:, :1].float() for t in (q, k, v)), None, None, None,
                                                   None, None, *a)
    torch.testing.assert_close(out[:, :1].float(), ref[0], rtol=2e-2, atol=2e-2)
    for t in (dq, dk, dv):
        assert torch.isfinite(t[0, 0]).all()
