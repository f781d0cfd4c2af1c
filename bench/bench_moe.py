#!/usr/bin/env python
"""The MoE benchmark from a checkout: ``python bench/bench_moe.py [flags]`` is
``moe-kernels bench [flags]`` (see ``--help`` and docs/PERFORMANCE.md).

Examples::

    python bench/bench_moe.py                                   # CPU: small shapes, ~1 minute
    python bench/bench_moe.py --device cuda --mode fwd,fwdbwd   # GPU: full model shapes
    python bench/bench_moe.py --shapes qwen3 --tokens 1 --routing skewed --providers triton,cuda,grouped_mm
"""

import os
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_kernels.bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
