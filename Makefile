# Quick start (README): `make compare` builds everything and runs the main job; `make test`
# runs the test suite. Both create ./.venv on first use (torch CPU build + build tools) and
# build the extension into the package with `pip install --no-build-isolation -e .`.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.srt-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: install build compare test bench clean

install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) ninja pybind11 setuptools wheel pytest hypothesis
	touch $@

# The extension (.so inside self_reasoning_tokens/) is rebuilt when a C++/CUDA source changes.
build: $(VENV)/.srt-built
$(VENV)/.srt-built: $(STAMP) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --quiet -e .
	touch $@

compare: build
	$(PY) -m self_reasoning_tokens compare --out runs/compare --overwrite

test: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf build $(VENV) self_reasoning_tokens/*.so *.egg-info
