"""What a backend is: routing, plan and experts for one implementation.

A backend answers three questions for the layer and the functional API:

* ``unavailable(device)``: ``None`` when it can run on ``device``, else a sentence
  saying why and how to get it (shown verbatim in the error and in ``moe-kernels info``).
* ``route(logits, router, options)``: a :class:`~moe_kernels.routing.Routing`; a backend
  with fused routing kernels overrides it for the routers it fuses and defers to the
  pure-PyTorch routers for the rest.
* ``plan(routing, params)`` then ``experts(x, plan, params)``: the dispatch plan and the
  expert computation, differentiable in ``x``, the weights and the slot weights.
"""

from __future__ import annotations

import torch

from ..params import ExpertParams
from ..plan import DispatchPlan, build_plan_torch
from ..routing import Routing, route


class Backend:
    name = "base"

    def unavailable(self, device: torch.device) -> str | None:
        raise NotImplementedError

    def route(self, logits: torch.Tensor, router: str, options: dict) -> Routing:
        return route(logits, router, **options)

    def block_m(self, params: ExpertParams, num_slots: int) -> int:
        return 64

    def plan(self, routing: Routing, params: ExpertParams) -> DispatchPlan:
        return build_plan_torch(routing, self.block_m(params, routing.num_slots))

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
        raise NotImplementedError
