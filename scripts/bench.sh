#!/usr/bin/env bash
# Set up .venv (once) and run the main job, `moe-kernels bench` (the README's first command).
# Without a visible GPU the CUDA extension is not built (MOE_KERNELS_SKIP_CUDA_BUILD=0 builds it).
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh" auto
moe-kernels bench "$@"
