"""What a backend is: routing, plan and experts for one implementation.

A backend answers four questions for the layer and the functional API:

* ``unavailable(device)``: ``None`` when it can run on ``device``, else a sentence
  saying why and how to get it (shown verbatim in the error and in ``moe-kernels info``).
* ``route(logits, router, options)``: a :class:`~moe_kernels.routing.Routing`; a backend
  with fused routing kernels overrides it for the routers it fuses and defers to the
  pure-PyTorch routers for the rest.
* ``plan(routing, params, options)``: the :class:`~moe_kernels.plan.DispatchPlan`, padded
  to ``block_m(params, options, routing.num_slots)`` rows per expert.
* ``experts(x, plan, params, options)``: the expert computation, differentiable in ``x``,
  the weights and the slot weights.
* ``run(x, routing, params, options)``: plan then experts; a backend overrides it where
  some calls need no plan (the torch backend at decode on the CPU).

``options`` is a :class:`~moe_kernels.options.KernelOptions` (``None``: the process
defaults); a backend resolves the fields it uses and ignores the rest.

Every backend keeps the same files for the same roles: ``backend.py`` (the class),
``routing.py``, ``plan.py``, ``experts.py`` (each kernel's launcher, autograd and
pure-PyTorch twin together); the torch backend's routing and plan are the core's.
"""

from __future__ import annotations

import torch

from ..options import KernelOptions
from ..params import ExpertParams
from ..plan import DispatchPlan, build_plan_torch
from ..routing import Routing, route


class Backend:
    name = "base"

    def unavailable(self, device: torch.device) -> str | None:
        raise NotImplementedError

    def route(self, logits: torch.Tensor, router: str, options: dict) -> Routing:
        return route(logits, router, **options)

    def block_m(self, params: ExpertParams, options: KernelOptions | None = None,
                num_slots: int | None = None) -> int:
        """Rows per padded block of the plan; a function of static shapes only: the
        parameters' and, when given, the routing's slot count ``T*k`` (a static shape of
        the call; backends bucket it so the padding changes only between regimes)."""
        return 64

    def plan(self, routing: Routing, params: ExpertParams, options: KernelOptions | None = None) -> DispatchPlan:
        return build_plan_torch(routing, self.block_m(params, options, routing.num_slots))

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams,
                options: KernelOptions | None = None) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x: torch.Tensor, routing: Routing, params: ExpertParams,
            options: KernelOptions | None = None) -> torch.Tensor:
        """Plan and experts in one call (what :func:`~moe_kernels.fused_experts` runs); a
        backend that can skip the plan for some calls overrides it."""
        return self.experts(x, self.plan(routing, params, options), params, options)
