#!/usr/bin/env bash
# Build one moe_kernels wheel per CUDA version and check each; no GPU needed.
#
#   +cu130 (or whatever the machine's nvcc is): nvcc from PATH / CUDA_HOME.
#   +cu129: the CUDA 12.9 toolchain from PyPI, installed into a throwaway venv:
#           nvidia-cuda-nvcc-cu12 (ptxas, libnvvm, crt headers: it ships no nvcc),
#           nvidia-cuda-nvrtc-cu12 (the C++ front end), nvidia-nvfatbin-cu12 (packs the
#           fatbin), nvidia-cuda-runtime-cu12 (cuda_runtime_api.h, libcudart_static.a).
#           setup.py builds with it when MOE_KERNELS_PIP_CUDA points at its nvidia/ dir.
#
# Each wheel is built from a clean copy of the tree, given the local version +cuXYZ,
# installed into a fresh venv with torch (TORCH_SPEC, default the CPU wheel
# torch==2.13.0), and checked from outside the tree with no GPU visible: imports, the
# CUDA version and archs it reports, the no-GPU error, 0 spill bytes, and
# cuobjdump --list-elf / --list-ptx on the installed extension.
#
# Usage: scripts/build_wheels.sh [cu130] [cu129]      (default: both)
# Env:   MOE_KERNELS_CUDA_ARCHS (default 80;90a;100a), OUT (default wheelhouse/),
#        PYTHON (default python3), TORCH_SPEC, CUOBJDUMP, KEEP_WORK=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/wheelhouse}
ARCHS=${MOE_KERNELS_CUDA_ARCHS:-80;90a;100a}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CU129_PACKAGES=("nvidia-cuda-nvcc-cu12==12.9.86" "nvidia-cuda-runtime-cu12==12.9.79"
                "nvidia-cuda-nvrtc-cu12==12.9.86" "nvidia-nvfatbin-cu12==12.9.82")
WORK=$(mktemp -d /tmp/moe_kernels_wheels.XXXXXX)
[[ "${KEEP_WORK:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
VARIANTS=("$@")
[[ ${#VARIANTS[@]} -gt 0 ]] || VARIANTS=(cu130 cu129)

log() { printf '\n== %s\n' "$*"; }

find_cuobjdump() {
  if [[ -n "${CUOBJDUMP:-}" ]]; then echo "$CUOBJDUMP"; return; fi
  local c
  c=$("$PY" -c 'import triton, os; p = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"); print(p if os.path.isfile(p) else "")' 2>/dev/null || true)
  if [[ -n "$c" ]]; then echo "$c"; return; fi
  c=$(command -v cuobjdump || true)
  if [[ -n "$c" ]]; then echo "$c"; return; fi
  # Last resort: NVIDIA's cuobjdump package from PyPI.
  "$PY" -m venv "$WORK/cuobjdump" >/dev/null
  "$WORK/cuobjdump/bin/pip" install -q nvidia-cuda-cuobjdump >&2
  find "$WORK/cuobjdump" -name cuobjdump -type f -perm -u+x | head -1
}

clean_copy() {  # the tree without build outputs or venvs, so every wheel builds from scratch
  local dst=$1
  mkdir -p "$dst"
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    # Tracked files and new ones git does not ignore (a tracked file deleted here is skipped).
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
      | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$dst" -xf -
  else
    tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude=./dist --exclude=./wheelhouse --exclude=./.venv \
        --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' --exclude=./.pytest_cache -cf - . \
      | tar -C "$dst" -xf -
  fi
}

build_variant() {
  local variant=$1 cuda_version src
  src="$WORK/src-$variant"
  clean_copy "$src"
  local -a env_args=(MOE_KERNELS_CUDA_ARCHS="$ARCHS")
  case "$variant" in
    cu129)
      log "cu129: CUDA 12.9 toolchain from PyPI (${CU129_PACKAGES[*]})"
      "$PY" -m venv "$WORK/cu129-tools"
      "$WORK/cu129-tools/bin/pip" install -q "${CU129_PACKAGES[@]}" 2> >(grep -v "is ignored" >&2)
      local nvidia
      nvidia=$("$WORK/cu129-tools/bin/python" -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
      env_args+=(MOE_KERNELS_PIP_CUDA="$nvidia")
      cuda_version=12.9
      ;;
    cu*)
      local v
      v=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
      if [[ "cu${v/./}" != "$variant" ]]; then
        echo "the machine's nvcc is CUDA $v, not $variant" >&2
        return 1
      fi
      log "$variant: the machine's nvcc ($(command -v nvcc), CUDA $v)"
      cuda_version=$v
      ;;
    *) echo "unknown variant $variant" >&2; return 1 ;;
  esac

  local start=$SECONDS
  if ! env "${env_args[@]}" "$PY" -m pip wheel -v --no-deps -w "$WORK/raw-$variant" "$src" \
      >"$WORK/build-$variant.log" 2>&1; then
    tail -60 "$WORK/build-$variant.log" >&2
    echo "$variant: the wheel build failed (log above)" >&2
    return 1
  fi
  grep -E "moe_kernels: |\.cu: [0-9]+ kernels" "$WORK/build-$variant.log" || true
  local raw
  raw=$(ls "$WORK/raw-$variant"/*.whl 2>/dev/null | head -1)
  [[ -n "$raw" ]] || { echo "$variant: no wheel was built" >&2; return 1; }
  local wheel
  wheel=$("$PY" "$ROOT/scripts/check_wheel.py" retag "$raw" "$variant" "$OUT")
  echo "built $(basename "$wheel") in $((SECONDS - start)) s ($(du -h "$wheel" | cut -f1))"

  log "$variant: checking $(basename "$wheel") in a fresh venv ($TORCH_SPEC, no GPU visible)"
  "$PY" -m venv "$WORK/check-$variant"
  "$WORK/check-$variant/bin/pip" install -q "$TORCH_SPEC" 2> >(grep -v "is ignored" >&2)
  "$WORK/check-$variant/bin/pip" install -q "$wheel" 2> >(grep -v "is ignored" >&2)
  (cd "$WORK" && CUDA_VISIBLE_DEVICES="" "$WORK/check-$variant/bin/python" "$ROOT/scripts/check_wheel.py" check \
     --archs "$ARCHS" --cuda "$cuda_version" --cuobjdump "$CUOBJDUMP_BIN")
}

CUOBJDUMP_BIN=$(find_cuobjdump)
[[ -n "$CUOBJDUMP_BIN" ]] || { echo "no cuobjdump found (set CUOBJDUMP)" >&2; exit 1; }
echo "cuobjdump: $CUOBJDUMP_BIN"
for variant in "${VARIANTS[@]}"; do
  build_variant "$variant"
done
log "wheels in $OUT"
ls -l "$OUT"
