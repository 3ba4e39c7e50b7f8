#!/usr/bin/env bash
# CUDA compile check, no GPU needed (called by .ci/run; runnable on its own).
#
# 1. A fresh virtual environment with a CUDA build of torch (torch 2.14.1 is a CUDA 13.0
#    build here, ~5.5 GB from local disk) and the build tools.
# 2. Builds the extension with nvcc (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=2) in a
#    temporary copy of the repository, so an in-place CPU build in the checkout is untouched.
#    setup.py resolves the toolkit home (CUDA_HOME, else `nvcc --dryrun`'s TOP=; SPEC 6).
# 3. Checks, without a GPU, that the library imports, reports compiled_with_cuda() and has
#    CUDA (and CPU) kernels registered for every op; then runs tests/test_cuda_build.py.
# Any failure exits non-zero.
#
# Environment: SRT_CUDA_VENV (default: <repo>/.venv-cuda), SRT_CUDA_TORCH (default 2.14.1),
# SRT_CUDA_VENV_REUSE=1 keeps an existing venv that already has that torch, PYTHON (python3),
# TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${SRT_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_VERSION="${SRT_CUDA_TORCH:-2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export FORCE_CUDA=1
t_start=$(date +%s)

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  echo "cuda_build_check: no nvcc on PATH and CUDA_HOME unset: cannot compile the CUDA kernels" >&2
  exit 1
fi

venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys, torch, ninja, pybind11, setuptools, pytest  # noqa: F401
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}

echo "== cuda_build_check: venv $VENV (torch==$TORCH_VERSION, a CUDA build)"
if [ "${SRT_CUDA_VENV_REUSE:-0}" = 1 ] && venv_ok; then
  echo "   reusing the existing venv"
else
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" ninja pybind11 numpy setuptools wheel pytest hypothesis
fi
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'torch $TORCH_VERSION is not a CUDA build'; print('   torch', torch.__version__, 'CUDA', torch.version.cuda)"
t_venv=$(date +%s)
echo "== venv ready in $(( t_venv - t_start )) s"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/srt-cuda-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# The sources as they are in the checkout (committed or not), without build outputs or venvs.
(cd "$ROOT" && tar --exclude=./.git --exclude=./build --exclude='./.venv*' --exclude='*.so' \
   --exclude='*.egg-info' --exclude=__pycache__ -cf - .) | tar -xf - -C "$WORK"

echo "== building the extension with nvcc (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS) in $WORK"
t_build0=$(date +%s)
(cd "$WORK" && "$VENV/bin/python" setup.py build_ext --inplace) > "$WORK/build.log" 2>&1 || {
  tail -n 80 "$WORK/build.log"
  echo "cuda_build_check: the CUDA build FAILED (log above)" >&2
  exit 1
}
t_build1=$(date +%s)
grep -E "building .* extension" "$WORK/build.log" || true
if grep -qiE "warning" "$WORK/build.log"; then
  echo "   compiler warnings:"; grep -iE "warning" "$WORK/build.log" | sort -u | head -n 20
fi
echo "== CUDA build took $(( t_build1 - t_build0 )) s"

echo "== registration check (no GPU used)"
(cd "$WORK" && CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" - <<'EOF'
import torch

import self_reasoning_tokens as srt

assert srt.HAS_EXTENSION, "self_reasoning_tokens._C did not load"
assert torch.ops.self_reasoning_tokens.compiled_with_cuda() is True, "compiled_with_cuda() is False"
assert srt.cuda_kernels_available()
ok = True
for op in ("attn_fwd", "attn_bwd"):
    for key in ("CPU", "CUDA"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"self_reasoning_tokens::{op}", key)
        print(f"   self_reasoning_tokens::{op:8s} {key:4s} kernel registered: {has}")
        ok = ok and has
print(f"   compiled_with_cuda(): {torch.ops.self_reasoning_tokens.compiled_with_cuda()}; "
      f"torch {torch.__version__}; GPU visible: {torch.cuda.is_available()}")
raise SystemExit(0 if ok else 1)
EOF
)
(cd "$WORK" && CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_cuda_build.py)
echo "== cuda_build_check passed in $(( $(date +%s) - t_start )) s (venv $(( t_venv - t_start )) s, build $(( t_build1 - t_build0 )) s)"
