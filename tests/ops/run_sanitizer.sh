#!/usr/bin/env bash
# Runs the small-shape tests of backend "cuda" under compute-sanitizer, on a GPU machine:
#   memcheck   out-of-bounds / misaligned global and shared accesses, leaks
#   racecheck  shared-memory data races (the reductions and histograms)
#   initcheck  reads of uninitialised global memory (workspace partials, histograms)
#   synccheck  invalid __syncthreads / warp-synchronous intrinsics usage
# torch's caching allocator is switched off so every tensor is its own allocation and
# memcheck sees an overrun past a tensor's end. The large-shape tests are skipped
# (IMAGEN_FAST_SANITIZER=1). Needs a CUDA build of torch in $PY's environment and
# imagen_fast built with nvcc (pip install -e . or make build).
#
#   tests/ops/run_sanitizer.sh                  # all four tools
#   TOOLS="memcheck racecheck" tests/ops/run_sanitizer.sh
#   SANITIZER_K=gpu_ tests/ops/run_sanitizer.sh   # only tests/ops/test_cuda_kernels.py -k gpu_ (quick)
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
TOOLS=${TOOLS:-"memcheck racecheck initcheck synccheck"}

if [ ! -x "$SANITIZER" ]; then
  echo "compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
"$PY" - <<'PY'
import sys, torch
from imagen_fast.ops import dispatch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: run this on a GPU machine with a CUDA build of torch")
status = dispatch.available_backends()["cuda"]
if status != "available":
    sys.exit(f"backend cuda unavailable: {status}")
PY

export IMAGEN_FAST_SANITIZER=1
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
# The cuda backend's own tests, and the op contract suite restricted to backend cuda
# (attention has no cuda kernel; the 2x3x1024x1024 contract case is too slow here).
TESTS=(tests/ops/test_cuda_kernels.py
       "tests/ops/test_ops.py -k cuda and not attention and not above_quantile_limit")
if [ -n "${SANITIZER_K:-}" ]; then
  TESTS=("tests/ops/test_cuda_kernels.py -k $SANITIZER_K")
fi

status=0
for tool in $TOOLS; do
  extra=()
  case "$tool" in
    memcheck) extra=(--leak-check no) ;;
    racecheck) extra=(--racecheck-report analysis) ;;
    initcheck) extra=(--track-unused-memory no) ;;
  esac
  for spec in "${TESTS[@]}"; do
    # shellcheck disable=SC2086
    set -- $spec
    file=$1; shift
    kexpr=()
    if [ "${1:-}" = "-k" ]; then shift; kexpr=(-k "$*"); fi
    echo "=== compute-sanitizer --tool $tool: $file ${kexpr[*]:-}"
    if ! "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 86 --target-processes all \
        "$PY" -m pytest -q -p no:cacheprovider "$file" "${kexpr[@]}"; then
      echo "!!! $tool reported errors (or tests failed) in $file" >&2
      status=1
    fi
  done
done
exit $status
