"""The ``triton`` backend: fused routing, the plan kernel, gathered grouped GEMMs.

A top-k layer forward runs 4 Triton kernels: routing (routing.py), plan (plan.py),
GEMM1 and GEMM2 with the combine fused into its epilogue (gemm.py, experts.py). Other
routers (noisy top-k, Switch, Expert Choice, dense) route with the pure-PyTorch routers
and share the rest. Runs on CUDA GPUs of compute capability 8.0 and newer, and on the
CPU under ``TRITON_INTERPRET=1`` (slow: for tests).

Aux losses: ``routing.losses`` has the same keys as the torch and cuda backends', in
training and in inference alike (:func:`moe_kernels.primitives.routing_from_topk`): the
fused softmax top-k router reports ``"load_balancing"`` from the softmax of the logits
(the kernel returns no probabilities). Its price in inference is a few small torch ops
on [T, E] next to the 4 Triton kernels; the launch-count test accounts for them. The
grouped sigmoid router (DeepSeek-V3) has no aux loss in any backend.
"""

from __future__ import annotations

import torch

from ...limits import TRITON
from ...options import KernelOptions, resolve
from ...params import ExpertParams
from ...plan import DispatchPlan, build_plan_torch
from ...primitives import fused_topk_args
from ...routing import Routing, route
from ..base import Backend
from . import unavailable_reason, warn_if_bf16_interpreted
from .configs import capability_of, layer_block_m
from .experts import moe_experts
from .plan import build_plan_triton
from .routing import route_fused

__all__ = ["TritonBackend"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonBackend(Backend):
    name = "triton"

    def unavailable(self, device: torch.device) -> str | None:
        return unavailable_reason(device)

    def route(self, logits: torch.Tensor, router: str, options: dict) -> Routing:
        args = fused_topk_args(router, options)
        if (args is not None and logits.dim() == 2 and logits.shape[0] > 0 and logits.dtype in _FUSED_DTYPES
                and TRITON.fuses_routing(logits.shape[1], args.top_k)):
            warn_if_bf16_interpreted(logits)
            return route_fused(logits, args)
        return route(logits, router, **options)

    def block_m(self, params: ExpertParams, options: KernelOptions | None = None,
                num_slots: int | None = None) -> int:
        # Static shapes only: the regime of the bucketed T*k (configs.regime_of), never
        # a runtime value; without num_slots, the medium regime's 64.
        return layer_block_m(capability_of(params.device), resolve(options).gemm_pin, num_slots,
                             params.num_experts)

    def plan(self, routing: Routing, params: ExpertParams, options: KernelOptions | None = None) -> DispatchPlan:
        bm = self.block_m(params, options, routing.num_slots)
        if not TRITON.plans(routing.num_experts):
            return build_plan_torch(routing, bm)
        return build_plan_triton(routing, bm)

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams,
                options: KernelOptions | None = None) -> torch.Tensor:
        warn_if_bf16_interpreted(x, params.w13)
        if params.quant is not None or params.post_norm is not None:  # quantized / post-norm experts (quant_experts.py)
            from .quant_experts import quant_experts
            return quant_experts(x, plan, params, options)
        return moe_experts(x, plan, params, options)
