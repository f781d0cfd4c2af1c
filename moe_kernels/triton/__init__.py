"""Triton kernels of the ``triton`` backend, one module per op.

Importing this package imports nothing heavy: each module (``routing``, ``plan``,
``wgrad``, ``aot``, the GEMMs) imports Triton itself, so ``import moe_kernels`` keeps
working where Triton is not installed.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, t) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{name}: expected a CUDA tensor (CPU tensors only with TRITON_INTERPRET=1), "
                     f"got device {t.device}")
