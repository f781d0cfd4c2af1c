"""The ``cuda`` backend: hand-written CUDA kernels (csrc/) for routing, the dispatch
plan and row permutation; the expert GEMMs stay Triton (or torch without Triton).

Pipeline: router logits ─► ``route_*`` (fused softmax / grouped-sigmoid top-k, one
warp per token) ─► ``build_plan`` (histogram, scans, stable scatter, padding and
block map in one launch, no host sync) ─► experts: the Triton backend's whole experts op
(:func:`moe_kernels.backends.triton.experts.moe_experts`, its public entry) on that plan
when Triton imports and runs here, else ``permute_rows`` (gather into expert order) ─►
grouped matmuls (:func:`moe_kernels.primitives.grouped_linear`) ─► ``unpermute_rows``
(weighted per-token combine in a fixed order, no atomics).

The extension ``moe_kernels._C`` takes raw device addresses, sizes, dtype codes and
the stream as integers and links the CUDA runtime statically (csrc/runtime.h): it
does not depend on torch's version and imports without a GPU. Every op
(:mod:`.routing`, :mod:`.plan`, :mod:`.experts`) is a ``torch.library.custom_op``
(namespace ``moe_kernels_cuda``) with a fake implementation (``torch.compile``), its CPU
kernel being the pure-PyTorch twin from :mod:`.twins` (same signature), and autograd
registered on it:

* routing: the gradient of the weights to the logits is a custom backward in torch
  from the saved ids and weights (renormalised softmax: ``w ⊙ (g - <g, w>)`` on the
  chosen logits; plain softmax recomputes ``p = softmax(logits)``; grouped sigmoid
  recomputes ``s = sigmoid(logits)`` at the chosen ids). The bias gets none.
* permute: backward = ``unpermute_rows`` of the output gradient with unit weights
  (needs the op's ``slot_row`` / ``token_slots`` maps); saves nothing else.
* unpermute: ``dy`` is a gather of ``w[s] * dout[t(s)]`` into each slot's row and
  ``dw[s] = <dout[t(s)], y[row(s)]>``; saves ``y``, the maps and the weights.
All backward sums are gathers and fixed-order reductions: deterministic.

Non-finite router logits never index out of bounds: the routing kernels never choose
a NaN score, and a slot left without a candidate is dropped (id ``E``, weight 0, not
counted); a softmax row with a NaN or +inf logit is dropped whole (see
:mod:`.twins`). Its gradient is zero.

Loading: the device images load lazily, at the first call of an op that needs them.
Loading is not allowed during CUDA-graph capture, so that first call must come before
any capture (run one forward pass, or call :func:`load_kernels`); a first call on a
capturing stream raises a ``RuntimeError`` saying so, without touching the capture.

Availability (:meth:`CudaBackend.unavailable`, so ``backend="auto"``) checks that the
build holds machine code or PTX the GPU can run and that the driver can run the
build's static CUDA runtime: :func:`compatibility_reason`.
"""

from typing import Optional

import torch

from ...limits import CUDA
from ...options import KernelOptions
from ...plan import DispatchPlan, build_plan_torch, max_padded_rows
from ...primitives import fused_topk_args
from ...routing import Routing
from ..base import Backend
from ..torch.experts import experts_torch
from . import extension as ext
from .experts import experts_permuted
from .plan import build_plan
from .routing import route_fused

__all__ = ["CudaBackend"]


def _triton_experts(device: torch.device):
    """Triton's public experts op when Triton imports and runs on ``device``, else None."""
    try:
        from ..triton import unavailable_reason
        if unavailable_reason(device) is not None:
            return None
        from ..triton.experts import moe_experts
    except ImportError:
        return None
    return moe_experts


def _triton_block_m(params, options, num_slots=None) -> int | None:
    try:
        from ..triton.backend import TritonBackend
    except ImportError:
        return None
    return TritonBackend().block_m(params, options, num_slots)


class CudaBackend(Backend):
    """CUDA routing / plan / permutation kernels with the Triton (or torch) GEMMs."""

    name = "cuda"

    def __init__(self) -> None:
        super().__init__()
        self._reasons: dict = {}  # (extension, device index) -> compatibility_reason

    def unavailable(self, device: torch.device) -> Optional[str]:
        if ext._C is None:
            return f"the CUDA extension moe_kernels._C is not available ({ext._C_ERROR}); {ext._HOW_TO_FIX}"
        device = torch.device(device)
        if device.type != "cuda":
            return (f"the cuda backend runs on CUDA devices only, got device {device}; "
                    "use backend='torch' (or 'auto') there")
        if getattr(torch.version, "hip", None):
            return "the cuda backend runs on NVIDIA GPUs, not under ROCm (HIP): use backend='triton' or 'torch'"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device (torch.cuda.is_available() is False): use backend='torch'"
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (id(ext._C), index)
        if key not in self._reasons:
            try:
                cap = torch.cuda.get_device_capability(index)
            except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. cuda:3 on a 2-GPU machine
                return f"cannot query {device}: {exc}"
            self._reasons[key] = ext.compatibility_reason(cap, ext._C.build_info(), ext._C.driver_version())
        return self._reasons[key]

    def route(self, logits: torch.Tensor, router: str, options: dict) -> Routing:
        args = fused_topk_args(router, options)
        if (args is not None and logits.is_cuda and logits.dim() == 2 and logits.dtype in ext._DTYPE_CODE
                and logits.shape[0] > 0 and logits.shape[1] > 0 and isinstance(args.top_k, int)
                and 0 < args.top_k and CUDA.fuses_routing(logits.shape[1], args.top_k)):
            return route_fused(logits, args)
        return super().route(logits, router, options)

    def block_m(self, params, options: KernelOptions | None = None, num_slots: int | None = None) -> int:
        bm = _triton_block_m(params, options, num_slots) if params.device.type == "cuda" else None
        return bm if bm is not None else 64

    def plan(self, routing: Routing, params, options: KernelOptions | None = None) -> DispatchPlan:
        bm = self.block_m(params, options, routing.num_slots)
        if not (routing.slot_expert.is_cuda and CUDA.plans(routing.num_experts)
                and max_padded_rows(routing.num_slots, routing.num_experts, bm) < 2**31):
            return build_plan_torch(routing, bm)
        fields = build_plan(routing.slot_expert, routing.slot_token, routing.num_tokens, routing.num_experts,
                            routing.max_slots_per_token, routing.top_k or 0, bm)
        return DispatchPlan.from_fields(routing, bm, fields)

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params, options: KernelOptions | None = None) -> torch.Tensor:
        if params.quant is not None or params.post_norm is not None:  # quantized / post-norm experts: Triton's path
            if x.is_cuda and _triton_experts(x.device) is not None:
                from ..triton.backend import TritonBackend  # Triton's public surface routes them
                return TritonBackend().experts(x, plan, params, options)
            from ...quant import experts_quant_torch
            return experts_quant_torch(x, plan, params) if params.quant is not None else experts_torch(x, plan, params)
        triton_experts = _triton_experts(x.device) if x.is_cuda else None
        if triton_experts is not None:
            return triton_experts(x, plan, params, options)
        if not (x.is_cuda and x.dtype in ext._DTYPE_CODE and plan.num_slots > 0):
            return experts_torch(x, plan, params)
        return experts_permuted(x, plan, params)
