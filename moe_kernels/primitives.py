"""Pieces every backend shares, written once: the per-token combine, autograd links for
empty work, the grouped matmul over expert segments, and the glue from a fused top-k
routing kernel's ids and weights to a :class:`~moe_kernels.routing.Routing`.

Core module: imports only the core (routing, plan), never a backend; backends import
it downward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import DispatchPlan
from .routing import Routing, topk_load_balancing_loss

__all__ = ["combine_slots", "zero_link", "grouped_linear", "TopkArgs", "fused_topk_args", "routing_from_topk"]


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


# --------------------------------------------------------------------------- fused top-k routing glue

FUSED_TOPK_ROUTERS = ("softmax_topk", "grouped_sigmoid_topk")
_TOPK_OPTIONS = {
    "softmax_topk": frozenset({"top_k", "renormalize"}),
    "grouped_sigmoid_topk": frozenset({"top_k", "renormalize", "bias", "n_group", "topk_group",
                                       "routed_scaling_factor"}),
}


@dataclass(frozen=True)
class TopkArgs:
    """The options of a router that a fused top-k kernel implements, with defaults
    filled in: softmax top-k (``bias`` None, one group, scale 1) or DeepSeek-V3's grouped
    sigmoid. Validation stays with the kernels' wrappers (they name the argument)."""

    router: str
    top_k: int
    renormalize: bool = True
    bias: torch.Tensor | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    @property
    def sigmoid(self) -> bool:
        return self.router == "grouped_sigmoid_topk"


def fused_topk_args(router: str, options: dict) -> TopkArgs | None:
    """``options`` of ``router`` as :class:`TopkArgs`, or ``None`` when a fused top-k
    kernel does not implement this router or one of these options (the caller then runs
    the pure-PyTorch router, which names what is wrong)."""
    allowed = _TOPK_OPTIONS.get(router)
    if allowed is None or "top_k" not in options or not allowed.issuperset(options):
        return None
    return TopkArgs(router=router, **options)


def _balance_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # The only torch compute next to a fused router's kernels (the launch-count test hooks it).
    return topk_load_balancing_loss(torch.softmax(logits.float(), dim=-1), ids.clamp(max=logits.shape[1] - 1))


def routing_from_topk(logits: torch.Tensor, args: TopkArgs, ids: torch.Tensor, weights: torch.Tensor,
                      slot_token: torch.Tensor | None = None) -> Routing:
    """A token-major :class:`Routing` from a fused kernel's ``ids`` and ``weights`` [T, k],
    with the losses the pure-PyTorch router reports: softmax top-k's ``load_balancing``
    (from the softmax of ``logits``: the kernels return no probabilities), none for the
    grouped sigmoid (auxiliary-loss-free balancing). Ids equal to ``E`` (a row the
    kernel dropped for non-finite scores) are clamped into range for the loss only: that
    row's probabilities are NaN, so the loss is NaN either way, while an index past ``E``
    would be an out-of-bounds scatter."""
    t, e = logits.shape
    k = args.top_k
    losses = {"load_balancing": _balance_loss(logits, ids.reshape(t, k))} if (t and not args.sigmoid) else {}
    if slot_token is None:
        slot_token = torch.arange(t, device=logits.device, dtype=torch.int32).repeat_interleave(k)
    return Routing(slot_token, ids.reshape(-1), weights.reshape(-1), t, e, k, top_k=k, losses=losses)
