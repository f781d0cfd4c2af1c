"""The CUDA extension's ops: loading ``moe_kernels._C``, availability, and each kernel
as a ``torch.library`` custom op (namespace ``moe_kernels_cuda``) with a fake
implementation, autograd, and validation before every launch.

Each op's CPU kernel is its pure-PyTorch twin from :mod:`moe_kernels.cuda_twins` (same
signature). How the pieces compose into a backend: :mod:`moe_kernels.cuda_backend`.
"""


import re
from typing import Optional, Tuple

import torch

from . import cuda_twins as twins
from ._checks import check_finite, check_int, check_tensor
from .plan import max_padded_rows
from .routing import check_grouped_options

try:
    from . import _C
    _C_ERROR: Optional[str] = None
except Exception as exc:  # not built (no nvcc at install), or unloadable
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["extension_info", "compatibility_reason", "load_kernels",
           "route_softmax_topk", "route_grouped_sigmoid_topk", "build_plan", "permute_rows", "unpermute_rows",
           "ROUTE_MAX_EXPERTS", "ROUTE_MAX_TOP_K", "PLAN_MAX_EXPERTS"]

ROUTE_MAX_EXPERTS = 512
ROUTE_MAX_TOP_K = 32
PLAN_MAX_EXPERTS = 4000
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


# --------------------------------------------------------------------------- routing


@torch.library.custom_op("moe_kernels_cuda::route_softmax_topk", mutates_args=(), device_types="cuda")
def _route_softmax_topk_op(logits: torch.Tensor, top_k: int, renormalize: bool) -> _Tensors3:
    ext = _ext("route_softmax_topk")
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    counts = torch.empty(e, dtype=torch.int32, device=logits.device)
    ext.route_softmax_topk(logits.data_ptr(), ids.data_ptr(), w.data_ptr(), counts.data_ptr(), t, e, top_k,
                           renormalize, _DTYPE_CODE[logits.dtype], *_launch_args(logits))
    return ids, w, counts


_route_softmax_topk_op.register_kernel("cpu", twins.route_softmax_topk)


@_route_softmax_topk_op.register_fake
def _(logits, top_k, renormalize):
    t, e = logits.shape
    return (logits.new_empty(t, top_k, dtype=torch.int32), logits.new_empty(t, top_k, dtype=torch.float32),
            logits.new_empty(e, dtype=torch.int32))


def _route_softmax_setup(ctx, inputs, output):
    logits, _, renormalize = inputs
    ids, w, _ = output
    ctx.renormalize = renormalize
    ctx.save_for_backward(logits, ids, w)


def _route_softmax_backward(ctx, grad_ids, grad_w, grad_counts):
    logits, ids, w = ctx.saved_tensors
    if grad_w is None:
        return None, None, None
    t, e = logits.shape
    g = grad_w.float()
    dot = (g * w).sum(-1, keepdim=True)
    # Dropped slots (id E, weight 0: rows with non-finite logits) scatter their zeros
    # into a spare column E; such a row, dropped whole, gets a zero gradient.
    if ctx.renormalize:  # w = softmax over the chosen logits only
        grad = torch.zeros(t, e + 1, dtype=torch.float32, device=logits.device)
        grad.scatter_(1, ids.long(), w * (g - dot))
    else:  # w = p[ids]: d/dx_m = p_m (g_m [m chosen] - <g, w>)
        p = torch.softmax(logits.float(), dim=-1)
        base = torch.where((ids < e).any(-1, keepdim=True), -p * dot, 0.0)
        grad = torch.cat([base, base.new_zeros(t, 1)], 1).scatter_add_(1, ids.long(), w * g)
    return grad[:, :e].to(logits.dtype), None, None


_route_softmax_topk_op.register_autograd(_route_softmax_backward, setup_context=_route_softmax_setup)


@torch.library.custom_op("moe_kernels_cuda::route_grouped_sigmoid_topk", mutates_args=(), device_types="cuda")
def _route_grouped_op(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int,
                      routed_scaling_factor: float, renormalize: bool) -> _Tensors3:
    ext = _ext("route_grouped_sigmoid_topk")
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    counts = torch.empty(e, dtype=torch.int32, device=logits.device)
    ext.route_grouped_sigmoid_topk(logits.data_ptr(), _ptr(bias), ids.data_ptr(), w.data_ptr(), counts.data_ptr(),
                                   t, e, top_k, n_group, topk_group, routed_scaling_factor, renormalize,
                                   _DTYPE_CODE[logits.dtype], *_launch_args(logits))
    return ids, w, counts


_route_grouped_op.register_kernel("cpu", twins.route_grouped_sigmoid_topk)


@_route_grouped_op.register_fake
def _(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, renormalize):
    t, e = logits.shape
    return (logits.new_empty(t, top_k, dtype=torch.int32), logits.new_empty(t, top_k, dtype=torch.float32),
            logits.new_empty(e, dtype=torch.int32))


def _route_grouped_setup(ctx, inputs, output):
    logits, _, _, _, _, scale, renormalize = inputs
    ids, _, _ = output
    ctx.scale, ctx.renormalize = scale, renormalize
    ctx.save_for_backward(logits, ids)


def _route_grouped_backward(ctx, grad_ids, grad_w, grad_counts):
    logits, ids = ctx.saved_tensors
    if grad_w is None:
        return None, None, None, None, None, None, None
    t, e = logits.shape
    g = grad_w.float()
    chosen = ids < e  # dropped slots (id E) have s = 0: no share of D, no gradient
    s = torch.where(chosen, torch.sigmoid(logits.float().gather(1, ids.long().clamp(max=e - 1))), 0.0)
    if ctx.renormalize:  # w_j = scale * s_j / D, D = sum(s) + 1e-20
        d = s.sum(-1, keepdim=True) + 1e-20
        ds = ctx.scale * (g / d - (g * s).sum(-1, keepdim=True) / (d * d))
    else:
        ds = ctx.scale * g
    grad = torch.zeros(t, e + 1, dtype=torch.float32, device=logits.device)
    grad.scatter_(1, ids.long(), ds * s * (1 - s))
    return grad[:, :e].to(logits.dtype), None, None, None, None, None, None


_route_grouped_op.register_autograd(_route_grouped_backward, setup_context=_route_grouped_setup)


def _check_logits(logits: torch.Tensor, top_k: int) -> None:
    check_tensor("logits", logits, ndim=2, dtypes=_ACT_DTYPES)
    check_finite("logits", logits)
    e = logits.shape[1]
    if not 1 <= e <= ROUTE_MAX_EXPERTS:
        raise ValueError(f"logits: expected 1..{ROUTE_MAX_EXPERTS} experts (shape [T, E]), got {tuple(logits.shape)}")
    check_int("top_k", top_k, low=1, high=min(e, ROUTE_MAX_TOP_K))


def route_softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> _Tensors3:
    """Softmax top-k routing (see :func:`moe_kernels.cuda_twins.route_softmax_topk`):
    logits [T, E] fp32/fp16/bf16, E <= 512, k <= 32 -> ids int32 [T, k], weights fp32
    [T, k] (differentiable), counts int32 [E]."""
    _check_logits(logits, top_k)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize: expected a bool, got {renormalize!r}")
    return _route_softmax_topk_op(logits, top_k, renormalize)


def route_grouped_sigmoid_topk(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int,
                               topk_group: int, routed_scaling_factor: float, renormalize: bool) -> _Tensors3:
    """DeepSeek-V3 routing (see :func:`moe_kernels.cuda_twins.route_grouped_sigmoid_topk`);
    ``bias`` [E] (any float dtype, used as fp32) or None."""
    _check_logits(logits, top_k)
    check_grouped_options(logits, top_k, bias, n_group, topk_group, routed_scaling_factor)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize: expected a bool, got {renormalize!r}")
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    return _route_grouped_op(logits, bias, top_k, n_group, topk_group, float(routed_scaling_factor), renormalize)


# --------------------------------------------------------------------------- plan


@torch.library.custom_op("moe_kernels_cuda::build_plan", mutates_args=(), device_types="cuda")
def _build_plan_op(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
                   max_slots_per_token: int, top_k: int, block_m: int) -> _Tensors8:
    ext = _ext("build_plan")
    s, e, t, k = slot_expert.shape[0], num_experts, num_tokens, max_slots_per_token
    p = max_padded_rows(s, e, block_m)
    new = lambda *shape: torch.empty(shape, dtype=torch.int32, device=slot_expert.device)  # noqa: E731
    out = (new(e), new(e + 1), new(s), new(s), new(e + 1), new(p), new(p // block_m), new(t, k))
    fill = new(max(t, 1)) if top_k == 0 else None
    ext.build_plan(slot_expert.data_ptr(), slot_token.data_ptr(), *[o.data_ptr() for o in out], _ptr(fill),
                   s, e, t, k, top_k, block_m, p, *_launch_args(slot_expert))
    return out


_build_plan_op.register_kernel("cpu", twins.build_plan)


@_build_plan_op.register_fake
def _(slot_expert, slot_token, num_tokens, num_experts, max_slots_per_token, top_k, block_m):
    s, e = slot_expert.shape[0], num_experts
    p = max_padded_rows(s, e, block_m)
    new = lambda *shape: slot_expert.new_empty(shape, dtype=torch.int32)  # noqa: E731
    return (new(e), new(e + 1), new(s), new(s), new(e + 1), new(p), new(p // block_m),
            new(num_tokens, max_slots_per_token))


def build_plan(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
               max_slots_per_token: int, top_k: int, block_m: int) -> _Tensors8:
    """The DispatchPlan index tensors in one launch (see
    :func:`moe_kernels.cuda_twins.build_plan`); E <= 4000; ``top_k`` 0 for slots that are
    not token-major."""
    _check_index("slot_expert", slot_expert)
    _check_index("slot_token", slot_token)
    s = slot_expert.shape[0]
    if slot_token.shape[0] != s:
        raise ValueError(f"slot_token: expected {s} slots like slot_expert, got {slot_token.shape[0]}")
    _check_same_device("slot_expert", slot_expert, slot_token=slot_token)
    check_int("num_experts", num_experts, low=1, high=PLAN_MAX_EXPERTS)
    check_int("num_tokens", num_tokens, low=0, high=2**31 - 1)
    check_int("max_slots_per_token", max_slots_per_token, low=1)
    check_int("top_k", top_k, low=0, high=max_slots_per_token)
    check_int("block_m", block_m, low=1, high=2**16)
    if top_k and s != num_tokens * top_k:
        raise ValueError(f"top_k: token-major slots need S = num_tokens * top_k = {num_tokens * top_k}, got S = {s}")
    if max_padded_rows(s, num_experts, block_m) >= 2**31:
        raise ValueError(f"slot_expert: {s} slots pad to more than 2^31 rows; use fewer slots per call")
    return _build_plan_op(slot_expert, slot_token, num_tokens, num_experts, max_slots_per_token, top_k, block_m)


# --------------------------------------------------------------------------- permutation


@torch.library.custom_op("moe_kernels_cuda::permute_rows", mutates_args=(), device_types="cuda")
def _permute_op(x: torch.Tensor, slot_token: torch.Tensor, row_slot: torch.Tensor, slot_row: Optional[torch.Tensor],
                token_slots: Optional[torch.Tensor]) -> torch.Tensor:
    ext = _ext("permute_rows")
    out = torch.empty(row_slot.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    ext.permute_rows(x.data_ptr(), slot_token.data_ptr(), row_slot.data_ptr(), out.data_ptr(), row_slot.shape[0],
                     x.shape[1], x.element_size(), *_launch_args(x))
    return out


_permute_op.register_kernel("cpu", twins.permute_rows)


@_permute_op.register_fake
def _(x, slot_token, row_slot, slot_row, token_slots):
    return x.new_empty(row_slot.shape[0], x.shape[1])


def _permute_setup(ctx, inputs, output):
    x, _, _, slot_row, token_slots = inputs
    ctx.x_shape = x.shape
    ctx.save_for_backward(slot_row, token_slots)


def _permute_backward(ctx, grad_out):
    slot_row, token_slots = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    if slot_row is None or token_slots is None:
        raise RuntimeError("moe_kernels_cuda::permute_rows: the backward needs slot_row and token_slots "
                           "(pass them to permute_rows when x requires grad)")
    ones = torch.ones(slot_row.shape[0], dtype=torch.float32, device=grad_out.device)
    dx = _unpermute_op(grad_out.contiguous(), slot_row, token_slots, ones)
    return dx, None, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("moe_kernels_cuda::unpermute_rows", mutates_args=(), device_types="cuda")
def _unpermute_op(y: torch.Tensor, slot_row: Optional[torch.Tensor], token_slots: torch.Tensor,
                  slot_weight: torch.Tensor) -> torch.Tensor:
    ext = _ext("unpermute_rows")
    t, k = token_slots.shape
    out = torch.empty(t, y.shape[1], dtype=y.dtype, device=y.device)
    ext.unpermute_rows(y.data_ptr(), _ptr(slot_row), token_slots.data_ptr(), slot_weight.data_ptr(), out.data_ptr(),
                       t, k, y.shape[1], _DTYPE_CODE[y.dtype], *_launch_args(y))
    return out


_unpermute_op.register_kernel("cpu", twins.unpermute_rows)


@_unpermute_op.register_fake
def _(y, slot_row, token_slots, slot_weight):
    return y.new_empty(token_slots.shape[0], y.shape[1])


def _unpermute_setup(ctx, inputs, output):
    y, slot_row, token_slots, slot_weight = inputs
    ctx.save_for_backward(y, slot_row, token_slots, slot_weight)


def _unpermute_backward(ctx, grad_out):
    y, slot_row, token_slots, w = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    r, s = y.shape[0], w.shape[0]
    t, k = token_slots.shape
    dev = y.device
    cells = token_slots.reshape(-1).long()
    listed = cells >= 0
    slot = torch.where(listed, cells, torch.full_like(cells, s))  # s: a dump entry
    token = torch.arange(t, device=dev).repeat_interleave(k)
    row_of = torch.arange(s, device=dev) if slot_row is None else slot_row.long()
    row = torch.cat([row_of, row_of.new_full((1,), r)])[slot]  # unlisted cells -> the dump row r
    # Listed slots own distinct rows, so these scatters write each kept entry once.
    slot_of_row = torch.full((r + 1,), s, dtype=torch.long, device=dev).scatter_(0, row, slot)[:r]
    token_of_slot = torch.zeros(s + 1, dtype=torch.long, device=dev).scatter_(0, slot, token)
    w_pad = torch.cat([w.float(), w.new_zeros(1, dtype=torch.float32)])
    g = grad_out.float()
    dy = (w_pad[slot_of_row].unsqueeze(1) * g[token_of_slot[slot_of_row]]).to(y.dtype)
    y_pad = torch.cat([y.float(), y.new_zeros(1, y.shape[1], dtype=torch.float32)])
    dots = (g[token] * y_pad[row]).sum(-1) * listed
    dw = torch.zeros(s + 1, dtype=torch.float32, device=dev).scatter_(0, slot, dots)[:s]
    return dy, None, None, dw


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def _check_rows(name: str, t: object) -> torch.Tensor:
    return check_tensor(name, t, ndim=2, dtypes=_ACT_DTYPES)


def permute_rows(x: torch.Tensor, slot_token: torch.Tensor, row_slot: torch.Tensor,
                 slot_row: Optional[torch.Tensor] = None, token_slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[r] = x[slot_token[row_slot[r]]]``, zero rows where ``row_slot[r] < 0``; x [T, H]
    fp32/fp16/bf16. ``slot_row`` [S] (slot -> its row of ``out``) and ``token_slots``
    [T, K] are only for the backward, which is ``unpermute_rows`` with unit weights: so
    every slot listed in ``token_slots`` must have ``row_slot[slot_row[s]] == s`` and
    the other rows must be ``-1``."""
    _check_rows("x", x)
    _check_index("slot_token", slot_token)
    _check_index("row_slot", row_slot)
    if slot_row is not None:
        _check_index("slot_row", slot_row)
        if slot_row.shape[0] != slot_token.shape[0]:
            raise ValueError(f"slot_row: expected {slot_token.shape[0]} slots like slot_token, got {slot_row.shape[0]}")
    if token_slots is not None:
        _check_index("token_slots", token_slots, ndim=2)
        if token_slots.shape[0] != x.shape[0]:
            raise ValueError(f"token_slots: expected {x.shape[0]} rows (tokens of x), got {tuple(token_slots.shape)}")
    if row_slot.shape[0] >= 2**31:
        raise ValueError(f"row_slot: expected fewer than 2^31 rows, got {row_slot.shape[0]}")
    _check_same_device("x", x, slot_token=slot_token, row_slot=row_slot, slot_row=slot_row, token_slots=token_slots)
    return _permute_op(x, slot_token, row_slot, slot_row, token_slots)


def unpermute_rows(y: torch.Tensor, slot_row: Optional[torch.Tensor], token_slots: torch.Tensor,
                   slot_weight: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j w[s_j] * y[slot_row[s_j]]`` over ``s_j = token_slots[t, j] >= 0``
    (``slot_row`` None: row ``s_j``); fp32 accumulation in column order, deterministic.
    y [R, H] fp32/fp16/bf16, slot_weight [S] (any float dtype, used as fp32).
    Differentiable in ``y`` and ``slot_weight``; ``slot_row`` must not map two listed
    slots to one row."""
    _check_rows("y", y)
    _check_index("token_slots", token_slots, ndim=2)
    check_tensor("slot_weight", slot_weight, ndim=1,
                 dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), contiguous=False)
    if slot_row is not None:
        _check_index("slot_row", slot_row)
        if slot_row.shape[0] != slot_weight.shape[0]:
            raise ValueError(f"slot_row: expected {slot_weight.shape[0]} slots like slot_weight, "
                             f"got {slot_row.shape[0]}")
    elif y.shape[0] < slot_weight.shape[0]:
        raise ValueError(f"y: without slot_row, expected a row per slot ({slot_weight.shape[0]}), got {y.shape[0]}")
    if token_slots.shape[1] < 1:
        raise ValueError(f"token_slots: expected at least one column, got shape {tuple(token_slots.shape)}")
    _check_same_device("y", y, slot_row=slot_row, token_slots=token_slots, slot_weight=slot_weight)
    return _unpermute_op(y, slot_row, token_slots, slot_weight.float().contiguous())


# Keep the module's constants in step with the extension it loaded.
if _C is not None:
    assert (_C.ROUTE_MAX_EXPERTS, _C.ROUTE_MAX_TOP_K, _C.PLAN_MAX_EXPERTS) == \
        (ROUTE_MAX_EXPERTS, ROUTE_MAX_TOP_K, PLAN_MAX_EXPERTS), "moe_kernels._C is from another version; rebuild it"
