#!/usr/bin/env bash
# On a fresh GPU machine with no network: build the extension, run the CUDA-op tests, the benchmarks and the rest of
# the tests, and write a summary (markdown; logs and pytest-benchmark JSON beside it) to OUTDIR (default ./out).
#   bash scripts/gpu_check.sh "$OUT"      (first, on the CPU machine: bash scripts/gpu_wheels.sh; carry .gpu_wheels)
# Budget: a lent GPU has 15 minutes of device time, machine start included, so the whole check ends within
# GPU_CHECK_BUDGET_S (default 330 s, under 6 minutes): every part runs under its own `timeout`, capped by what is
# left of the budget, and a part that would start with too little left is skipped and listed. The summary is written
# as the parts finish and completed by an exit trap, so it exists (saying what ran, what failed or timed out, what was
# skipped and why) even when a part fails, hangs or the script is killed.
# Without a visible GPU it only writes the summary saying so (nothing is built or run; rc 0). rc 1: a part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
S="$OUT/summary.md"
BUDGET=${GPU_CHECK_BUDGET_S:-330}
t0=$(date +%s)
deadline=$((t0 + BUDGET))
ran=()
skipped=()
bad=()

finish() {
  local rc=$?
  {
    echo
    echo "## end after $(( $(date +%s) - t0 )) s (budget ${BUDGET} s)"
    echo "- ran: ${ran[*]:-none}"
    echo "- failed or timed out: ${bad[*]:-none}"
    echo "- skipped: ${skipped[*]:-none}"
    echo "- exit status: $rc (0: every part that ran passed, or no GPU; 1: a part failed or timed out)"
  } >>"$S"
  cat "$S"
}
trap finish EXIT
trap 'echo "- interrupted (signal) after $(( $(date +%s) - t0 )) s" >>"$S"; exit 130' INT TERM

# cap CAP_S: a timeout for a small step, never past the budget (at least 1 s)
cap() {
  local left=$((deadline - $(date +%s) - 10))
  left=$((left < 1 ? 1 : left))
  echo $(($1 < left ? $1 : left))
}

# part NAME CAP_S LOG CMD...: run CMD under timeout min(CAP_S, what is left of the budget − 10 s), log to $OUT/LOG.
part() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((deadline - $(date +%s) - 10))
  if [ "$left" -lt 20 ]; then
    skipped+=("$name(budget)")
    echo "- $name: SKIPPED — ${left}s of the budget left" >>"$S"
    return 0
  fi
  local lim=$((cap < left ? cap : left)) ts
  ts=$(date +%s)
  timeout -k 10 "$lim" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - ts ))
  ran+=("$name")
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    bad+=("$name(timeout)")
    echo "- $name: TIMED OUT after ${dt}s (limit ${lim}s): $(tail -n 1 "$OUT/$log") — $log" >>"$S"
  else
    [ $rc -eq 0 ] || bad+=("$name(rc=$rc)")
    echo "- $name: rc=$rc (${dt}s): $(tail -n 1 "$OUT/$log") — $log" >>"$S"
  fi
  return 0
}

{
  echo "# fastdiff GPU check"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+local changes)')"
  echo "- device: $(timeout "$(cap 20)" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
  echo "- versions: $(timeout "$(cap 60)" $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1 | tail -n 1)"
} >"$S"

# Is a GPU visible to torch? (a driver too old for torch's CUDA makes it False, with torch's warning as the reason)
vis=$(timeout "$(cap 60)" $PY - 2>&1 <<'PYEOF'
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch
    ok = torch.cuda.is_available()
why = "; ".join(str(x.message).splitlines()[0] for x in w)
if ok:
    print(f"- cuda visible: True ({torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)})")
else:
    print("- cuda visible: False — NO GPU visible" + (f" ({why})" if why else ""))
PYEOF
)
echo "${vis:-"- cuda visible: unknown (torch did not answer in 60 s)"}" | tail -n 1 >>"$S"
if ! grep -q "cuda visible: True" "$S"; then
  skipped+=("wheels(no GPU)" "build(no GPU)" "cuda-ops-tests(no GPU)" "benchmarks(no GPU)" "gpu-model(no GPU)"
            "other-tests(no GPU)")
  echo "- NO GPU is visible: nothing built or run (the CPU checks are CI's: bash scripts/test.sh)" >>"$S"
  exit 0
fi

# 0. wheels carried from the CPU machine (scripts/gpu_wheels.sh: diffusers, which the GPU image lacks)
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  part wheels 60 wheels.log $PY -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
else
  skipped+=("wheels(none carried)")
  echo "- wheels: none carried — diffusers parity tests and the U-Net-vs-diffusers benchmark skip (scripts/gpu_wheels.sh)" >>"$S"
fi

# 1. build (no network: no deps resolution, no build isolation)
export MAX_JOBS=${MAX_JOBS:-16}
part build 200 build.log $PY -m pip install -q --no-build-isolation --no-deps -e .
# were the CUDA kernels built? (if not, the CUDA-kernel tests SKIP, so a silent CPU-only build must be loud here)
timeout "$(cap 60)" $PY - >>"$S" 2>&1 <<'PYEOF'
try:
    import fastdiff._backend as b
    built = bool(getattr(b._cfg, "BUILT_CUDA", False)) and b.has_cpp()
    note = getattr(b._cfg, "NOTE", "no build record") if b._cfg else "no build record"
    print(f"- CUDA kernels: {'built' if built else 'NOT BUILT (their tests skip)'} — {note}"
          + ("" if b.has_cpp() else f"; fastdiff._C: {b._ext_error}"))
except Exception as e:
    print(f"- CUDA kernels: fastdiff import failed: {type(e).__name__}: {e}")
PYEOF

# 2. the CUDA ops first (the kernels no CPU run can time), then 3. the benchmarks, then 4. everything else
part cuda-ops-tests 120 tests_ops.log $PY -m pytest -q -x -p no:cacheprovider tests/ops -m "not slow" --benchmark-disable
part benchmarks 100 bench.log $PY -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
  --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=min,median,mean,rounds
if [ -s "$OUT/benchmarks.json" ]; then
  timeout "$(cap 30)" $PY scripts/bench_summary.py "$OUT/benchmarks.json" >>"$S" 2>&1
fi
# >>> GPU cost on paper beside the measurement (benchmarks/gpu_model.py, GPU-MODEL engineer): one `part` line here,
# >>> e.g.  part gpu-model 30 gpu_model.log $PY benchmarks/gpu_model.py ...   (then its table into "$S")
part other-tests 150 tests.log $PY -m pytest -q -p no:cacheprovider tests --ignore=tests/ops -m "not slow" \
  --benchmark-disable
[ ${#bad[@]} -eq 0 ]  # rc 1 when a part failed or timed out (the summary says which)
