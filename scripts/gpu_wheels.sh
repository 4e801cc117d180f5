#!/usr/bin/env bash
# The lent GPU machine has no network and no diffusers (it has torch, triton, safetensors, pillow, tqdm, scikit-learn,
# huggingface-hub; see the device tool's KINDS.md). Download the pure-Python wheels it lacks into .gpu_wheels/
# (git-ignored) here, then carry them: run(command="bash scripts/gpu_check.sh $OUT", carry=[".gpu_wheels"]).
# gpu_check.sh installs them with --no-index before building, so the diffusers parity tests and the
# U-Net-vs-diffusers benchmark run there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIFFUSERS=$($PY -c "import diffusers; print(diffusers.__version__)" 2>/dev/null || echo 0.42.1)
rm -rf .gpu_wheels && mkdir -p .gpu_wheels
$PY -m pip download -q --no-deps --only-binary=:all: -d .gpu_wheels "diffusers==$DIFFUSERS" importlib_metadata
ls -la .gpu_wheels
