"""Argument validation shared by every public entry point.

Every check raises ``ValueError`` naming the argument and what was expected, so a
user sees the mistake at the call site instead of a wrong result or a kernel fault.

Checks that look at tensor *values* (NaN in logits, expert ids in range) need the
data on the host. They run when the tensor is on the CPU, or on any device when the
environment variable ``MOE_KERNELS_DEBUG=1`` is set; on a GPU they would cost a
device-to-host synchronisation per layer, which serving cannot afford. They never
run while ``torch.compile`` traces.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .options import debug_checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether data-dependent checks should run for a tensor on this device."""
    if _compiling() or t.device.type == "meta":  # meta tensors hold no values to check
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return debug_checks()


def deep_checks_enabled() -> bool:
    """Whether the expensive internal consistency checks (a plan's invariants) run:
    ``MOE_KERNELS_DEBUG=1`` on any device, never while compiling or capturing."""
    if _compiling() or not debug_checks():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor (got strides {t.stride()} for shape {tuple(t.shape)}); "
            f"call .contiguous() first, or pass the layout flag that describes it"
        )
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def check_same_device(pairs: Iterable[tuple[str, torch.Tensor | None]]) -> None:
    pairs = [(n, t) for n, t in pairs if t is not None]
    if not pairs:
        return
    n0, t0 = pairs[0]
    for n, t in pairs[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n}: expected device {t0.device} (the device of {n0}), got {t.device}")


def check_same_dtype(pairs: Iterable[tuple[str, torch.Tensor | None]]) -> None:
    pairs = [(n, t) for n, t in pairs if t is not None]
    if not pairs:
        return
    n0, t0 = pairs[0]
    for n, t in pairs[1:]:
        if t.dtype != t0.dtype:
            raise ValueError(f"{n}: expected dtype {t0.dtype} (the dtype of {n0}), got {t.dtype}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if value_checks_enabled(t) and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def check_int(name: str, v: object, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name}: expected an int, got {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{name}: expected >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name}: expected <= {high}, got {v}")
    return v


def check_positive_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name}: expected a number > 0, got {v!r}")
    if not (v > 0) or v != v or v == float("inf"):
        raise ValueError(f"{name}: expected a finite number > 0, got {v}")
    return float(v)


def check_bool(name: str, v: object) -> bool:
    """``True`` or ``False`` only: ``"no"`` is truthy and ``None`` falsy, so accepting
    them would flip an option silently."""
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected True or False, got {v!r}")
    return v


def check_float(name: str, v: object, *, low: float | None = None, low_open: bool = False) -> float:
    """A finite real number (not a bool, not a string), ``>= low`` (``> low`` when
    ``low_open``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name}: expected {'>' if low_open else '>='} {low}, got {v}")
    return float(v)
