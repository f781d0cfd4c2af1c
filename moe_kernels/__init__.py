"""moe_kernels: fused Mixture-of-Experts kernels for PyTorch.

Every router (dense 1991 mixture, noisy top-k, softmax top-k, DeepSeek-V3 grouped
sigmoid, Switch, Expert Choice) emits slots; one dispatch plan and one set of expert
kernels serve them all. Backends: ``torch`` (pure PyTorch, any device), ``triton``,
``cuda``, and ``auto``. Importing this package imports neither Triton nor
transformers, and works without the CUDA extension.
"""

from .activations import ACTIVATIONS, Activation, PostNorm
from .backends import available_backends, get_backend
from .functional import fused_experts, moe
from .layer import MoE, MoEConfig
from .options import KernelOptions
from .params import ExpertParams, expert_params
from .plan import DispatchPlan, build_plan
from .quant import quantize_experts, quantized_params
from .reference import moe_reference
from .routing import (
    ROUTERS,
    Routing,
    dense_softmax,
    expert_choice,
    grouped_sigmoid_topk,
    noisy_topk,
    route,
    softmax_topk,
    switch,
    z_loss,
)

try:  # written by setup.py next to the CUDA extension it builds (absent without one)
    from . import _build_variant as _variant
except ImportError:
    _variant = None

# The distribution's version plus the CUDA variant of the installed extension, as
# torch does it: "0.1.0+cu130" even from the wheel published as plain 0.1.0.
__version__ = "0.1.0" + (f"+{_variant.VARIANT}" if _variant else "")


def build_variant():
    """The installed CUDA build, without importing it: ``{"variant": "cu130",
    "cuda_version": "13.0", "archs": ("80", "90a", "100a"), "ptx": ("100",),
    "device_compiler": ...}``, or None when the package has no CUDA extension."""
    if _variant is None:
        return None
    return {"variant": _variant.VARIANT, "cuda_version": _variant.CUDA_VERSION, "archs": _variant.ARCHS,
            "ptx": _variant.PTX, "device_compiler": _variant.DEVICE_COMPILER}


def __getattr__(name):
    # moe_kernels._C, the CUDA extension, imported on first access (not by the package).
    if name == "_C":
        import importlib

        try:
            return importlib.import_module(f"{__name__}._C")
        except ImportError as exc:
            raise AttributeError(f"moe_kernels._C: the CUDA extension does not import: {exc}") from exc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def replace_moe_layers(model, backend="auto", **kwargs):
    """Swap the MoE blocks of ``model`` for fused ones; see
    :func:`moe_kernels.integrations.replace.replace_moe_layers`."""
    from .integrations.replace import replace_moe_layers as _replace

    return _replace(model, backend=backend, **kwargs)


__all__ = [
    "ACTIVATIONS", "Activation", "DispatchPlan", "ExpertParams", "KernelOptions", "MoE", "MoEConfig", "ROUTERS",
    "Routing", "available_backends", "build_plan", "build_variant", "dense_softmax", "expert_choice", "expert_params",
    "fused_experts",
    "get_backend", "grouped_sigmoid_topk", "moe", "moe_reference", "noisy_topk", "replace_moe_layers", "route",
    "softmax_topk", "switch", "z_loss", "__version__",
]
__all__ += ["PostNorm", "quantize_experts", "quantized_params"]  # quantized experts (moe_kernels.quant)
