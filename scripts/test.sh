#!/usr/bin/env bash
# Set up .venv (reusing what scripts/bench.sh installed) and run the test suite (the
# README's test command). Builds the CUDA extension when nvcc is found and it is not built
# yet: its CPU twins are part of the suite.
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh" cuda
moe-kernels info
python -m pytest -q "$@"
