"""Triton kernels of the ``triton`` backend, one module per op.

Importing this package imports nothing heavy: each module (``routing``, ``plan``,
``experts``, ``gemm``, ``combine``, ``wgrad``) imports Triton itself, so
``import moe_kernels`` keeps working where Triton is not installed. The public surface
another backend may use is :func:`unavailable_reason` here and
:func:`moe_kernels.backends.triton.experts.moe_experts` (the CUDA backend runs its GEMMs).
"""

from __future__ import annotations

import contextlib
import os
import warnings

__all__ = ["interpreting", "check_device", "on_device", "unavailable_reason", "InterpreterBf16Warning",
           "warn_if_bf16_interpreted"]


class InterpreterBf16Warning(UserWarning):
    """bf16 tensors reached Triton kernels running in the interpreter."""


def warn_if_bf16_interpreted(*tensors) -> None:
    """Warn when bf16 CPU tensors meet the Triton interpreter: it stores bf16 as raw
    integers and does integer math on them, so the results are garbage (max |out| 8e9
    where 2.9 is right), with no error of its own."""
    if interpreting() and any(t is not None and str(t.dtype) == "torch.bfloat16" and t.device.type == "cpu"
                              for t in tensors):
        warnings.warn("bfloat16 under the Triton interpreter (TRITON_INTERPRET=1) gives wrong results: the "
                      "interpreter does integer math on bf16 bits. Use float32 or float16 there, or "
                      "backend='torch' on the CPU", InterpreterBf16Warning, stacklevel=4)


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


def unavailable_reason(device) -> str | None:
    """``None`` if Triton kernels can run on ``device``, else why not and what to use."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available in this PyTorch build or on this machine"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return (f"the triton backend needs a GPU of compute capability 8.0 or newer (Ampere); "
                    f"this one is {major}.{minor}: use backend='torch'")
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return ("the triton backend runs on CUDA GPUs; on the CPU only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton; slow, for tests): use backend='torch'")
    return f"the triton backend runs on CUDA GPUs, not on device type {device.type!r}: use backend='torch'"
