"""The CUDA extension ``moe_kernels._C``: loading it, what it is (:func:`extension_info`),
whether it runs on a GPU (:func:`compatibility_reason`), loading its device images
(:func:`load_kernels`), and the launch helpers the ops share (validation, raw pointers,
the stream). The ops themselves live by role: :mod:`.routing`, :mod:`.plan`,
:mod:`.experts`; their pure-PyTorch twins in :mod:`.twins`.
"""

import re
from typing import Optional, Tuple

import torch

from ..._checks import check_tensor
from ...limits import CUDA

try:
    from ... import _C
    _C_ERROR: Optional[str] = None
except Exception as exc:  # not built (no nvcc at install), or unloadable
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["extension_info", "compatibility_reason", "load_kernels"]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ACT_DTYPES = tuple(_DTYPE_CODE)
_HOW_TO_FIX = ("reinstall moe_kernels where nvcc (CUDA >= 12.8) is on PATH or CUDA_HOME is set, without "
               "MOE_KERNELS_SKIP_CUDA_BUILD=1 (pip install . or pip install -e .), or use a prebuilt +cuXXX wheel")
_Tensors3 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_Tensors8 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def extension_info() -> dict:
    """What the CUDA extension is: ``built``, ``error`` (why not), ``path``,
    ``cuda_version``, ``archs`` (machine code), ``ptx``, ``device_compiler``,
    ``driver_version`` (0 without a driver) and ``max_spill_bytes`` from its ptxas log."""
    if _C is None:
        return {"built": False, "error": _C_ERROR, "how_to_fix": _HOW_TO_FIX}
    info = {"built": True, "error": None, "path": _C.__file__, **_C.build_info(), "driver_version": _C.driver_version()}
    spills = [int(v) for v in _spill_bytes(_C.ptxas_log())]
    info["max_spill_bytes"] = max(spills) if spills else None
    return info


def load_kernels(device=None) -> None:
    """Load the extension's device images now (``device``: a CUDA device, default the
    current one). Otherwise each loads at the first call that needs it, which must not
    happen during CUDA-graph capture: call this, or run one forward pass, before
    capturing. Idempotent."""
    ext = _ext("load_kernels")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    if dev.index is None:  # without CUDA in torch, device 0: the extension then says what is missing
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    ext.load_images(dev.index)


_ARCH = re.compile(r"(\d+)(\d)([af]?)")


def _runs_on(arch: str, cap: Tuple[int, int], ptx: bool) -> bool:
    """Whether machine code (``ptx`` False) or PTX for ``arch`` ('80', '90a', '100f')
    runs on a GPU of compute capability ``cap``."""
    m = _ARCH.fullmatch(arch)
    if m is None:
        raise ValueError(f"arch: expected digits and an optional 'a' or 'f' (e.g. '80', '90a'), got {arch!r}")
    major, minor, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
    if suffix == "a":  # arch-specific (wgmma, tcgen05): that exact GPU only, sm_90a on sm_90 alone
        return (major, minor) == cap
    if suffix == "f" or not ptx:  # machine code, or family-specific: same major, up to the GPU's minor
        return major == cap[0] and minor <= cap[1]
    return (major, minor) <= cap  # plain PTX: the driver compiles it for any GPU at least as new


def compatibility_reason(capability, build_info: dict, driver_version: int) -> Optional[str]:
    """``None`` if a build (``_C.build_info()``: ``cuda_version`` 'X.Y', ``archs``,
    ``ptx``) runs on a GPU of ``capability`` (major, minor) under a driver of
    ``driver_version`` (``_C.driver_version()``, e.g. 13000; 0 = none), else why not.

    Pure: the decision behind :meth:`CudaBackend.unavailable`. Machine code runs on the
    same major capability at an equal or higher minor ('a' archs on that exact GPU
    only); PTX is compiled by the driver for any GPU at least as new. The driver must be
    of the build's CUDA major version or newer (minor version compatibility lets a 13.0
    driver run a 13.x runtime), and as new as the build to compile its PTX."""
    cap = (int(capability[0]), int(capability[1]))
    gpu = f"sm_{cap[0]}{cap[1]}"
    build = tuple(int(x) for x in str(build_info["cuda_version"]).split(".")[:2])
    need = f"{build[0]}.{build[1]}"
    archs, ptx = list(build_info["archs"]), list(build_info["ptx"])
    if driver_version <= 0:
        return "no NVIDIA driver was found (cudaDriverGetVersion gives 0): install the NVIDIA driver"
    driver = (driver_version // 1000, driver_version % 1000 // 10)
    have = f"{driver[0]}.{driver[1]}"
    if driver[0] < build[0]:
        return (f"the NVIDIA driver supports CUDA {have}, older than the extension's static CUDA runtime {need} "
                f"(cudaErrorInsufficientDriver): update the driver to one for CUDA >= {need}, or install a "
                f"moe_kernels build for CUDA {driver[0]}.x")
    if any(_runs_on(a, cap, ptx=False) for a in archs):
        return None
    jit = [p for p in ptx if _runs_on(p, cap, ptx=True)]
    if jit and driver >= build:
        return None
    rebuild = f"rebuild with MOE_KERNELS_CUDA_ARCHS={cap[0]}{cap[1]} (if CUDA {need} still targets it)"
    fallback = "backend='triton' or 'torch'" if cap >= (8, 0) else "backend='torch'"  # Triton needs sm_80+
    if jit:
        return (f"this GPU ({gpu}) could only run the extension's PTX (compute_{jit[0]}), which the NVIDIA driver "
                f"(CUDA {have}) is too old to compile (it comes from CUDA {need}): update the driver, or {rebuild}")
    return (f"the extension holds machine code for {', '.join('sm_' + a for a in archs) or 'nothing'} and PTX for "
            f"{', '.join('compute_' + p for p in ptx) or 'nothing'}, none of which runs on this GPU ({gpu}): "
            f"{rebuild}, or use {fallback}")


def _spill_bytes(log: str) -> list:
    return [v for pair in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log) for v in pair]


def _ext(op: str):
    if _C is None:
        raise RuntimeError(f"moe_kernels_cuda::{op}: the CUDA extension moe_kernels._C is not available "
                           f"({_C_ERROR}); {_HOW_TO_FIX}")
    return _C


def _launch_args(t: torch.Tensor) -> Tuple[int, int]:
    return t.device.index if t.device.index is not None else torch.cuda.current_device(), \
        torch.cuda.current_stream(t.device).cuda_stream


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _check_same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def _check_index(name: str, t: object, ndim: int = 1) -> torch.Tensor:
    return check_tensor(name, t, ndim=ndim, dtypes=(torch.int32,))



# Keep the limits table in step with the extension it loaded.
if _C is not None:
    assert (_C.ROUTE_MAX_EXPERTS, _C.ROUTE_MAX_TOP_K, _C.PLAN_MAX_EXPERTS) == \
        (CUDA.route_max_experts, CUDA.route_max_top_k, CUDA.plan_max_experts), \
        "moe_kernels._C is from another version; rebuild it"
