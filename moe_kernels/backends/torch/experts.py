"""The torch backend's expert computation: sort by expert, one matmul per expert segment.

Pipeline: gather ``x`` rows into expert order (``x[slot_token[sorted_slot]]``) →
grouped matmul with W13 (:func:`moe_kernels.primitives.grouped_linear`) → activation →
grouped matmul with W2 → back to slot order → times the slot weight → per-token sum
(token-major routings: a ``[T, k, H]`` view summed over ``k``; others through the plan's
``token_slots`` table; a fixed-order sum either way: deterministic, no atomics).

The grouped matmul's method is picked by regime from static shapes
(:func:`moe_kernels.primitives.grouped_method`): on the CPU a loop over the *active*
experts while few can be active (small ``T``), each segment by the fastest library form
for its rows and weight (:mod:`moe_kernels.segment_matmul`), ``torch._grouped_mm`` over
the expert segments past that (feature-major at few rows per expert). The only host read
is the expert offsets (``E + 1`` ints, once per call, shared by both matmuls, as is the
list of non-empty segments); value checks belong to the API boundary (and to
``MOE_KERNELS_DEBUG=1``), never to this path. Under ``torch.compile`` the matmuls run as
opaque custom ops, so every method traces.

Calls on the CPU that need no plan skip it altogether (:mod:`.planless`, from
``TorchBackend.run``); given a plan, :func:`experts_torch` takes the same paths.

Backward: autograd through the gathers, the activation and the combine; the grouped
matmuls have an explicit backward (one matmul per expert and operand, fixed order). It
saves the gathered rows and both matmul inputs. Runs on any device; this is also the
CPU product.

Determinism: at a fixed thread count every output and gradient is bitwise the same
on every rerun (no atomics, each sum in a fixed order; tests/test_torch_regimes.py runs
2 threads). Across thread counts it is not: the matmul libraries split their reductions
by thread count, so changing ``torch.set_num_threads`` can change the last bits, the
router-weight gradient of a layer (a plain matmul) included.
"""

from __future__ import annotations

import torch

from ..._checks import _compiling
from ...activations import apply_activation, apply_post_norm
from ...params import ExpertParams
from ...plan import DispatchPlan
from ...primitives import active_segments, combine_slots, grouped_linear, grouped_method, zero_link
from .planless import experts_planless

__all__ = ["experts_torch"]


def experts_torch(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
    """``out[t] = sum over slots s of t of  w[s] * Expert_{e[s]}(x[t])`` with torch ops."""
    t, h = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if plan.num_slots == 0:
        out = x.new_zeros(t, h)
        link = zero_link(x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight)
        return out if link is None else out + link
    out = experts_planless(x, plan, params, plan.token_slots)
    if out is not None:
        return out
    src = plan.slot_token.index_select(0, plan.sorted_slot)
    # Backward of this gather sums the rows of a token's slots. index_select's backward
    # (index_add) does it with atomics on CUDA; advanced indexing's (index_put with
    # accumulate) sorts there instead, but runs parallel atomics on the CPU: take the
    # deterministic one on each device.
    rows = x[src.long()] if x.is_cuda else x.index_select(0, src)
    # One host read of the offsets (CPU: no device sync), shared by both matmuls.
    offsets = segs = m13 = m2 = None
    if x.device.type == "cpu" and not _compiling():
        offsets = plan.host_offsets if plan.host_offsets is not None else plan.expert_offsets.tolist()
        # The loop's pass over the E experts for the non-empty ones, also done once.
        m13 = grouped_method(rows, params.w13, plan.num_slots, plan.num_experts)
        segs = active_segments(offsets) if m13 == "loop" else None
    # The expert of each sorted row, for the biases of the grouped methods (one gather, shared).
    row_expert = (plan.slot_expert.index_select(0, plan.sorted_slot)
                  if offsets is not None and segs is None and (params.b13 is not None or params.b2 is not None) else None)
    h13 = grouped_linear(rows, params.w13, params.b13, plan, method=m13, offsets=offsets, segments=segs,
                         row_expert=row_expert)
    hidden = apply_activation(h13, params.activation, params.interleaved)
    if offsets is not None:
        m2 = grouped_method(hidden, params.w2, plan.num_slots, plan.num_experts)
        if m2 == "loop" and segs is None:
            segs = active_segments(offsets)
    y = apply_post_norm(grouped_linear(hidden, params.w2, params.b2, plan, method=m2, offsets=offsets,
                                       segments=segs, row_expert=row_expert), params.post_norm)
    y_slot = y.index_select(0, plan.slot_position).to(acc) * plan.slot_weight.to(acc).unsqueeze(1)
    k = plan.top_k
    if k is not None and plan.max_slots_per_token == k:
        # Token-major slots (s = t*k + j): a dropped slot's row is exactly 0 (zero row
        # times weight 0), so the plain sum over j equals combine_slots' sum in column order.
        return y_slot.view(t, k, h).sum(dim=1).to(x.dtype)
    return combine_slots(y_slot, plan.token_slots).to(x.dtype)
