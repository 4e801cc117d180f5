#!/usr/bin/env bash
# Compile each csrc/cuda/*.cu on its own with nvcc for sm_80 and sm_90 (CUDA toolkit headers only; the torch glue
# lives in .cpp files), then check each kernel's ptxas resources (scripts/ptxas_check.py: registers, spills, stack,
# static shared memory against its launch bounds; fails on spills). Nothing runs: the kernels run on the CPU in
# scripts/cuda_emu_test.sh. Fails if nvcc is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PY=${PYTHON:-python3}
command -v "$NVCC" >/dev/null || { echo "nvcc_check: nvcc not found (set NVCC=...)" >&2; exit 1; }
shopt -s nullglob
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
dirs=()
for f in csrc/cuda/*.cu; do
  k="$out/$(basename "$f" .cu)"
  mkdir -p "$k"
  if ! "$NVCC" -std=c++17 -O3 -Icsrc/include -c "$f" -o "$k/obj.o" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xptxas -v -keep -keep-dir "$k" 2>"$k/ptxas.log"; then
    grep -v '^ptxas info\|^    [0-9]* bytes stack frame' "$k/ptxas.log" >&2 || true
    echo "nvcc_check: $f failed to compile" >&2
    exit 1
  fi
  grep -v '^ptxas info\|^    [0-9]* bytes stack frame' "$k/ptxas.log" >&2 || true  # warnings, if any
  dirs+=("$k")
  n=$((n + 1))
done
echo "nvcc_check: $n CUDA source(s) compiled for sm_80 and sm_90 with $("$NVCC" --version | tail -n 2 | head -n 1)"
[ $n -eq 0 ] || $PY scripts/ptxas_check.py "${dirs[@]}"
