"""Fused top-k routing: router logits [T, E] → expert ids, weights, per-expert counts.

Pipeline (forward, ONE kernel launch ``_topk_route_fwd_kernel``): each program loads a
``[BLOCK_T, E]`` tile of logits, computes the scores in float32 (softmax, or sigmoid +
selection bias + DeepSeek-V3 group masking), picks the ``k`` best by ``k`` rounds of
"max, then the lowest column holding it" (exactly ``torch.topk``'s tie rule on the CPU:
lowest expert index first), renormalises and scales the weights, and writes ids
``[T, k]`` int32, weights ``[T, k]`` float32, the slot→token map ``[T*k]`` int32 (so a
:class:`~moe_kernels.routing.Routing` needs no further op) and the per-expert token
counts ``[E]`` int32. Counts: when one program covers all tokens (``T <= BLOCK_T``,
decode) it stores them directly; otherwise each program adds its tile's histogram with
integer atomics into a buffer zeroed by ``torch.zeros`` (a second launch, the fill).
Integer atomics are exact, so the counts are deterministic either way. The dispatch
plan does not read these counts (it recounts inside its own single launch), so
:func:`route_fused` skips them and is always one launch.

Ids equal the pure-PyTorch routers' on exact ties; two scores within rounding error of
each other (a few ulps: Triton's ``exp`` is not torch's) may be ranked differently.
A row whose scores hold a NaN (NaN logits, or +inf under softmax: the public API
rejects them where it can check, i.e. on the CPU, but a GPU run does not sync to look)
is dropped: every one of its ids is ``E`` (never more, the :class:`Routing` invariant)
with weight 0, it adds no counts and gets a zero gradient.

Backward (``_topk_route_bwd_kernel``, one launch): the gradient reaches the logits
through the weights only (ids carry none, the selection bias is detached). Saved for
backward: the logits and the ids; the kernel recomputes the scores from the logits and
writes every element of ``dlogits`` [T, E] (zero where the expert was not chosen, for
sigmoid and renormalised softmax):

* softmax, renormalised: ``q = softmax over the chosen logits``, ``w = c*q``:
  ``dx = c * q * (g - sum_j q_j g_j)`` on the chosen, 0 elsewhere;
* softmax, not renormalised: ``dx = c * p * (G - sum_e p_e G_e)`` (``G`` = ``g``
  scattered to the chosen experts, 0 elsewhere);
* sigmoid: ``w_j = c*s_j/Z`` with ``Z = sum s_chosen + 1e-20`` (or ``w_j = c*s_j``):
  ``dL/ds_j = (c g_j - sum_l g_l w_l) / Z``, ``dx_j = dL/ds_j * s_j (1 - s_j)``.

Both kernels are wrapped as ``torch.library`` custom ops (``moe_kernels::topk_route`` and
``moe_kernels::topk_route_backward``) with fake implementations, so ``torch.compile``
traces through them; autograd is registered on the forward op.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import routing as _ref
from ..._checks import check_finite, check_int, check_positive_float, check_tensor
from ...routing import Routing, check_grouped_options
from ...limits import TRITON
from ...primitives import FUSED_TOPK_ROUTERS, TopkArgs, routing_from_topk
from . import check_device, on_device

__all__ = ["fused_topk", "fused_topk_torch", "route_fused"]
_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Allocation hook: tests replace it to pre-fill outputs with poison (every element of
# every output must be written by the kernel).
_empty = torch.empty


# --------------------------------------------------------------------------- kernels


@triton.jit
def _topk_route_fwd_kernel(
    logits_ptr,  # [T, E] router logits (fp32/fp16/bf16), strides (stride_t, stride_e)
    bias_ptr,  # [E] selection bias (HAS_BIAS only), any float dtype, stride stride_b
    ids_ptr,  # [T, TOP_K] int32 out, contiguous
    w_ptr,  # [T, TOP_K] float32 out, contiguous
    token_ptr,  # [T * TOP_K] int32 out: the token of slot t*TOP_K + j (= t)
    counts_ptr,  # [E] int32 out: slots per expert (zeroed by the caller when ATOMIC_COUNT)
    T, E, stride_t, stride_e, stride_b, per_group, scale,
    TOP_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    COUNT: tl.constexpr, ATOMIC_COUNT: tl.constexpr,
):
    NEG: tl.constexpr = float("-inf")
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, K_POW2)
    rmask = rows < T
    cmask = cols < E
    rows64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :] * stride_e,
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)

    if SIGMOID:
        score = tl.sigmoid(x)
        choice = score
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols * stride_b, mask=cmask, other=0.0).to(tl.float32)
            choice = score + b[None, :]
        choice = tl.where(cmask[None, :], choice, NEG)
        if N_GROUP > 1:
            # Every column carries its group's score (sum of the group's two best
            # choices), so group selection is the same argmax loop as expert selection.
            group = cols // per_group
            gscore = tl.full([BLOCK_T, BLOCK_E], NEG, tl.float32)
            for g in range(N_GROUP):
                ing = ((group == g) & cmask)[None, :]
                cg = tl.where(ing, choice, NEG)
                top1 = tl.max(cg, 1)
                first = tl.min(tl.where(cg == top1[:, None], cols[None, :], BLOCK_E), 1)
                top2 = tl.max(tl.where(cols[None, :] == first[:, None], NEG, cg), 1)
                gs = tl.where(per_group > 1, top1 + top2, top1)
                gscore = tl.where(ing, gs[:, None], gscore)
            keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
            for _ in range(TOPK_GROUP):
                gcand = tl.where(keep, NEG, gscore)
                best = tl.max(gcand, 1)
                # lowest column holding the best score lies in the lowest such group
                bcol = tl.min(tl.where(gcand == best[:, None], cols[None, :], BLOCK_E), 1)
                keep = keep | (group[None, :] == (bcol // per_group)[:, None])
            choice = tl.where(keep, choice, NEG)
    else:
        xm = tl.where(cmask[None, :], x, NEG)
        ex = tl.exp(xm - tl.max(xm, 1)[:, None])
        score = ex / tl.sum(ex, 1)[:, None]
        choice = tl.where(cmask[None, :], score, NEG)

    taken = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    ids_t = tl.zeros([BLOCK_T, K_POW2], dtype=tl.int32)
    w_t = tl.zeros([BLOCK_T, K_POW2], dtype=tl.float32)
    for j in range(TOP_K):
        cand = tl.where(taken, NEG, choice)
        best = tl.max(cand, 1)
        idx = tl.min(tl.where(cand == best[:, None], cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == idx[:, None]
        taken = taken | hit
        wj = tl.sum(tl.where(hit, score, 0.0), 1)
        ids_t = tl.where(kcols[None, :] == j, idx[:, None], ids_t)
        w_t = tl.where(kcols[None, :] == j, wj[:, None], w_t)

    if RENORM:
        if SIGMOID:
            w_t = w_t / (tl.sum(w_t, 1)[:, None] + 1e-20)
        else:
            w_t = w_t / tl.sum(w_t, 1)[:, None]
    w_t = w_t * scale
    # A row with a NaN score (a NaN logit; +inf under softmax) has no ranking: the
    # argmax finds no column holding the (NaN-ignoring) max, or only padding columns,
    # and would write ids >= E. Such a row is dropped instead: ids E (the Routing
    # sentinel), weights 0, no counts. One row sum (NaN iff a score is) after the loop,
    # the score tile's last use: a check next to the softmax spilled registers (E=256).
    chk = tl.sum(tl.where(cmask[None, :], score, 0.0), 1)
    bad = (chk != chk) | (tl.max(ids_t, 1) >= E)
    ids_t = tl.where(bad[:, None], E, ids_t)
    w_t = tl.where(bad[:, None], 0.0, w_t)
    taken = taken & ~bad[:, None]

    omask = rmask[:, None] & (kcols < TOP_K)[None, :]
    optr = rows64[:, None] * TOP_K + kcols[None, :]
    tl.store(ids_ptr + optr, ids_t, mask=omask)
    tl.store(w_ptr + optr, w_t, mask=omask)
    tl.store(token_ptr + optr, tl.broadcast_to(rows[:, None], [BLOCK_T, K_POW2]), mask=omask)
    if COUNT:
        cnt = tl.sum((taken & rmask[:, None]).to(tl.int32), 0)
        if ATOMIC_COUNT:
            tl.atomic_add(counts_ptr + cols, cnt, mask=cmask & (cnt > 0), sem="relaxed")
        else:
            tl.store(counts_ptr + cols, cnt, mask=cmask)


@triton.jit
def _topk_route_bwd_kernel(
    logits_ptr,  # [T, E] saved router logits, strides (stride_t, stride_e)
    ids_ptr,  # [T, TOP_K] int32 saved expert ids, contiguous
    gw_ptr,  # [T, TOP_K] gradient of the weights, any float dtype, strides (stride_gt, stride_gk)
    dx_ptr,  # [T, E] out: gradient of the logits (logits' dtype), contiguous
    T, E, stride_t, stride_e, stride_gt, stride_gk, scale,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    rows64 = rows.to(tl.int64)
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :] * stride_e, mask=m2, other=0.0).to(tl.float32)

    g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)  # dL/dw scattered to the chosen experts
    sel = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    for j in range(TOP_K):
        idj = tl.load(ids_ptr + rows64 * TOP_K + j, mask=rmask, other=-1)
        gj = tl.load(gw_ptr + rows64 * stride_gt + j * stride_gk, mask=rmask, other=0.0).to(tl.float32)
        hit = (cols[None, :] == idj[:, None]) & cmask[None, :]
        g = tl.where(hit, gj[:, None], g)
        sel = sel | hit
    # A dropped row (the forward's NaN rows: every id is E) has constant zero weights.
    live = tl.sum(sel.to(tl.int32), 1) > 0

    if SIGMOID:
        s = tl.sigmoid(x)
        if RENORM:
            z = tl.sum(tl.where(sel, s, 0.0), 1) + 1e-20
            gw = tl.sum(tl.where(sel, g * s, 0.0), 1) * scale / z  # sum_j g_j w_j
            ds = (g * scale - gw[:, None]) / z[:, None]
        else:
            ds = g * scale
        dx = tl.where(sel, ds * s * (1.0 - s), 0.0)
    else:
        xm = tl.where(cmask[None, :], x, float("-inf"))
        ex = tl.exp(xm - tl.max(xm, 1)[:, None])
        if RENORM:
            ex = tl.where(sel, ex, 0.0)
        denom = tl.sum(ex, 1)
        p = ex / tl.where(denom > 0, denom, 1.0)[:, None]  # 0 only in the masked rows
        dx = scale * p * (g - tl.sum(p * g, 1)[:, None])
    dx = tl.where(live[:, None], dx, 0.0)
    tl.store(dx_ptr + rows64[:, None] * E + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------- launchers


def _blocks(num_experts: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps), keyed on E only: a tile of about 4K scores."""
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_t = max(1, min(64, 4096 // block_e))
    return block_t, block_e, 4 if block_t * block_e <= 2048 else 8


def _launch_fwd(logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scale, count):
    t, e = logits.shape
    dev = logits.device
    block_t, block_e, warps = _blocks(e)
    grid = (triton.cdiv(t, block_t),)
    atomic = count and grid[0] > 1
    ids = _empty((t, top_k), dtype=torch.int32, device=dev)
    w = _empty((t, top_k), dtype=torch.float32, device=dev)
    tok = _empty((t * top_k,), dtype=torch.int32, device=dev)
    if not count:
        counts = _empty((0,), dtype=torch.int32, device=dev)
    elif atomic:
        counts = torch.zeros((e,), dtype=torch.int32, device=dev)
    else:
        counts = _empty((e,), dtype=torch.int32, device=dev)
    if not t:
        return ids, w, counts.zero_(), tok
    with on_device(logits):
        _topk_route_fwd_kernel[grid](
            logits, bias if bias is not None else logits, ids, w, tok, counts if count else ids,
            t, e, logits.stride(0), logits.stride(1), bias.stride(0) if bias is not None else 0,
            e // n_group, float(scale),
            TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e,
            SIGMOID=sigmoid, RENORM=renormalize, HAS_BIAS=bias is not None,
            N_GROUP=n_group, TOPK_GROUP=topk_group, COUNT=count, ATOMIC_COUNT=atomic,
            num_warps=warps,
        )
    return ids, w, counts, tok


def _launch_bwd(logits, ids, grad_w, sigmoid, renormalize, scale):
    t, e = logits.shape
    block_t, block_e, warps = _blocks(e)
    dx = _empty((t, e), dtype=logits.dtype, device=logits.device)
    if t:
        with on_device(logits):
            _topk_route_bwd_kernel[(triton.cdiv(t, block_t),)](
                logits, ids, grad_w, dx, t, e, logits.stride(0), logits.stride(1),
                grad_w.stride(0), grad_w.stride(1), float(scale),
                TOP_K=ids.shape[1], BLOCK_T=block_t, BLOCK_E=block_e, SIGMOID=sigmoid, RENORM=renormalize,
                num_warps=warps,
            )
    return dx


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("moe_kernels::topk_route", mutates_args=())
def _topk_route_op(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, sigmoid: bool,
                   renormalize: bool, n_group: int, topk_group: int, scale: float,
                   count: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scale, count)


@_topk_route_op.register_fake
def _(logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scale, count):
    t, e = logits.shape
    i32 = torch.int32
    return (logits.new_empty((t, top_k), dtype=i32), logits.new_empty((t, top_k), dtype=torch.float32),
            logits.new_empty((e if count else 0,), dtype=i32), logits.new_empty((t * top_k,), dtype=i32))


@torch.library.custom_op("moe_kernels::topk_route_backward", mutates_args=())
def _topk_route_backward_op(logits: torch.Tensor, ids: torch.Tensor, grad_weights: torch.Tensor,
                            sigmoid: bool, renormalize: bool, scale: float) -> torch.Tensor:
    return _launch_bwd(logits, ids, grad_weights, sigmoid, renormalize, scale)


@_topk_route_backward_op.register_fake
def _(logits, ids, grad_weights, sigmoid, renormalize, scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, _bias, _k, sigmoid, renormalize, _ng, _tg, scale, _count = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.sigmoid, ctx.renormalize, ctx.scale = sigmoid, renormalize, scale


def _backward(ctx, _g_ids, g_w, _g_counts, _g_tok):
    logits, ids = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] and g_w is not None:
        dx = _topk_route_backward_op(logits, ids, g_w, ctx.sigmoid, ctx.renormalize, ctx.scale)
    return dx, None, None, None, None, None, None, None, None


_topk_route_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def _check_args(logits, top_k, router, renormalize, bias, n_group, topk_group, routed_scaling_factor):
    check_tensor("logits", logits, ndim=2, dtypes=_LOGIT_DTYPES, contiguous=False)
    t, e = logits.shape
    check_int("logits.shape[1] (number of experts)", e, low=1, high=TRITON.route_max_experts)
    check_finite("logits", logits)
    check_int("top_k", top_k, low=1, high=e)
    if router not in FUSED_TOPK_ROUTERS:
        raise ValueError(f"router: expected one of {list(FUSED_TOPK_ROUTERS)}, got {router!r}")
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize: expected a bool, got {renormalize!r}")
    check_positive_float("routed_scaling_factor", routed_scaling_factor)
    check_int("n_group", n_group, low=1, high=e)
    if router == "softmax_topk":
        if bias is not None:
            raise ValueError("bias: the selection bias is only used by router='grouped_sigmoid_topk'; "
                             "got a tensor with 'softmax_topk'")
        if n_group != 1 or topk_group != 1:
            raise ValueError(f"n_group: grouped selection needs router='grouped_sigmoid_topk'; got n_group={n_group}, "
                             f"topk_group={topk_group} with 'softmax_topk'")
        return
    check_grouped_options(logits, top_k, bias, n_group, topk_group, routed_scaling_factor)


def _run(logits, top_k, router, renormalize, bias, n_group, topk_group, routed_scaling_factor, count):
    _check_args(logits, top_k, router, renormalize, bias, n_group, topk_group, routed_scaling_factor)
    check_device("logits", logits)
    if bias is not None:
        bias = bias.detach()
    return _topk_route_op(logits, bias, top_k, router == "grouped_sigmoid_topk", renormalize, n_group, topk_group,
                          float(routed_scaling_factor), count)


def fused_topk(logits: torch.Tensor, top_k: int, *, router: str = "softmax_topk", renormalize: bool = True,
               bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
               routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing in one Triton launch (two when ``T`` exceeds one program's rows:
    the counts buffer is zero-filled first).

    ``logits`` [T, E] (fp32/fp16/bf16, any strides; math in fp32, ``E <= 1024``).
    ``router="softmax_topk"``: :func:`moe_kernels.routing.softmax_topk` (Mixtral/Qwen with
    ``renormalize``, OLMoE without). ``router="grouped_sigmoid_topk"``:
    :func:`moe_kernels.routing.grouped_sigmoid_topk` (DeepSeek-V3: selection ``bias``
    [E], ``n_group`` groups of which ``topk_group`` stay). Weights are multiplied by
    ``routed_scaling_factor`` in both modes.

    Returns ``ids`` [T, k] int32, ``weights`` [T, k] float32 (differentiable w.r.t.
    ``logits``) and ``counts`` [E] int32 (chosen slots per expert)."""
    ids, w, counts, _ = _run(logits, top_k, router, renormalize, bias, n_group, topk_group,
                             routed_scaling_factor, True)
    return ids, w, counts


def route_fused(logits: torch.Tensor, args: TopkArgs) -> Routing:
    """The backend's fused top-k entry (the same in every backend): ``args.router``'s
    routing of ``logits`` [T, E] as a token-major :class:`~moe_kernels.routing.Routing`
    with the pure-PyTorch router's losses, in ONE launch (no counts: the plan recounts)."""
    t = logits.shape[0] if logits.dim() == 2 else 0
    ids, w, _, tok = _run(logits, args.top_k, args.router, args.renormalize, args.bias, args.n_group,
                          args.topk_group, args.routed_scaling_factor, False)
    return routing_from_topk(logits, args, ids.view(t, args.top_k), w.view(t, args.top_k), slot_token=tok)


def fused_topk_torch(logits: torch.Tensor, top_k: int, *, router: str = "softmax_topk", renormalize: bool = True,
                     bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
                     routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pure-PyTorch twin of :func:`fused_topk` (same signature and results), built
    on :mod:`moe_kernels.routing`; differentiable through PyTorch autograd."""
    _check_args(logits, top_k, router, renormalize, bias, n_group, topk_group, routed_scaling_factor)
    t, e = logits.shape
    if router == "softmax_topk":
        r = _ref.softmax_topk(logits, top_k, renormalize=renormalize)
        w = r.slot_weight * routed_scaling_factor if routed_scaling_factor != 1.0 else r.slot_weight
    else:
        r = _ref.grouped_sigmoid_topk(logits, top_k, bias=bias, n_group=n_group, topk_group=topk_group,
                                      routed_scaling_factor=routed_scaling_factor, renormalize=renormalize)
        w = r.slot_weight
    ids = r.slot_expert.view(t, top_k)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=e).to(torch.int32)
    return ids, w.view(t, top_k).to(torch.float32), counts
