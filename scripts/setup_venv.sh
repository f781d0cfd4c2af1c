#!/usr/bin/env bash
# Source this with the package extras to install: creates .venv, installs torch's pinned
# CPU wheel first (so nothing pulls a multi-GB CUDA build), then the package in place
# (building the CUDA extension when nvcc is found), and leaves .venv activated.
#   . scripts/setup_venv.sh "test,triton,bench,hf"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$1]"
