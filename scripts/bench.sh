#!/usr/bin/env bash
# Set up a fresh .venv and run the main job, `moe-kernels bench` (the README's first command).
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh" "triton,bench"
moe-kernels bench "$@"
