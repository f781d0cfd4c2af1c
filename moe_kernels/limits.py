"""What each backend's kernels can take, and why: the one table of size limits.

A backend routes or plans in its own kernels only within these limits; past them it
falls back to the pure-PyTorch routers and plan (same results, no error), so the limits
decide speed, never correctness. The CUDA numbers are compiled into the extension too
(``moe_kernels._C`` exports them), and its loader checks that the two agree.

=========  ==================  ===========  ===========  ========================================
backend    op                  max experts  max top-k    why
=========  ==================  ===========  ===========  ========================================
torch      every op            none         E            plain tensor ops
triton     fused top-k route   1024         E            one program holds a [rows, next_pow2(E)]
                                                         fp32 score tile in registers
triton     dispatch plan       1024         any          one-hot [chunk, next_pow2(E)] int32 tiles
cuda       fused top-k route   512          32           one warp per token: E/32 scores and k
                                                         picks per lane in registers
cuda       dispatch plan       4000         any          per-expert counters in 48 KB of shared
                                                         memory
=========  ==================  ===========  ===========  ========================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "LIMITS", "TRITON", "CUDA"]


@dataclass(frozen=True)
class Limits:
    """Size limits of one backend's routing and plan kernels (``None``: no limit)."""

    route_max_experts: int | None
    route_max_top_k: int | None
    plan_max_experts: int | None

    def fuses_routing(self, num_experts: int, top_k: int) -> bool:
        """Whether the fused routing kernel takes ``num_experts`` and ``top_k``."""
        return ((self.route_max_experts is None or num_experts <= self.route_max_experts)
                and (self.route_max_top_k is None or top_k <= self.route_max_top_k))

    def plans(self, num_experts: int) -> bool:
        """Whether the plan kernel takes ``num_experts``."""
        return self.plan_max_experts is None or num_experts <= self.plan_max_experts


TORCH = Limits(route_max_experts=None, route_max_top_k=None, plan_max_experts=None)
TRITON = Limits(route_max_experts=1024, route_max_top_k=None, plan_max_experts=1024)
CUDA = Limits(route_max_experts=512, route_max_top_k=32, plan_max_experts=4000)
LIMITS = {"torch": TORCH, "triton": TRITON, "cuda": CUDA}
