#!/usr/bin/env bash
# Set up a fresh .venv and run the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,triton,bench,hf]"
moe-kernels info
python -m pytest -q "$@"
