"""Backends: ``torch/``, ``triton/`` and ``cuda/``, one folder each with the same file
names for the same roles (``backend.py``, ``routing.py``, ``plan.py``, ``experts.py``), and
the registry that picks one (:mod:`.registry`: ``"auto"`` and availability).

The registry lives in its own module: this package's attributes ``torch``, ``triton``
and ``cuda`` are its subpackages once they are imported, so code here must not use the
name ``torch`` for PyTorch itself.
"""

from .base import Backend
from .registry import BACKEND_NAMES, available_backends, get_backend, unavailable_reason

__all__ = ["Backend", "BACKEND_NAMES", "available_backends", "get_backend", "unavailable_reason"]
