#!/usr/bin/env bash
# Compile every CUDA source with nvcc and check its ptxas resources (a broken or spilling kernel fails here), test
# the shared kernel math in C++, run the CUDA kernels on the CPU emulator (scripts/cuda_emu_test.sh), then run the
# test suite on the CPU with Triton kernels under the interpreter, then compile the Triton kernels for real GPUs
# (scripts/triton_aot_check.py). Extra arguments go to pytest (and skip the emulator run and the Triton compile check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/nvcc_check.sh
# the per-element math shared by the CPU and CUDA kernels, tested on its own with g++ (also a CMake/ctest target)
bin=$(mktemp -d)/test_math
${CXX:-g++} -std=c++17 -O2 -Icsrc/include csrc/tests/test_math.cpp -o "$bin" && "$bin"
# the CUDA kernels themselves, run on the CPU by the emulator in csrc/tests/cuemu (plain, ASan+UBSan, TSan builds)
if [ $# -eq 0 ]; then bash scripts/cuda_emu_test.sh; fi
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
