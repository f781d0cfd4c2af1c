"""The torch backend's decode paths on the CPU: a few slots, no sort.

At decode (``T * k`` slots, a handful) the matmuls are matrix-vector products bound by
reading each active expert's weights once, and with the caches cold between layers
(the rest of the model evicts them) the fixed cost of everything around them, the
dispatch plan, the gather into expert order and back, each torch call and each line of
Python, weighs as much as the matmuls. Two paths skip the plan entirely:

* ``"gather"``: small experts (at most ``GATHER_MAX_EXPERT_BYTES`` of w13 + w2 each) and
  at most ``GATHER_MAX_SLOTS`` slots: each slot's expert weights gathered with one
  ``index_select`` per weight, two ``bmm`` over the slots. No host read at all;
  differentiable (autograd through ``index_select`` and ``bmm``; the weights' gradient is
  an ``index_add`` in a fixed order on the CPU).
* ``"slot_order"``: larger experts, at most ``SLOT_ORDER_MAX_SLOTS`` slots, inference only
  (no autograd node is built): each slot a one-row segment in slot order, by the fastest
  form of :mod:`moe_kernels.segment_matmul`; one host read of the slots' experts.

Both keep the slots in slot order, so the combine is a ``[T, k, H]`` sum for token-major
routings (the plan's ``token_slots`` otherwise). :func:`experts_decode` picks the path
from static shapes and whether autograd is recording; :class:`TorchBackend.run` calls it
on the routing before any plan is built, :func:`experts_torch` on a plan it was given.
Measured cold on the default bench shapes: docs/PERFORMANCE.md ("CPU decode").
"""

from __future__ import annotations

import torch

from ..._checks import _compiling
from ...activations import apply_activation, apply_post_norm
from ...params import ExpertParams
from ...primitives import combine_slots
from ...segment_matmul import segment_form, segment_linear

__all__ = ["GATHER_MAX_SLOTS", "GATHER_MAX_EXPERT_BYTES", "SLOT_ORDER_MAX_SLOTS", "decode_path", "experts_decode"]

# Gathering copies each slot's weights once; a loop of per-expert matmuls costs ~6 torch
# calls per segment instead. Up to 16 slots and 128 KiB per expert the copy is cheaper.
GATHER_MAX_SLOTS = 16
GATHER_MAX_EXPERT_BYTES = 128 << 10
SLOT_ORDER_MAX_SLOTS = 8
# Tests pin "gather", "slot_order" or "segments" (the plan's grouped path) here.
_forced_path: str | None = None


def _records_grad(x: torch.Tensor, params: ExpertParams, slot_weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (
        x, params.w13, params.w2, params.b13, params.b2, slot_weight))


def decode_path(x: torch.Tensor, slots, params: ExpertParams) -> str | None:
    """``"gather"``, ``"slot_order"`` or ``None`` (the plan's grouped path) for ``slots``
    (a :class:`~moe_kernels.routing.Routing` or a plan) of ``x``, from static shapes."""
    s = slots.slot_token.shape[0]
    if params.quant is not None or s == 0:
        return None
    if _forced_path is not None:
        return None if _forced_path == "segments" else _forced_path
    if x.device.type != "cpu":
        return None
    if s <= GATHER_MAX_SLOTS:
        w13, w2 = params.w13, params.w2
        if (w13.shape[1] * w13.shape[2] + w2.shape[1] * w2.shape[2]) * w13.element_size() <= GATHER_MAX_EXPERT_BYTES:
            return "gather"
    if s <= SLOT_ORDER_MAX_SLOTS and not _compiling() and not _records_grad(x, params, slots.slot_weight):
        return "slot_order"
    return None


def experts_decode(x: torch.Tensor, slots, params: ExpertParams,
                   token_slots: torch.Tensor | None = None) -> torch.Tensor | None:
    """The experts on a decode path, or ``None`` when none applies: no path, or a routing
    that is not token-major and no ``token_slots`` table to combine with."""
    path = decode_path(x, slots, params)
    token_major = slots.top_k is not None and slots.max_slots_per_token == slots.top_k
    if path is None or (token_slots is None and not token_major):
        return None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y_slot = (_gathered if path == "gather" else _slot_order)(x, slots, params, acc)
    t, h = x.shape
    if token_major:
        return y_slot.view(t, slots.top_k, h).sum(dim=1).to(x.dtype)
    return combine_slots(y_slot, token_slots).to(x.dtype)


# --------------------------------------------------------------------------- gather

def _stored(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``w`` [E, N, K] in its storage's layout: itself, or ``[E, K, N]`` (and True) when
    stored transposed, so the gather copies contiguous rows."""
    if w.stride(-1) != 1 and w.stride(-2) == 1:
        return w.transpose(-2, -1), True
    return w, False


def _gathered_linear(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """``rows[s] @ w[ids[s]]^T + b[ids[s]]`` for every slot: [S, K] -> [S, N]."""
    ws, transposed = _stored(w)
    g = ws.index_select(0, ids)
    out = torch.bmm(rows.unsqueeze(1), g if transposed else g.transpose(1, 2)).squeeze(1)
    return out if b is None else out + b.index_select(0, ids)


def _gathered(x: torch.Tensor, slots, params: ExpertParams, acc: torch.dtype) -> torch.Tensor:
    """Weighted slot outputs [S, H] (in ``acc``). A dropped slot (expert ``E``) computes a
    zero row with expert ``E - 1`` and is selected away: selects, not multiplies, so inf
    in ``x`` or in that expert never becomes NaN, and its every gradient is exactly 0."""
    e = params.num_experts
    valid = (slots.slot_expert < e).unsqueeze(1)
    ids = slots.slot_expert.clamp(max=e - 1)
    rows = torch.where(valid, x.index_select(0, slots.slot_token), 0.0)
    hidden = apply_activation(_gathered_linear(rows, params.w13, params.b13, ids), params.activation,
                              params.interleaved)
    y = apply_post_norm(_gathered_linear(hidden, params.w2, params.b2, ids), params.post_norm)
    return torch.where(valid, y.to(acc), 0.0) * slots.slot_weight.to(acc).unsqueeze(1)


# --------------------------------------------------------------------------- slot order

def _slot_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """``a[s] @ w[ids[s]]^T + b[ids[s]]`` per slot as one-row segments; the rows of
    dropped slots (``ids[s] >= E``) are zero."""
    e = w.shape[0]
    out = a.new_empty(a.shape[0], w.shape[1]) if max(ids) < e else a.new_zeros(a.shape[0], w.shape[1])
    for s, ex in enumerate(ids):
        if ex < e:
            w_e = w[ex]
            segment_linear(out, a, w_e, None if b is None else b[ex], s, s + 1, segment_form(1, w_e))
    return out


def _slot_order(x: torch.Tensor, slots, params: ExpertParams, acc: torch.dtype) -> torch.Tensor:
    """Weighted slot outputs [S, H]: a dropped slot's rows stay zero (every activation
    maps a zero row to zero, and the post-expert norms do too), times its zero weight."""
    ids = slots.slot_expert.tolist()
    rows = x.index_select(0, slots.slot_token)
    hidden = apply_activation(_slot_linear(rows, params.w13, params.b13, ids), params.activation, params.interleaved)
    y = apply_post_norm(_slot_linear(hidden, params.w2, params.b2, ids), params.post_norm)
    return y.to(acc) * slots.slot_weight.to(acc).unsqueeze(1)
