#!/usr/bin/env bash
# `pip wheel .` as a user runs it: in a fresh venv that has torch 2.13.0 (the CPU build), plain pip, build isolation
# on. The wheel must be built against that torch (build_backend/fastdiff_build_backend.py), require it, install
# without replacing it, and load its extension with no version warning. Leaves nothing behind (a temp directory).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
python3 -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install -q --disable-pip-version-check torch==2.13.0
before=$("$py" -c "import importlib.metadata as m; print(m.version('torch'))")
echo "wheel_check [$((SECONDS - t0))s]: pip wheel . (fresh venv with torch $before)"
"$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" .
whl=$(ls "$work"/dist/fastdiff-*.whl)
echo "wheel_check [$((SECONDS - t0))s]: built $(basename "$whl"); installing it"
"$py" -m pip install -q --disable-pip-version-check "$whl"
cd "$work"  # import the installed wheel, not the source tree
"$py" -W error::RuntimeWarning - "$before" <<'PY'
import importlib.metadata as md, sys, torch
import fastdiff
from fastdiff import _build_config as cfg
before = sys.argv[1]
assert torch.__version__ == before, f"installing the wheel replaced torch {before} by {torch.__version__}"
assert cfg.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0], (cfg.TORCH_VERSION, torch.__version__)
info = fastdiff.backends()["cpp"]
assert info["available"], info
reqs = [r for r in md.requires("fastdiff") if r.startswith("torch")]
assert reqs == [f"torch=={before.split('+')[0]}"], reqs
x = fastdiff.ddim_sample(lambda x, t: torch.zeros_like(x), 4, shape=(2, 3), generator=torch.Generator().manual_seed(0))
assert torch.isfinite(x).all()
print(f"wheel_check: fastdiff {fastdiff.__version__} from the wheel: built against torch {cfg.TORCH_VERSION} "
      f"(C++{cfg.CXX_STD}), requires {reqs[0]}, C++ kernels loaded")
PY
echo "wheel_check [$((SECONDS - t0))s]: ok"
