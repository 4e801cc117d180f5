#!/usr/bin/env bash
# Compile every CUDA source with nvcc (a broken kernel fails here), test the shared kernel math in C++, then run
# the test suite on the CPU with Triton kernels under the interpreter, then compile the Triton kernels for real GPUs
# (scripts/triton_aot_check.py). Extra arguments go to pytest (and skip the compile check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/nvcc_check.sh
# the per-element math shared by the CPU and CUDA kernels, tested on its own with g++ (also a CMake/ctest target)
bin=$(mktemp -d)/test_math
${CXX:-g++} -std=c++17 -O2 -Icsrc/include csrc/tests/test_math.cpp -o "$bin" && "$bin"
export TRITON_INTERPRET=1
set +e
$PY -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
[ $rc -eq 0 ] || exit $rc
# every Triton kernel specialization the tests launch, compiled for sm_80/sm_90 with Triton's own ptxas (no GPU
# needed): catches what the interpreter accepts and a GPU rejects (tl.dot shapes, shared memory over the limit)
if [ $# -eq 0 ]; then $PY scripts/triton_aot_check.py; fi
