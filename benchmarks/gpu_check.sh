#!/usr/bin/env bash
# The one prepared GPU run (issue 3): on a machine with a CUDA GPU, builds the extension in place
# for sm_90, runs the test suite's GPU tests (every test parametrised on "cuda", "cuda-bf16" included,
# and tests/test_cuda_build.py: the tests carrying the `gpu` marker of tests/conftest.py; the
# CPU-only tests are CI's), then the GPU benchmark, and writes logs and JSON under OUTDIR. A run
# in which torch sees no GPU, the build has no CUDA kernels or no GPU test passed fails (it would
# otherwise pass vacuously); the profile is diagnostics, and its failure is noted, not counted.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Budget: all stages together stay inside SRT_GPU_CHECK_BUDGET_S (450 s, so that the whole run,
# summary included, stays within issue 3's 8 minutes and one device call of 540 s): the stages
# share one deadline and each has its own timeout (build 180 s, tests 220 s, tests that would
# start in its last 60 s skipped and counted as NOT RUN, CUDA tests first, each test at most 150 s
# with pytest-timeout where installed, and the stage stopped with SIGINT so that pytest still writes tests.xml
# for what ran; the benchmark whatever
# is left but the profile's reserve, about 100-200 s; the Nsight Compute profile SRT_PROFILE_S,
# 75 s, when ncu is there), so a hang in one stage still leaves every log. The benchmark gets
# --budget-s = its time left minus 40 s: it runs by priority (the issue-6 target shape, the
# longest-sequence search, the other shapes, FlexAttention's per-shape compiles last), stops
# cleanly at its budget and records what it skipped; bench.json is also
# rewritten after every measurement, so even a killed benchmark leaves its numbers.
# OUTDIR gets at most 7 flat files (the device tool brings back at most 8): summary.txt (written
# as the run goes, printed last), tests.xml, bench.json, bench_table.txt, bench.png (the plot of
# bench.json, benchmarks/plot_bench.py), profile.txt (the table of ncu's CSV,
# benchmarks/profile_gpu.py) and logs.tar.gz, rewritten after each stage, with env.log,
# build.log, tests.log, bench.log, plot.log, profile.log and profile_raw.csv (ncu's CSV).
# Environment: PYTHON (python3), SRT_GPU_CHECK_BUDGET_S (450), TORCH_CUDA_ARCH_LIST (9.0),
# MAX_JOBS (16), SRT_TEST_WORKERS (8, with pytest-xdist; each gets nproc/workers CPU threads
# through OMP_NUM_THREADS unless that is set), SRT_TEST_ARGS (pytest's paths and
# filters instead of "tests"), SRT_GPU_CHECK_ALL_TESTS (1: the CPU-only tests too),
# SRT_TEST_START_MARGIN_S (60: no test starts later than this before the test stage's timeout),
# SRT_PROFILE_S (75), SRT_BENCH_MIN_S (150: a benchmark left less
# with the profile's reserve takes the reserve and the profile is not run), BENCH_ARGS (extra
# arguments for benchmarks/bench_gpu.py), SRT_GPU_CHECK_SKIP (stages to leave out:
# tests,sanitize,bench,profile), SRT_GPU_CHECK_SANITIZE (1: run the compute-sanitizer stages even
# when the tests passed), SRT_GPU_CHECK_ALLOW_NO_GPU (1: no GPU and no GPU test passing is not a
# failure; for tests/test_gpu_check_script.py, which runs this script on the CPU), NCU and
# COMPUTE_SANITIZER (the tools' paths; unset, they are looked for on PATH, in $CUDA_HOME/bin and
# the usual install folders; set but empty, the stage that needs one is skipped).
# compute-sanitizer (memcheck on every kernel variant, racecheck and synccheck on a quick subset,
# benchmarks/sanitize_gpu.py; logs sanitize-*.log) runs after the tests when a GPU test failed
# (or the test stage crashed), before the benchmark, so that a wrong kernel's run also says where it goes wrong (an
# out-of-bounds access, a shared-memory race, a barrier not every thread reaches); a clean run of
# it alone: SRT_GPU_CHECK_SKIP=tests,bench,profile SRT_GPU_CHECK_SANITIZE=1 benchmarks/gpu_check.sh OUTDIR
# A quick rerun after a fix, e.g.: SRT_TEST_ARGS=tests/test_cuda_build.py SRT_GPU_CHECK_SKIP=profile
# BENCH_ARGS="--skip-longest --shapes 2x8192 --head-dims 128" benchmarks/gpu_check.sh OUTDIR
set -uo pipefail  # no -e: a failing stage is recorded and the next stages still run

OUTDIR="${1:?usage: benchmarks/gpu_check.sh OUTDIR}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
T0=$(date +%s)
DEADLINE=$(( T0 + ${SRT_GPU_CHECK_BUDGET_S:-450} ))
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
failed=()
# Stage logs are written here and packed into OUTDIR/logs.tar.gz after each stage and at exit,
# when the folder is removed.
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")"
pack_logs() {
  tar -czf "$OUTDIR/logs.tar.gz.part" -C "$LOGS" . 2>/dev/null && mv -f "$OUTDIR/logs.tar.gz.part" "$OUTDIR/logs.tar.gz"
}
trap 'pack_logs; rm -rf "$LOGS"' EXIT
trap 'exit 143' TERM INT

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S CMD...: runs CMD with stdout+stderr to NAME.log (and the console), stopped
# after min(LIMIT_S, time left before the deadline) with STAGE_SIGNAL (TERM; INT for pytest, which
# then still writes its XML) and killed 15 s later; the logs are packed again after it.
stage() {
  local name="$1" limit="$2"; shift 2
  local left=$(( DEADLINE - $(date +%s) - 15 ))  # timeout's --kill-after grace stays inside the budget
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then
    note "== $name: SKIPPED (no time left in the budget)"; failed+=("$name"); return 1
  fi
  echo "== $name (timeout ${limit}s): $*"
  local t=$(date +%s)
  timeout --signal="${STAGE_SIGNAL:-TERM}" --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  pack_logs
  local dt=$(( $(date +%s) - t ))
  if (( rc == 0 )); then
    note "== $name: ok in ${dt}s"
  else
    [[ $rc == 124 || $rc == 137 ]] && note "== $name: TIMED OUT after ${dt}s" || note "== $name: FAILED (exit $rc) after ${dt}s"
    failed+=("$name")
  fi
  return $rc
}

env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -n 1)"
  local ncu_bin; ncu_bin="$(find_ncu)"
  echo "ncu: ${ncu_bin:-not found} $([[ -n "$ncu_bin" ]] && "$ncu_bin" --version 2>/dev/null | tail -n 1)"
  local san_bin; san_bin="$(find_sanitizer)"
  echo "compute-sanitizer: ${san_bin:-not found} $([[ -n "$san_bin" ]] && "$san_bin" --version 2>/dev/null | tail -n 1)"
  "$PY" - <<'EOF'
import importlib.util, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("device: NO CUDA DEVICE VISIBLE")
try:
    import triton
    print(f"triton {triton.__version__} (FlexAttention, benchmark contender (e))")
except ImportError:
    print("triton: MISSING (the benchmark records FlexAttention, contender (e), as skipped)")
missing = [m for m in ("setuptools", "ninja", "pybind11", "pytest", "hypothesis", "numpy", "tqdm", "matplotlib")
           if importlib.util.find_spec(m) is None]
print("python packages: " + ("all present (setuptools, ninja, pybind11, pytest, hypothesis, numpy, tqdm, matplotlib)"
                            if not missing else "MISSING: " + ", ".join(missing)))
EOF
}

tests_summary() {
  "$PY" - "$OUTDIR/tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as e:  # no XML: pytest did not finish
    print(f"tests: no junit XML ({e})"); sys.exit(0)
counts = {"all": {}, "cuda": {}}
for case in root.iter("testcase"):
    if not case.get("name"):  # the test a SIGINT (the stage's timeout) cut short: not a pass;
        # the XML does not say which, so it counts in both lines (GPU tests run first)
        for group in counts:
            counts[group]["interrupted"] = counts[group].get("interrupted", 0) + 1
        continue
    # a test that killed its pytest-xdist worker (a segfault, an abort): the controller's report
    # has lost the gpu property, so it counts as a failed GPU test too
    crashed = any("crashed while running" in (el.get("message") or "") + (el.text or "")
                  for el in list(case.findall("error")) + list(case.findall("failure")))
    skip = case.find("skipped")
    kind = "failed" if case.find("failure") is not None or case.find("error") is not None else \
           "skipped" if skip is not None else "passed"
    if skip is not None and "SRT_TEST_DEADLINE" in (skip.get("message") or ""):
        kind = "not run (time budget)"
    # GPU tests: the ones tests/conftest.py marks `gpu`, which it records as the property gpu=1
    on_gpu = crashed or any(p.get("name") == "gpu" for p in case.iter("property"))
    for group in ("all", "cuda"):
        if group == "all" or on_gpu:
            counts[group][kind] = counts[group].get(kind, 0) + 1
for group, c in counts.items():
    label = "all tests" if group == "all" else "GPU tests (marked gpu: on cuda, test_cuda_build.py)"
    print(f"{label}: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped"
          + (f", {c['not run (time budget)']} NOT RUN (time budget)" if c.get("not run (time budget)") else "")
          + (f", {c['interrupted']} INTERRUPTED (a test the stage's timeout cut short)" if c.get("interrupted") else ""))
if not counts["cuda"].get("passed"):
    print("GPU tests: NONE PASSED (no GPU visible to pytest, no CUDA kernels, or all deselected)")
EOF
}

# skipped STAGE: SRT_GPU_CHECK_SKIP (comma-separated: tests, sanitize, bench, profile) names it.
skipped() { [[ ",${SRT_GPU_CHECK_SKIP:-}," == *",$1,"* ]]; }
# wanted STAGE: not skipped; a skipped stage is noted in the summary.
wanted() {
  skipped "$1" && { note "== $1: skipped (SRT_GPU_CHECK_SKIP)"; return 1; }
  return 0
}

# find_tool VAR CANDIDATE...: $VAR when it is set (even empty, which means none; a path that is not
# an executable is none too), else the first executable candidate
find_tool() {
  local var=$1 c; shift
  if [[ -n "${!var+set}" ]]; then c="${!var}"; [[ -n "$c" && -x "$c" ]] && echo "$c"; return 0; fi
  for c in "$@"; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
}

# not_found_where VAR PLACES: where a tool was looked for, for the line saying it was not found
not_found_where() {
  if [[ -n "${!1+set}" ]]; then echo "at $1='${!1}'"; else echo "$2"; fi
}

# Nsight Compute's CLI (NCU): on PATH, else beside nvcc, else the newest under /opt/nvidia.
find_ncu() {
  find_tool NCU "$(command -v ncu)" "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" \
    $(ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | sort -V -r)
}

# NVIDIA's compute-sanitizer (COMPUTE_SANITIZER): on PATH, else beside nvcc, else the newest toolkit's.
find_sanitizer() {
  find_tool COMPUTE_SANITIZER "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    $(ls -d /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | sort -V -r)
}

echo "== env"
env_report 2>&1 | tee "$LOGS/env.log"
note "$(grep -E '^(device|torch|python|nvcc)' "$LOGS/env.log")"
pack_logs

stage build 180 env FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
build_ok=$?
if (( build_ok == 0 )); then
  # a GPU run without a visible GPU or without the CUDA kernels would pass every stage vacuously
  "$PY" -c "import sys, torch, self_reasoning_tokens as s
reg = [torch._C._dispatch_has_kernel_for_dispatch_key(f'self_reasoning_tokens::{o}', 'CUDA') for o in ('attn_fwd', 'attn_bwd')]
print('cuda kernels:', s.cuda_kernels_available(), reg, '| GPU visible:', torch.cuda.is_available())
sys.exit(0 if s.cuda_kernels_available() and all(reg) and torch.cuda.is_available() else 3)" 2>&1 | tee -a "$SUMMARY"
  if (( PIPESTATUS[0] != 0 )) && [[ "${SRT_GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ]]; then
    note "== gpu: FAILED (no GPU visible to torch, or the build has no CUDA kernels: the line above)"
    failed+=("gpu")
  fi

  # The GPU tests (SRT_GPU_TESTS_ONLY=1: tests/conftest.py deselects the others, which CI runs;
  # SRT_GPU_CHECK_ALL_TESTS=1 keeps them, GPU tests first). Tests that would start less than
  # SRT_TEST_START_MARGIN_S (60) seconds before the stage's timeout are skipped instead
  # (SRT_TEST_DEADLINE), so pytest still ends
  # normally and tests.xml counts what ran; a test stuck in Python is stopped by pytest-timeout
  # (150 s) where installed; one blocked inside a CUDA call (a kernel that never ends) only by the
  # stage's SIGINT, on which pytest still writes the XML (the test counts as INTERRUPTED).
  # With pytest-xdist installed (the lent machines have it), SRT_TEST_WORKERS (8) processes share
  # the suite; the suite also passes under xdist on the CPU.
  # SRT_TEST_ARGS replaces pytest's "tests" (e.g. "tests/test_cuda_build.py", or
  # "tests/test_attention.py -k cuda-bf16", for a quick rerun after a fix).
  if wanted tests; then
    tests_limit=$(( DEADLINE - $(date +%s) - 15 )); (( tests_limit > 220 )) && tests_limit=220
    xdist=()
    workers=1
    "$PY" -c "import xdist" 2>/dev/null && { workers=${SRT_TEST_WORKERS:-8}; xdist=(-n "$workers"); }
    # pytest-xdist 3.2+: --dist worksteal (a worker out of tests takes half of another's queue;
    # with the default, one worker can be left with a chunk of slow tests while the others idle,
    # as `make test` showed on the CPU). It splits the collection order into contiguous parts, so
    # with SRT_GPU_CHECK_ALL_TESTS=1 the GPU tests no longer all start before the CPU-only ones.
    "$PY" -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null \
      && xdist+=(--dist worksteal)
    "$PY" -c "import pytest_timeout" 2>/dev/null && xdist+=(--timeout 150)
    gpu_only=1; [[ "${SRT_GPU_CHECK_ALL_TESTS:-0}" == 1 ]] && gpu_only=0
    # each worker's torch would otherwise start one CPU thread per core (8 x 16 on the lent
    # machine): the cores are shared out instead, unless OMP_NUM_THREADS is set already
    threads=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))}
    note "tests: $workers pytest worker(s), $threads CPU thread(s) each (OMP_NUM_THREADS)$([[ " ${xdist[*]-} " == *" worksteal "* ]] && echo ", --dist worksteal")"
    rm -f "$OUTDIR/tests.xml"  # a reused OUTDIR: an old XML would hide a test stage that wrote none
    # shellcheck disable=SC2086
    # (SRT_TEST_CONFIGS emptied: a leftover value would drop the "cuda" / "cuda-bf16" configurations)
    OMP_NUM_THREADS=$threads SRT_TEST_DEADLINE=$(( $(date +%s) + tests_limit - ${SRT_TEST_START_MARGIN_S:-60} )) \
      SRT_GPU_TESTS_ONLY=$gpu_only \
      SRT_TEST_CONFIGS= \
      STAGE_SIGNAL=INT stage tests 220 "$PY" -m pytest ${SRT_TEST_ARGS:-tests} -q -p no:cacheprovider \
        --continue-on-collection-errors ${xdist[@]+"${xdist[@]}"} --junitxml="$OUTDIR/tests.xml"
    tests_summary | tee -a "$SUMMARY"
    if grep -q "^GPU tests: NONE PASSED" "$SUMMARY" && [[ "${SRT_GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ]] && \
       [[ " ${failed[*]} " != *" tests "* ]]; then
      failed+=("tests")
    fi
    grep -E "^(FAILED|ERROR) " "$LOGS/tests.log" | head -n 30 | tee -a "$SUMMARY"
  fi

  # compute-sanitizer on small launches of every kernel variant (benchmarks/sanitize_gpu.py), when
  # a GPU test failed or the test stage ended without its XML (a crash, a kill), or on
  # SRT_GPU_CHECK_SANITIZE=1: before the benchmark, whose numbers mean little for a kernel that is
  # wrong. A CPU-only failure does not take the benchmark's time. No caching allocator under
  # memcheck, so that a read past a tensor's end is not hidden inside a larger cached block.
  # a GPU test failed or was cut short (a hang?), or the stage left no XML to say (a crash)
  gpu_tests_failed=0
  if grep -qE "^GPU tests \(.*: [0-9]+ passed, [1-9][0-9]* failed|^GPU tests \(.*INTERRUPTED|^tests: no junit XML" "$SUMMARY"; then
    gpu_tests_failed=1
  fi
  if skipped sanitize; then
    wanted sanitize  # notes the skip
  elif [[ $gpu_tests_failed == 1 || "${SRT_GPU_CHECK_SANITIZE:-0}" == 1 ]]; then
    san_bin="$(find_sanitizer)"
    if [[ -z "$san_bin" ]]; then
      note "== sanitize: skipped (no compute-sanitizer $(not_found_where COMPUTE_SANITIZER "on PATH, in \$CUDA_HOME/bin or /usr/local/cuda*"))"
    else
      # errors a CUDA API call returns (PyTorch probes some on purpose) are not kernel bugs: left
      # out where this compute-sanitizer has the option
      san_opts=(--error-exitcode 9 --print-limit 20)
      # (the help read whole first: grep -q would stop reading early, and under pipefail the
      # sanitizer's SIGPIPE would then fail the test)
      san_help="$("$san_bin" --help 2>/dev/null || true)"
      grep -q -- "--report-api-errors" <<<"$san_help" && san_opts+=(--report-api-errors no)
      for tool_args in "memcheck 70" "racecheck 45 --quick" "synccheck 30 --quick"; do
        set -- $tool_args
        tool=$1 limit=$2; shift 2
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage "sanitize-$tool" "$limit" "$san_bin" --tool "$tool" \
          "${san_opts[@]}" "$PY" benchmarks/sanitize_gpu.py "$@"
        { grep -E "(ERROR|RACECHECK) SUMMARY|^sanitize_gpu: [0-9]" "$LOGS/sanitize-$tool.log" || true
          grep -E "^========= +(Invalid|Error|Race|Barrier|Program hit|Warning|Malformed)" "$LOGS/sanitize-$tool.log" \
            | head -n 5 || true; } | sed "s/^/sanitize $tool: /" | tee -a "$SUMMARY"
      done
    fi
  else
    note "== sanitize: not run (no GPU test failed; SRT_GPU_CHECK_SANITIZE=1 runs it)"
  fi

  # The benchmark takes all the time left but the profile's reserve; it stops itself 40 s before
  # the stage timeout (SIGTERM, then SIGKILL 15 s later, would still leave the JSON it rewrites
  # as it goes).
  ncu_bin="$(find_ncu)"
  profile_reserve=0
  [[ -n "$ncu_bin" ]] && ! skipped profile && profile_reserve=${SRT_PROFILE_S:-75}
  bench_left=$(( DEADLINE - $(date +%s) - profile_reserve ))
  # A slow build or test stage leaves the benchmark (issue 6's numbers) first claim on the time:
  # under SRT_BENCH_MIN_S (150 s) with the reserve, the profile gives its reserve up.
  profile_given_up=0
  if (( profile_reserve > 0 && bench_left < ${SRT_BENCH_MIN_S:-150} )) && ! skipped bench; then
    bench_left=$(( bench_left + profile_reserve )); profile_reserve=0; profile_given_up=1
  fi
  if wanted bench; then
    rm -f "$OUTDIR/bench.json" "$OUTDIR/bench.png"  # a reused OUTDIR: no old numbers in this run's plot
    # shellcheck disable=SC2086
    stage bench "$bench_left" "$PY" benchmarks/bench_gpu.py --out "$OUTDIR/bench.json" \
          --table-out "$OUTDIR/bench_table.txt" --budget-s $(( bench_left - 40 )) ${BENCH_ARGS:-}
    # The benchmark as a picture (benchmarks/plot_bench.py, a few seconds on the CPU, taken from
    # the 40 s the benchmark leaves of its stage, never from the profile's reserve): bench.png; a
    # failed plot is noted, not counted.
    if [[ -s "$OUTDIR/bench.json" ]]; then
      plot_left=$(( DEADLINE - $(date +%s) - 15 - profile_reserve )); (( plot_left > 60 )) && plot_left=60
      if (( plot_left < 5 )); then
        note "bench: no plot (no time left in the budget)"
      elif timeout "$plot_left" "$PY" benchmarks/plot_bench.py "$OUTDIR/bench.json" --out "$OUTDIR/bench.png" \
           >>"$LOGS/plot.log" 2>&1; then
        note "bench: plot in bench.png"
      else
        note "bench: no plot (plot.log in logs.tar.gz)"
      fi
      pack_logs
    fi
  fi

  # Why the numbers are what they are: Nsight Compute on one fwd+bwd of (a), (a2), (a3), (b) and
  # SDPA's flash kernels at the target shape (benchmarks/profile_gpu.py), into profile.txt.
  if skipped profile; then
    wanted profile  # notes the skip
  elif (( profile_given_up )); then
    note "== profile: not run (its ${SRT_PROFILE_S:-75} s went to the benchmark, which had under ${SRT_BENCH_MIN_S:-150} s)"
  elif [[ -n "$ncu_bin" ]]; then
    # the sections this ncu knows (an unknown name would abort the whole profile)
    known="$("$ncu_bin" --list-sections 2>/dev/null)"
    sections=()
    for s in SpeedOfLight ComputeWorkloadAnalysis MemoryWorkloadAnalysis MemoryWorkloadAnalysis_Tables \
             Occupancy LaunchStats WarpStateStats SchedulerStats; do
      [[ -z "$known" ]] || grep -qw -- "$s" <<<"$known" && sections+=(--section "$s")
    done
    # ncu writes its CSV when the profiled process ends; the launches are bounded by the
    # profiler start/stop bracket in profile_gpu.py (about 16 kernels), --launch-count caps them
    # --clock-control none: the card's clocks are left alone (ncu's default locks them to base)
    stage profile "$profile_reserve" "$ncu_bin" --target-processes all --profile-from-start off --clock-control none \
         --kernel-name "regex:attn_|flash_" --launch-count 20 ${sections[@]+"${sections[@]}"} \
         --page raw --csv --print-units base --log-file "$LOGS/profile_raw.csv" \
         "$PY" benchmarks/profile_gpu.py run
    if grep -qE "ERR_NVGPUCTRPERM|LibraryNotLoaded|Failed to initialize the profiler" \
         "$LOGS/profile_raw.csv" "$LOGS/profile.log" 2>/dev/null; then
      note "profile: Nsight Compute cannot profile here (no counter access, or its library does not load)"
    elif [[ -s "$LOGS/profile_raw.csv" ]]; then
      "$PY" benchmarks/profile_gpu.py summarize "$LOGS/profile_raw.csv" --out "$OUTDIR/profile.txt" \
        >/dev/null 2>>"$LOGS/profile.log" || note "profile: could not tabulate profile_raw.csv (profile.log in logs.tar.gz)"
    else
      note "profile: ncu wrote no CSV (profile.log in logs.tar.gz)"
    fi
    pack_logs
    # the profile is diagnostics: its failure (a timeout, no counters) is noted above, not counted
    if [[ " ${failed[*]} " == *" profile "* ]]; then
      kept=(); for f in "${failed[@]}"; do [[ $f != profile ]] && kept+=("$f"); done
      failed=(${kept[@]+"${kept[@]}"})
      note "profile: not counted as a failed stage (diagnostics only)"
    fi
  else
    note "== profile: skipped (no ncu $(not_found_where NCU "on PATH, in \$CUDA_HOME/bin or /opt/nvidia/nsight-compute"))"
  fi
else
  note "== tests, bench: not run (the build failed; see build.log in logs.tar.gz)"
  tail -n 40 "$LOGS/build.log"
fi

[[ -f "$OUTDIR/bench_table.txt" ]] && cat "$OUTDIR/bench_table.txt" >> "$SUMMARY"
[[ -f "$OUTDIR/profile.txt" ]] && { echo; echo "== Nsight Compute profile (profile.txt)"; cat "$OUTDIR/profile.txt"; } >> "$SUMMARY"
echo
echo "================ summary ($(( $(date +%s) - T0 )) s) ================"
cat "$SUMMARY"
# The lines that matter most, again at the very end (a reply that keeps only the output's tail
# still has them): device, stages, test counts, issue 6's targets, the A/B lines (tiles, determinism).
echo "================ headline ================"
grep -E '^(device|torch|== |all tests|GPU tests|tests: no junit|(FAILED|ERROR) |sanitize |  (PASS|FAIL|n/a) |  A/B )' "$SUMMARY"
if (( ${#failed[@]} )); then
  echo "gpu_check: FAILED stages: ${failed[*]}" | tee -a "$SUMMARY"
  exit 1
fi
echo "gpu_check: all stages passed" | tee -a "$SUMMARY"
