"""Custom ops and autograd of the triton backend's expert computation.

Forward (``moe_kernels::experts_fwd``, 2 launches): GEMM1 gathers x rows through the
plan, applies bias and activation and writes h [S, I] (slot order) and, for backward,
the pre-activation h13 [S, nI]; its prologue zeroes GEMM2's combine counters and the
output rows of tokens without a valid slot. GEMM2 multiplies h by W2[e]^T, adds b2,
scales by the slot weight, writes y [S, H] and combines each token's rows into
out [T, H] in the epilogue (deterministic; see gemm.py). With routing (1 launch,
routing.py) and the plan (1 launch, plan.py) a top-k layer forward is 4 launches.
``combine="separate"`` (or ``MOE_KERNELS_COMBINE=separate``) runs the combine as its
own kernel instead (5 launches; same bits).

Backward (``moe_kernels::experts_bwd``, 4 launches, 5 with ``recompute_h``):

1. (``recompute_h`` only) GEMM1 again, storing h13 and no activation;
2. dGEMM2: ``g = dOut[t] @ W2[e]`` gathered by token; epilogue: the slot-weight
   gradient's partial ``dot(g, h)`` per column block (+ ``dot(dOut[t], b2[e])``),
   ``dh13 = act'(h13) * (w * g)`` and ``h`` (for dW2); its prologue zeroes dGEMM1's
   counters, the dx rows of empty tokens and the slot-weight gradient;
3. dGEMM1: ``dh13 @ W13[e]`` combined per token into dx [T, H] (fused, deterministic),
   and ``dw[s]`` = the sum of the partials (column block order, deterministic);
4. dW13 = sum_s outer(dh13[s], x[t]) and db13 (one wgrad launch, wgrad.py);
5. dW2 = sum_s outer(w_s dOut[t], h[s]) and db2 (one wgrad launch).

Saved for backward: x, the weights and biases, the slot weights, the plan's index
tensors and h13 [S, nI] in x's dtype. ``recompute_h=True`` saves no h13 and reruns
GEMM1 in backward: memory saved per layer = S * nI elements (Mixtral at T=8192, k=2:
16384 x 28672 bf16 = 0.94 GB), time added = GEMM1's FLOPs, 2 of the 9 GEMM units of a
forward+backward (GEMM1 = 2 units of 2*S*H*I, GEMM2 = 1, backward = 6): about +20%.

The router gradient reaches the logits through ``slot_weight`` (an input of the op), so
every router (torch ops or the fused routing op) trains through it.

Custom ops (namespace ``moe_kernels``, each with a fake implementation, so
``torch.compile(fullgraph=True)`` traces them and CUDA graphs capture them):

* ``experts_fwd`` (allocating; autograd registered, backward = ``experts_bwd``) and
  ``experts_fwd_out`` (inference into a caller's buffer, static for CUDA graphs);
* ``experts_bwd``: every gradient in one op (opaque to the compiler, like the forward);
* ``combine_slots`` / ``combine_slots_out``: the separate combine kernel.

Each op launches on its inputs' GPU and that GPU's current stream, whatever the
current device (``on_device``: Triton launches on the current one).

GEMM1 and GEMM2 are not separate ops: GEMM1's prologue prepares GEMM2's fused combine
(zeroed counters, zero rows), a contract between two launches that an op boundary would
expose to reordering; :func:`moe_kernels.triton.gemm.grouped_gemm` is the Python-level
launcher of each GEMM (buffers given or allocated) for anyone composing their own.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..activations import Activation
from ..params import ExpertParams
from ..plan import DispatchPlan
from . import check_device, on_device
from .combine import combine as combine_launch
from .combine import combine_torch
from .configs import capability_of, gemm_config
from .gemm import Prologue, grouped_gemm, grouped_gemm_torch
from .wgrad import expert_bias_grad, expert_weight_grad

__all__ = ["moe_experts", "moe_experts_torch", "plan_args", "combine_mode", "recompute_default"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ENV_COMBINE = "MOE_KERNELS_COMBINE"
ENV_RECOMPUTE = "MOE_KERNELS_RECOMPUTE_H"

# Allocation hook: tests replace it to pre-fill every output with poison.
_empty = torch.empty


def combine_mode(mode: str | None = None) -> str:
    """``"fused"`` (default) or ``"separate"``, from the argument or ``MOE_KERNELS_COMBINE``."""
    mode = mode if mode is not None else os.environ.get(ENV_COMBINE, "fused")
    if mode not in ("fused", "separate"):
        raise ValueError(f"combine: expected 'fused' or 'separate' (also via {ENV_COMBINE}), got {mode!r}")
    return mode


def recompute_default() -> bool:
    return os.environ.get(ENV_RECOMPUTE, "0") == "1"


# --------------------------------------------------------------------------- plan <-> op args

_PLAN_FIELDS = ("slot_token", "slot_expert", "expert_counts", "expert_offsets", "sorted_slot", "slot_position",
                "padded_offsets", "padded_slot", "block_expert", "token_slots")


def plan_args(plan: DispatchPlan) -> tuple[list[torch.Tensor], list[int]]:
    """The plan as custom-op arguments: its index tensors and its sizes."""
    return ([getattr(plan, f) for f in _PLAN_FIELDS],
            [plan.num_tokens, plan.num_experts, plan.block_m, plan.max_slots_per_token, plan.top_k or 0])


def _plan_from(idx: list[torch.Tensor], meta: list[int], slot_weight: torch.Tensor) -> DispatchPlan:
    t, e, bm, k, top_k = meta
    return DispatchPlan(num_tokens=t, num_experts=e, block_m=bm, max_slots_per_token=k,
                        slot_weight=slot_weight, top_k=top_k or None, **dict(zip(_PLAN_FIELDS, idx)))


# --------------------------------------------------------------------------- launch sequences


def _forward_impl(x, w13, w2, b13, b2, slot_weight, plan, act, interleaved, save_pre, combine, gemm=grouped_gemm,
                  comb=combine_launch, out=None):
    t, h = x.shape
    e, n_i, _ = w13.shape
    i = w2.shape[2]
    s = plan.num_slots
    cap = capability_of(x.device)
    cfg1 = gemm_config(e, i, h, x.dtype, cap, plan.block_m, gated_b=act.gated)
    cfg2 = gemm_config(e, h, i, x.dtype, cap, plan.block_m)
    out = _empty((t, h), dtype=x.dtype, device=x.device) if out is None else out
    pre = _empty((s if save_pre else 0, n_i), dtype=x.dtype, device=x.device)
    if plan.num_blocks == 0:  # no slot at all: no program would run a prologue
        return out.zero_(), pre
    hbuf = _empty((s, i), dtype=x.dtype, device=x.device)
    fused = combine == "fused"
    counters = _empty((t * -(-h // cfg2.BLOCK_N),), dtype=torch.int32, device=x.device) if fused else None
    gemm(x, w13, plan, a_rows="token", epilogue="act", activation=act, interleaved=interleaved, bias=b13,
         store_pre=save_pre, c=hbuf, pre=pre if save_pre else None,
         prologue=Prologue(counters=counters, out=out) if fused else None, config=cfg1)
    if fused:
        gemm(hbuf, w2, plan, a_rows="slot", bias=b2, row_scale=True, combine="fused", out=out, counters=counters,
             c=_empty((s, h), dtype=x.dtype, device=x.device), config=cfg2)
    else:
        y = gemm(hbuf, w2, plan, a_rows="slot", bias=b2, row_scale=True,
                 c=_empty((s, h), dtype=x.dtype, device=x.device), config=cfg2).c
        comb(y, plan.token_slots, out=out)
    return out, pre


def _backward_impl(dout, x, w13, w2, b13, b2, slot_weight, pre, plan, act, interleaved, combine, needs,
                   gemm=grouped_gemm, comb=combine_launch, wgrad=expert_weight_grad):
    t, h = x.shape
    e, n_i, _ = w13.shape
    i = w2.shape[2]
    s = plan.num_slots
    dev, dt = x.device, x.dtype
    cap = capability_of(dev)
    _, need_w13, need_w2, need_b13, need_b2, _ = needs  # dx and dw always (one kernel pair)
    dx = _empty((t, h), dtype=dt, device=dev)
    dsw = _empty((s,), dtype=torch.float32, device=dev)
    dw13 = _grad_buffer(w13) if need_w13 else x.new_empty(0)
    dw2 = _grad_buffer(w2) if need_w2 else x.new_empty(0)
    db13 = _empty((e, n_i), dtype=dt, device=dev) if (need_b13 and b13 is not None) else x.new_empty(0)
    db2 = _empty((e, h), dtype=dt, device=dev) if (need_b2 and b2 is not None) else x.new_empty(0)
    if plan.num_blocks == 0:
        for g in (dx, dsw, dw13, dw2, db13, db2):
            g.zero_()
        return dx, dw13, dw2, db13, db2, dsw
    if pre.shape[0] == 0:  # recompute_h
        cfg1 = gemm_config(e, i, h, dt, cap, plan.block_m, gated_b=act.gated)
        pre = gemm(x, w13, plan, a_rows="token", epilogue="act", activation=act, interleaved=interleaved, bias=b13,
                   store_c=False, store_pre=True, pre=_empty((s, n_i), dtype=dt, device=dev), config=cfg1).pre
    cfg_dh = gemm_config(e, i, h, dt, cap, plan.block_m, heavy_epilogue=True)
    cfg_dx = gemm_config(e, h, n_i, dt, cap, plan.block_m)
    fused = combine == "fused"
    counters = _empty((t * -(-h // cfg_dx.BLOCK_N),), dtype=torch.int32, device=dev) if fused else None
    w2t = w2.transpose(1, 2)  # [E, I, H] view: dOut @ W2[e]
    d1 = gemm(dout, w2t, plan, a_rows="token", epilogue="act_bwd", activation=act, interleaved=interleaved,
              pre=pre, store_h=need_w2, bias_dot=b2, c=_empty((s, n_i), dtype=dt, device=dev),
              h=_empty((s, i), dtype=dt, device=dev) if need_w2 else None,
              wpart=_empty((s, -(-i // cfg_dh.BLOCK_N)), dtype=torch.float32, device=dev),
              prologue=Prologue(counters=counters, out=dx if fused else None, zero_f32=dsw), config=cfg_dh)
    w13t = w13.transpose(1, 2)  # [E, H, nI] view: dh13 @ W13[e]
    if fused:
        gemm(d1.c, w13t, plan, a_rows="slot", combine="fused", out=dx, counters=counters, dw_final=True,
             wpart=d1.wpart, dw=dsw, c=_empty((s, h), dtype=dt, device=dev), config=cfg_dx)
    else:
        dxs = gemm(d1.c, w13t, plan, a_rows="slot", dw_final=True, wpart=d1.wpart, dw=dsw,
                   c=_empty((s, h), dtype=dt, device=dev), config=cfg_dx).c
        comb(dxs, plan.token_slots, out=dx)
    if need_w13:
        wgrad(x, "token", d1.c, "slot", plan, out=dw13, bias_out=db13 if db13.numel() else None)
    elif db13.numel():
        expert_bias_grad(d1.c, "slot", plan, out=db13)
    if need_w2:
        wgrad(d1.h, "slot", dout, "token", plan, out=dw2, scale=slot_weight, bias_out=db2 if db2.numel() else None)
    elif db2.numel():
        expert_bias_grad(dout, "token", plan, out=db2, scale=slot_weight)
    return dx, dw13, dw2, db13, db2, dsw


def _dense(w: torch.Tensor) -> bool:
    return w.is_contiguous() or w.transpose(1, 2).is_contiguous()


def _grad_buffer(w: torch.Tensor) -> torch.Tensor:
    """A weight gradient in the weight's own strides: a transposed weight view gets a
    gradient in its storage layout, so autograd's view backward yields a contiguous one."""
    if _dense(w):
        return _empty(w.shape, dtype=w.dtype, device=w.device) if w.is_contiguous() else \
            _empty(w.transpose(1, 2).shape, dtype=w.dtype, device=w.device).transpose(1, 2)
    return _empty(w.shape, dtype=w.dtype, device=w.device)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("moe_kernels::experts_fwd", mutates_args=())
def _experts_fwd_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, b13: Optional[torch.Tensor],
                    b2: Optional[torch.Tensor], slot_weight: torch.Tensor, plan_idx: list[torch.Tensor],
                    plan_meta: list[int], activation: str, alpha: float, limit: float, interleaved: bool,
                    save_pre: bool, combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan_from(plan_idx, plan_meta, slot_weight)
    with on_device(x):
        return _forward_impl(x, w13, w2, b13, b2, slot_weight, plan, Activation(activation, alpha, limit),
                             interleaved, save_pre, combine)


@_experts_fwd_op.register_fake
def _(x, w13, w2, b13, b2, slot_weight, plan_idx, plan_meta, activation, alpha, limit, interleaved, save_pre,
      combine):
    s = plan_idx[0].shape[0]
    return x.new_empty(x.shape), x.new_empty((s if save_pre else 0, w13.shape[1]))


@torch.library.custom_op("moe_kernels::experts_bwd", mutates_args=())
def _experts_bwd_op(dout: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    b13: Optional[torch.Tensor], b2: Optional[torch.Tensor], slot_weight: torch.Tensor,
                    pre: torch.Tensor, plan_idx: list[torch.Tensor], plan_meta: list[int], activation: str,
                    alpha: float, limit: float, interleaved: bool, combine: str,
                    needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    plan = _plan_from(plan_idx, plan_meta, slot_weight)
    with on_device(x):
        return _backward_impl(dout.contiguous(), x, w13, w2, b13, b2, slot_weight, pre, plan,
                              Activation(activation, alpha, limit), interleaved, combine, needs)


@_experts_bwd_op.register_fake
def _(dout, x, w13, w2, b13, b2, slot_weight, pre, plan_idx, plan_meta, activation, alpha, limit, interleaved,
      combine, needs):
    e, n_i, h = w13.shape
    s = plan_idx[0].shape[0]

    return (x.new_empty(x.shape), _grad_buffer(w13) if needs[1] else x.new_empty(0),
            _grad_buffer(w2) if needs[2] else x.new_empty(0),
            x.new_empty((e, n_i)) if (needs[3] and b13 is not None) else x.new_empty(0),
            x.new_empty((e, h)) if (needs[4] and b2 is not None) else x.new_empty(0),
            x.new_empty((s,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, w13, w2, b13, b2, sw, idx, meta, act, alpha, limit, inter, _save_pre, comb = inputs
    ctx.save_for_backward(x, w13, w2, b13, b2, sw, output[1], *idx)
    ctx.meta, ctx.act, ctx.inter, ctx.comb = list(meta), (act, alpha, limit), inter, comb
    ctx.mark_non_differentiable(output[1])


def _experts_backward(ctx, dout, _dpre):
    x, w13, w2, b13, b2, sw, pre, *idx = ctx.saved_tensors
    needs = [bool(v) for v in ctx.needs_input_grad[:6]]
    rest = ([None] * len(idx),) + (None,) * 7  # plan tensors, sizes and options get no gradient
    if dout is None or not any(needs):
        return (None,) * 6 + rest
    dx, dw13, dw2, db13, db2, dsw = _experts_bwd_op(dout, x, w13, w2, b13, b2, sw, pre, idx, ctx.meta, *ctx.act,
                                                    ctx.inter, ctx.comb, needs)
    return (dx if needs[0] else None, dw13 if needs[1] else None, dw2 if needs[2] else None,
            db13 if (needs[3] and b13 is not None) else None, db2 if (needs[4] and b2 is not None) else None,
            dsw.to(sw.dtype) if needs[5] else None) + rest


_experts_fwd_op.register_autograd(_experts_backward, setup_context=_setup_context)


@torch.library.custom_op("moe_kernels::experts_fwd_out", mutates_args=("out",))
def _experts_fwd_out_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, b13: Optional[torch.Tensor],
                        b2: Optional[torch.Tensor], slot_weight: torch.Tensor, plan_idx: list[torch.Tensor],
                        plan_meta: list[int], activation: str, alpha: float, limit: float, interleaved: bool,
                        combine: str, out: torch.Tensor) -> None:
    """Inference forward into a caller's buffer (static addresses for CUDA graphs); no autograd."""
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {tuple(x.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    plan = _plan_from(plan_idx, plan_meta, slot_weight)
    with on_device(x):
        _forward_impl(x, w13, w2, b13, b2, slot_weight, plan, Activation(activation, alpha, limit), interleaved,
                      False, combine, out=out)


@_experts_fwd_out_op.register_fake
def _(x, w13, w2, b13, b2, slot_weight, plan_idx, plan_meta, activation, alpha, limit, interleaved, combine, out):
    return None


@torch.library.custom_op("moe_kernels::combine_slots", mutates_args=())
def _combine_slots_op(y: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j y[token_slots[t, j]]`` (the separate combine kernel)."""
    return combine_launch(y, token_slots, out=_empty((token_slots.shape[0], y.shape[1]), dtype=y.dtype,
                                                     device=y.device))


@_combine_slots_op.register_fake
def _(y, token_slots):
    return y.new_empty((token_slots.shape[0], y.shape[1]))


@torch.library.custom_op("moe_kernels::combine_slots_out", mutates_args=("out",))
def _combine_slots_out_op(y: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor) -> None:
    combine_launch(y, token_slots, out=out)


@_combine_slots_out_op.register_fake
def _(y, token_slots, out):
    return None


# --------------------------------------------------------------------------- public entry points


def _check(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: the triton backend computes in float16, bfloat16 or float32, got {x.dtype}")
    check_device("x", x)
    if plan.num_tokens != x.shape[0] or plan.num_experts != params.num_experts:
        raise ValueError(f"plan: expected num_tokens={x.shape[0]} and num_experts={params.num_experts}, got "
                         f"{plan.num_tokens} and {plan.num_experts}")


def moe_experts(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams, *, recompute_h: bool | None = None,
                combine: str | None = None) -> torch.Tensor:
    """The expert computation of the triton backend: ``out[t] = sum_s w[s] * Expert_e(x[t])``,
    differentiable in ``x``, the weights, the biases and ``plan.slot_weight``.

    ``recompute_h`` (default ``MOE_KERNELS_RECOMPUTE_H=1``): save no pre-activation and
    recompute it in backward (see the module docstring for the trade-off). ``combine``:
    ``"fused"`` (default, ``MOE_KERNELS_COMBINE``) or ``"separate"``."""
    _check(x, plan, params)
    act = params.activation
    recompute = recompute_default() if recompute_h is None else bool(recompute_h)
    needs_grad = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight))
    idx, meta = plan_args(plan)
    out, _ = _experts_fwd_op(x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight, idx, meta, act.name,
                             float(act.alpha), float(act.limit), bool(params.interleaved),
                             bool(needs_grad and not recompute), combine_mode(combine))
    return out


def moe_experts_torch(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams, *, recompute_h: bool | None = None,
                      combine: str | None = None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`moe_experts` (forward only): the same launch sequence
    with every kernel replaced by its twin."""
    _check(x, plan, params)
    out, _ = _forward_impl(x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight, plan,
                           params.activation, params.interleaved, False, combine_mode(combine),
                           gemm=grouped_gemm_torch, comb=combine_torch)
    return out
