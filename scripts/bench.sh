#!/usr/bin/env bash
# Set up a fresh .venv and run the main job, `moe-kernels bench` (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[triton,bench]"
moe-kernels bench "$@"
