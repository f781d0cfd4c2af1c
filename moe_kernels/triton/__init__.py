"""Triton kernels of the ``triton`` backend, one module per op.

Importing this package imports nothing heavy: each module (``routing``, ``plan``,
``wgrad``, ``aot``, the GEMMs) imports Triton itself, so ``import moe_kernels`` keeps
working where Triton is not installed.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["interpreting", "check_device", "on_device", "MAX_EXPERTS"]

# Widest routing and plan kernels: one program holds a [rows, next_pow2(E)] tile of
# scores or one-hot ids; past this the backend uses the pure-PyTorch plan and routers.
MAX_EXPERTS = 1024


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET`` set to
    anything but ``""`` or ``"0"``, as Triton itself reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, t) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{name}: expected a CUDA tensor (CPU tensors only with TRITON_INTERPRET=1), "
                     f"got device {t.device}")


def on_device(t):
    """Context for launching kernels on ``t``'s device (a tensor or a device).

    A Triton launch goes to the *current* CUDA device and its current stream, not to
    the device of its arguments: on a multi-GPU process whose current device is
    another one, the kernel would run on the wrong GPU with foreign pointers (an
    illegal address). Every launcher enters this context: ``torch.cuda.device(dev)``
    for a CUDA device (current device and its current stream for the launch), a no-op
    elsewhere (the interpreter's CPU tensors)."""
    import torch

    dev = t.device if isinstance(t, torch.Tensor) else torch.device(t)
    if dev.type == "cuda":
        return torch.cuda.device(dev)
    return contextlib.nullcontext()
