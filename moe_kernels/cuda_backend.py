"""The ``cuda`` backend: hand-written CUDA kernels (csrc/) for routing, the dispatch
plan and row permutation; the expert GEMMs stay Triton (or torch without Triton).

Pipeline: router logits ─► ``route_*`` (fused softmax / grouped-sigmoid top-k, one
warp per token) ─► ``build_plan`` (histogram, scans, stable scatter, padding and
block map in one launch, no host sync) ─► experts: the Triton backend's GEMMs on that
plan when ``moe_kernels.triton.backend`` imports and runs here, else ``permute_rows``
(gather into expert order) ─► the torch backend's grouped matmuls ─► ``unpermute_rows``
(weighted per-token combine in a fixed order, no atomics).

The extension ``moe_kernels._C`` takes raw device addresses, sizes, dtype codes and
the stream as integers and links the CUDA runtime statically (csrc/runtime.h): it
does not depend on torch's version and imports without a GPU. Every op
(:mod:`moe_kernels.cuda_ops`) is a ``torch.library.custom_op`` (namespace ``moe_kernels_cuda``) with a fake
implementation (``torch.compile``), its CPU kernel being the pure-PyTorch twin from
:mod:`moe_kernels.cuda_twins` (same signature), and autograd registered on it:

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
:mod:`moe_kernels.cuda_twins`). Its gradient is zero.

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

from . import cuda_ops as ops
from .backends.base import Backend
from .cuda_ops import (  # noqa: F401  (re-exported: the backend's public surface)
    PLAN_MAX_EXPERTS,
    ROUTE_MAX_EXPERTS,
    ROUTE_MAX_TOP_K,
    build_plan,
    compatibility_reason,
    extension_info,
    load_kernels,
    permute_rows,
    route_grouped_sigmoid_topk,
    route_softmax_topk,
    unpermute_rows,
)
from .plan import DispatchPlan, build_plan_torch, max_padded_rows
from .routing import Routing, topk_load_balancing_loss

__all__ = ["CudaBackend", "extension_info", "compatibility_reason", "load_kernels", "route_fused", "experts_permuted",
           "route_softmax_topk", "route_grouped_sigmoid_topk", "build_plan", "permute_rows", "unpermute_rows",
           "ROUTE_MAX_EXPERTS", "ROUTE_MAX_TOP_K", "PLAN_MAX_EXPERTS"]


class CudaBackend(Backend):
    """CUDA routing / plan / permutation kernels with the Triton (or torch) GEMMs."""

    name = "cuda"

    def __init__(self) -> None:
        super().__init__()
        self._reasons: dict = {}  # (extension, device index) -> compatibility_reason

    def unavailable(self, device: torch.device) -> Optional[str]:
        if ops._C is None:
            return f"the CUDA extension moe_kernels._C is not available ({ops._C_ERROR}); {ops._HOW_TO_FIX}"
        device = torch.device(device)
        if device.type != "cuda":
            return (f"the cuda backend runs on CUDA devices only, got device {device}; "
                    "use backend='torch' (or 'auto') there")
        if getattr(torch.version, "hip", None):
            return "the cuda backend runs on NVIDIA GPUs, not under ROCm (HIP): use backend='triton' or 'torch'"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device (torch.cuda.is_available() is False): use backend='torch'"
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (id(ops._C), index)
        if key not in self._reasons:
            try:
                cap = torch.cuda.get_device_capability(index)
            except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. cuda:3 on a 2-GPU machine
                return f"cannot query {device}: {exc}"
            self._reasons[key] = compatibility_reason(cap, ops._C.build_info(), ops._C.driver_version())
        return self._reasons[key]

    @staticmethod
    def _triton(device: torch.device):
        """The Triton backend when it imports and runs on ``device``, else None."""
        from .backends import get_backend, unavailable_reason

        return get_backend("triton", device) if unavailable_reason("triton", device) is None else None

    def route(self, logits: torch.Tensor, router: str, options: dict) -> Routing:
        fused = router in ("softmax_topk", "grouped_sigmoid_topk") and logits.is_cuda and logits.dim() == 2 \
            and logits.dtype in ops._DTYPE_CODE and 0 < logits.shape[0] and 0 < logits.shape[1] <= ROUTE_MAX_EXPERTS \
            and isinstance(options.get("top_k"), int) and 0 < options["top_k"] <= ROUTE_MAX_TOP_K
        if not fused:
            return super().route(logits, router, options)
        return route_fused(logits, router, options)

    def block_m(self, params, num_slots: int) -> int:
        tb = self._triton(params.device) if params.device.type == "cuda" else None
        return tb.block_m(params, num_slots) if tb is not None else 64

    def plan(self, routing: Routing, params) -> DispatchPlan:
        bm = self.block_m(params, routing.num_slots)
        if not (routing.slot_expert.is_cuda and routing.num_experts <= PLAN_MAX_EXPERTS
                and max_padded_rows(routing.num_slots, routing.num_experts, bm) < 2**31):
            return build_plan_torch(routing, bm)
        fields = build_plan(routing.slot_expert, routing.slot_token, routing.num_tokens, routing.num_experts,
                            routing.max_slots_per_token, routing.top_k or 0, bm)
        names = ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "padded_offsets", "padded_slot",
                 "block_expert", "token_slots")
        return DispatchPlan(num_tokens=routing.num_tokens, num_experts=routing.num_experts, block_m=bm,
                            max_slots_per_token=routing.max_slots_per_token, slot_token=routing.slot_token,
                            slot_expert=routing.slot_expert, slot_weight=routing.slot_weight,
                            top_k=routing.top_k, **dict(zip(names, fields)))

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params) -> torch.Tensor:
        from .backends.torch_backend import experts_torch

        tb = self._triton(x.device) if x.is_cuda else None
        if tb is not None:
            return tb.experts(x, plan, params)
        if not (x.is_cuda and x.dtype in ops._DTYPE_CODE and plan.num_slots > 0):
            return experts_torch(x, plan, params)
        return experts_permuted(x, plan, params)


def route_fused(logits: torch.Tensor, router: str, options: dict) -> Routing:
    """``softmax_topk`` or ``grouped_sigmoid_topk`` routing (``options`` as for
    :func:`moe_kernels.routing.route`) through the fused ops, for logits of any layout;
    the same Routing and losses as the torch routers. Runs on any device (the ops' CPU
    kernels are the twins)."""
    opts = dict(options)
    t, e = logits.shape
    k = opts.pop("top_k")
    logits = logits.contiguous()  # internal calls take any layout; the public op wrappers insist on it
    if router == "softmax_topk":
        renormalize = opts.pop("renormalize", True)
        _reject_unknown(router, opts)
        ids, w, _ = route_softmax_topk(logits, k, renormalize)
        # Dropped ids (E) come only from rows whose probs are all NaN, which make the
        # loss NaN whatever those ids are; clamped so the loss's scatter stays in range.
        probs = torch.softmax(logits.float(), dim=-1)
        losses = {"load_balancing": topk_load_balancing_loss(probs, ids.clamp(max=e - 1))} if t else {}
    else:
        args = {"bias": None, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "renormalize": True}
        unknown = set(opts) - set(args)
        args.update(opts)
        _reject_unknown(router, {x: opts[x] for x in unknown})
        ids, w, _ = route_grouped_sigmoid_topk(logits, args["bias"], k, args["n_group"], args["topk_group"],
                                               args["routed_scaling_factor"], args["renormalize"])
        losses = {}  # as routing.grouped_sigmoid_topk: auxiliary-loss-free balancing
    token = torch.arange(t, device=logits.device, dtype=torch.int32).repeat_interleave(k)
    return Routing(token, ids.reshape(-1), w.reshape(-1), t, e, k, top_k=k, losses=losses)


def experts_permuted(x: torch.Tensor, plan: DispatchPlan, params) -> torch.Tensor:
    """The experts without Triton: ``permute_rows`` into expert order, the torch backend's
    grouped matmuls, ``unpermute_rows`` back. Runs on any device (the ops' CPU kernels
    are the twins), which is how the CPU tests check it."""
    from .activations import apply_activation
    from .backends.torch_backend import grouped_linear

    # Rows of dropped slots (sorted positions >= V) stay zero: grouped_linear ignores
    # them, and the backward (through token_slots) never visits them.
    valid = torch.arange(plan.num_slots, device=x.device) < plan.expert_offsets[plan.num_experts]
    row_slot = torch.where(valid, plan.sorted_slot, torch.full_like(plan.sorted_slot, -1))
    rows = permute_rows(x, plan.slot_token, row_slot, plan.slot_position, plan.token_slots)
    h13 = grouped_linear(rows, params.w13, params.b13, plan)
    hidden = apply_activation(h13, params.activation, params.interleaved)
    y = grouped_linear(hidden, params.w2, params.b2, plan)
    return unpermute_rows(y, plan.slot_position, plan.token_slots, plan.slot_weight)


def _reject_unknown(router: str, extra: dict) -> None:
    if extra:
        raise ValueError(f"router options: {sorted(extra)} are not options of router {router!r}")
