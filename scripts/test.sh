#!/usr/bin/env bash
# Set up a fresh .venv and run the test suite (the README's test command).
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh" "test,triton,bench,hf"
moe-kernels info
python -m pytest -q "$@"
