#!/usr/bin/env bash
# One-shot GPU check for moe_kernels, for a machine with one NVIDIA GPU and no network.
#
#   bench/gpu_check.sh OUTDIR [--dry-run] [--wheel PATH]
#
# Steps (each logged to OUTDIR/<step>.log, guarded by `timeout`, the whole run kept under
# GPU_CHECK_TOTAL_S = 450 s so it ends well inside 8 minutes on an H200):
#   env        versions, nvidia-smi
#   build      pip install --no-build-isolation -e . (CUDA extension for MOE_KERNELS_CUDA_ARCHS,
#              default 90a; falls back to setup.py build_ext --inplace); with --wheel PATH
#              (a wheel from scripts/build_wheels.sh that travels with the tree, or a folder
#              of them: the one pip finds compatible) no nvcc runs: pip installs the wheel
#              (--no-deps --no-index, so its tags must fit this Python) into OUTDIR/wheel-target
#              and its extension (_C.abi3.so + _build_variant.py) is put into the tree's
#              moe_kernels/, where the tests and benchmarks import it from
#   info       moe-kernels info: what was built, which backends run
#   tests-gpu  pytest -m gpu: the real-kernel tests (bf16 included)
#   bench      reduced benchmark grid, forward (OUTDIR/bench/), then forward+backward
#              (OUTDIR/bench_fwdbwd/) with what time is left: CSV, markdown, PNG
#   tests-rest pytest -m "not gpu": the rest of the suite
#   summary    steps, tests per file, best fraction of the roofline per shape (printed last)
#
# --dry-run exercises the same logic on the CPU: a wheel built with
# MOE_KERNELS_SKIP_CUDA_BUILD=1 (nothing installed), the GPU tests collected and skipped,
# a tiny benchmark grid on the CPU, one fast test file.
# Per-step limits can be changed with GPU_CHECK_{BUILD,TESTS_GPU,BENCH,TESTS_REST}_S.
# Exit code: 0 when every step and test passed, 1 otherwise, 2 on bad usage.
set -u -o pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run] [--wheel PATH]" >&2; exit 2; }
OUT=""
DRY=0
WHEEL=""
while (( $# )); do
  arg=$1
  shift
  case "$arg" in
    --dry-run) DRY=1 ;;
    --wheel) (( $# )) || usage; WHEEL=$1; shift ;;
    --wheel=*) WHEEL=${arg#--wheel=} ;;
    -h|--help) usage ;;
    -*) echo "unknown option: $arg" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || usage
if [ -n "$WHEEL" ]; then
  [ -e "$WHEEL" ] || { echo "--wheel $WHEEL: no such file or folder" >&2; exit 2; }
  WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MOE_KERNELS_CUDA_ARCHS=${MOE_KERNELS_CUDA_ARCHS:-90a}
TOTAL=${GPU_CHECK_TOTAL_S:-450}
START=$(date +%s)
rm -f "$OUT/steps.tsv" "$OUT"/tests*.log
: > "$OUT/steps.tsv"

# cap LIMIT RESERVE: LIMIT, lowered so that RESERVE seconds stay for the later steps.
cap() {
  local left=$(( TOTAL - ($(date +%s) - START) - $2 ))
  if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# run_step NAME LIMIT CMD...: runs CMD under `timeout` (SIGINT first, so pytest still
# prints what it has), logs to OUT/NAME.log and appends NAME, exit code, seconds to
# OUT/steps.tsv. Never fails the script itself.
run_step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  if (( limit < 5 )); then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "== $name: skipped (no time left)"
    return 0
  fi
  local cmd="$*"
  echo "== $name (limit ${limit}s): ${cmd:0:200}"
  t0=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  tail -n 2 "$OUT/$name.log" | sed 's/^/   /'
  return 0
}

if (( DRY )); then
  # One thread: on a shared, oversubscribed CPU, OpenMP barriers turn small ops into
  # scheduler waits and a seconds-long dry run into minutes.
  export MOE_KERNELS_SKIP_CUDA_BUILD=1 MOE_KERNELS_GPU_CHECK_DRY_RUN=1 OMP_NUM_THREADS=1
  DEVICE=cpu
  # Build from a copy so that the dry run leaves no build/ or egg-info in the checkout.
  BUILD=(bash -c "rm -rf '$OUT/wheel' '$OUT/src' && mkdir -p '$OUT/src' \
         && tar -C '$REPO' --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude=./bench_out \
                --exclude=__pycache__ -cf - . | tar -C '$OUT/src' -xf - \
         && '$PY' -m pip wheel --no-build-isolation --no-deps -q -w '$OUT/wheel' '$OUT/src' && rm -rf '$OUT/src'")
  TESTS_GPU=("$PY" -m pytest -v -p no:cacheprovider -m gpu tests)
  TESTS_REST=("$PY" -m pytest -v -p no:cacheprovider -m "not gpu" tests/test_benchmark.py
              -k "hand_computed or csv_writer or format_table or parse_pytest_log")
  BENCH_FWD=(--device cpu --size tiny --tokens 1,16 --mode fwd --repeats 2 --warmup 1 --cell-budget 0.5
             --providers torch,torch:layer,torch:routing,reference,grouped_mm)
  BENCH_BWD=(--device cpu --size tiny --tokens 16 --mode fwdbwd --repeats 2 --warmup 1 --cell-budget 0.5
             --shapes mixtral,gpt-oss --providers torch,reference)
else
  DEVICE=cuda
  BUILD=(bash -c "'$PY' -m pip install --no-build-isolation --no-deps -v -e . \
         || { echo '== pip install failed: trying setup.py build_ext --inplace'; '$PY' setup.py build_ext --inplace --force; }")
  TESTS_GPU=("$PY" -m pytest -v -p no:cacheprovider -m gpu tests)
  TESTS_REST=("$PY" -m pytest -v -p no:cacheprovider -m "not gpu" tests)
  # No reference loop here (HF eager is the loop peer; the reference is slow at E=256).
  BENCH_FWD=(--device cuda --size full --tokens 1,128,8192 --mode fwd --repeats 10 --warmup 2 --cell-budget 1.5
             --providers torch,torch:routing,triton,triton:layer,triton:routing,cuda,cuda:layer,cuda:routing,grouped_mm,hf_eager,hf_grouped_mm)
  BENCH_BWD=(--device cuda --size full --tokens 128,8192 --mode fwdbwd --repeats 5 --warmup 1 --cell-budget 1.5
             --providers torch,triton,cuda,grouped_mm,hf_grouped_mm)
fi

if [ -n "$WHEEL" ]; then
  # The prebuilt extension instead of a build: pip checks that the wheel fits this Python
  # and platform; the tree then imports its module (a stale per-Python build would win
  # over _C.abi3.so in the import order, so those go).
  install_wheel() {
    set -e
    local -a src=("$WHEEL")
    # A folder (scripts/build_wheels.sh's dist/): the wheel of it that pip finds fits.
    [ -d "$WHEEL" ] && src=(--find-links "$WHEEL" moe-kernels-fused)
    rm -rf "$OUT/wheel-target"
    "$PY" -m pip install --no-deps --no-index --only-binary=:all: --target "$OUT/wheel-target" "${src[@]}"
    rm -f "$REPO"/moe_kernels/_C.*.so "$REPO"/moe_kernels/_C.so
    cp "$OUT/wheel-target/moe_kernels/_C.abi3.so" "$OUT/wheel-target/moe_kernels/_build_variant.py" "$REPO/moe_kernels/"
    cd "$OUT" && "$PY" -c 'import moe_kernels as m; print("installed", m.__version__, m.build_variant(), m._C.__file__)'
  }
  export -f install_wheel
  export WHEEL OUT REPO PY
  BUILD=(bash -c install_wheel)
fi

echo "gpu_check: repo $REPO, output $OUT, $([ $DRY = 1 ] && echo 'DRY RUN on the CPU' || echo 'GPU run')${WHEEL:+, prebuilt wheel $WHEEL}"

run_step env 30 bash -c "date -u; uname -a; '$PY' -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available())'; \
  '$PY' -c 'import triton; print(\"triton\", triton.__version__)' || true; command -v nvcc >/dev/null && nvcc --version | tail -n 2; \
  command -v cmake >/dev/null && cmake --version | head -n 1 || echo 'no cmake (setup.py builds the CUDA extension directly)'; \
  command -v nvidia-smi >/dev/null && nvidia-smi || echo 'no nvidia-smi'; git -C '$REPO' log -1 --oneline || true"
run_step build "$(cap "${GPU_CHECK_BUILD_S:-170}" 230)" "${BUILD[@]}"
run_step info 30 "$PY" -m moe_kernels info
run_step tests-gpu "$(cap "${GPU_CHECK_TESTS_GPU_S:-150}" 90)" "${TESTS_GPU[@]}"

L=$(cap "${GPU_CHECK_BENCH_S:-110}" 40)
run_step bench "$L" "$PY" -m moe_kernels.bench.run "${BENCH_FWD[@]}" --budget $(( L > 60 ? L - 40 : L / 2 )) \
  --no-progress --out "$OUT/bench"
L=$(cap 60 40)
if (( L >= 20 )); then
  run_step bench-fwdbwd "$L" "$PY" -m moe_kernels.bench.run "${BENCH_BWD[@]}" --budget $(( L / 2 )) \
    --no-progress --out "$OUT/bench_fwdbwd"
fi
run_step tests-rest "$(cap "${GPU_CHECK_TESTS_REST_S:-120}" 15)" "${TESTS_REST[@]}"

echo "gpu_check: done in $(( $(date +%s) - START ))s (device $DEVICE); logs in $OUT"
echo
# The summary goes last so that it is the last thing on the terminal.
timeout 60 "$PY" -m moe_kernels.bench.gpucheck "$OUT"
