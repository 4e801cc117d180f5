#!/usr/bin/env bash
# Compile every CUDA source with nvcc (a broken kernel fails here), test the shared kernel math in C++, then run
# the test suite on the CPU with Triton kernels under the interpreter. Extra arguments go to pytest.
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
exit $rc
