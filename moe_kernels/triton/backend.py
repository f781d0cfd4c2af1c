"""The ``triton`` backend: fused routing, one-launch plan, gathered grouped GEMMs.

A top-k layer forward runs 4 Triton kernels: routing (routing.py), plan (plan.py),
GEMM1 and GEMM2 with the combine fused into its epilogue (gemm.py, ops.py). Other
routers (noisy top-k, Switch, Expert Choice, dense) route with the pure-PyTorch routers
and share the rest. Runs on CUDA GPUs of compute capability 8.0 and newer, and on the
CPU under ``TRITON_INTERPRET=1`` (slow: for tests).

Aux losses: ``routing.losses`` has the same keys as the torch and cuda backends',
in training and in inference alike: the fused softmax top-k router reports
``"load_balancing"`` (:func:`moe_kernels.routing.topk_load_balancing_loss` of the
softmax of the logits and the chosen ids; the fused kernel returns no probabilities).
Chosen over computing it only when the logits require grad, which made eval-time
``routing.losses`` / ``layer.aux_loss`` differ between backends: a caller logging the
balance at eval would silently get 0 here. Its price in inference is a few small torch
ops on [T, E] (a softmax, a scatter-add, two reductions) next to the 4 Triton kernels;
the launch-count test counts the expert path's Triton kernels and accounts for
exactly these loss ops. The grouped sigmoid router (DeepSeek-V3) has no aux loss in any
backend.
"""

from __future__ import annotations

import torch

from ..backends.base import Backend
from ..params import ExpertParams
from ..plan import DispatchPlan, build_plan_torch
from ..routing import Routing, route, topk_load_balancing_loss
from . import MAX_EXPERTS, interpreting
from .configs import capability_of, layer_block_m
from .ops import moe_experts
from .plan import build_plan_triton
from .routing import route_topk

__all__ = ["TritonBackend"]

_SOFTMAX_OPTS = {"top_k", "renormalize"}
_SIGMOID_OPTS = {"top_k", "bias", "n_group", "topk_group", "routed_scaling_factor", "renormalize"}


def _balance_loss(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """:func:`~moe_kernels.routing.topk_load_balancing_loss` of a fused softmax top-k
    routing. Ids equal to E (a NaN row, dropped by the kernel) are clamped into range:
    that row's probabilities are NaN, so the loss is NaN either way, while an index
    past E would be an out-of-bounds scatter (a device-side assert on a GPU)."""
    ids = routing.slot_expert.view(logits.shape[0], -1).clamp_max(logits.shape[1] - 1)
    return topk_load_balancing_loss(torch.softmax(logits.float(), dim=-1), ids)


class TritonBackend(Backend):
    name = "triton"

    def unavailable(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available in this PyTorch build or on this machine"
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (8, 0):
                return (f"the triton backend needs a GPU of compute capability 8.0 or newer (Ampere); "
                        f"this one is {major}.{minor}: use backend='torch'")
            return None
        if device.type == "cpu":
            if interpreting():
                return None
            return ("the triton backend runs on CUDA GPUs; on the CPU only under the Triton interpreter "
                    "(set TRITON_INTERPRET=1 before importing triton; slow, for tests): use backend='torch'")
        return f"the triton backend runs on CUDA GPUs, not on device type {device.type!r}: use backend='torch'"

    def route(self, logits: torch.Tensor, router: str, options: dict) -> Routing:
        fusable = (logits.dim() == 2 and logits.shape[0] > 0
                   and logits.shape[1] <= MAX_EXPERTS
                   and logits.dtype in (torch.float16, torch.bfloat16, torch.float32))
        if fusable and router == "softmax_topk" and set(options) <= _SOFTMAX_OPTS and "top_k" in options:
            routing = route_topk(logits, options["top_k"], scoring="softmax",
                                 renormalize=options.get("renormalize", True))
            routing.losses["load_balancing"] = _balance_loss(logits, routing)
            return routing
        if fusable and router == "grouped_sigmoid_topk" and set(options) <= _SIGMOID_OPTS and "top_k" in options:
            o = dict(options)
            return route_topk(logits, o.pop("top_k"), scoring="sigmoid", renormalize=o.get("renormalize", True),
                              bias=o.get("bias"), n_group=o.get("n_group", 1), topk_group=o.get("topk_group", 1),
                              routed_scaling_factor=o.get("routed_scaling_factor", 1.0))
        return route(logits, router, **options)

    def block_m(self, params: ExpertParams, num_slots: int) -> int:
        # Never the slot count: the plan's padding must not change with the batch size.
        return layer_block_m(params.num_experts, params.hidden_size, params.intermediate_size, params.dtype,
                             capability_of(params.device))

    def plan(self, routing: Routing, params: ExpertParams) -> DispatchPlan:
        bm = self.block_m(params, routing.num_slots)
        if routing.num_experts > MAX_EXPERTS:
            return build_plan_torch(routing, bm)
        return build_plan_triton(routing, bm)

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
        return moe_experts(x, plan, params)
