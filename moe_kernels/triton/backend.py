"""The ``triton`` backend: fused routing, one-launch plan, gathered grouped GEMMs.

A top-k layer forward is 4 launches: routing (routing.py), plan (plan.py), GEMM1 and
GEMM2 with the combine fused into its epilogue (gemm.py, ops.py). Other routers (noisy
top-k, Switch, Expert Choice, dense) route with the pure-PyTorch routers and share
the rest. Runs on CUDA GPUs of compute capability 8.0 and newer, and on the CPU under
``TRITON_INTERPRET=1`` (slow: for tests).

Aux losses: the fused routers return no probabilities, so the softmax top-k
load-balancing loss (Mixtral's form, equal to the torch router's) is computed from the
logits with torch ops only when it can matter, i.e. when the logits require grad;
inference stays at 4 launches.
"""

from __future__ import annotations

import os

import torch

from ..backends.base import Backend
from ..params import ExpertParams
from ..plan import DispatchPlan, build_plan_torch
from ..routing import Routing, route
from .configs import capability_of, layer_block_m
from .ops import moe_experts
from .plan import MAX_EXPERTS as _PLAN_MAX_EXPERTS
from .plan import build_plan_triton
from .routing import MAX_EXPERTS as _ROUTE_MAX_EXPERTS
from .routing import route_topk

__all__ = ["TritonBackend"]

_SOFTMAX_OPTS = {"top_k", "renormalize"}
_SIGMOID_OPTS = {"top_k", "bias", "n_group", "topk_group", "routed_scaling_factor", "renormalize"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_balancing(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Mixtral's load-balancing loss over the top-k assignments, as
    :func:`moe_kernels.routing.softmax_topk` computes it."""
    t, e = logits.shape
    k = routing.top_k
    probs = torch.softmax(logits.float(), dim=-1)
    ids = routing.slot_expert.long()
    f = torch.zeros(e, dtype=probs.dtype, device=probs.device).scatter_add_(
        0, ids, torch.ones(ids.numel(), dtype=probs.dtype, device=probs.device)) / (t * k)
    return e * torch.sum(f * probs.mean(dim=0))


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
            if _interpreting():
                return None
            return ("the triton backend runs on CUDA GPUs; on the CPU only under the Triton interpreter "
                    "(set TRITON_INTERPRET=1 before importing triton; slow, for tests): use backend='torch'")
        return f"the triton backend runs on CUDA GPUs, not on device type {device.type!r}: use backend='torch'"

    def route(self, logits: torch.Tensor, router: str, options: dict) -> Routing:
        fusable = (logits.dim() == 2 and logits.shape[0] > 0
                   and logits.shape[1] <= min(_ROUTE_MAX_EXPERTS, _PLAN_MAX_EXPERTS)
                   and logits.dtype in (torch.float16, torch.bfloat16, torch.float32))
        if fusable and router == "softmax_topk" and set(options) <= _SOFTMAX_OPTS and "top_k" in options:
            routing = route_topk(logits, options["top_k"], scoring="softmax",
                                 renormalize=options.get("renormalize", True))
            if torch.is_grad_enabled() and logits.requires_grad:
                routing.losses["load_balancing"] = _load_balancing(logits, routing)
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
        if routing.num_experts > _PLAN_MAX_EXPERTS:
            return build_plan_torch(routing, bm)
        return build_plan_triton(routing, bm)

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
        return moe_experts(x, plan, params)
