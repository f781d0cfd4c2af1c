"""The triton backend's experts for quantized weights and for a post-expert norm
(inference): GEMM1 and GEMM2 of quant_gemm.py, then the combine.

Pipeline (3 launches after routing and the plan):

1. GEMM1 ``x W13^T``: rows gathered by token, quantized in the gather (W8A8 dynamic or
   static) or used as they are (fp8/fp4 weights dequantized in registers); bias and the
   activation in the epilogue; with dynamic quantization the epilogue also quantizes h
   (e4m3 + one fp32 scale per 128 columns of a row), GEMM2's input.
2. GEMM2 ``h W2^T`` + b2: times the slot weight into y [S, H] fp32, or, with a post-expert
   norm, the unweighted rows in the compute dtype.
3. The combine ``out[t] = sum_j y[token_slots[t, j]]``: combine.py's deterministic kernel,
   or ``_post_norm_combine_fwd_kernel`` (per token: each slot row's norm, its weight, the
   fixed-order sum), which for a whole-row norm is cheaper than a second GEMM2 pass.

No backward: quantized experts refuse inputs that need gradients; float experts with a
post-expert norm that need gradients run the torch backend's autograd path instead.
On GPUs without FP8 tensor cores (compute capability < 8.9) fp8 experts run W8A16 (the
activations stay in the compute dtype). Tile sizes are fixed by the format (the
``gemm_config`` / autotune options of the float path do not apply here).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from ...activations import PostNorm
from ...options import KernelOptions
from ...params import ExpertParams
from ...plan import DispatchPlan
from ...quant import check_inference, experts_quant_torch
from . import on_device
from .combine import combine
from .quant_gemm import fp8_mma, qgemm, qgemm_torch

__all__ = ["quant_experts", "quant_experts_torch", "post_norm_combine", "post_norm_combine_torch"]

_empty = torch.empty


@triton.jit
def _norm_input(y, w, INPUT_SCALED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    if INPUT_SCALED:  # MuseSpark: scale first, round to the activations' dtype, then normalise
        return (y * (1.0 + w)).to(OUT_DTYPE).to(tl.float32)
    return y


@triton.jit
def _post_norm_combine_fwd_kernel(
    y_ptr,            # [S, H] unweighted expert outputs, slot order
    w_ptr,            # [H] norm weight
    token_slots_ptr,  # [T, KS] int32, -1 padded
    slot_weight_ptr,  # [S] float
    out_ptr,          # [T, H] fp32
    H, KS, stride_ym, stride_om, eps,
    INPUT_SCALED: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    out_row = out_ptr + t * stride_om
    for h0 in range(0, H, BLOCK_H):
        tl.store(out_row + h0 + offs, tl.zeros((BLOCK_H,), tl.float32), mask=h0 + offs < H)
    for j in range(KS):
        slot = tl.load(token_slots_ptr + t * KS + j)
        if slot >= 0:
            y_row = y_ptr + slot.to(tl.int64) * stride_ym
            ss = tl.zeros((BLOCK_H,), tl.float32)
            for h0 in range(0, H, BLOCK_H):
                m = h0 + offs < H
                w = tl.load(w_ptr + h0 + offs, mask=m, other=0.0).to(tl.float32)
                z = _norm_input(tl.load(y_row + h0 + offs, mask=m, other=0.0).to(tl.float32), w, INPUT_SCALED,
                                y_ptr.dtype.element_ty)
                ss += z * z
            r = tl.math.rsqrt(tl.sum(ss, axis=0) / H + eps)
            wgt = tl.load(slot_weight_ptr + slot).to(tl.float32)
            for h0 in range(0, H, BLOCK_H):
                m = h0 + offs < H
                w = tl.load(w_ptr + h0 + offs, mask=m, other=0.0).to(tl.float32)
                z = _norm_input(tl.load(y_row + h0 + offs, mask=m, other=0.0).to(tl.float32), w, INPUT_SCALED,
                                y_ptr.dtype.element_ty)
                v = z * r
                if not INPUT_SCALED:
                    v = v * w
                v = v.to(y_ptr.dtype.element_ty).to(tl.float32) * wgt
                tl.store(out_row + h0 + offs, tl.load(out_row + h0 + offs, mask=m, other=0.0) + v, mask=m)


def post_norm_combine(y: torch.Tensor, plan: DispatchPlan, norm: PostNorm) -> torch.Tensor:
    """``out[t] = sum_j w[s_j] * norm(y[s_j])`` (fp32 [T, H]) over a token's valid slots."""
    t, h = plan.num_tokens, y.shape[1]
    out = _empty((t, h), dtype=torch.float32, device=y.device)
    if t == 0 or h == 0:
        return out
    ts = plan.token_slots
    with on_device(y):
        _post_norm_combine_fwd_kernel[(t,)](y, norm.weight, ts, plan.slot_weight, out, h, ts.shape[1], y.stride(0),
                                            out.stride(0), float(norm.eps),
                                            INPUT_SCALED=norm.kind == "input_scaled_rms",
                                            BLOCK_H=min(1024, triton.next_power_of_2(h)), num_warps=4)
    return out


def post_norm_combine_torch(y: torch.Tensor, plan: DispatchPlan, norm: PostNorm) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`post_norm_combine`."""
    from ...activations import apply_post_norm
    from ...primitives import combine_slots

    yn = apply_post_norm(y, norm).float() * plan.slot_weight.float()[:, None]
    return combine_slots(yn, plan.token_slots)


def _run(x, plan, params, gemm, comb, norm_comb):
    t, h = x.shape
    quant = params.quant
    if quant is not None and quant.act != "none" and gemm is qgemm and not fp8_mma(x.device):
        quant = replace(quant, act="none")  # no FP8 tensor cores (sm_80/86): W8A16, weights decoded in registers
    if plan.num_slots == 0:
        return x.new_zeros(t, h)
    w13 = quant.w13 if quant is not None else params.w13
    w2 = quant.w2 if quant is not None else params.w2
    static = quant is not None and quant.act == "static"
    h1, h1_scale = gemm(x, w13, plan, a_rows="token", out_cols=params.intermediate_size, epilogue="act", quant=quant,
                        activation=params.activation, interleaved=params.interleaved, bias=params.b13,
                        act_scale=quant.act_scale13 if static else None, out_dtype=x.dtype)
    norm = params.post_norm
    y, _ = gemm(h1, w2, plan, a_rows="slot", out_cols=h, epilogue="out", quant=quant, bias=params.b2,
                a_scale=h1_scale, act_scale=quant.act_scale2 if static else None, row_scale=norm is None,
                out_dtype=torch.float32 if norm is None else x.dtype)
    out = comb(y, plan.token_slots) if norm is None else norm_comb(y, plan, norm)
    return out.to(x.dtype)


def quant_experts(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams,
                  options: KernelOptions | None = None) -> torch.Tensor:
    """The experts of quantized params and/or a post-expert norm on the triton backend."""
    if params.quant is not None:
        check_inference(x, plan.slot_weight, params)
    elif torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (
            x, params.w13, params.w2, params.b13, params.b2, plan.slot_weight, params.post_norm.weight)):
        return experts_quant_torch(x, plan, params)  # training through the norm: autograd of the torch ops
    return _run(x, plan, params, qgemm, combine, post_norm_combine)


def quant_experts_torch(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams,
                        options: KernelOptions | None = None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`quant_experts`: the same launch sequence with each kernel
    replaced by its twin."""
    from .combine import combine_torch

    comb = (lambda y, ts: combine_torch(y, ts))
    return _run(x, plan, params, qgemm_torch, comb, post_norm_combine_torch)
