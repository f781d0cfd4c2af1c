"""The torch backend's expert computation: sort by expert, one matmul per expert segment.

Pipeline: gather ``x`` rows into expert order (``x[slot_token[sorted_slot]]``) →
grouped matmul with W13 (:func:`moe_kernels.primitives.grouped_linear`:
``torch._grouped_mm`` where it takes the operands, else a loop over the non-empty
segments) → activation → grouped matmul with W2 → back to slot order → times the slot
weight → per-token sum through the plan's ``token_slots`` table (a gather and a
fixed-order sum: deterministic, no atomics). Backward is PyTorch autograd through these
ops; it saves the gathered rows and both matmul inputs. Runs on any device; this is
also the CPU product.
"""

from __future__ import annotations

import torch

from ...activations import apply_activation, apply_post_norm
from ...params import ExpertParams
from ...plan import DispatchPlan
from ...primitives import combine_slots, grouped_linear, zero_link

__all__ = ["experts_torch"]


def experts_torch(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
    """``out[t] = sum over slots s of t of  w[s] * Expert_{e[s]}(x[t])`` with torch ops."""
    t, h = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if plan.num_slots == 0:
        out = x.new_zeros(t, h)
        link = zero_link(x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight)
        return out if link is None else out + link
    src = plan.slot_token.index_select(0, plan.sorted_slot).long()
    # Backward of this gather sums the rows of a token's slots. index_select's backward
    # (index_add) does it with atomics on CUDA; advanced indexing's (index_put with
    # accumulate) sorts there instead, but runs parallel atomics on the CPU: take the
    # deterministic one on each device.
    rows = x[src] if x.is_cuda else x.index_select(0, src)
    h13 = grouped_linear(rows, params.w13, params.b13, plan)
    hidden = apply_activation(h13, params.activation, params.interleaved)
    y = apply_post_norm(grouped_linear(hidden, params.w2, params.b2, plan), params.post_norm)
    y_slot = y.index_select(0, plan.slot_position.long()).to(acc) * plan.slot_weight.to(acc).unsqueeze(1)
    return combine_slots(y_slot, plan.token_slots).to(x.dtype)
