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
# emulator is built once for all of them); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
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
	$(PY) -m pytest tests -q -n $(TEST_WORKERS)

bench: build
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf build $(VENV) self_reasoning_tokens/*.so *.egg-info
