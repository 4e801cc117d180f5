#!/usr/bin/env bash
# Compile every CUDA source with nvcc and check its ptxas resources (a broken or spilling kernel fails here), test
# the shared kernel math in C++, run the CUDA kernels on the CPU emulator (scripts/cuda_emu_test.sh), then run the
# test suite on the CPU with Triton kernels under the interpreter, then compile the Triton kernels for real GPUs
# (scripts/triton_aot_check.py). Extra arguments go to pytest (and skip the emulator run and the Triton compile check).
# Python: $PYTHON, else ./.venv (scripts/setup.sh --test makes it), else python3.
# Without a CUDA toolkit the CUDA compile checks are skipped with a notice (nvcc_check needs nvcc; the emulator needs
# the toolkit's headers); FASTDIFF_REQUIRE_NVCC=1 (CI) makes a missing toolkit an error instead.
# docs/testing.md describes each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHON=$PY  # the helper scripts below use the same Python
t0=$SECONDS
stage() { echo "test.sh [$((SECONDS - t0))s]: $*"; }
if ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "test.sh: pytest is not installed for $PY: run bash scripts/setup.sh --test first" >&2
  exit 1
fi
need_toolkit() {  # need_toolkit WHAT: a missing CUDA toolkit skips WHAT with a notice, or fails under FASTDIFF_REQUIRE_NVCC=1
  if [ "${FASTDIFF_REQUIRE_NVCC:-0}" = 1 ]; then
    echo "test.sh: $1 needs the CUDA toolkit, which is not found, and FASTDIFF_REQUIRE_NVCC=1" >&2
    exit 1
  fi
  echo "test.sh: no CUDA toolkit found: skipping $1 (CI runs it; install the toolkit or set NVCC/CUDA_HOME to run it)"
}
cuda_headers() {  # the toolkit's headers, where scripts/cuda_emu_test.sh looks for them
  local nvcc d
  nvcc=$(command -v "${NVCC:-nvcc}" 2>/dev/null || true)
  for d in "${CUDA_HOME:-}" ${nvcc:+"$(dirname "$(dirname "$(readlink -f "$nvcc")")")"} /usr/local/cuda; do
    if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then return 0; fi
  done
  return 1
}
if command -v "${NVCC:-nvcc}" >/dev/null; then bash scripts/nvcc_check.sh; else need_toolkit "the nvcc compile and ptxas check (nvcc not on PATH)"; fi
# the per-element math shared by the CPU and CUDA kernels, tested on its own with g++ (also a CMake/ctest target)
bin=$(mktemp -d)/test_math
${CXX:-g++} -std=c++17 -O2 -Icsrc/include csrc/tests/test_math.cpp -o "$bin" && "$bin"
# the CUDA kernels themselves, run on the CPU by the emulator in csrc/tests/cuemu (plain, ASan+UBSan, TSan builds)
if [ $# -eq 0 ]; then
  if cuda_headers; then bash scripts/cuda_emu_test.sh; else need_toolkit "the CUDA emulator run (no cuda_runtime.h)"; fi
fi
export TRITON_INTERPRET=1
stage "pytest (Triton under its interpreter)"
# the full run records every Triton kernel specialization it launches, for the GPU compile check below
rec=$(mktemp -d)/triton_specs.json
set +e
if [ $# -eq 0 ]; then
  FASTDIFF_TRITON_RECORD=$rec $PY -m pytest -q -p no:cacheprovider tests
else
  $PY -m pytest -q -p no:cacheprovider tests "$@"
fi
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
[ $rc -eq 0 ] || exit $rc
# every Triton kernel specialization the tests launch, compiled for sm_80/sm_90 with Triton's own ptxas (no GPU
# needed): catches what the interpreter accepts and a GPU rejects (tl.dot shapes, shared memory over the limit)
if [ $# -eq 0 ]; then stage "Triton AOT compile check"; $PY scripts/triton_aot_check.py --from-record "$rec"; fi
stage "done"
