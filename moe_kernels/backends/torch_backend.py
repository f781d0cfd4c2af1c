"""The fast pure-PyTorch backend: sort by expert, one matmul per expert segment.

Pipeline: gather ``x`` rows into expert order (``x[slot_token[sorted_slot]]``) →
grouped matmul with W13 (``torch._grouped_mm`` where it takes the operands: fp32/bf16
with 16-byte-aligned rows on the CPU, bf16 on sm_90+; else a loop over the non-empty
segments, which reads the counts on the host) → activation → grouped matmul with W2
→ back to slot order → times the slot weight → per-token sum through the plan's
``token_slots`` table (a gather and a fixed-order sum: deterministic, no atomics).
Backward is PyTorch autograd through these ops; it saves the gathered rows and both
matmul inputs. Runs on any device; this is also the CPU product.
"""

from __future__ import annotations

import torch

from ..activations import apply_activation
from ..params import ExpertParams
from ..plan import DispatchPlan
from .base import Backend


def combine_slots(y: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j y[token_slots[t, j]]`` over the entries ``>= 0``, summed in
    column order (deterministic). ``y`` [S, H] already weighted; returns [T, H]."""
    s, h = y.shape
    t, k = token_slots.shape
    pad = torch.cat([y, y.new_zeros(1, h)])
    idx = torch.where(token_slots < 0, torch.full_like(token_slots, s), token_slots).long()
    # Expert choice has K = E columns but only about S live entries: gathering all of
    # [T, K, H] at once would take E/capacity_factor times the memory of y, so gather a
    # few columns at a time (one step for top-k, Switch and dense, where T*K = S).
    step = k if t == 0 else max(1, -(-s // t))
    out = pad[idx[:, :step]].sum(dim=1)
    for j in range(step, k, step):
        out = out + pad[idx[:, j:j + step]].sum(dim=1)
    return out


def zero_link(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    """An exact 0-d zero that depends on each tensor that requires grad (a sum over an
    empty slice): keeps autograd connected, with zero gradients, when no slot reaches the
    matmuls. Unlike ``0 * x`` it stays 0 when ``x`` holds inf or NaN."""
    link = None
    for v in tensors:
        if v is not None and v.requires_grad:
            term = v.reshape(-1)[:0].sum()
            link = term if link is None else link + term
    return link


def _grouped_mm_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: on the CPU (fp32, bf16) it
    needs 16-byte-aligned row strides; on CUDA we use it for bf16 on sm_90+, where it is
    a real grouped kernel. It avoids the per-expert loop and its host sync."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.device.type == "cpu":
        if a.dtype not in (torch.float32, torch.bfloat16):
            return False
        size = a.element_size()
        return (a.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0 and w.stride(-1) in (1, w.shape[-2])
    return (a.is_cuda and a.dtype == torch.bfloat16
            and a.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0
            and torch.cuda.get_device_capability(a.device)[0] >= 9)


def grouped_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: DispatchPlan) -> torch.Tensor:
    """Rows of ``a`` [S, K] in expert order times ``w[e]^T`` ([E, N, K]) plus ``b[e]``;
    rows past the valid ones (dropped slots) come out zero. Returns [S, N]."""
    s = a.shape[0]
    e, n, _ = w.shape
    if _grouped_mm_ok(a, w):
        pos_expert = plan.slot_expert.long()[plan.sorted_slot.long()]
        valid = (pos_expert < e).unsqueeze(1)
        # _grouped_mm leaves rows past the last offset (dropped slots) unwritten, in its
        # output and in the gradient of ``a``: select them away on both sides (a select,
        # not a multiply, so garbage or inf there never becomes NaN).
        a = torch.where(valid, a, a.new_zeros(()))
        out = torch._grouped_mm(a, w.transpose(-2, -1), offs=plan.expert_offsets[1:])
        out = torch.where(valid, out, out.new_zeros(()))
        if b is not None:
            out = out + torch.where(valid, b[pos_expert.clamp(max=e - 1)], b.new_zeros(()))
        return out
    counts = plan.expert_counts.tolist()  # a host sync; the loop needs sizes
    pieces, start = [], 0
    for ex, c in enumerate(counts):
        if c:
            seg = a[start:start + c] @ w[ex].t()
            pieces.append(seg + b[ex] if b is not None else seg)
            start += c
    if start < s:
        pieces.append(a.new_zeros(s - start, n))
    out = torch.cat(pieces) if pieces else a.new_zeros(0, n)
    if start == 0:  # every slot dropped: nothing touched a, w or b
        link = zero_link(a, w, b)
        out = out if link is None else out + link
    return out


def experts_torch(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
    """The expert computation of the torch backend; same signature as every backend's."""
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
    y = grouped_linear(hidden, params.w2, params.b2, plan)
    y_slot = y.index_select(0, plan.slot_position.long()).to(acc) * plan.slot_weight.to(acc).unsqueeze(1)
    return combine_slots(y_slot, plan.token_slots).to(x.dtype)


class TorchBackend(Backend):
    name = "torch"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def experts(self, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
        return experts_torch(x, plan, params)
