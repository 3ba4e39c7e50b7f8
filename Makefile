# Quick start (README): `make compare` builds everything and runs the main job; `make test`
# runs the test suite. Both create ./.venv on first use (torch CPU build + build tools) and
# build the extension into the package with `pip install --no-build-isolation -e .`.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
# what the venv gets besides torch; the stamp's name follows this list and the torch version, so
# that a venv made by an older Makefile is brought up to date by the next `make` (which then
# also rebuilds the extension)
DEV_PACKAGES := ninja pybind11 setuptools wheel pytest pytest-xdist hypothesis
STAMP := $(VENV)/.srt-installed-$(shell echo '$(TORCH_VERSION) $(DEV_PACKAGES)' | cksum | cut -d' ' -f1)
# test processes (pytest-xdist): the machine's cores, at most 4 (each one imports torch; the CUDA
# emulator is built once for all of them); TEST_WORKERS=0 runs the suite in one process.
# --dist worksteal: a worker that runs out of tests takes half of another's queue. With the
# default (--dist load) a worker is sent tests in chunks, and one chunk could hold most of the
# slow gpu_check.sh tests (one file, one after another): on 2 cores the other worker then sat idle
# for the last 192 of 578 s; worksteal ended both within 3 s, in 477 s (same machine, cold
# emulator builds, one run after the other).
NPROC := $(shell env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
TEST_WORKERS ?= $(shell n=$(NPROC); [ $$n -gt 4 ] && n=4; echo $$n)
# CPU threads of each test process (OMP_NUM_THREADS, unless set already): the cores shared out
# among the workers. Each worker's torch would otherwise start one thread per core and the
# workers' threads contend: on 2 cores with 2 workers the suite took 856 s with torch's default
# threads and 712 s with one thread per worker (measured one after the other on the same machine).
TEST_THREADS ?= $(shell w=$(TEST_WORKERS); [ $$w -lt 1 ] && w=1; t=$$(( $(NPROC) / w )); [ $$t -lt 1 ] && t=1; echo $$t)
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: install build compare test bench clean

install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(DEV_PACKAGES)
	touch $@

# The extension (.so inside self_reasoning_tokens/) is rebuilt when a C++/CUDA source changes.
build: $(VENV)/.srt-built
$(VENV)/.srt-built: $(STAMP) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --quiet -e .
	touch $@

compare: build
	$(PY) -m self_reasoning_tokens compare --out runs/compare --overwrite

test: build
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TEST_THREADS)} $(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist worksteal

bench: build
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf build $(VENV) self_reasoning_tokens/*.so *.egg-info
