"""Row permutation in CUDA (csrc/permute.cu): ``permute_rows`` gathers rows into expert
order, ``unpermute_rows`` weights and sums each token's rows back (fixed-order fp32, no
atomics), as custom ops with fake implementations, autograd and validation; and
:func:`experts_permuted`, the cuda backend's expert computation when Triton is missing.

Backward: permute's is ``unpermute_rows`` of the output gradient with unit weights (it
needs the op's ``slot_row`` / ``token_slots`` maps); unpermute's ``dy`` is a gather of
``w[s] * dout[t(s)]`` into each slot's row and ``dw[s] = <dout[t(s)], y[row(s)]>``.
"""

from typing import Optional

import torch

from ..._checks import FLOAT_DTYPES, check_tensor, value_checks_enabled
from ...activations import apply_activation
from ...plan import DispatchPlan
from ...primitives import grouped_linear
from . import twins
from .extension import _ACT_DTYPES, _DTYPE_CODE, _check_index, _check_same_device, _ext, _launch_args, _ptr

__all__ = ["permute_rows", "unpermute_rows", "experts_permuted"]


def _raise_on_bad_index(op: str, bad: torch.Tensor, what: str) -> None:
    """The kernels drop a row whose index is out of range and set ``bad``; reading it is
    a host sync, so it is read where value checks are on (MOE_KERNELS_DEBUG=1) and never
    inside CUDA-graph capture. Without checks the row is zero / the cell skipped, and
    the CUDA context survives (an unchecked index would be an illegal-address fault)."""
    if value_checks_enabled(bad) and not torch.cuda.is_current_stream_capturing() and int(bad.item()):
        raise ValueError(f"moe_kernels_cuda::{op}: {what}: expected indices in range, got an out-of-range index "
                         "(the kernel dropped its row)")


@torch.library.custom_op("moe_kernels_cuda::permute_rows", mutates_args=(), device_types="cuda")
def _permute_op(x: torch.Tensor, slot_token: torch.Tensor, row_slot: torch.Tensor, slot_row: Optional[torch.Tensor],
                token_slots: Optional[torch.Tensor]) -> torch.Tensor:
    ext = _ext("permute_rows")
    out = torch.empty(row_slot.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    bad = torch.zeros(1, dtype=torch.int32, device=x.device)
    ext.permute_rows(x.data_ptr(), slot_token.data_ptr(), row_slot.data_ptr(), out.data_ptr(), row_slot.shape[0],
                     x.shape[1], x.element_size(), slot_token.shape[0], x.shape[0], bad.data_ptr(), *_launch_args(x))
    _raise_on_bad_index("permute_rows", bad, "row_slot or slot_token")
    return out


_permute_op.register_kernel("cpu", twins.permute_rows)


@_permute_op.register_fake
def _(x, slot_token, row_slot, slot_row, token_slots):
    return x.new_empty(row_slot.shape[0], x.shape[1])


def _permute_setup(ctx, inputs, output):
    x, _, _, slot_row, token_slots = inputs
    ctx.x_shape = x.shape
    ctx.save_for_backward(slot_row, token_slots)


def _permute_backward(ctx, grad_out):
    slot_row, token_slots = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    if slot_row is None or token_slots is None:
        raise RuntimeError("moe_kernels_cuda::permute_rows: the backward needs slot_row and token_slots "
                           "(pass them to permute_rows when x requires grad)")
    ones = torch.ones(slot_row.shape[0], dtype=torch.float32, device=grad_out.device)
    dx = _unpermute_op(grad_out.contiguous(), slot_row, token_slots, ones)
    return dx, None, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("moe_kernels_cuda::unpermute_rows", mutates_args=(), device_types="cuda")
def _unpermute_op(y: torch.Tensor, slot_row: Optional[torch.Tensor], token_slots: torch.Tensor,
                  slot_weight: torch.Tensor) -> torch.Tensor:
    ext = _ext("unpermute_rows")
    t, k = token_slots.shape
    out = torch.empty(t, y.shape[1], dtype=y.dtype, device=y.device)
    bad = torch.zeros(1, dtype=torch.int32, device=y.device)
    ext.unpermute_rows(y.data_ptr(), _ptr(slot_row), token_slots.data_ptr(), slot_weight.data_ptr(), out.data_ptr(),
                       t, k, y.shape[1], _DTYPE_CODE[y.dtype], slot_weight.shape[0], y.shape[0], bad.data_ptr(),
                       *_launch_args(y))
    _raise_on_bad_index("unpermute_rows", bad, "token_slots or slot_row")
    return out


_unpermute_op.register_kernel("cpu", twins.unpermute_rows)


@_unpermute_op.register_fake
def _(y, slot_row, token_slots, slot_weight):
    return y.new_empty(token_slots.shape[0], y.shape[1])


def _unpermute_setup(ctx, inputs, output):
    y, slot_row, token_slots, slot_weight = inputs
    ctx.save_for_backward(y, slot_row, token_slots, slot_weight)


def _unpermute_backward(ctx, grad_out):
    y, slot_row, token_slots, w = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    r, s = y.shape[0], w.shape[0]
    t, k = token_slots.shape
    dev = y.device
    cells = token_slots.reshape(-1).long()
    listed = cells >= 0
    slot = torch.where(listed, cells, torch.full_like(cells, s))  # s: a dump entry
    token = torch.arange(t, device=dev).repeat_interleave(k)
    row_of = torch.arange(s, device=dev) if slot_row is None else slot_row.long()
    row = torch.cat([row_of, row_of.new_full((1,), r)])[slot]  # unlisted cells -> the dump row r
    # Listed slots own distinct rows, so these scatters write each kept entry once.
    slot_of_row = torch.full((r + 1,), s, dtype=torch.long, device=dev).scatter_(0, row, slot)[:r]
    token_of_slot = torch.zeros(s + 1, dtype=torch.long, device=dev).scatter_(0, slot, token)
    w_pad = torch.cat([w.float(), w.new_zeros(1, dtype=torch.float32)])
    g = grad_out.float()
    dy = (w_pad[slot_of_row].unsqueeze(1) * g[token_of_slot[slot_of_row]]).to(y.dtype)
    y_pad = torch.cat([y.float(), y.new_zeros(1, y.shape[1], dtype=torch.float32)])
    dots = (g[token] * y_pad[row]).sum(-1) * listed
    dw = torch.zeros(s + 1, dtype=torch.float32, device=dev).scatter_(0, slot, dots)[:s]
    return dy, None, None, dw


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def _check_rows(name: str, t: object) -> torch.Tensor:
    return check_tensor(name, t, ndim=2, dtypes=_ACT_DTYPES)


def permute_rows(x: torch.Tensor, slot_token: torch.Tensor, row_slot: torch.Tensor,
                 slot_row: Optional[torch.Tensor] = None, token_slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[r] = x[slot_token[row_slot[r]]]``, zero rows where ``row_slot[r] < 0``; x [T, H]
    fp32/fp16/bf16. ``slot_row`` [S] (slot -> its row of ``out``) and ``token_slots``
    [T, K] are only for the backward, which is ``unpermute_rows`` with unit weights: so
    every slot listed in ``token_slots`` must have ``row_slot[slot_row[s]] == s`` and
    the other rows must be ``-1``."""
    _check_rows("x", x)
    _check_index("slot_token", slot_token)
    _check_index("row_slot", row_slot)
    if slot_row is not None:
        _check_index("slot_row", slot_row)
        if slot_row.shape[0] != slot_token.shape[0]:
            raise ValueError(f"slot_row: expected {slot_token.shape[0]} slots like slot_token, got {slot_row.shape[0]}")
    if token_slots is not None:
        _check_index("token_slots", token_slots, ndim=2)
        if token_slots.shape[0] != x.shape[0]:
            raise ValueError(f"token_slots: expected {x.shape[0]} rows (tokens of x), got {tuple(token_slots.shape)}")
    if row_slot.shape[0] >= 2**31:
        raise ValueError(f"row_slot: expected fewer than 2^31 rows, got {row_slot.shape[0]}")
    _check_same_device("x", x, slot_token=slot_token, row_slot=row_slot, slot_row=slot_row, token_slots=token_slots)
    return _permute_op(x, slot_token, row_slot, slot_row, token_slots)


def unpermute_rows(y: torch.Tensor, slot_row: Optional[torch.Tensor], token_slots: torch.Tensor,
                   slot_weight: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j w[s_j] * y[slot_row[s_j]]`` over ``s_j = token_slots[t, j] >= 0``
    (``slot_row`` None: row ``s_j``); fp32 accumulation in column order, deterministic.
    y [R, H] fp32/fp16/bf16, slot_weight [S] (any float dtype, used as fp32).
    Differentiable in ``y`` and ``slot_weight``; ``slot_row`` must not map two listed
    slots to one row."""
    _check_rows("y", y)
    _check_index("token_slots", token_slots, ndim=2)
    check_tensor("slot_weight", slot_weight, ndim=1,
                 dtypes=FLOAT_DTYPES, contiguous=False)
    if slot_row is not None:
        _check_index("slot_row", slot_row)
        if slot_row.shape[0] != slot_weight.shape[0]:
            raise ValueError(f"slot_row: expected {slot_weight.shape[0]} slots like slot_weight, "
                             f"got {slot_row.shape[0]}")
    elif y.shape[0] < slot_weight.shape[0]:
        raise ValueError(f"y: without slot_row, expected a row per slot ({slot_weight.shape[0]}), got {y.shape[0]}")
    if token_slots.shape[1] < 1:
        raise ValueError(f"token_slots: expected at least one column, got shape {tuple(token_slots.shape)}")
    _check_same_device("y", y, slot_row=slot_row, token_slots=token_slots, slot_weight=slot_weight)
    return _unpermute_op(y, slot_row, token_slots, slot_weight.float().contiguous())


# Keep the module's constants in step with the extension it loaded.

def experts_permuted(x: torch.Tensor, plan: DispatchPlan, params) -> torch.Tensor:
    """The experts without Triton: ``permute_rows`` into expert order, the grouped
    matmuls of :func:`moe_kernels.primitives.grouped_linear`, ``unpermute_rows`` back.
    Runs on any device (the ops' CPU kernels are the twins), which is how the CPU tests
    check it."""
    # Rows of dropped slots (sorted positions >= V) stay zero: grouped_linear ignores
    # them, and the backward (through token_slots) never visits them.
    valid = torch.arange(plan.num_slots, device=x.device) < plan.expert_offsets[plan.num_experts]
    row_slot = torch.where(valid, plan.sorted_slot, torch.full_like(plan.sorted_slot, -1))
    rows = permute_rows(x, plan.slot_token, row_slot, plan.slot_position, plan.token_slots)
    h13 = grouped_linear(rows, params.w13, params.b13, plan)
    hidden = apply_activation(h13, params.activation, params.interleaved)
    y = grouped_linear(hidden, params.w2, params.b2, plan)
    return unpermute_rows(y, plan.slot_position, plan.token_slots, plan.slot_weight)
