#!/usr/bin/env bash
# Install fastdiff and everything it needs on a fresh CPU machine (or reuse what is there), then build the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch (a looser range would pull several GB of CUDA packages).
$PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith(('2.11', '2.12', '2.13')) else 1)" 2>/dev/null \
  || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q setuptools wheel ninja pybind11
# --no-build-isolation: the extension builds against the torch installed above.
$PY -m pip install -q --no-build-isolation -e ".[test,train]"
$PY -c "import fastdiff, json; print(json.dumps(fastdiff.backends(), indent=1))"
