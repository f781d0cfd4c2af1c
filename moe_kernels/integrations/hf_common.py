"""What the HF integration's modules share: the error for experts we cannot compute
exactly, the names registered with transformers and the backend each was given. Its own
module so that :mod:`.transformers` and :mod:`.hf_mxfp4` import it, never each other
in a loop."""

from __future__ import annotations

from ..options import hf_backend_default

__all__ = ["UnsupportedExpertsError", "registered_backends", "backend_for"]

# name -> backend given to register() (None: the environment variable, else "auto")
registered_backends: dict[str, str | None] = {}


class UnsupportedExpertsError(ValueError):
    """An experts module declares something the fused kernels cannot compute exactly."""


def backend_for(name: str | None, backend: str | None) -> str:
    """The backend a call runs on: the explicit one, else the one ``name`` was registered
    with, else ``MOE_KERNELS_HF_BACKEND`` / ``"auto"``."""
    if backend is not None:
        return backend
    if name is not None and registered_backends.get(name) is not None:
        return registered_backends[name]
    return hf_backend_default()
