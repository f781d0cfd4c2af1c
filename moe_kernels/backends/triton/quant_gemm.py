"""The grouped GEMM of quantized experts (inference): ``_qgemm_fwd_kernel``, its launcher
:func:`qgemm` and pure-PyTorch twin :func:`qgemm_torch`.

``C[slot(r)] = epilogue(A[row_of(r)] @ dequant(B[e])^T)`` over the plan's padded rows, one
row block per expert (``plan.block_expert``), A rows gathered in the kernel (``token``:
``x[slot_token[padded_slot[r]]]``, ``slot``: ``A[padded_slot[r]]``), outputs in slot order.

Weights (``W_FMT``): float (a strided view, for the post-expert-norm path of float
experts), fp8 e4m3 with one scale per (BN_S, BK_S) block, or fp4 e2m1 packed two per byte
(even k in the low nibble) with one scale per 32 along K (float32 or ue8m0 bytes).

Activations (``ACT_Q``):

* 0, none: fp8 / fp4 tiles are dequantized in registers (``q * scale``, exact in fp32),
  cast to A's dtype and multiplied with the native ``tl.dot`` of that dtype (W8A16,
  W4A16); on GPUs without an fp8 type (sm_80/86, ``FP8_NATIVE=False``) the e4m3 bits
  are decoded arithmetically. The right path where the GPU has no FP8 MMA (sm_80) and for FP4 weights with
  bf16 activations (sm_100's ``dot_scaled`` upcasts a bf16 x e2m1 product the same way).
* 1, dynamic (fp8 only): W8A8 on the FP8 tensor cores (``wgmma ... e4m3.e4m3`` on sm_90,
  ``tcgen05.mma kind::f8f6f4`` on sm_100, ``mma.sync ... e4m3`` on sm_89):
  ``acc += dot(a_q, b_q) * sa[:, None] * sb[None, :]`` per K step, BLOCK_K = the
  activation group (128) so each step has one A scale per row and one B scale per
  column. GEMM1 quantizes its gathered float rows in the gather (per-row amax of the K
  tile); GEMM1's epilogue quantizes the activation output h per (row, BLOCK_N = 128
  columns) and writes e4m3 h and its scales, which GEMM2 reads as its A operand.
* 2, static (fp8 only): as dynamic with one float32 scale per expert for A.

Epilogues: ``act`` (GEMM1: bias, the fused activation of act.py over gate and up
accumulators, whose B rows are ``n``/``N + n`` concatenated or ``2n``/``2n + 1``
interleaved) and ``out`` (GEMM2: bias, optionally times the slot weight). The combine
over a token's slots is the separate deterministic kernel of combine.py (or the
post-norm combine of quant_experts.py). No backward: quantized experts are inference-only.

Numerics: fp32 accumulation; e4m3 casts clamp to +-448 then round to nearest even (the
hardware's ``cvt.rn.satfinite``); int64 row offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...activations import Activation, apply_activation
from ...plan import DispatchPlan
from ...quant import E4M3_MAX, ExpertQuant, QuantizedWeight, dequantize, quantize_act_fp8
from . import on_device
from .act import ACT_CODES, _act_fwd

__all__ = ["qgemm", "qgemm_torch", "num_warps_for", "fp8_mma", "W_FLOAT", "W_FP8", "W_FP4"]

W_FLOAT, W_FP8, W_FP4 = 0, 1, 2
_ACT_Q = {"none": 0, "dynamic": 1, "static": 2}

# Allocation hook: tests replace it to pre-fill every output with poison.
_empty = torch.empty


@triton.jit
def _fp4_decode(p):
    # e2m1 nibble codes (uint8 [R, C]) -> fp32: sign bit 3, exponent bits 1-2, mantissa bit 0.
    p = p.to(tl.int32)
    e = (p >> 1) & 3
    m = (p & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((p & 8) != 0, -mag, mag)


@triton.jit
def _e4m3_decode(p):
    # e4m3fn bytes (uint8) -> fp32 without the fp8 type (sm_80 has none): sign bit 7,
    # exponent bits 3-6 (bias 7), mantissa bits 0-2; exponent 0 is subnormal.
    p = p.to(tl.int32)
    e = (p >> 3) & 15
    m = (p & 7).to(tl.float32) * 0.125
    mag = tl.where(e == 0, m * 0.015625, (1.0 + m) * tl.exp2((e - 7).to(tl.float32)))
    return tl.where((p & 128) != 0, -mag, mag)


@triton.jit
def _load_b(b_ptr, bs_ptr, e, brow, offs_k, k0, row_ok, K, stride_be, stride_bn, stride_bk, stride_se, stride_sn,
            W_FMT: tl.constexpr, SCALE_E8M0: tl.constexpr, BN_S: tl.constexpr, BK_S: tl.constexpr,
            FP8_NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One [BLOCK_N, BLOCK_K] weight tile and a per-row fp32 scale: W_FP8 gives the raw e4m3
    # tile and its block scale; fp4 the dequantized fp32 tile (scale 1); float the tile as is.
    # (One return at the end: code after a constexpr-if return is still compiled.)
    base = b_ptr + e.to(tl.int64) * stride_be + brow.to(tl.int64)[:, None] * stride_bn
    if W_FMT == 2:  # fp4
        kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(base + kh[None, :], mask=row_ok[:, None] & (kh < K // 2)[None, :], other=0)
        lo = _fp4_decode(p & 15)
        hi = _fp4_decode((p >> 4) & 15)
        v = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # element 2j from the low nibble
        kg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = tl.load(bs_ptr + e.to(tl.int64) * stride_se + brow.to(tl.int64)[:, None] * stride_sn + kg[None, :],
                    mask=row_ok[:, None] & (kg < K // 32)[None, :], other=0)
        if SCALE_E8M0:
            s = tl.exp2(s.to(tl.float32) - 127.0)
        b = tl.reshape(tl.reshape(v, (BLOCK_N, BLOCK_K // 32, 32)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        sb = tl.full((BLOCK_N,), 1.0, tl.float32)
    else:
        k = k0 + offs_k
        b = tl.load(base + k[None, :] * stride_bk, mask=row_ok[:, None] & (k < K)[None, :], other=0)
        if W_FMT == 1:  # e4m3 bytes arrive as uint8 (a masked fp8 load has no portable `other`)
            if FP8_NATIVE:
                b = b.to(tl.float8e4nv, bitcast=True)
            else:  # no fp8 type on this GPU: decode the bits (W8A16 only)
                b = _e4m3_decode(b)
            sb = tl.load(bs_ptr + e.to(tl.int64) * stride_se + (brow // BN_S) * stride_sn + k0 // BK_S, mask=row_ok,
                         other=0)
            if SCALE_E8M0:
                sb = tl.exp2(sb.to(tl.float32) - 127.0)
            sb = sb.to(tl.float32)
        else:
            sb = tl.full((BLOCK_N,), 1.0, tl.float32)
    return b, sb


@triton.jit
def _to_e4m3(v, s):
    # clamp(v / s, +-448) -> e4m3, round to nearest even (cvt.rn.satfinite).
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -448.0), 448.0)
    return q.to(tl.float8e4nv)


@triton.jit
def _mma(acc, a, aq, sa, b, sb, ACT_Q: tl.constexpr, W_FMT: tl.constexpr):
    if ACT_Q == 0:  # weights dequantized in registers, the MMA of A's dtype
        if W_FMT == 1:
            bd = (b.to(tl.float32) * sb[:, None]).to(a.dtype)
        else:
            bd = b.to(a.dtype)
        acc = acc + tl.dot(a, tl.trans(bd), out_dtype=tl.float32)
    else:  # W8A8 on the FP8 tensor cores, both scales applied to the fp32 partial product
        acc = acc + tl.dot(aq, tl.trans(b), out_dtype=tl.float32) * (sa * sb[None, :])
    return acc


@triton.jit
def _qgemm_fwd_kernel(
    a_ptr,            # [Ra, K] A rows (float, or e4m3 bytes when A_FP8); Ra = T (token rows) or S (slot rows)
    a_scale_ptr,      # [Ra, cdiv(K, BLOCK_K)] fp32 scales of an e4m3 A (A_FP8)
    b_ptr,            # [E, NB, K] float weights / e4m3 bytes, or [E, NB, K/2] packed fp4 bytes (NB = 2N gated GEMM1)
    bs_ptr,           # fp8: [E, cdiv(NB, BN_S), cdiv(K, BK_S)]; fp4: [E, NB, K/32]; fp32 or uint8 e8m0
    act_scale_ptr,    # [E] fp32 static activation scale (ACT_Q == 2)
    bias_ptr,         # [E, NB] (HAS_BIAS)
    c_ptr,            # [S, N] output rows in slot order (e4m3 when QUANT_OUT)
    c_scale_ptr,      # [S, cdiv(N, BLOCK_N)] fp32 scales of an e4m3 C (QUANT_OUT)
    padded_slot_ptr,  # [P] int32 padded row -> slot, -1 for padding
    slot_token_ptr,   # [S] int32
    slot_weight_ptr,  # [S] float (ROW_SCALE)
    block_expert_ptr,  # [NUM_BLOCKS] int32, -1 past the last used block
    N, K,
    stride_am, stride_asm, stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_bias_e, stride_cm,
    stride_csm,
    alpha, limit,
    A_TOKEN: tl.constexpr, A_FP8: tl.constexpr, ACT_Q: tl.constexpr, W_FMT: tl.constexpr,
    SCALE_E8M0: tl.constexpr, BN_S: tl.constexpr, BK_S: tl.constexpr, FP8_NATIVE: tl.constexpr,
    EPI_ACT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(padded_slot_ptr + rows)
    row_ok = slot >= 0
    slot_c = tl.maximum(slot, 0)
    if A_TOKEN:
        arow = tl.load(slot_token_ptr + slot_c, mask=row_ok, other=0).to(tl.int64)
    else:
        arow = slot_c.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    if GATED and EPI_ACT:
        if INTERLEAVED:
            grow, urow = 2 * offs_n, 2 * offs_n + 1
        else:
            grow, urow = offs_n, N + offs_n
    else:
        grow, urow = offs_n, offs_n
    sa = 1.0
    if ACT_Q == 2:
        sa = tl.load(act_scale_ptr + e)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + arow[:, None] * stride_am + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0)
        if A_FP8:  # e4m3 h from GEMM1, passed as uint8
            a = a.to(tl.float8e4nv, bitcast=True)
        aq = a
        sa_t = sa
        if ACT_Q == 1:
            if A_FP8:
                sa_t = tl.load(a_scale_ptr + arow * stride_asm + k0 // BLOCK_K, mask=row_ok, other=1.0)[:, None]
            else:
                af = a.to(tl.float32)
                s_row = tl.maximum(tl.max(tl.abs(af), axis=1), 1e-4) / 448.0  # quant.ACT_SCALE_FLOOR, E4M3_MAX
                aq = _to_e4m3(af, s_row[:, None])
                sa_t = s_row[:, None]
        elif ACT_Q == 2:
            aq = _to_e4m3(a.to(tl.float32), sa)
        b, sb = _load_b(b_ptr, bs_ptr, e, grow, offs_k, k0, n_ok, K, stride_be, stride_bn, stride_bk, stride_se,
                        stride_sn, W_FMT, SCALE_E8M0, BN_S, BK_S, FP8_NATIVE, BLOCK_N, BLOCK_K)
        acc_g = _mma(acc_g, a, aq, sa_t, b, sb, ACT_Q, W_FMT)
        if GATED and EPI_ACT:
            b, sb = _load_b(b_ptr, bs_ptr, e, urow, offs_k, k0, n_ok, K, stride_be, stride_bn, stride_bk, stride_se,
                            stride_sn, W_FMT, SCALE_E8M0, BN_S, BK_S, FP8_NATIVE, BLOCK_N, BLOCK_K)
            acc_u = _mma(acc_u, a, aq, sa_t, b, sb, ACT_Q, W_FMT)
    if HAS_BIAS:
        bias = bias_ptr + e.to(tl.int64) * stride_bias_e
        acc_g += tl.load(bias + grow, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED and EPI_ACT:
            acc_u += tl.load(bias + urow, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPI_ACT:
        v = _act_fwd(acc_g, acc_u, ACT, GATED, alpha, limit)
    else:
        v = acc_g
        if ROW_SCALE:
            v = v * tl.load(slot_weight_ptr + slot_c, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_mask = row_ok[:, None] & n_ok[None, :]
    c_ptrs = c_ptr + slot_c.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    if QUANT_OUT:
        v = tl.where(n_ok[None, :], v, 0.0)
        s_row = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-4) / 448.0
        tl.store(c_ptrs, _to_e4m3(v, s_row[:, None]), mask=c_mask)
        tl.store(c_scale_ptr + slot_c.to(tl.int64) * stride_csm + pid_n, s_row, mask=row_ok)
    else:
        tl.store(c_ptrs, v.to(c_ptr.dtype.element_ty), mask=c_mask)


# --------------------------------------------------------------------------- launcher


def fp8_mma(device: torch.device) -> bool:
    """Whether the device's tensor cores take e4m3 (sm_89 and newer; the interpreter runs
    fp8 dots too). Elsewhere fp8 weights are decoded from their bits in registers."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def num_warps_for(consts: dict) -> int:
    """Warps of one launch from its constexprs: a gated GEMM1 holds two fp32 accumulators
    (gate and up); with A quantized in registers (W8A8), BLOCK_N = 128 or fp4 tiles decoded
    in registers, 4 warps spill on sm_80 / sm_90 / sm_100, 8 do not (tests/test_quant_aot.py)."""
    if not consts["FP8_NATIVE"]:  # sm_80/86: BLOCK_K = 32 tiles fit 4 warps' registers
        return 4
    heavy = consts["BLOCK_N"] >= 128 or consts["ACT_Q"] or consts["W_FMT"] == W_FP4
    return 8 if consts["EPI_ACT"] and consts["GATED"] and heavy else 4


def _pow2_divisor(v: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and v % (d * 2) == 0:
        d *= 2
    return d


def _block_k(w: QuantizedWeight | None, act_q: str, group: int, fp8_native: bool = True) -> int:
    # K tile: the activation group for W8A8 (one A scale per row per step); 64 for fp4 and a
    # divisor of the fp8 block otherwise; 32 on GPUs without fp8 (sm_80/86), where decoding
    # two 64-wide tiles in registers spills (tests/test_quant_aot.py).
    if w is None:
        return 32
    if not fp8_native:
        if w.format == "fp8" and w.block[1] % 32:
            raise ValueError(f"block: fp8 weights on a GPU without fp8 need K blocks of a multiple of 32, "
                             f"got {w.block}")
        return 32
    if w.format == "fp4":
        return 64
    bk = w.block[1]
    if act_q == "dynamic":
        if bk % group:
            raise ValueError(f"act_group: dynamic activation groups of {group} must tile the weight blocks along K "
                             f"({bk})")
        return group
    d = _pow2_divisor(bk, 128)
    if d < 16:
        raise ValueError(f"block: the triton kernels need fp8 weight blocks whose K size has a power-of-two divisor "
                         f">= 16, got {w.block}")
    return d


def qgemm(a: torch.Tensor, w: torch.Tensor | QuantizedWeight, plan: DispatchPlan, *, a_rows: str, out_cols: int,
          epilogue: str, quant: ExpertQuant | None, activation: Activation | None = None, interleaved: bool = False,
          bias: torch.Tensor | None = None, a_scale: torch.Tensor | None = None, act_scale: torch.Tensor | None = None,
          row_scale: bool = False, out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One quantized grouped GEMM; returns ``(c [S, out_cols], c_scale or None)``.

    ``w``: a :class:`~moe_kernels.quant.QuantizedWeight` or a float [E, NB, K] view.
    ``epilogue``: ``"act"`` (GEMM1: activation; with dynamic quantization writes e4m3 h and
    its [S, cdiv(N, 128)] scales) or ``"out"`` (GEMM2; ``row_scale`` multiplies the slot
    weight). ``a_scale``: the scales of an e4m3 ``a`` (GEMM2 after a dynamic GEMM1)."""
    act_q = quant.act if quant is not None else "none"
    qw = w if isinstance(w, QuantizedWeight) else None
    group = quant.act_group if quant is not None else 128
    fp8_native = fp8_mma(a.device)
    if not fp8_native and act_q != "none":
        raise ValueError(f"quant: {a.device} has no FP8 tensor cores (compute capability < 8.9): W8A8 cannot run; "
                         f"quantize with act_scheme='none' (W8A16)")
    s = plan.num_slots
    n, k = out_cols, (qw.shape[2] if qw is not None else w.shape[2])
    quant_out = epilogue == "act" and act_q == "dynamic"
    block_n = group if quant_out else 64
    block_k = _block_k(qw, act_q, group, fp8_native)
    if a_scale is not None and block_k != group:
        raise ValueError("a_scale: an e4m3 A operand needs BLOCK_K = the activation group")
    c = _empty((s, n), dtype=torch.float8_e4m3fn if quant_out else out_dtype, device=a.device)
    c_scale = _empty((s, triton.cdiv(n, block_n)), dtype=torch.float32, device=a.device) if quant_out else None
    act = activation or Activation("swiglu")
    gated = epilogue == "act" and act.gated
    if qw is not None:
        b, bs = qw.data.view(torch.uint8), qw.scale_bits()
        w_fmt, (bn_s, bk_s), e8m0 = (W_FP4 if qw.format == "fp4" else W_FP8), qw.block, qw.e8m0
    else:
        b, bs, w_fmt, bn_s, bk_s, e8m0 = w, w, W_FLOAT, 1, 1, False
    dummy = c
    grid = (plan.num_blocks, triton.cdiv(n, block_n))
    if s == 0 or n == 0:
        return c, c_scale
    consts = dict(A_TOKEN=a_rows == "token", A_FP8=a_scale is not None, ACT_Q=_ACT_Q[act_q], W_FMT=w_fmt,
                  SCALE_E8M0=e8m0, BN_S=bn_s, BK_S=bk_s, FP8_NATIVE=fp8_native, EPI_ACT=epilogue == "act",
                  ACT=ACT_CODES[act.name],
                  GATED=gated, INTERLEAVED=bool(interleaved), HAS_BIAS=bias is not None, ROW_SCALE=row_scale,
                  QUANT_OUT=quant_out, BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    with on_device(a):
        _qgemm_fwd_kernel[grid](
            a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a, a_scale if a_scale is not None else dummy, b, bs, act_scale if act_scale is not None else dummy,
            bias if bias is not None else dummy, c, c_scale if c_scale is not None else dummy,
            plan.padded_slot, plan.slot_token, plan.slot_weight, plan.block_expert,
            n, k, a.stride(0), a_scale.stride(0) if a_scale is not None else 0, b.stride(0), b.stride(1),
            b.stride(2), bs.stride(0), bs.stride(1), bias.stride(0) if bias is not None else 0, c.stride(0),
            c_scale.stride(0) if c_scale is not None else 0, float(act.alpha), float(act.limit),
            **consts, num_warps=num_warps_for(consts))
    return c, c_scale


def qgemm_torch(a, w, plan, *, a_rows, out_cols, epilogue, quant, activation=None, interleaved=False, bias=None,
                a_scale=None, act_scale=None, row_scale=False, out_dtype=torch.float32):
    """Pure-PyTorch twin of :func:`qgemm` (same signature and outputs)."""
    act_q = quant.act if quant is not None else "none"
    s = plan.num_slots
    slots = torch.arange(s, device=a.device)
    rows = plan.slot_token.long() if a_rows == "token" else slots
    e = plan.slot_expert.long().clamp(max=plan.num_experts - 1)
    if a_scale is not None:
        group = quant.act_group
        af = a.float()[rows] * a_scale[rows].repeat_interleave(group, 1)[:, :a.shape[1]]
    elif act_q == "dynamic":
        q, sc = quantize_act_fp8(a[rows], quant.act_group)
        af = q.float() * sc.repeat_interleave(quant.act_group, 1)[:, :a.shape[1]]
    elif act_q == "static":
        sc = act_scale.float()[e][:, None]
        af = (a[rows].float() / sc).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * sc
    else:
        af = a[rows].float()
    wf = dequantize(w) if isinstance(w, QuantizedWeight) else w.float()
    v = torch.einsum("sk,snk->sn", af, wf[e])
    if bias is not None:
        v = v + bias.float()[e]
    if epilogue == "act":
        v = apply_activation(v, activation, interleaved)
        if act_q == "dynamic":
            q, sc = quantize_act_fp8(v, quant.act_group)
            return q, sc
    elif row_scale:
        v = v * plan.slot_weight.float()[:, None]
    return v.to(out_dtype), None
