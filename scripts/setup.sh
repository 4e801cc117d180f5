#!/usr/bin/env bash
# Set up fastdiff in a virtual environment, ./.venv (created here, reused when it exists):
#   bash scripts/setup.sh          what sampling needs: torch (the CPU build of 2.13.0 unless a torch 2.11-2.13 is
#                                  there), numpy, safetensors, tqdm, pillow, einops, and fastdiff itself, editable, with its
#                                  C++ extension built against that torch
#   bash scripts/setup.sh --test   the same plus the test, training and benchmark extras (pytest, pytest-benchmark,
#                                  diffusers, transformers, scikit-learn, scipy, matplotlib, triton)
#   PYTHON=/path/to/python bash scripts/setup.sh ...   install into that Python instead of .venv
# Each step prints what it does; the extension's compile prints one line per source ([3/14] csrc/cpu/foo.cpp), and
# its full log is kept in build/setup-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do
  case $arg in
    --test) extras="[test,train]" ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done
t0=$SECONDS
step() { echo "setup [$((SECONDS - t0))s]: $*"; }

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  step "installing into $PY ($("$PY" -c 'import sys; print(sys.prefix)')), as PYTHON says"
else
  if [ ! -x .venv/bin/python ]; then
    step "creating the virtual environment .venv"
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
  step "installing into .venv (use it: .venv/bin/fastdiff, .venv/bin/python, or source .venv/bin/activate)"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@" 2>&1 | { grep --line-buffered -v "^Requirement already satisfied" || true; }; }

# The CPU build of torch (a looser range would pull several GB of CUDA packages).
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('torch').startswith(('2.11.', '2.12.', '2.13.')) else 1)" 2>/dev/null; then
  step "torch $("$PY" -c "import importlib.metadata as m; print(m.version('torch'))") is there; keeping it"
else
  step "installing torch 2.13.0 (CPU build)"
  pip_install torch==2.13.0
fi
step "installing the build tools (setuptools, wheel, ninja)"
pip_install "setuptools>=64" wheel ninja
# --no-build-isolation: the extension builds against the torch installed above (setup.py pins the package to it)
step "building fastdiff's C++ extension and installing fastdiff${extras:+ with $extras} (editable)"
mkdir -p build
log=build/setup-build.log
# pip -v shows the build as it goes: what it collects, ninja's progress lines shortened to the source they compile,
# and setup.py's own lines
set +e
"$PY" -m pip install --disable-pip-version-check -v --no-build-isolation -e ".$extras" 2>&1 | tee "$log" \
  | grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] |^ *setup\.py: |^Collecting |^Installing collected|^Successfully installed' \
  | sed -u -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c (/[^ ]*/)?(csrc/[^ ]+) .*#  \1 compiling \3#'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  tail -n 40 "$log" >&2
  echo "setup: the install failed; the whole log is $log" >&2
  exit 1
fi
step "done; backends:"
"$PY" -c "import fastdiff; [print(f'  {k:7s} {\"yes\" if v[\"available\"] else \"no \"}  {v[\"why\"]}') for k, v in fastdiff.backends().items()]"
