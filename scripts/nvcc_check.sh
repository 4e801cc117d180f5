#!/usr/bin/env bash
# Compile each csrc/cuda/*.cu on its own with nvcc for sm_80 and sm_90 (CUDA toolkit headers only; the torch glue
# lives in .cpp files). Nothing runs: this only proves the kernels compile. Fails if nvcc is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "nvcc_check: nvcc not found (set NVCC=...)" >&2; exit 1; }
shopt -s nullglob
out=$(mktemp -d)
n=0
for f in csrc/cuda/*.cu; do
  "$NVCC" -std=c++17 -O3 -Icsrc/include -c "$f" -o "$out/$(basename "$f").o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  n=$((n + 1))
done
rm -rf "$out"
echo "nvcc_check: $n CUDA source(s) compiled for sm_80 and sm_90 with $("$NVCC" --version | tail -n 2 | head -n 1)"
