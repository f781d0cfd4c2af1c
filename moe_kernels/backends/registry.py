"""The backend registry: ``"torch"``, ``"triton"``, ``"cuda"`` and ``"auto"``.

``auto`` picks, for the input's device, the first available of ``cuda`` (CUDA routing
and plan kernels with Triton GEMMs), ``triton``, ``torch``; on the CPU that is always
``torch``. Backends are imported lazily so that importing :mod:`moe_kernels` never
imports Triton or loads the CUDA extension.
"""

from __future__ import annotations

import torch

from .base import Backend
from .torch.backend import TorchBackend

BACKEND_NAMES = ("torch", "triton", "cuda")
_AUTO_ORDER = ("cuda", "triton", "torch")
_cache: dict[str, Backend] = {"torch": TorchBackend()}
_import_errors: dict[str, str] = {}


def _load(name: str) -> Backend | None:
    if name in _cache:
        return _cache[name]
    if name in _import_errors:
        return None
    try:
        if name == "triton":
            from .triton.backend import TritonBackend as cls
        else:
            from .cuda.backend import CudaBackend as cls
        backend = cls()
    except ImportError as exc:  # triton missing, extension missing
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _cache[name] = backend
    return backend


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """``None`` if backend ``name`` can run on ``device``, else why not and how to fix it."""
    device = torch.device(device)
    backend = _load(name)
    if backend is None:
        hint = {"triton": "install triton (pip install triton) on a machine with a CUDA GPU",
                "cuda": "reinstall moe_kernels where nvcc is on PATH (without MOE_KERNELS_SKIP_CUDA_BUILD=1)"}[name]
        return f"the {name} backend could not be imported ({_import_errors[name]}); {hint}"
    return backend.unavailable(device)


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Every backend name mapped to ``None`` (available) or the reason it is not."""
    return {name: unavailable_reason(name, device) for name in BACKEND_NAMES}


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend object for ``name`` on ``device``; raises ``ValueError`` for an
    unknown name and ``RuntimeError`` (with the reason) for an unavailable one."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return _cache["torch"]  # the interpreter can run Triton on the CPU, but slowly
        for candidate in _AUTO_ORDER:
            if unavailable_reason(candidate, device) is None:
                return _cache[candidate]
        return _cache["torch"]
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {['auto', *BACKEND_NAMES]}, got {name!r}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available on device {torch.device(device)}: {reason}")
    return _cache[name]


__all__ = ["Backend", "BACKEND_NAMES", "available_backends", "get_backend", "unavailable_reason"]
