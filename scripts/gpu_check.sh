#!/usr/bin/env bash
# On a fresh GPU machine with no network: build the extension, run the whole test suite (GPU tests included),
# run the benchmarks, and write a summary (markdown + pytest-benchmark JSON) to OUTDIR (default ./out).
#   bash scripts/gpu_check.sh "$OUT"      (first, on the CPU machine: bash scripts/gpu_wheels.sh; carry .gpu_wheels)
# Budget: about 8 minutes on an H100 (each phase has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
S="$OUT/summary.md"
t0=$(date +%s)
{
  echo "# fastdiff GPU check"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+local changes)')"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
  echo "- versions: $($PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1)"
} >"$S"

# 0. wheels carried from the CPU machine (scripts/gpu_wheels.sh: diffusers, which the GPU image lacks)
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .gpu_wheels/*.whl >"$OUT/wheels.log" 2>&1
  echo "- carried wheels: rc=$? ($(ls .gpu_wheels | tr '\n' ' '))" >>"$S"
else
  echo "- no .gpu_wheels carried: diffusers parity tests and the U-Net-vs-diffusers benchmark skip (scripts/gpu_wheels.sh)" >>"$S"
fi

# 1. build (no network: no deps resolution, no build isolation)
export MAX_JOBS=${MAX_JOBS:-16}
timeout 300 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
echo "- build: rc=$? ($(( $(date +%s) - t0 ))s) — log in build.log" >>"$S"
$PY -c "import fastdiff, json; print(json.dumps(fastdiff.backends(), indent=1))" >>"$OUT/build.log" 2>&1
# One line each: is a GPU visible to torch (a driver too old for torch's CUDA makes it False, with torch's warning),
# and were the CUDA kernels built (if not, the CUDA-kernel tests SKIP, so a silent CPU-only build must be loud here).
$PY - >>"$S" 2>&1 <<'PYEOF'
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch
    ok = torch.cuda.is_available()
why = "; ".join(str(x.message).splitlines()[0] for x in w)
if ok:
    print(f"- cuda visible: True ({torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)})")
else:
    print("- cuda visible: False — NO GPU: GPU tests skip, benchmarks are skipped" + (f" ({why})" if why else ""))
try:
    import fastdiff._backend as b
    built = bool(getattr(b._cfg, "BUILT_CUDA", False)) and b.has_cpp()
    note = getattr(b._cfg, "NOTE", "no build record") if b._cfg else "no build record"
    print(f"- CUDA kernels: {'built' if built else 'NOT BUILT (their tests skip)'} — {note}"
          + ("" if b.has_cpp() else f"; fastdiff._C: {b._ext_error}"))
except Exception as e:
    print(f"- CUDA kernels: fastdiff import failed: {type(e).__name__}: {e}")
PYEOF

# 2. tests (GPU tests run here; CPU-only ones too)
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests -m "not slow" --benchmark-disable >"$OUT/tests.log" 2>&1
rc=$?
echo "- tests: rc=$rc: $(tail -n 1 "$OUT/tests.log")" >>"$S"

# 3. benchmarks (GPU only: on CPU they would only run out the timeout)
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "- benchmarks: skipped (no CUDA device visible)" >>"$S"
  cat "$S"
  exit 0
fi
timeout 300 $PY -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
  --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=min,median,mean,rounds >"$OUT/bench.log" 2>&1
echo "- benchmarks: rc=$? ($(( $(date +%s) - t0 ))s total) — table in bench.log, JSON in benchmarks.json" >>"$S"
if [ -f "$OUT/benchmarks.json" ]; then
  $PY scripts/bench_summary.py "$OUT/benchmarks.json" >>"$S" 2>&1
fi

# --- predicted GPU cost beside the measured medians (benchmarks/gpu_model.py: a model from published figures, not a
# measurement; counts on meta tensors, ~10 s, no GPU work). JSON: gpu_model.json; table appended to the summary.
echo >>"$S"
timeout 120 $PY benchmarks/gpu_model.py --json "$OUT/gpu_model.json" --measured "$OUT/benchmarks.json" >>"$S" 2>"$OUT/gpu_model.log"
echo "- gpu_model (predicted, not measured): rc=$? — all predictions in gpu_model.json, log in gpu_model.log" >>"$S"
# ---
cat "$S"
