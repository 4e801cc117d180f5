#!/usr/bin/env bash
# Run the CUDA kernels on the CPU: csrc/cuda/*.cu compiled by g++ as host code against the emulator in
# csrc/tests/cuemu (fibers per CUDA thread, checked barriers and warp shuffles, launch limits, bounds and alignment
# of vector loads), each kernel's cases against its CPU reference. Three builds, cached under build/cuemu:
#   plain  -O2, every case;  asan  AddressSanitizer + UBSan, the quick set;  tsan  ThreadSanitizer, the tiny set
#   (each emulated thread a TSan fiber, only CUDA's own synchronisation as happens-before: a missing barrier races).
# Usage:
#   bash scripts/cuda_emu_test.sh                 all three (scripts/test.sh runs this)
#   bash scripts/cuda_emu_test.sh plain|asan|tsan one of them (extra arguments go to the test binary)
#   bash scripts/cuda_emu_test.sh --planted       plant each of four known bugs in a temp copy of a kernel source
#                                                 (sed; the real files are not touched) and show the harness fails
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-g++}
B=${CUEMU_BUILD:-build/cuemu}
JOBS=${CUEMU_JOBS:-2}

# the CUDA toolkit's headers (host-compiler mode): $CUDA_HOME, else next to nvcc, else /usr/local/cuda
CUDA_INC=""
for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")" \
         /usr/local/cuda; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_INC="$d/include"; break; fi
done
if [ -z "$CUDA_INC" ]; then
  echo "cuda_emu_test: CUDA toolkit headers (cuda_runtime.h) not found; set CUDA_HOME" >&2
  exit 1
fi

build() {  # build CONFIG DIR [CU_SRCS]; one make at a time per directory (several checkouts' test runs may share it)
  local srcs=${3:-} args
  args=(-s -j"$JOBS" -f csrc/tests/cuemu/Makefile CONFIG="$1" BUILD="$2" CXX="$CXX" CUDA_INC="$CUDA_INC")
  [ -z "$srcs" ] || args+=(CU_SRCS="$srcs")
  mkdir -p "$2"
  if command -v flock >/dev/null; then
    flock "$2/.lock" make "${args[@]}"
  else
    make "${args[@]}"
  fi
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=0:exitcode=66:report_signal_unsafe=0}

run_config() {  # run_config CONFIG [args...]
  local c=$1
  shift
  local t0=$SECONDS
  build "$c" "$B/$c"
  local set=()
  case $c in asan) set=(--quick) ;; tsan) set=(--tiny) ;; esac
  echo "== cuda_emu_test [$c] (built in $((SECONDS - t0)) s)"
  "$B/$c/cuemu_test" "${set[@]}" "$@"
}

if [ "${1:-}" = "--planted" ]; then
  # name | file in csrc/cuda to plant it in | sed expression | the kernel source to rebuild with it | suite
  bugs=(
    "no __syncthreads in group_norm_silu|group_norm_silu.cu|/__syncthreads();/d|group_norm_silu.cu|group_norm_silu"
    "__shfl_down_sync -> __shfl_up_sync|group_norm_silu.cu|s/__shfl_down_sync/__shfl_up_sync/g|group_norm_silu.cu|group_norm_silu"
    "vector path on a partial last chunk|fd_vec.cuh|s/if (ALIGNED \&\& i + VEC <= n)/if (ALIGNED \&\& i < n)/|multistep.cu|multistep"
    "grid-stride loop skips every other chunk|fd_vec.cuh|s/c += (int64_t)gridDim.x \* blockDim.x/c += 2 * (int64_t)gridDim.x * blockDim.x/|multistep.cu|multistep"
    "block_sum: only its first __syncthreads removed|group_norm_silu.cu|0,/__syncthreads();  \/\/ red may/{/__syncthreads();  \/\/ red may/d}|group_norm_silu.cu|group_norm_silu"
  )
  build plain "$B/plain"
  build tsan "$B/tsan"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  table="| planted bug | file | plain run | ThreadSanitizer run (tiny set) | caught |\n|---|---|---|---|---|\n"
  all=0
  i=0
  for b in "${bugs[@]}"; do
    IFS='|' read -r name file expr kernel suite <<<"$b"
    i=$((i + 1))
    mkdir -p "$tmp/$i"
    # a header is found next to the copied kernel source before csrc/cuda (#include "...": the includer's directory)
    [ "$file" = "$kernel" ] || cp "csrc/cuda/$kernel" "$tmp/$i/$kernel"
    sed "$expr" "csrc/cuda/$file" >"$tmp/$i/$file"
    if cmp -s "csrc/cuda/$file" "$tmp/$i/$file"; then
      echo "cuda_emu_test --planted: the sed for '$name' changed nothing in csrc/cuda/$file (update it)" >&2
      table+="| $name | $file | NOT APPLIED | | NO |\n"
      all=1
      continue
    fi
    srcs=""
    for f in csrc/cuda/*.cu; do
      if [ "$(basename "$f")" = "$kernel" ]; then srcs+=" $tmp/$i/$kernel"; else srcs+=" $f"; fi
    done
    res=()
    for c in plain tsan; do
      d="$B/planted$i-$c"
      mkdir -p "$d"
      cp -a "$B/$c/." "$d/"  # reuse the unchanged objects (make rebuilds the planted kernel only)
      build "$c" "$d" "$srcs"
      set=()
      [ "$c" = tsan ] && set=(--tiny)
      if "$d/cuemu_test" "${set[@]}" --only "$suite" >"$tmp/$i/$c.log" 2>&1; then
        res+=("passed (missed)")
      else
        n=$(grep -c '^FAIL ' "$tmp/$i/$c.log" || true)
        r=$(grep -c 'WARNING: ThreadSanitizer' "$tmp/$i/$c.log" || true)
        f=$(grep -c 'emulator fault' "$tmp/$i/$c.log" || true)
        res+=("FAILED: $n case(s), $f fault(s), $r race report(s)")
      fi
      rm -rf "$d"
    done
    caught=NO
    if [[ ${res[0]} == FAILED* || ${res[1]} == FAILED* ]]; then caught=yes; else all=1; fi
    table+="| $name | $file | ${res[0]} | ${res[1]} | $caught |\n"
    echo "planted: $name -> plain ${res[0]}; tsan ${res[1]}"
  done
  printf "%b" "$table"
  exit $all
fi

for f in csrc/cuda/*.cu; do
  k=$(basename "$f" .cu)
  [ -f "csrc/tests/cuemu/cases_$k.cpp" ] || echo "cuda_emu_test: WARNING: csrc/cuda/$k.cu has no cases (add csrc/tests/cuemu/cases_$k.cpp)" >&2
done
t0=$SECONDS
if [ $# -gt 0 ]; then
  run_config "$@"
else
  run_config plain
  run_config asan
  run_config tsan
fi
echo "cuda_emu_test: passed ($((SECONDS - t0)) s)"
