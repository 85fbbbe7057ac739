#!/usr/bin/env bash
# Everything a lent CUDA GPU (H100/H200) is needed for, in ONE call of under ~9 minutes:
#   1 info        nvidia-smi, versions
#   2 build       imagen_fast._C with the CUDA kernels for this card's architecture only
#   3 tests       tests/ops/test_ops.py tests/ops/test_triton.py tests/ops/test_cuda_kernels.py at full shapes
#   4 compile     the GPU capture-safety tests (tests/ops/test_capture_safety.py -m gpu: no host
#                 sync, each op captured in a CUDA graph, the reduce-overhead step), then
#                 python -m imagen_fast.bench.bench_compile --device cuda: base64 sampling at batch 1,
#                 4, 16, eager vs compiled vs graph-captured (reduce-overhead), steps/s, end
#                 to end with compile, outputs vs eager (a batch is written as soon as it is done)
#   5 kernels     the compile audit's kernels for real (benchmarks/gpu_compile.py --device-run):
#                 every config the Triton wrappers reach at shape-table shapes (each autotuner
#                 candidate too) compiled, loaded and launched once; registers and local
#                 memory as the driver reports them -> results/gpu_compile_device.json
#   6 ops         python -m imagen_fast.bench.bench_ops --device cuda (every op; triton vs cuda;
#                 writes imagen_fast/ops/gpu_choice.json)
#   7 model       python -m imagen_fast.bench.bench_model --device cuda (paper-size presets)
#   8 sanitizer   compute-sanitizer memcheck + racecheck on the small-shape cuda tests
# Both benchmarks write into this checkout: results to benchmarks/results/, the choice
# table to imagen_fast/ops/ (named explicitly below; an installed package's benchmarks
# default to ./bench-results).
# Each part runs under its own hard time limit (`timeout`), inside what is left of the
# total; a part that fails or times out is recorded and the next one runs. Nothing here
# stops on an error.
#
#   bash benchmarks/gpu_session.sh                       # from the repository root
#   OUT=/some/dir TOTAL_S=540 bash benchmarks/gpu_session.sh
#   bash benchmarks/gpu_session.sh --dry-run             # any machine, no GPU (CI runs it:
#                                                        # tests/bench/test_gpu_session.py)
# The dry run makes every part run or be skipped with its reason, so that a lent GPU is
# never lost to an error in this script: info runs as is; build configures CMake only;
# tests collects the test files; compile, kernels, ops and model run their real command lines,
# which check their arguments and then refuse without a GPU (exit 2: skipped, with that
# message); sanitizer checks its script. The summary and archives come out as on a GPU.
# With the device tool:  run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# (add carry [".whl"] and IMAGEN_FAST_WHEELS=.whl to bring imagen-pytorch, see
# benchmarks/fetch_gpu_wheels.sh). Back on the development machine:
#   bash benchmarks/gpu_session.sh --unpack /path/to/fetched/files
# puts the results under benchmarks/results/ and the choice table in imagen_fast/ops/.
#
# What comes back (at most 8 files, the device tool's limit): summary.md (one line per
# part with status and seconds, the test summary, the tables), logs.tar.gz (every log
# and the pytest junit files), results.tar.gz (benchmark JSON/markdown/PNG files, the
# device run's JSON) and gpu_choice.json.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--unpack" ]; then
  src=${2:?usage: gpu_session.sh --unpack DIR}
  tar -xzf "$src/results.tar.gz" -C "$ROOT/benchmarks/results" && echo "results -> benchmarks/results/"
  if [ -s "$src/gpu_choice.json" ]; then
    cp "$src/gpu_choice.json" "$ROOT/imagen_fast/ops/gpu_choice.json" && echo "choice table -> imagen_fast/ops/gpu_choice.json"
  fi
  exit 0
fi

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
PY=${PY:-python3}
OUT=${OUT:-$ROOT/benchmarks/results/gpu_session}
TOTAL_S=${TOTAL_S:-540}
RESERVE_S=20                       # kept back for packing the results
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
START=$(date +%s)
touch "$WORK/start.marker"
SUMMARY=$WORK/summary.md
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
IMAGEN_FAST_WHEELS=${IMAGEN_FAST_WHEELS:-}
echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN (no GPU)')" > "$SUMMARY"
echo "" >> "$SUMMARY"
echo "| part | status | seconds | limit |" >> "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"

# part NAME LIMIT_S COMMAND...: runs under `timeout` with at most what is left of the total
part() {
  local name=$1 limit=$2; shift 2
  local now left t0 rc status
  now=$(date +%s)
  left=$(( TOTAL_S - RESERVE_S - (now - START) ))
  if [ "$left" -lt 10 ]; then
    echo "| $name | skipped (no time left) | 0 | $limit |" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s)"
  t0=$(date +%s)
  # the part's functions run in a child bash (timeout cannot run a shell function)
  PART_LIMIT=$limit PART_LOG=$LOGS/$name.log timeout --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" \
    > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    77) status="skipped ($(sed -n 's/^SKIP: //p' "$LOGS/$name.log" | head -n 1))" ;;
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "| $name | $status | $(( $(date +%s) - t0 )) | $limit |" >> "$SUMMARY"
  tail -n 3 "$LOGS/$name.log"
  return 0
}

# skip REASON: ends the part as "skipped (REASON)" in the summary
skip() { echo "SKIP: $*"; exit 77; }

# gpu_only CMD...: on a GPU, the command; in the dry run the same command, which checks
# its arguments and refuses without a GPU (exit 2): that refusal is a skip, with its message
gpu_only() {
  if [ "$DRY_RUN" = 1 ]; then
    local rc msg
    "$@" 2> "$PART_LOG.err"; rc=$?
    cat "$PART_LOG.err" >&2
    msg=$(grep -i -m1 "gpu" "$PART_LOG.err")
    if [ "$rc" = 2 ] && [ -n "$msg" ]; then skip "dry run: $msg"; fi
    echo "dry run: expected exit 2 and a no-GPU message from: $*" >&2
    exit 1
  fi
  "$@"
}

info() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device', torch.cuda.get_device_capability(0) if torch.cuda.is_available() else '')"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  command -v nvcc && nvcc --version | tail -n 2
  command -v compute-sanitizer || true
  if [ -n "${IMAGEN_FAST_WHEELS:-}" ] && ls "$IMAGEN_FAST_WHEELS"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ipsite \
      "$IMAGEN_FAST_WHEELS"/*.whl && echo "wheels installed to /tmp/ipsite"
  fi
}

build() {
  local arch bdir=build/gpu cmake_bin ninja_bin
  cmake_bin=$(command -v cmake || echo "$(dirname "$(command -v "$PY")")/cmake")
  [ -x "$cmake_bin" ] || skip "cmake not found"
  ninja_bin=$(command -v ninja || true)
  if [ -z "$ninja_bin" ] && [ -x "$(dirname "$cmake_bin")/ninja" ]; then ninja_bin=$(dirname "$cmake_bin")/ninja; fi
  local extra=()
  if [ "$DRY_RUN" = 1 ]; then
    # configure only, without nvcc's slow compiler probe: checks this command line (CI
    # builds csrc/cuda itself wherever nvcc exists)
    arch=90a; bdir=$WORK/build-dry; extra=(-DIMAGEN_FAST_CUDA=OFF)
  else
    arch=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(0); print(f'{p[0]}{p[1]}' + ('a' if p[0] == 9 else ''))")
  fi
  echo "building for CUDA architecture $arch"
  "$cmake_bin" -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    ${ninja_bin:+-DCMAKE_MAKE_PROGRAM="$ninja_bin"} \
    -DIMAGEN_FAST_OUTPUT_DIR="$ROOT/imagen_fast" "${extra[@]}" || return 1
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: configured only"; return 0; fi
  "$cmake_bin" --build "$bdir" --parallel "$(nproc)" &&
  "$PY" -m imagen_fast.cli info
}

tests() {
  local opts=()
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/ops/test_ops.py tests/ops/test_triton.py \
      tests/ops/test_cuda_kernels.py | tail -n 3
    return "${PIPESTATUS[0]}"
  fi
  "$PY" -c "import pytest_timeout" 2> /dev/null && opts+=(--timeout=120)
  # the tests are mostly Triton compilation: 8 workers on the 16 cores share the GPU
  "$PY" -c "import xdist" 2> /dev/null && opts+=(-n 8)
  "$PY" -m pytest -q -p no:cacheprovider "${opts[@]}" -o junit_family=xunit2 \
    --junitxml="$LOGS/tests.xml" tests/ops/test_ops.py tests/ops/test_triton.py tests/ops/test_cuda_kernels.py
}

# the ahead-of-time audit's kernels on the real card: load, launch once, driver registers
kernels() {
  gpu_only "$PY" -m benchmarks.gpu_compile --device-run --check --budget-s "$(( PART_LIMIT - 30 ))"
}

# the real-GPU kernel tests (test_cuda_kernels.py -k gpu_) at small shapes: the whole
# contract suite under the sanitizer takes longer than one call allows
sanitizer() {
  if [ "$DRY_RUN" = 1 ]; then
    bash -n tests/ops/run_sanitizer.sh || return 1
    skip "dry run: compute-sanitizer needs a CUDA GPU (tests/ops/run_sanitizer.sh parses)"
  fi
  SANITIZER_K=gpu_ TOOLS="memcheck racecheck" PY="$PY" bash tests/ops/run_sanitizer.sh
}

# the benchmarks stop starting new cases in time to write their results
ops_bench() {
  gpu_only "$PY" -m imagen_fast.bench.bench_ops --device cuda --compile-limit 2 --budget-s "$(( PART_LIMIT - 40 ))" \
    --results-dir "$ROOT/benchmarks/results" --choice-table "$ROOT/imagen_fast/ops/gpu_choice.json"
}

compile_bench() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider --collect-only -m gpu tests/ops/test_capture_safety.py | tail -n 1
  else
    timeout 50 "$PY" -m pytest -q -p no:cacheprovider -m gpu -o junit_family=xunit2 \
      --junitxml="$LOGS/capture.xml" tests/ops/test_capture_safety.py
  fi
  gpu_only "$PY" -m imagen_fast.bench.bench_compile --device cuda --budget-s "$(( PART_LIMIT - 65 ))" \
    --results-dir "$ROOT/benchmarks/results"
}

model_bench() {
  if [ -d /tmp/ipsite ]; then export PYTHONPATH=$PYTHONPATH:/tmp/ipsite; fi
  gpu_only "$PY" -m imagen_fast.bench.bench_model --device cuda --budget-s "$(( PART_LIMIT - 25 ))" \
    --results-dir "$ROOT/benchmarks/results"
}

export PY ROOT LOGS WORK PYTHONPATH IMAGEN_FAST_WHEELS DRY_RUN
export -f skip gpu_only info build tests compile_bench kernels sanitizer ops_bench model_bench

# limits: 520 s of the 540 (20 kept for packing); the compile part first after the tests
# (its first batch needs two inductor compiles of base64: about two minutes)
part info 15 info
part build 90 build
part tests 80 tests
part compile 150 compile_bench
part kernels 60 kernels
part ops 70 ops_bench
part model 30 model_bench
part sanitizer 25 sanitizer

# ---------------------------------------------------------------- pack it up
{
  echo ""
  echo "total $(( $(date +%s) - START )) s of $TOTAL_S"
  echo ""
  echo "## tests"
  grep -E "passed|failed|error" "$LOGS/tests.log" 2>/dev/null | tail -n 5 | sed 's/^/    /'
  echo ""
  echo "## kernels (the compile audit's configs on this card)"
  grep -E "device run on|^FAILED" "$LOGS/kernels.log" 2>/dev/null | tail -n 12 | sed 's/^/    /'
  echo ""
  echo "## sanitizer"
  grep -E "ERROR SUMMARY|!!!|passed|failed" "$LOGS/sanitizer.log" 2>/dev/null | tail -n 12 | sed 's/^/    /'
  echo ""
  echo "## capture-safety tests (compile part)"
  grep -E "passed|failed|error" "$LOGS/compile.log" 2>/dev/null | head -n 3 | sed 's/^/    /'
} >> "$SUMMARY"
cd "$ROOT/benchmarks/results" || exit 0
NEW=$(find . -maxdepth 1 -newer "$WORK/start.marker" -type f \( -name 'gpu_*' -o -name 'bench_model_gpu*' \
  -o -name 'bench_compile_gpu*' \) | sort)
for f in $NEW; do
  case $f in *.md) { echo ""; cat "$f"; } >> "$SUMMARY" ;; esac
done
# (always an archive, empty when no part wrote results: the dry run, or every part failed)
if [ -n "$NEW" ]; then tar -czf "$OUT/results.tar.gz" $NEW; else tar -czf "$OUT/results.tar.gz" -T /dev/null; fi
cp "$ROOT/imagen_fast/ops/gpu_choice.json" "$OUT/gpu_choice.json"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
cp "$SUMMARY" "$OUT/summary.md"
echo "=== done in $(( $(date +%s) - START )) s; results in $OUT"
head -n 40 "$OUT/summary.md"
