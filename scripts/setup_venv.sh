#!/usr/bin/env bash
# Source this to get .venv ready and activated: . scripts/setup_venv.sh [cuda|auto]
#
# Installs torch's pinned CPU wheel first (so nothing pulls a multi-GB CUDA build), then
# the package in place with every extra the two README commands need (test, triton,
# bench, hf), once: a stamp in .venv records what was installed and from which build
# inputs (setup.py, CMakeLists.txt, pyproject.toml, csrc/), so the second command reuses
# the first one's install instead of rebuilding it.
#
# The CUDA extension (about 3 minutes of nvcc): "cuda" builds it whenever nvcc is found
# (the test command: its CPU twins are tested); "auto" (the bench command) builds it only
# when a GPU is visible (nvidia-smi), since without one the 'cuda' backend cannot run.
# MOE_KERNELS_SKIP_CUDA_BUILD=1 or 0 overrides both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
want=${1:-cuda}
if [[ -z "${MOE_KERNELS_SKIP_CUDA_BUILD:-}" && "$want" == auto ]] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "moe_kernels: no GPU visible: not building the CUDA extension (MOE_KERNELS_SKIP_CUDA_BUILD=0 to build it)"
    export MOE_KERNELS_SKIP_CUDA_BUILD=1
fi
mode=cuda
[[ "${MOE_KERNELS_SKIP_CUDA_BUILD:-0}" == 1 ]] && mode=skip
inputs=$( (cat setup.py CMakeLists.txt pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat) | sha256sum | cut -c1-16)
[[ -d .venv ]] || python3 -m venv .venv
. .venv/bin/activate
stamp=.venv/.moe_kernels_install
if [[ -f $stamp ]] && read -r got_inputs got_mode < "$stamp" && [[ "$got_inputs" == "$inputs" ]] \
        && [[ "$mode" == skip || "$got_mode" == cuda ]] && python -c "import moe_kernels" 2>/dev/null; then
    echo "moe_kernels: .venv is up to date (installed with CUDA extension: $got_mode); not reinstalling"
    return 0 2>/dev/null || exit 0
fi
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,triton,bench,hf]"
echo "$inputs $mode" > "$stamp"
