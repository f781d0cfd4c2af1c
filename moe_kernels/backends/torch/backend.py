"""The ``torch`` backend: pure PyTorch on any device, the CPU product and the readable
fast path. Routing is the core's routers (:mod:`moe_kernels.routing`), the plan the
core's :func:`~moe_kernels.plan.build_plan_torch`, the experts :mod:`.experts`, and on
the CPU, where a call needs no plan, :mod:`.planless`."""

from __future__ import annotations

import torch

from ...options import KernelOptions
from ...params import ExpertParams
from ...plan import DispatchPlan
from ...routing import Routing
from ..base import Backend
from .planless import experts_planless
from .experts import experts_torch

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    name = "torch"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def block_m(self, params: ExpertParams, options: KernelOptions | None = None,
                num_slots: int | None = None) -> int:
        # No kernel reads padded blocks here: with one-row blocks the padded order is
        # the sorted order, which the plan builds with no extra work.
        return 1

    def run(self, x: torch.Tensor, routing: Routing, params: ExpertParams,
            options: KernelOptions | None = None) -> torch.Tensor:
        # On the CPU decode and grouped inference need no plan (see .planless).
        out = experts_planless(x, routing, params)
        return out if out is not None else super().run(x, routing, params, options)

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams,
                options: KernelOptions | None = None) -> torch.Tensor:
        if params.quant is not None:  # quantized experts: the dequantizing twin (moe_kernels.quant)
            from ...quant import experts_quant_torch
            return experts_quant_torch(x, plan, params)
        return experts_torch(x, plan, params)
