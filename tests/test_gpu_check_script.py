"""benchmarks/gpu_check.sh, the prepared GPU run, end to end on the CPU: its stages, budget
arithmetic, file layout and summary. Four things are stood in for, nothing else: the CUDA build
(a python wrapper answers `setup.py build_ext` without building; the extension is already built),
the GPU benchmark (BENCH_ARGS runs its --dry-run code paths), Nsight Compute (a stand-in `ncu`
runs the profiled workload on the CPU and writes tests/test_profile_gpu.py's synthetic CSV) and
compute-sanitizer (a stand-in that runs its workload on the CPU). STANDIN_BUILD_FAILS,
STANDIN_PLOT_FAILS, STANDIN_NCU_NO_PERMISSION and STANDIN_RACE make them fail as the real ones
would."""
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
BENCH = os.path.join(ROOT, "benchmarks")

PYWRAP = f"""#!/usr/bin/env bash
if [[ "$1" == setup.py && "${{STANDIN_BUILD_FAILS:-0}}" == 1 ]]; then
  echo "attn_fwd_bf16.cu(12): error: (stand-in nvcc error)"; exit 1
fi
if [[ "$1" == setup.py ]]; then echo "(CUDA build stood in for)"; exit 0; fi
if [[ "$1" == benchmarks/plot_bench.py && "${{STANDIN_PLOT_FAILS:-0}}" == 1 ]]; then
  echo "(stand-in plot error)"; exit 1
fi
exec {sys.executable} "$@"
"""

NCU = f"""#!/usr/bin/env bash
case "$1" in
  --version) echo "stand-in ncu"; exit 0;;
  --list-sections) printf 'Identifier Display Name\\nSpeedOfLight x\\nOccupancy x\\nWarpStateStats x\\n'; exit 0;;
esac
if [[ "${{STANDIN_NCU_NO_PERMISSION:-0}}" == 1 ]]; then  # the real tool's words on a locked-down machine
  echo "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters"
  exit 1
fi
log=""
while (( $# )); do
  case "$1" in
    --log-file) log="$2"; shift 2;;
    --csv) shift;;
    --*) echo "ncu option $1 $2" >&2; shift 2;;
    *) break;;
  esac
done
"$@" --device cpu --seq 64 --head-dim 32 --hidden 64 --dtype float32 --warmup 1 || exit $?
PYTHONPATH={TESTS}:{BENCH} {sys.executable} -c "import test_profile_gpu as t; print(t.raw_csv(), end='')" > "$log"
"""


# compute-sanitizer: records its options and environment, runs the workload on the CPU and ends
# with the summary line the real tool prints; with STANDIN_RACE=1 its racecheck reports a hazard
# (in the real tool's words) and exits with the --error-exitcode; STANDIN_SANITIZER_NO_WORKLOAD=1
# leaves the workload out (for tests that only ask whether the stages ran)
SANITIZER = """#!/usr/bin/env bash
[[ "$1" == --version ]] && { echo "stand-in compute-sanitizer"; exit 0; }
[[ "$1" == --help ]] && { echo "  --report-api-errors arg (=explicit)  stand-in help"; exit 0; }
echo "sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=${PYTORCH_NO_CUDA_MEMORY_CACHING:-unset}"
tool=memcheck
while [[ "$1" == --* ]]; do echo "sanitizer option $1 $2"; [[ "$1" == --tool ]] && tool=$2; shift 2; done
rc=0
[[ "${STANDIN_SANITIZER_NO_WORKLOAD:-0}" == 1 ]] || { "$@" --device cpu; rc=$?; }
if [[ "$tool" == racecheck && "${STANDIN_RACE:-0}" == 1 ]]; then
  echo "========= Error: Race reported between Write access at void srt::cuda::attn_bwd_tc_kernel+0x1a0"
  echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
  exit 9
fi
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


def _logs(out):
    """{name: text} of the stage logs packed into OUTDIR/logs.tar.gz."""
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {os.path.basename(m.name): tar.extractfile(m).read().decode()
                for m in tar.getmembers() if m.isfile()}


def _script(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _env(bin_dir, **settings):
    """This process's environment without the script's own settings (this test may itself run
    inside gpu_check.sh, whose deadline, stage choices and tool paths must not leak in), plus
    `settings`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SRT_TEST_", "SRT_GPU_CHECK_", "SRT_PROFILE_"))
           and k not in ("BENCH_ARGS", "NCU", "COMPUTE_SANITIZER")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "pywrap"), PYTHONPATH=ROOT, **settings)
    return env


def _run_gpu_check(tmp_path, timeout, returncode=0, **settings):
    """Runs gpu_check.sh with the stand-ins and `settings`; (the finished process, OUTDIR). Unless
    `settings` say otherwise, no GPU is not a failure here and the CPU-only tests are kept."""
    settings = {"SRT_GPU_CHECK_ALLOW_NO_GPU": "1", "SRT_GPU_CHECK_ALL_TESTS": "1", **settings}
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    _script(bin_dir / "pywrap", PYWRAP)
    _script(bin_dir / "ncu", NCU)
    _script(bin_dir / "compute-sanitizer", SANITIZER)
    r = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), str(out)], cwd=ROOT,
                       env=_env(bin_dir, **settings), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == returncode, r.stdout[-4000:] + r.stderr[-2000:]
    return r, out


def _summary_has(out, *lines):
    """OUTDIR's summary.txt, once each of `lines` has been found in it."""
    summary = (out / "summary.txt").read_text()
    for line in lines:
        assert line in summary, summary
    return summary


def _planted(tmp_path, text):
    """A test file in tmp_path beside a copy of tests/conftest.py (which marks the GPU tests)."""
    shutil.copy(os.path.join(TESTS, "conftest.py"), tmp_path / "conftest.py")
    path = tmp_path / "test_planted_failure.py"
    path.write_text(text)
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_runs_every_stage_and_writes_its_files(tmp_path):
    r, out = _run_gpu_check(tmp_path, 600, SRT_TEST_ARGS="tests/test_sass_loop.py", SRT_TEST_WORKERS="1",
                            BENCH_ARGS="--dry-run --device cpu --skip-longest")
    # the headline, printed last, repeats the device, the stages, the counts and the targets
    headline = r.stdout.split("================ headline ================")[1]
    for line in ("device: ", "== tests: ok", "all tests: 3 passed", "GPU tests (", "(b) within 10% of (a)",
                 "  A/B ours-fwd128 vs ours, d=", "  A/B ours-bwd128 vs ours, d="):
        assert line in headline, headline
    summary = _summary_has(out, "== build: ok", "== tests: ok", "== bench: ok", "== profile: ok",
                           "gpu_check: all stages passed", "== sanitize: not run (no GPU test failed",
                           "all tests: 3 passed, 0 failed", "== Nsight Compute profile (profile.txt)")
    # one worker (SRT_TEST_WORKERS=1) gets all the cores, or OMP_NUM_THREADS where that is set
    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    assert f"tests: 1 pytest worker(s), {threads} CPU thread(s) each" in summary, summary
    # pytest-xdist 3.2 or newer (this venv's, the pyproject's test extra) gets --dist worksteal
    xdist_version = importlib.metadata.version("pytest-xdist") if importlib.util.find_spec("xdist") else "0"
    if tuple(map(int, xdist_version.split(".")[:2])) >= (3, 2):
        assert "CPU thread(s) each (OMP_NUM_THREADS), --dist worksteal" in summary, summary
    # the device tool brings back at most 8 files from $OUT: the logs travel as one archive
    assert {p.name for p in out.iterdir()} == {
        "summary.txt", "tests.xml", "bench.json", "bench_table.txt", "bench.png", "profile.txt", "logs.tar.gz"}
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG") and "bench: plot in bench.png" in summary
    logs = _logs(out)
    assert set(logs) == {"env.log", "build.log", "tests.log", "bench.log", "plot.log", "profile.log",
                         "profile_raw.csv"}
    assert "3 passed" in logs["tests.log"] and "(CUDA build stood in for)" in logs["build.log"]
    # the profile table attributes the stand-in CSV's kernels to the contenders, in launch order
    assert "attn_fwd_tc_kernel" in (out / "profile.txt").read_text()
    # ncu leaves the card's clocks alone (its default would lock them to base)
    assert "ncu option --clock-control none" in logs["profile.log"]


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_skips_stages_on_request(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    _, out = _run_gpu_check(tmp_path, 300, SRT_GPU_CHECK_SKIP="tests,sanitize,bench,profile", TMPDIR=str(tmp))
    stages = ("tests", "sanitize", "bench", "profile")
    _summary_has(out, *(f"== {stage}: skipped (SRT_GPU_CHECK_SKIP)" for stage in stages))
    assert not (out / "bench.json").exists() and not (out / "tests.xml").exists()
    # the stage logs' folder (under TMPDIR) is gone once they are packed into logs.tar.gz
    assert "env.log" in _logs(out) and not list(tmp.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_notes_a_missing_sanitizer_or_ncu_and_goes_on(tmp_path):
    # NCU and COMPUTE_SANITIZER, when set, are the only candidates (the stand-ins on PATH are not
    # used): an empty or missing one is a skipped stage, not a failed run
    missing = tmp_path / "no-such-compute-sanitizer"
    _, out = _run_gpu_check(tmp_path, 300, SRT_GPU_CHECK_SKIP="tests,bench", SRT_GPU_CHECK_SANITIZE="1",
                            NCU="", COMPUTE_SANITIZER=str(missing))
    _summary_has(out, f"== sanitize: skipped (no compute-sanitizer at COMPUTE_SANITIZER='{missing}')",
                 "== profile: skipped (no ncu at NCU='')")
    logs = _logs(out)
    assert "ncu: not found" in logs["env.log"] and "compute-sanitizer: not found" in logs["env.log"], logs["env.log"]
    assert not any(name.startswith(("sanitize-", "profile")) for name in logs)
    assert {p.name for p in out.iterdir()} == {"summary.txt", "logs.tar.gz"}


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_stops_after_a_failed_build_and_shows_its_log(tmp_path):
    # nothing would test the kernels: no tests, sanitizer, benchmark or profile; the build log's
    # tail is printed and packed, and the run fails
    r, out = _run_gpu_check(tmp_path, 300, returncode=1, STANDIN_BUILD_FAILS="1")
    _summary_has(out, "== build: FAILED (exit 1)", "== tests, bench: not run (the build failed; see build.log",
                 "gpu_check: FAILED stages: build")
    assert "(stand-in nvcc error)" in r.stdout.split("== tests, bench: not run")[1], r.stdout[-3000:]
    assert "(stand-in nvcc error)" in _logs(out)["build.log"]
    assert {p.name for p in out.iterdir()} == {"summary.txt", "logs.tar.gz"}


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_skips_a_stage_the_budget_has_no_time_for(tmp_path):
    # a budget under the 15 s of timeout grace plus 10 s: not even the build may start
    _, out = _run_gpu_check(tmp_path, 300, returncode=1, SRT_GPU_CHECK_BUDGET_S="20")
    _summary_has(out, "== build: SKIPPED (no time left in the budget)", "== tests, bench: not run (the build failed",
                 "gpu_check: FAILED stages: build")


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_does_not_count_a_failed_plot_or_a_profile_without_counter_access(tmp_path):
    # the likeliest profile failure on a lent machine: no access to the performance counters.
    # The plot and the profile are diagnostics: their failures are noted, not failed stages.
    _, out = _run_gpu_check(tmp_path, 600, SRT_GPU_CHECK_SKIP="tests,sanitize", STANDIN_NCU_NO_PERMISSION="1",
                            STANDIN_PLOT_FAILS="1", BENCH_ARGS="--dry-run --device cpu --skip-longest")
    _summary_has(out, "== bench: ok", "bench: no plot (plot.log in logs.tar.gz)", "== profile: FAILED (exit 1)",
                 "profile: Nsight Compute cannot profile here (no counter access",
                 "profile: not counted as a failed stage (diagnostics only)", "gpu_check: all stages passed")
    assert not (out / "profile.txt").exists() and "ERR_NVGPUCTRPERM" in _logs(out)["profile.log"]
    assert (out / "bench.json").exists() and not (out / "bench.png").exists()
    assert "(stand-in plot error)" in _logs(out)["plot.log"]


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_gives_the_profile_time_to_a_short_benchmark(tmp_path):
    # SRT_BENCH_MIN_S above the whole budget: the benchmark is "short of time", so it gets the
    # profile's reserve and the profile is not run, which is not a failure
    r, out = _run_gpu_check(tmp_path, 600, SRT_GPU_CHECK_SKIP="tests", SRT_BENCH_MIN_S="100000",
                            BENCH_ARGS="--dry-run --device cpu --skip-longest")
    _summary_has(out, "== bench: ok", "== profile: not run (its 75 s went to the benchmark",
                 "gpu_check: all stages passed")
    assert "profile_raw.csv" not in _logs(out) and not (out / "profile.txt").exists()
    # the benchmark's stage limit includes the reserve: 15 s of timeout grace are kept back
    bench_limit = int(r.stdout.split("== bench (timeout ")[1].split("s)")[0])
    assert 450 - 15 - 60 < bench_limit <= 450 - 15, r.stdout[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_runs_the_sanitizer_when_a_gpu_test_fails(tmp_path):
    # a failing GPU test brings in compute-sanitizer's three tools on sanitize_gpu.py (memcheck on
    # every case, racecheck and synccheck on --quick), before the benchmark, and the run fails
    failing = _planted(tmp_path, "import pytest\n\n@pytest.mark.parametrize('device', ['cuda', 'cpu'])\n"
                                 "def test_planted_failure(device):\n    assert device == 'cpu'\n")
    r, out = _run_gpu_check(tmp_path, 600, returncode=1, SRT_TEST_ARGS=str(failing), SRT_TEST_WORKERS="1",
                            SRT_GPU_CHECK_SKIP="bench,profile")
    _summary_has(out, "== tests: FAILED", "all tests: 1 passed, 1 failed", "== sanitize-memcheck: ok",
                 "== sanitize-racecheck: ok", "== sanitize-synccheck: ok",
                 "sanitize memcheck: ========= ERROR SUMMARY: 0 errors",
                 "sanitize memcheck: sanitize_gpu: 80 of 80 cases ok",
                 "sanitize racecheck: sanitize_gpu: 10 of 10 cases ok", "gpu_check: FAILED stages: tests")
    headline = r.stdout.split("================ headline ================")[1]
    assert "sanitize synccheck: ========= ERROR SUMMARY: 0 errors" in headline, headline
    logs = _logs(out)
    assert "sanitizer option --tool memcheck" in logs["sanitize-memcheck.log"]
    assert "sanitizer option --error-exitcode 9" in logs["sanitize-racecheck.log"]
    # API errors PyTorch provokes on purpose are not kernel bugs (the stand-in's --help has the option)
    assert "sanitizer option --report-api-errors no" in logs["sanitize-memcheck.log"]
    # memcheck sees a read past a tensor's end only without the caching allocator's larger blocks
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in logs["sanitize-memcheck.log"]
    assert r.stdout.index("== sanitize-synccheck") < r.stdout.index("== bench: skipped")


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_runs_the_sanitizer_when_the_tests_leave_no_xml(tmp_path):
    # a test stage that ends without its junit XML (here pytest refusing an option; on a GPU, a
    # crash or a kill) says nothing of the kernels: it fails, and the sanitizer stages run
    _, out = _run_gpu_check(tmp_path, 300, returncode=1, SRT_TEST_ARGS="--no-such-option",
                            SRT_GPU_CHECK_SKIP="bench,profile", STANDIN_SANITIZER_NO_WORKLOAD="1")
    _summary_has(out, "== tests: FAILED (exit 4)", "tests: no junit XML", "== sanitize-memcheck: ok",
                 "== sanitize-racecheck: ok", "== sanitize-synccheck: ok", "gpu_check: FAILED stages: tests")
    assert not (out / "tests.xml").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_leaves_the_sanitizer_out_when_only_a_cpu_test_fails(tmp_path):
    failing = _planted(tmp_path, "def test_planted_failure():\n    assert 1 == 2\n")
    _, out = _run_gpu_check(tmp_path, 300, returncode=1, SRT_TEST_ARGS=str(failing), SRT_TEST_WORKERS="1",
                            SRT_GPU_CHECK_SKIP="bench,profile")
    _summary_has(out, "== sanitize: not run (no GPU test failed")
    assert not any(name.startswith("sanitize") for name in _logs(out))


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_sanitizer_on_request_reports_a_race(tmp_path):
    # SRT_GPU_CHECK_SANITIZE=1 runs it without a test failure; a hazard the tool reports fails the
    # stage and its first lines reach the summary
    r, out = _run_gpu_check(tmp_path, 600, returncode=1, SRT_GPU_CHECK_SKIP="tests,bench,profile",
                            SRT_GPU_CHECK_SANITIZE="1", STANDIN_RACE="1")
    _summary_has(out, "== sanitize-memcheck: ok", "== sanitize-racecheck: FAILED (exit 9)", "== sanitize-synccheck: ok",
                 "sanitize racecheck: ========= RACECHECK SUMMARY: 1 hazard displayed",
                 "sanitize racecheck: ========= Error: Race reported between Write access",
                 "gpu_check: FAILED stages: sanitize-racecheck")


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_runs_only_the_gpu_tests_by_default(tmp_path):
    # the tests conftest marks gpu (a "cuda" parametrisation, an explicit marker) run, the
    # CPU-only ones (CI's) are deselected, and the XML's gpu property is what the summary counts
    planted = _planted(tmp_path, "import pytest\n\n@pytest.mark.parametrize('device', ['cuda', 'cpu'])\n"
                                 "def test_on(device):\n    pass\n\n@pytest.mark.gpu\ndef test_marked():\n    pass\n\n"
                                 "def test_cpu_only():\n    pass\n")
    r, out = _run_gpu_check(tmp_path, 300, SRT_TEST_ARGS=str(planted), SRT_TEST_WORKERS="1",
                            SRT_GPU_CHECK_ALL_TESTS="0", SRT_GPU_CHECK_SKIP="bench,profile")
    _summary_has(out, "all tests: 2 passed, 0 failed", "GPU tests (marked gpu: on cuda, test_cuda_build.py): 2 passed")
    xml = (out / "tests.xml").read_text()
    assert "test_on[cuda]" in xml and "test_marked" in xml and "test_on[cpu]" not in xml and "test_cpu_only" not in xml


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_fails_without_a_gpu_or_gpu_tests(tmp_path):
    # no GPU visible (this machine) and no GPU test passing: a vacuous run must not pass
    planted = _planted(tmp_path, "def test_cpu_only():\n    pass\n")
    r, out = _run_gpu_check(tmp_path, 300, returncode=1, SRT_TEST_ARGS=str(planted), SRT_TEST_WORKERS="1",
                            SRT_GPU_CHECK_ALLOW_NO_GPU="0", SRT_GPU_CHECK_SKIP="sanitize,bench,profile")
    _summary_has(out, "GPU visible: False", "== gpu: FAILED (no GPU visible", "GPU tests: NONE PASSED",
                 "gpu_check: FAILED stages: gpu tests")


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_test_stage_timeout_keeps_the_xml(tmp_path):
    # a test stage cut off by its timeout is stopped with SIGINT, on which pytest still writes the
    # junit XML of what ran (SIGTERM would leave none, and the run would look like a crash).
    # A budget of 70 s leaves the test stage about 50 s (15 s of timeout grace and the stages
    # before it come off), and with no start margin the planted tests may start at any time in
    # it: a loaded machine once took over 15 s to start them. The planted slow test is then cut
    # off about a minute in. The start margin (tests skipped as NOT RUN) has its own test below.
    planted = _planted(tmp_path, "import time\n\ndef test_quick():\n    pass\n\n"
                                 "def test_slow():\n    time.sleep(600)\n")
    r, out = _run_gpu_check(tmp_path, 300, returncode=1, SRT_TEST_ARGS=str(planted),
                            SRT_TEST_WORKERS="1", SRT_GPU_CHECK_SKIP="sanitize,bench,profile",
                            SRT_GPU_CHECK_BUDGET_S="70", SRT_TEST_START_MARGIN_S="0")
    summary = _summary_has(out, "== tests: TIMED OUT", "all tests: 1 passed, 0 failed, 0 skipped, 1 INTERRUPTED")
    assert (out / "tests.xml").exists(), summary


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_counts_tests_past_the_start_margin_as_not_run(tmp_path):
    # tests that would start less than SRT_TEST_START_MARGIN_S before the stage's timeout are
    # skipped (tests/conftest.py's SRT_TEST_DEADLINE) and counted apart: they did not pass. A
    # margin longer than the stage puts the deadline before the first test.
    planted = _planted(tmp_path, "import pytest\n\n@pytest.mark.parametrize('device', ['cuda', 'cpu'])\n"
                                 "def test_late(device):\n    pass\n")
    _, out = _run_gpu_check(tmp_path, 300, SRT_TEST_ARGS=str(planted), SRT_TEST_WORKERS="1",
                            SRT_GPU_CHECK_SKIP="bench,profile", SRT_TEST_START_MARGIN_S="100000")
    _summary_has(out, "== tests: ok", "all tests: 0 passed, 0 failed, 0 skipped, 2 NOT RUN (time budget)",
                 "GPU tests (marked gpu: on cuda, test_cuda_build.py): 0 passed, 0 failed, 0 skipped, 1 NOT RUN",
                 "GPU tests: NONE PASSED", "== sanitize: not run (no GPU test failed")


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils' timeout")
def test_gpu_check_counts_a_crashed_worker_as_a_failed_gpu_test(tmp_path):
    # a test that kills its pytest-xdist worker is reported by the controller without the gpu
    # property; it must still count as a failed GPU test (which brings in the sanitizer)
    pytest.importorskip("xdist")
    planted = _planted(tmp_path, "import os\n\ndef test_ok():\n    pass\n\ndef test_crash():\n    os.abort()\n")
    _, out = _run_gpu_check(tmp_path, 300, returncode=1, SRT_TEST_ARGS=str(planted), SRT_TEST_WORKERS="1",
                            SRT_GPU_CHECK_SKIP="sanitize,bench,profile")
    _summary_has(out, "all tests: 1 passed, 1 failed",
                 "GPU tests (marked gpu: on cuda, test_cuda_build.py): 0 passed, 1 failed",
                 "== sanitize: skipped (SRT_GPU_CHECK_SKIP)")
