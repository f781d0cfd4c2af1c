"""The ``torch`` backend (pure PyTorch, any device): :class:`TorchBackend`, :func:`experts_torch`."""

from .backend import TorchBackend
from .experts import experts_torch

__all__ = ["TorchBackend", "experts_torch"]
