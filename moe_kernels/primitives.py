"""Pieces every backend shares, written once: the per-token combine, autograd links for
empty work, the grouped matmul over expert segments, and the glue from a fused top-k
routing kernel's ids and weights to a :class:`~moe_kernels.routing.Routing`.

Core module: imports only the core (routing, plan), never a backend; backends import
it downward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import _compiling
from .plan import DispatchPlan
from .routing import Routing, topk_load_balancing_loss
from .segment_matmul import FM_MAX_ROWS, segment_form, segment_linear

__all__ = ["combine_slots", "zero_link", "grouped_linear", "grouped_method", "grouped_mm_rows", "active_segments", "TopkArgs", "fused_topk_args", "routing_from_topk"]


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


# On the CPU the torch backend picks its grouped-matmul method by regime. A Python loop
# over the *active* experts costs a few microseconds of dispatch per expert but touches
# only their weights; torch._grouped_mm runs one C++ mm per expert, empty or not, with
# no Python per expert. Measured on the default bench shapes (docs/PERFORMANCE.md): with
# up to 8 possibly-active experts (min(S, E), known from the shapes alone) the loop is as
# fast or faster, from 32 on grouped_mm is; the cut sits between.
LOOP_MAX_SEGMENTS = 24
GROUPED_METHODS = ("loop", "grouped_mm", "grouped_mm_fm")
# Tests pin a method here to cover every path the dispatcher can choose.
_forced_method: str | None = None


def _grouped_mm_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands (forward and backward): on the
    CPU (fp32, bf16) it needs 16-byte-aligned rows in ``a`` and both dims of ``w``; on
    CUDA we use it for bf16 on sm_90+, where it is a real grouped kernel (no per-expert
    loop, no host sync)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.device.type == "cpu":
        if a.dtype is not torch.float32 and a.dtype is not torch.bfloat16:
            return False
        size = a.element_size()
        return ((a.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0
                and (w.shape[-1] * size) % 16 == 0 and w.stride(-1) in (1, w.shape[-2]))
    return (a.is_cuda and a.dtype == torch.bfloat16
            and a.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0
            and torch.cuda.get_device_capability(a.device)[0] >= 9)


def grouped_method(a: torch.Tensor, w: torch.Tensor, num_slots: int, num_experts: int) -> str:
    """``"loop"``, ``"grouped_mm"`` or ``"grouped_mm_fm"`` (CPU float32, at most
    ``FM_MAX_ROWS`` rows per expert on average: the feature-major orientation) for rows
    ``a`` [S, K] and weights ``w`` [E, N, K], from static shapes only (the same choice in
    eager and under ``torch.compile``)."""
    if _forced_method is not None:
        if _forced_method == "loop" or not _grouped_mm_ok(a, w):
            return "loop"
        if _forced_method == "grouped_mm_fm" and (a.device.type != "cpu" or w.stride(-1) != 1):
            return "grouped_mm"
        return _forced_method
    if not _grouped_mm_ok(a, w):
        return "loop"
    if a.device.type != "cpu":
        return "grouped_mm"
    if min(num_slots, num_experts) <= LOOP_MAX_SEGMENTS:
        return "loop"
    # Few rows per expert: the feature-major orientation (see segment_matmul) in the same C++ loop.
    if a.dtype is torch.float32 and w.stride(-1) == 1 and num_slots <= FM_MAX_ROWS * num_experts:
        return "grouped_mm_fm"
    return "grouped_mm"


def active_segments(offs: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, lo, hi)`` of each non-empty segment (a Python pass over ``E``: with
    ``E = 256`` worth computing once per layer call, see :func:`grouped_linear`)."""
    return [(ex, offs[ex], offs[ex + 1]) for ex in range(len(offs) - 1) if offs[ex + 1] > offs[ex]]


def _bias_rows(b, offs_t, v: int, row_expert):
    """``b[e]`` for each of the ``v`` valid sorted rows: ``row_expert`` when the caller has
    it (one gather), else expanded from the offsets."""
    if row_expert is not None:
        return b.index_select(0, row_expert[:v])
    counts = offs_t[1:] - offs_t[:-1]
    pos = torch.repeat_interleave(torch.arange(b.shape[0], device=b.device), counts, output_size=v)
    return b.index_select(0, pos)


def grouped_mm_rows(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, offs_t: torch.Tensor, v: int,
                    method: str, row_expert: torch.Tensor | None = None) -> torch.Tensor:
    """``torch._grouped_mm`` of sorted rows ``a`` [S, K] with ``w`` [E, N, K] over the
    expert segments ``offs_t`` [E+1] (``v = offs_t[E]`` valid rows, read by the caller),
    plus ``b[e]``; rows ``>= v`` zero. ``method`` ``"grouped_mm"`` (token-major) or
    ``"grouped_mm_fm"`` (feature-major: ``[N, S] = w[e] @ a^T`` per segment, the weight
    as the 3-D operand, returned as its ``[S, N]`` transposed view)."""
    s = a.shape[0]
    if method == "grouped_mm_fm":
        out_t = torch._grouped_mm(w, a.t(), offs=offs_t[1:])
        if b is not None and v:
            (out_t if v == s else out_t[:, :v]).add_(_bias_rows(b, offs_t, v, row_expert).t())
        if v < s:
            out_t[:, v:] = 0
        return out_t.t()
    out = torch._grouped_mm(a, w.transpose(-2, -1), offs=offs_t[1:])
    if b is not None and v:
        # add_ on the view: `out[:v] += ...` would also copy the sum onto itself.
        (out if v == s else out[:v]).add_(_bias_rows(b, offs_t, v, row_expert))
    if v < s:
        out[v:] = 0  # rows of dropped slots: left unwritten
    return out


def _fwd_impl(a, w, b, offs_t, offs: list[int], method: str, segs=None, row_expert=None) -> torch.Tensor:
    """``out[r] = a[r] @ w[e]^T + b[e]`` for row ``r`` of segment ``e``; rows ``>= V`` zero."""
    s, n, v = a.shape[0], w.shape[1], offs[-1]
    if method.startswith("grouped_mm"):
        return grouped_mm_rows(a, w, b, offs_t, v, method, row_expert)
    out = a.new_empty(s, n)
    segs = segs if segs is not None else active_segments(offs)
    forms = [segment_form(hi - lo, w[ex]) for ex, lo, hi in segs]
    fm_rows = max((hi - lo for (_, lo, hi), f in zip(segs, forms) if f == "fm"), default=0)
    scratch = a.new_empty(n, fm_rows) if fm_rows else None
    for (ex, lo, hi), form in zip(segs, forms):
        segment_linear(out, a, w[ex], None if b is None else b[ex], lo, hi, form, scratch)
    if v < s:
        out[v:] = 0  # rows of dropped slots: unwritten by either method
    return out


def _bwd_impl(g, a, w, has_bias: bool, offs_t, offs: list[int], method: str, need_w: bool = True, segs=None):
    """Gradients of :func:`_fwd_impl`: one matmul (or row sum) per expert and per
    operand, each element reduced in a fixed order (no atomics: bitwise repeatable).
    ``need_w=False`` (frozen experts): only the gradient of ``a``."""
    if not need_w:
        has_bias = False
    s, k = a.shape
    e, n, _ = w.shape
    v = offs[-1]
    # Weights stored transposed ([E, K, N], GPT-OSS): write their gradient in that layout
    # (a^T g per expert), so autograd accumulates it without a strided copy.
    stored_t = w.stride(-2) == 1 and w.stride(-1) != 1
    if method.startswith("grouped_mm"):
        ga = torch._grouped_mm(g, w, offs=offs_t[1:])
        if v < s:
            ga[v:] = 0
        if not need_w:
            return ga, None, None
        gt = g.t()
        gw = (torch._grouped_mm(a.t(), g, offs=offs_t[1:]).transpose(-2, -1) if stored_t
              else torch._grouped_mm(gt, a, offs=offs_t[1:]))
        gb = torch._grouped_mm(gt, g.new_ones(s, 16 // g.element_size()), offs=offs_t[1:])[..., 0] if has_bias else None
        empty = [ex for ex in range(e) if offs[ex + 1] == offs[ex]]
        if empty:  # no rows: no mm ran for these experts
            idx = torch.tensor(empty, device=g.device)
            gw.index_fill_(0, idx, 0)
            if gb is not None:
                gb.index_fill_(0, idx, 0)
        return ga, gw, gb
    ga = g.new_zeros(s, k)
    if segs is None:
        segs = active_segments(offs)
    if not need_w:
        for ex, lo, hi in segs:
            torch.mm(g[lo:hi], w[ex], out=ga[lo:hi])
        return ga, None, None
    gw = w.new_zeros(e, k, n).transpose(-2, -1) if stored_t else w.new_zeros(e, n, k)
    gb = w.new_zeros(e, n) if has_bias else None
    for ex, lo, hi in segs:
        torch.mm(g[lo:hi], w[ex], out=ga[lo:hi])
        if stored_t:
            torch.mm(a[lo:hi].t(), g[lo:hi], out=gw[ex].t())
        else:
            torch.mm(g[lo:hi].t(), a[lo:hi], out=gw[ex])
        if gb is not None:
            torch.sum(g[lo:hi], 0, out=gb[ex])
    return ga, gw, gb


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w, b, offs_t, offs, method, segs, row_expert):
        ctx.save_for_backward(a, w, offs_t)
        ctx.offs, ctx.method, ctx.has_bias, ctx.segs = offs, method, b is not None, segs
        return _fwd_impl(a, w, b, offs_t, offs, method, segs, row_expert)

    @staticmethod
    def backward(ctx, g):
        a, w, offs_t = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
        ga, gw, gb = _bwd_impl(g.contiguous(), a, w, ctx.has_bias, offs_t, ctx.offs, ctx.method, need_w, ctx.segs)
        return ga, gw, gb, None, None, None, None, None


# Under torch.compile the same two functions run as opaque custom ops: the loop's host
# read of the offsets and torch._grouped_mm's CPU float32 path (its fake kernel accepts
# bf16 only) would otherwise break the graph or fail to trace.
@torch.library.custom_op("moe_kernels::grouped_linear_fwd", mutates_args=())
def _grouped_linear_op(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, offs_t: torch.Tensor,
                       method: str) -> torch.Tensor:
    return _fwd_impl(a, w, b, offs_t, offs_t.tolist(), method).contiguous()  # the fake's strides


@_grouped_linear_op.register_fake
def _(a, w, b, offs_t, method):
    return a.new_empty(a.shape[0], w.shape[1])


@torch.library.custom_op("moe_kernels::grouped_linear_bwd", mutates_args=())
def _grouped_linear_bwd_op(g: torch.Tensor, a: torch.Tensor, w: torch.Tensor, has_bias: bool, offs_t: torch.Tensor,
                           method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ga, gw, gb = _bwd_impl(g.contiguous(), a, w, has_bias, offs_t, offs_t.tolist(), method)
    return ga, gw.contiguous(), (gb if gb is not None else w.new_zeros(0))  # strides as the fake's


@_grouped_linear_bwd_op.register_fake
def _(g, a, w, has_bias, offs_t, method):
    e, n, k = w.shape
    return a.new_empty(a.shape), w.new_empty(e, n, k), w.new_empty((e, n) if has_bias else (0,))


def _op_setup(ctx, inputs, output):
    a, w, b, offs_t, method = inputs
    ctx.save_for_backward(a, w, offs_t)
    ctx.method, ctx.has_bias = method, b is not None


def _op_backward(ctx, g):
    a, w, offs_t = ctx.saved_tensors
    ga, gw, gb = _grouped_linear_bwd_op(g, a, w, ctx.has_bias, offs_t, ctx.method)
    return ga, gw, (gb if ctx.has_bias else None), None, None


_grouped_linear_op.register_autograd(_op_backward, setup_context=_op_setup)


def grouped_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: DispatchPlan, *,
                   method: str | None = None, offsets: list[int] | None = None,
                   segments: list[tuple[int, int, int]] | None = None,
                   row_expert: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``a`` [S, K] in expert order times ``w[e]^T`` ([E, N, K]) plus ``b[e]``;
    rows past the valid ones (dropped slots) come out zero. Returns [S, N].

    ``method`` (default :func:`grouped_method`): ``"loop"``, one matmul per *active*
    expert (reads the offsets on the host once: pass them as ``offsets`` to share one
    read between calls; ``segments``, :func:`active_segments` of them, shares the pass
    over the experts too), or ``"grouped_mm"`` / ``"grouped_mm_fm"``, ``torch._grouped_mm``
    over every expert (``row_expert``, the expert of each sorted row, shares the bias
    rows' index between calls).
    Backward is explicit (one matmul per expert and operand): deterministic, and no
    whole-weight temporaries per expert."""
    method = method or grouped_method(a, w, plan.num_slots, plan.num_experts)
    if a.device.type != "cpu":
        return _grouped_device(a, w, b, plan) if method == "grouped_mm" else _loop_autograd(a, w, b, plan)
    offs_t = plan.expert_offsets
    if not a.is_contiguous():  # a feature-major result of the previous matmul: every form (and backward) wants rows
        a = a.contiguous()
    if _compiling():
        return _grouped_linear_op(a, w, b, offs_t, method)
    offs = offsets if offsets is not None else offs_t.tolist()
    if torch.is_grad_enabled() and (a.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _GroupedLinear.apply(a, w, b, offs_t, offs, method, segments, row_expert)
    return _fwd_impl(a, w, b, offs_t, offs, method, segments, row_expert)  # inference: no autograd node to build


def _grouped_device(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: DispatchPlan) -> torch.Tensor:
    """``torch._grouped_mm`` on a GPU with no host sync: valid rows found on the device."""
    e = w.shape[0]
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


def _loop_autograd(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: DispatchPlan) -> torch.Tensor:
    """The GPU fallback (no grouped kernel for these operands): autograd through a loop
    over the non-empty segments, after one host sync for their sizes."""
    s = a.shape[0]
    e, n, _ = w.shape
    counts = plan.expert_counts.tolist()
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
