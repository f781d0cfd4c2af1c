"""Custom ops and autograd of the triton backend's expert computation.

Forward (``moe_kernels::experts_fwd``, 2 launches): GEMM1 gathers x rows through the
plan, applies bias and activation and writes h [S, I] (slot order) and, for backward,
the pre-activation h13 [S, nI]; its prologue zeroes GEMM2's combine counters and the
output rows of tokens without a valid slot. GEMM2 multiplies h by W2[e]^T, adds b2,
scales by the slot weight, writes y [S, H] and combines each token's rows into
out [T, H] in the epilogue (deterministic; see gemm.py). With routing (1 launch,
routing.py) and the plan (1 launch, plan.py) a top-k layer forward is 4 launches.
``combine="separate"`` (:class:`~moe_kernels.options.KernelOptions`) runs the combine as
its own kernel instead (5 launches; same bits); the default ``"auto"`` picks one of the
two per call from static shapes (:func:`.configs.combine_mode`: separate for many slots
per token outside decode, e.g. K >= 8 at H <= 4096 or Expert Choice / dense with K > 16).

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

* ``experts_fwd_out``: inference into a given buffer (static addresses for CUDA graphs);
  :func:`moe_experts` without gradients allocates the buffer and calls it;
* ``experts_fwd`` (allocating, for training; autograd registered, backward = ``experts_bwd``);
* ``experts_bwd``: every gradient in one op (opaque to the compiler, like the forward).

Each op launches on its inputs' GPU and that GPU's current stream, whatever the
current device (``on_device``: Triton launches on the current one).

GEMM1 and GEMM2 are not separate ops: GEMM1's prologue prepares GEMM2's fused combine
(zeroed counters, zero rows), a hand-off between two launches that an op boundary would
expose to reordering, so both launches live in the same op and the hand-off is a checked
object (:class:`~moe_kernels.backends.triton.gemm.Prologue`: GEMM2 refuses one that did not
run). :func:`moe_kernels.backends.triton.gemm.grouped_gemm` is the Python-level launcher of
each GEMM (buffers given or allocated) for anyone composing their own.

Configs (configs.py): the plan's ``block_m`` is the regime of the bucketed ``T*k``; each
GEMM's tiles, split-K (decode), TMA and persistence (prefill, sm_90+) follow from it,
the GEMM's (N, K), the dtype and the GPU (capability, SM count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...activations import Activation
from ...options import GEMM_FIELDS, KernelOptions, resolve
from ...params import ExpertParams
from ...plan import DispatchPlan
from . import check_device, on_device
from .combine import combine as combine_launch
from .combine import combine_torch
from .configs import capability_of, combine_mode, gemm_config, num_sms_of
from .gemm import Prologue, grouped_gemm, grouped_gemm_torch
from .wgrad import expert_bias_grad, expert_weight_grad

__all__ = ["moe_experts", "moe_experts_torch", "plan_args"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Allocation hook: tests replace it to pre-fill every output with poison.
_empty = torch.empty


@dataclass(frozen=True)
class _Tuning:
    """What the launch sequence needs of the resolved :class:`~moe_kernels.options.KernelOptions`."""

    pin: dict
    autotune: bool

    def config(self, e, n, k, dtype, cap, block_m, **kw):
        return gemm_config(e, n, k, dtype, cap, block_m, pin=self.pin, **kw)

    def layer(self, plan, e, h, i, n_i, dtype, device, gated):
        """The configs of a layer's GEMMs (gemm1, gemm2, dgemm2, dgemm1) for this plan:
        the plan's block_m sets the regime, ``T*k`` and the SM count size split-K."""
        cap, sms, s = capability_of(device), num_sms_of(device), plan.num_slots
        kw = dict(num_slots=s, num_sms=sms)
        return {"gemm1": self.config(e, i, h, dtype, cap, plan.block_m, gated_b=gated, kind="gemm1", **kw),
                "gemm2": self.config(e, h, i, dtype, cap, plan.block_m, kind="gemm2", **kw),
                "dgemm2": self.config(e, i, h, dtype, cap, plan.block_m, heavy_epilogue=True, kind="dgemm2", **kw),
                "dgemm1": self.config(e, h, n_i, dtype, cap, plan.block_m, kind="dgemm1", **kw)}

    def as_op_args(self) -> tuple[list[int], bool]:
        # Custom-op arguments: the pin as one int per GEMM field (0 = not pinned).
        return [self.pin.get(f, 0) for f in GEMM_FIELDS], self.autotune

    @staticmethod
    def from_op_args(pin: Optional[list[int]], autotune: bool) -> "_Tuning":
        return _Tuning({f: v for f, v in zip(GEMM_FIELDS, pin or ()) if v}, bool(autotune))


_DEFAULT_TUNING = _Tuning({}, False)


def plan_args(plan: DispatchPlan) -> tuple[list[torch.Tensor], list[int]]:
    """The plan as custom-op arguments (:meth:`DispatchPlan.op_args`)."""
    return plan.op_args()


_plan_from = DispatchPlan.from_op_args


# --------------------------------------------------------------------------- launch sequences


def _forward_impl(x, w13, w2, b13, b2, slot_weight, plan, act, interleaved, save_pre, combine,
                  tuning=_DEFAULT_TUNING, gemm=grouped_gemm, comb=combine_launch, out=None):
    t, h = x.shape
    e, n_i, _ = w13.shape
    i = w2.shape[2]
    s = plan.num_slots
    cfgs = tuning.layer(plan, e, h, i, n_i, x.dtype, x.device, act.gated)
    cfg1, cfg2 = cfgs["gemm1"], cfgs["gemm2"]
    tune = {"autotune": tuning.autotune} if gemm is grouped_gemm else {}
    out = _empty((t, h), dtype=x.dtype, device=x.device) if out is None else out
    pre = _empty((s if save_pre else 0, n_i), dtype=x.dtype, device=x.device)
    if plan.num_blocks == 0:  # no slot at all: no program would run a prologue
        return out.zero_(), pre
    hbuf = _empty((s, i), dtype=x.dtype, device=x.device)
    fused = combine == "fused"
    pro = Prologue.for_combine(out, cfg2.BLOCK_N) if fused else None
    gemm(x, w13, plan, a_rows="token", epilogue="act", activation=act, interleaved=interleaved, bias=b13,
         store_pre=save_pre, c=hbuf, pre=pre if save_pre else None, prologue=pro, config=cfg1, **tune)
    if fused:
        gemm(hbuf, w2, plan, a_rows="slot", bias=b2, row_scale=True, combine="fused", out=out, combine_from=pro,
             c=_empty((s, h), dtype=x.dtype, device=x.device), config=cfg2, **tune)
    else:
        y = gemm(hbuf, w2, plan, a_rows="slot", bias=b2, row_scale=True,
                 c=_empty((s, h), dtype=x.dtype, device=x.device), config=cfg2, **tune).c
        comb(y, plan.token_slots, out=out)
    return out, pre


def _backward_impl(dout, x, w13, w2, b13, b2, slot_weight, pre, plan, act, interleaved, combine, needs,
                   tuning=_DEFAULT_TUNING, gemm=grouped_gemm, comb=combine_launch, wgrad=expert_weight_grad):
    t, h = x.shape
    e, n_i, _ = w13.shape
    i = w2.shape[2]
    s = plan.num_slots
    dev, dt = x.device, x.dtype
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
    tune = {"autotune": tuning.autotune} if gemm is grouped_gemm else {}
    cfgs = tuning.layer(plan, e, h, i, n_i, dt, dev, act.gated)
    if pre.shape[0] == 0:  # recompute_h
        cfg1 = cfgs["gemm1"]
        pre = gemm(x, w13, plan, a_rows="token", epilogue="act", activation=act, interleaved=interleaved, bias=b13,
                   store_c=False, store_pre=True, pre=_empty((s, n_i), dtype=dt, device=dev), config=cfg1, **tune).pre
    cfg_dh, cfg_dx = cfgs["dgemm2"], cfgs["dgemm1"]
    fused = combine == "fused"
    pro = Prologue.for_combine(dx, cfg_dx.BLOCK_N, zero_f32=dsw) if fused else Prologue(zero_f32=dsw)
    w2t = w2.transpose(1, 2)  # [E, I, H] view: dOut @ W2[e]
    d1 = gemm(dout, w2t, plan, a_rows="token", epilogue="act_bwd", activation=act, interleaved=interleaved,
              pre=pre, store_h=need_w2, bias_dot=b2, c=_empty((s, n_i), dtype=dt, device=dev),
              h=_empty((s, i), dtype=dt, device=dev) if need_w2 else None,
              wpart=_empty((s, -(-i // cfg_dh.BLOCK_N)), dtype=torch.float32, device=dev),
              prologue=pro, config=cfg_dh, **tune)
    w13t = w13.transpose(1, 2)  # [E, H, nI] view: dh13 @ W13[e]
    if fused:
        gemm(d1.c, w13t, plan, a_rows="slot", combine="fused", out=dx, combine_from=pro, dw_final=True,
             wpart=d1.wpart, dw=dsw, c=_empty((s, h), dtype=dt, device=dev), config=cfg_dx, **tune)
    else:
        dxs = gemm(d1.c, w13t, plan, a_rows="slot", dw_final=True, wpart=d1.wpart, dw=dsw,
                   c=_empty((s, h), dtype=dt, device=dev), config=cfg_dx, **tune).c
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
                    save_pre: bool, combine: str, gemm_pin: Optional[list[int]] = None,
                    autotune: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan_from(plan_idx, plan_meta, slot_weight)
    with on_device(x):
        return _forward_impl(x, w13, w2, b13, b2, slot_weight, plan, Activation(activation, alpha, limit),
                             interleaved, save_pre, combine, _Tuning.from_op_args(gemm_pin, autotune))


@_experts_fwd_op.register_fake
def _(x, w13, w2, b13, b2, slot_weight, plan_idx, plan_meta, activation, alpha, limit, interleaved, save_pre,
      combine, gemm_pin=None, autotune=False):
    s = plan_idx[0].shape[0]
    return x.new_empty(x.shape), x.new_empty((s if save_pre else 0, w13.shape[1]))


@torch.library.custom_op("moe_kernels::experts_bwd", mutates_args=())
def _experts_bwd_op(dout: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    b13: Optional[torch.Tensor], b2: Optional[torch.Tensor], slot_weight: torch.Tensor,
                    pre: torch.Tensor, plan_idx: list[torch.Tensor], plan_meta: list[int], activation: str,
                    alpha: float, limit: float, interleaved: bool, combine: str,
                    needs: list[bool], gemm_pin: Optional[list[int]] = None,
                    autotune: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    plan = _plan_from(plan_idx, plan_meta, slot_weight)
    with on_device(x):
        return _backward_impl(dout.contiguous(), x, w13, w2, b13, b2, slot_weight, pre, plan,
                              Activation(activation, alpha, limit), interleaved, combine, needs,
                              _Tuning.from_op_args(gemm_pin, autotune))


@_experts_bwd_op.register_fake
def _(dout, x, w13, w2, b13, b2, slot_weight, pre, plan_idx, plan_meta, activation, alpha, limit, interleaved,
      combine, needs, gemm_pin=None, autotune=False):
    e, n_i, h = w13.shape
    s = plan_idx[0].shape[0]

    return (x.new_empty(x.shape), _grad_buffer(w13) if needs[1] else x.new_empty(0),
            _grad_buffer(w2) if needs[2] else x.new_empty(0),
            x.new_empty((e, n_i)) if (needs[3] and b13 is not None) else x.new_empty(0),
            x.new_empty((e, h)) if (needs[4] and b2 is not None) else x.new_empty(0),
            x.new_empty((s,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, w13, w2, b13, b2, sw, idx, meta, act, alpha, limit, inter, _save_pre, comb, *tuning = inputs
    pin, autotune = (*tuning, None, False)[:2]
    ctx.save_for_backward(x, w13, w2, b13, b2, sw, output[1], *idx)
    ctx.meta, ctx.act, ctx.inter, ctx.comb, ctx.tuning = list(meta), (act, alpha, limit), inter, comb, (pin, autotune)
    ctx.mark_non_differentiable(output[1])


def _experts_backward(ctx, dout, _dpre):
    x, w13, w2, b13, b2, sw, pre, *idx = ctx.saved_tensors
    needs = [bool(v) for v in ctx.needs_input_grad[:6]]
    # No gradient for the plan tensors, sizes and options. The dispatcher drops trailing
    # arguments equal to their defaults, so count the ones it passed.
    rest = ([None] * len(idx),) + (None,) * (len(ctx.needs_input_grad) - 7)
    if dout is None or not any(needs):
        return (None,) * 6 + rest
    dx, dw13, dw2, db13, db2, dsw = _experts_bwd_op(dout, x, w13, w2, b13, b2, sw, pre, idx, ctx.meta, *ctx.act,
                                                    ctx.inter, ctx.comb, needs, *ctx.tuning)
    return (dx if needs[0] else None, dw13 if needs[1] else None, dw2 if needs[2] else None,
            db13 if (needs[3] and b13 is not None) else None, db2 if (needs[4] and b2 is not None) else None,
            dsw.to(sw.dtype) if needs[5] else None) + rest


_experts_fwd_op.register_autograd(_experts_backward, setup_context=_setup_context)


@torch.library.custom_op("moe_kernels::experts_fwd_out", mutates_args=("out",))
def _experts_fwd_out_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, b13: Optional[torch.Tensor],
                        b2: Optional[torch.Tensor], slot_weight: torch.Tensor, plan_idx: list[torch.Tensor],
                        plan_meta: list[int], activation: str, alpha: float, limit: float, interleaved: bool,
                        combine: str, out: torch.Tensor, gemm_pin: Optional[list[int]] = None,
                        autotune: bool = False) -> None:
    """Inference forward into a caller's buffer (static addresses for CUDA graphs); no autograd."""
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {tuple(x.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    plan = _plan_from(plan_idx, plan_meta, slot_weight)
    with on_device(x):
        _forward_impl(x, w13, w2, b13, b2, slot_weight, plan, Activation(activation, alpha, limit), interleaved,
                      False, combine, _Tuning.from_op_args(gemm_pin, autotune), out=out)


@_experts_fwd_out_op.register_fake
def _(x, w13, w2, b13, b2, slot_weight, plan_idx, plan_meta, activation, alpha, limit, interleaved, combine, out,
      gemm_pin=None, autotune=False):
    return None


# --------------------------------------------------------------------------- public entry points


def _check(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: the triton backend computes in float16, bfloat16 or float32, got {x.dtype}")
    check_device("x", x)
    if plan.num_tokens != x.shape[0] or plan.num_experts != params.num_experts:
        raise ValueError(f"plan: expected num_tokens={x.shape[0]} and num_experts={params.num_experts}, got "
                         f"{plan.num_tokens} and {plan.num_experts}")


def _combine_of(mode: str, x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> str:
    # "auto" -> "fused" | "separate" from static shapes only (T*k, K, H, E, dtype,
    # capability), before the custom op: the op and its saved context see a concrete mode.
    if mode != "auto":
        return mode
    return combine_mode(plan.num_slots, plan.max_slots_per_token, x.shape[1], params.num_experts, x.dtype,
                        capability_of(x.device))


def moe_experts(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams, options: KernelOptions | None = None, *,
                recompute_h: bool | None = None, combine: str | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The expert computation of the triton backend: ``out[t] = sum_s w[s] * Expert_e(x[t])``,
    differentiable in ``x``, the weights, the biases and ``plan.slot_weight``.

    ``options`` (:class:`~moe_kernels.options.KernelOptions`; the keywords ``recompute_h``
    and ``combine`` override its fields): ``recompute_h`` saves no pre-activation and
    recomputes it in backward (see the module docstring for the trade-off); ``combine``
    is ``"fused"``, ``"separate"`` or ``"auto"`` (:func:`.configs.combine_mode`); ``gemm_config`` pins tile fields; ``autotune``.
    ``out``: a caller's [T, H] buffer to write (inference only, e.g. static addresses for
    CUDA graphs); otherwise one is allocated."""
    _check(x, plan, params)
    opts = resolve(options, recompute_h=recompute_h, combine=combine)
    comb = _combine_of(opts.combine, x, plan, params)
    pin, autotune = _Tuning(opts.gemm_pin, opts.autotune).as_op_args()
    act = params.activation
    needs_grad = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight))
    idx, meta = plan.op_args()
    args = (x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight, idx, meta, act.name,
            float(act.alpha), float(act.limit), bool(params.interleaved))
    if needs_grad:
        if out is not None:
            raise ValueError("out: a caller's buffer serves inference only (no input requires grad)")
        return _experts_fwd_op(*args, not opts.recompute_h, comb, pin, autotune)[0]
    out = _empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    _experts_fwd_out_op(*args, comb, out, pin, autotune)
    return out


def moe_experts_torch(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams, options: KernelOptions | None = None,
                      *, recompute_h: bool | None = None, combine: str | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`moe_experts` (forward only): the same launch sequence
    with every kernel replaced by its twin."""
    _check(x, plan, params)
    opts = resolve(options, recompute_h=recompute_h, combine=combine)
    res, _ = _forward_impl(x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight, plan,
                           params.activation, params.interleaved, False, _combine_of(opts.combine, x, plan, params),
                           _Tuning(opts.gemm_pin, False), gemm=grouped_gemm_torch, comb=combine_torch, out=out)
    return res
