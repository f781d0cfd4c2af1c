"""The grouped GEMM of every expert matmul, forward and backward: one kernel
(``_grouped_gemm_kernel``), flags.

``C[r] = epilogue(A[row_of(r)] @ B[e]^T)`` over the plan's padded rows ``r``; row block
``b`` belongs to expert ``e = plan.block_expert[b]`` (``-1``: the program exits), so a
tile never straddles two experts. ``B`` is any strided ``[E, N, K]`` view: the layer's
four GEMMs use W13 ``[E, nI, H]``, W2 ``[E, H, I]`` and their transposed views without
a copy. ``A`` rows are gathered inside the kernel (``A_ROWS``): ``token`` reads
``x[slot_token[padded_slot[r]]]`` (no permuted copy of x), ``slot`` reads
``A[padded_slot[r]]``, ``padded`` reads ``A[r]``. Outputs go to slot order (``[S, .]``,
what the combine and the weight gradients index) or padded order.

Pipeline (ops.py runs it):

====================  ============  =====================================================
GEMM                  A (rows)      epilogue
====================  ============  =====================================================
GEMM1  x W13^T        x (token)     + b13, activation (gated: two accumulators, or one
                                    2*BLOCK_N tile split for interleaved rows) -> h [S, I];
                                    pre-activation h13 [S, nI] saved for backward
GEMM2  h W2^T         h (slot)      + b2, x slot weight -> y [S, H]; fused combine:
                                    out[t] = sum_j y[token_slots[t, j]]
dGEMM2 dOut W2        dOut (token)  g = dOut[t] W2[e]: dw partial = dot(g, h) (+ dOut.b2),
                                    activation backward of (slot weight x g) -> dh13 [S, nI],
                                    h [S, I] for dW2
dGEMM1 dh13 W13       dh13 (slot)   -> dx_slot [S, H], fused combine into dx [T, H];
                                    dw[s] = sum of the partials
====================  ============  =====================================================

Backward saves x, the weights, the plan and h13 (the pre-activation, [S, nI]); with
``recompute_h`` it saves no h13 and reruns GEMM1 without the activation (see ops.py).

Fused combine (combine.py): the program that completes a token's last slot sums the
token's rows in ``token_slots`` order (int32 counters, no float atomics, bitwise
deterministic); the previous kernel's prologue zeroes the counters and the rows of
tokens with no valid slot, so a layer forward is routing + plan + GEMM1 + GEMM2 = 4
launches. ``combine="none"`` leaves ``y`` for the separate combine kernel.

Numerics: fp32 accumulation, the activation in fp32, outputs rounded to their buffer's
dtype; row offsets and expert offsets in int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...activations import Activation, apply_activation
from .act import ACT_CODES, _act_bwd, _act_fwd
from ...primitives import combine_slots
from . import on_device
from .combine import _fused_combine, _zero_prologue, ks_block
from .configs import GemmConfig, autotune_configs, capability_of, gemm_config

__all__ = ["ACT_CODES", "Prologue", "GemmOutputs", "grouped_gemm", "grouped_gemm_torch", "dot_precision",
           "tf32_allowed"]

_A_ROWS = {"token": 0, "slot": 1, "padded": 2}
_C_ROWS = {"slot": 1, "padded": 2}
_EPI = {"none": 0, "act": 1, "act_bwd": 2}
_PRO_BLOCK = 1024


# --------------------------------------------------------------------------- kernel


@triton.jit
def _load_pair(ptr, rows, stride_m, n0, offs_n, row_ok, N,
               INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Gate and up columns n0 + offs_n of a [R, 2N] row-major buffer laid out like W13's rows.
    if INTERLEAVED:
        cols = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        v = tl.load(ptr + rows[:, None] * stride_m + cols[None, :],
                    mask=row_ok[:, None] & (cols < 2 * N)[None, :], other=0.0).to(tl.float32)
        g, u = tl.split(tl.reshape(v, (BLOCK_M, BLOCK_N, 2)))
    else:
        cols = n0 + offs_n
        m = row_ok[:, None] & (cols < N)[None, :]
        g = tl.load(ptr + rows[:, None] * stride_m + cols[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(ptr + rows[:, None] * stride_m + (N + cols)[None, :], mask=m, other=0.0).to(tl.float32)
    return g, u


@triton.jit
def _store_pair(ptr, rows, stride_m, n0, offs_n, row_ok, N, g, u,
                INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if INTERLEAVED:
        cols = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        v = tl.reshape(tl.join(g, u), (BLOCK_M, 2 * BLOCK_N))
        tl.store(ptr + rows[:, None] * stride_m + cols[None, :], v.to(ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < 2 * N)[None, :])
    else:
        cols = n0 + offs_n
        m = row_ok[:, None] & (cols < N)[None, :]
        tl.store(ptr + rows[:, None] * stride_m + cols[None, :], g.to(ptr.dtype.element_ty), mask=m)
        tl.store(ptr + rows[:, None] * stride_m + (N + cols)[None, :], u.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,              # [Ra, K] A rows (Ra = T, S or P by A_ROWS)
    b_ptr,              # [E, NB, K] strided weights (NB = 2N for the gated GEMM1, else N)
    c_ptr,              # [Rc, NC] main output, rows by C_ROWS (NC = N; 2N for a gated act_bwd)
    bias_ptr,           # [E, NB] bias of A @ B^T (HAS_BIAS)
    pre_ptr,            # [Rc, NB] (act) or [Rc, NC] (act_bwd): pre-activation written / read
    h_ptr,              # [Rc, N] activation recomputed by act_bwd (STORE_H)
    wpart_ptr,          # [S, NUM_WPART] fp32: per column block dot(g, h) (act_bwd) / read by DW_FINAL
    bias_dot_ptr,       # [E, K] vector whose dot with each A row joins wpart (BIAS_DOT)
    dw_ptr,             # [S] fp32 slot-weight gradient (DW_FINAL)
    padded_slot_ptr,    # [P] int32 padded row -> slot, -1 for padding
    slot_token_ptr,     # [S] int32
    slot_weight_ptr,    # [S] float
    block_expert_ptr,   # [NUM_BLOCKS] int32, -1 past the last used block
    token_slots_ptr,    # [T, KS] int32, -1 padded
    counter_ptr,        # [T, cdiv(N, BLOCK_N)] int32 zeroed by the previous kernel (FUSED_COMBINE)
    out_ptr,            # [T, N] combined output (FUSED_COMBINE)
    pro_counter_ptr,    # [pro_count] int32 (prologue)
    pro_out_ptr,        # [T, pro_n] (prologue)
    pro_f32_ptr,        # [pro_f32_len] fp32 (prologue)
    T, N, K, KS, NUM_BLOCKS, NUM_WPART, pro_count, pro_n, pro_f32_len,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_bias_e,
    stride_pm, stride_hm, stride_bd_e, stride_om, stride_pro_om,
    alpha, limit,
    A_ROWS: tl.constexpr, C_ROWS: tl.constexpr, EPI: tl.constexpr, ACT: tl.constexpr,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, TWO_DOTS: tl.constexpr, B_TILE_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_C: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr,
    ROW_SCALE: tl.constexpr, BIAS_DOT: tl.constexpr, DW_FINAL: tl.constexpr, FUSED_COMBINE: tl.constexpr,
    PRO_COUNTERS: tl.constexpr, PRO_EMPTY_ROWS: tl.constexpr, PRO_F32: tl.constexpr,
    KS_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRO_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if PRO_COUNTERS or PRO_EMPTY_ROWS or PRO_F32:
        _zero_prologue(pid, tl.num_programs(0), T, KS, pro_count, pro_n, pro_f32_len, token_slots_ptr,
                       pro_counter_ptr, pro_out_ptr, pro_f32_ptr, stride_pro_om,
                       PRO_COUNTERS, PRO_EMPTY_ROWS, PRO_F32, KS_BLOCK, PRO_BLOCK, 16, 128)

    # Swizzled order: GROUP_M row blocks (mostly one expert) sweep the N tiles together,
    # so each weight tile comes from HBM once and from L2 for the rest of the group.
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(NUM_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    e64 = expert.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    prow = pid_m.to(tl.int64) * BLOCK_M + offs_m
    slot = tl.load(padded_slot_ptr + prow)
    row_ok = slot >= 0
    slot64 = tl.where(row_ok, slot, 0).to(tl.int64)
    token64 = tl.load(slot_token_ptr + slot64, mask=row_ok, other=0).to(tl.int64)
    if A_ROWS == 0:
        a_rows = token64
    elif A_ROWS == 1:
        a_rows = slot64
    else:
        a_rows = prow
    if C_ROWS == 1:
        c_rows = slot64
    else:
        c_rows = prow

    n0 = pid_n * BLOCK_N
    if TWO_DOTS or not GATED or EPI != 1:
        b_cols = n0 + tl.arange(0, B_TILE_N)
        b_ok = b_cols < N
    else:  # interleaved gate/up rows: one contiguous 2*BLOCK_N tile, split in the epilogue
        b_cols = 2 * n0 + tl.arange(0, B_TILE_N)
        b_ok = b_cols < 2 * N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + e64 * stride_be + b_cols[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    b2_ptrs = b_ptrs + N * stride_bn  # up rows (TWO_DOTS)
    acc = tl.zeros((BLOCK_M, B_TILE_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, B_TILE_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=b_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & b_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if TWO_DOTS:
            if EVEN_K:
                b2 = tl.load(b2_ptrs, mask=b_ok[None, :], other=0.0)
            else:
                b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & b_ok[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        b2_ptrs += BLOCK_K * stride_bk

    cols = n0 + offs_n
    col_ok = cols < N
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if ROW_SCALE or EPI == 2:
        w = tl.load(slot_weight_ptr + slot64, mask=row_ok, other=0.0).to(tl.float32)

    if EPI == 1:  # ---------------------------------------------- GEMM1: bias, activation
        if HAS_BIAS:
            bias_row = bias_ptr + e64 * stride_bias_e
            acc += tl.load(bias_row + b_cols, mask=b_ok, other=0.0).to(tl.float32)[None, :]
            if TWO_DOTS:
                acc2 += tl.load(bias_row + N + b_cols, mask=b_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            if TWO_DOTS:
                g = acc
                u = acc2
            else:
                g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
            if STORE_PRE:
                _store_pair(pre_ptr, c_rows, stride_pm, n0, offs_n, row_ok, N, g, u,
                            INTERLEAVED, BLOCK_M, BLOCK_N)
        else:
            g = acc
            u = acc
            if STORE_PRE:
                tl.store(pre_ptr + c_rows[:, None] * stride_pm + cols[None, :],
                         g.to(pre_ptr.dtype.element_ty), mask=tile_ok)
        if STORE_C:
            h = _act_fwd(g, u, ACT, GATED, alpha, limit)
            tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :], h.to(c_ptr.dtype.element_ty),
                     mask=tile_ok)
    elif EPI == 2:  # ------------------------------------ dGEMM2: activation backward
        if GATED:
            pg, pu = _load_pair(pre_ptr, c_rows, stride_pm, n0, offs_n, row_ok, N, INTERLEAVED, BLOCK_M, BLOCK_N)
        else:
            pg = tl.load(pre_ptr + c_rows[:, None] * stride_pm + cols[None, :], mask=tile_ok,
                         other=0.0).to(tl.float32)
            pu = pg
        h, dg, du = _act_bwd(pg, pu, acc * w[:, None], ACT, GATED, alpha, limit)
        # The forward rounded h to its dtype before GEMM2; the weight gradient and dW2 use that h.
        h = h.to(c_ptr.dtype.element_ty).to(tl.float32)
        part = tl.sum(tl.where(tile_ok, acc * h, 0.0), axis=1)
        if BIAS_DOT:
            # y = h W2^T + b2, so dw also gets dot(dOut[t], b2[e]): once per row, by the
            # first column block, in its own loop (kept out of the MMA loop's registers).
            if pid_n == 0:
                a_row_ptrs = a_ptr + a_rows[:, None] * stride_am
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + offs_k
                    av = tl.load(a_row_ptrs + kk[None, :] * stride_ak, mask=row_ok[:, None] & (kk < K)[None, :],
                                 other=0.0).to(tl.float32)
                    bd = tl.load(bias_dot_ptr + e64 * stride_bd_e + kk, mask=kk < K, other=0.0).to(tl.float32)
                    part += tl.sum(av * bd[None, :], axis=1)
        tl.store(wpart_ptr + slot64 * NUM_WPART + pid_n, part, mask=row_ok)
        if STORE_H:
            tl.store(h_ptr + c_rows[:, None] * stride_hm + cols[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=tile_ok)
        if GATED:
            _store_pair(c_ptr, c_rows, stride_cm, n0, offs_n, row_ok, N, dg, du, INTERLEAVED, BLOCK_M, BLOCK_N)
        else:
            tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :], dg.to(c_ptr.dtype.element_ty),
                     mask=tile_ok)
    else:  # ------------------------------------------- GEMM2 / dGEMM1: plain epilogue
        v = acc
        if HAS_BIAS:
            v += tl.load(bias_ptr + e64 * stride_bias_e + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ROW_SCALE:
            v = v * w[:, None]
        tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :], v.to(c_ptr.dtype.element_ty), mask=tile_ok)
        if DW_FINAL:
            if pid_n == 0:
                dw = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for j in range(0, NUM_WPART):
                    dw += tl.load(wpart_ptr + slot64 * NUM_WPART + j, mask=row_ok, other=0.0)
                tl.store(dw_ptr + slot64, dw, mask=row_ok)
        if FUSED_COMBINE:
            _fused_combine(c_ptr, token_slots_ptr, counter_ptr, out_ptr, token64, row_ok, cols, col_ok, offs_n,
                           pid_n, num_pid_n, KS, stride_cm, stride_om, KS_BLOCK, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------- launcher


@dataclass
class Prologue:
    """Work a GEMM does before its tiles, for the *next* kernel's fused combine:
    zero ``counters`` (int32) and ``zero_f32`` (fp32), and zero the rows of ``out``
    ([T, N]) whose token has no valid slot."""

    counters: torch.Tensor | None = None
    out: torch.Tensor | None = None
    zero_f32: torch.Tensor | None = None


@dataclass
class GemmOutputs:
    c: torch.Tensor | None = None       # main output rows (c_rows order)
    pre: torch.Tensor | None = None     # pre-activation written by epilogue="act"
    h: torch.Tensor | None = None       # activation recomputed by epilogue="act_bwd"
    wpart: torch.Tensor | None = None   # [S, num_pid_n] fp32 partials (act_bwd)
    dw: torch.Tensor | None = None      # [S] fp32 (dw_final)
    out: torch.Tensor | None = None     # [T, N] combined (combine="fused")


def _rows(plan, which: str) -> int:
    return {"token": plan.num_tokens, "slot": plan.slot_token.shape[0], "padded": plan.padded_slot.shape[0]}[which]


def _check_args(a, b, plan, a_rows, c_rows, epilogue, activation, combine):
    if a_rows not in _A_ROWS:
        raise ValueError(f"a_rows: expected one of {list(_A_ROWS)}, got {a_rows!r}")
    if c_rows not in _C_ROWS:
        raise ValueError(f"c_rows: expected one of {list(_C_ROWS)}, got {c_rows!r}")
    if epilogue not in _EPI:
        raise ValueError(f"epilogue: expected one of {list(_EPI)}, got {epilogue!r}")
    if epilogue != "none" and activation is None:
        raise ValueError(f"activation: required by epilogue={epilogue!r}")
    if combine not in ("none", "fused"):
        raise ValueError(f"combine: expected 'none' or 'fused', got {combine!r}")
    if combine == "fused" and (c_rows != "slot" or epilogue != "none"):
        raise ValueError("combine: 'fused' needs c_rows='slot' and epilogue='none'")
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"a, b: expected [R, K] and [E, N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != _rows(plan, a_rows):
        raise ValueError(f"a: expected {_rows(plan, a_rows)} rows for a_rows={a_rows!r}, got {a.shape[0]}")
    if a.shape[1] != b.shape[2]:
        raise ValueError(f"a: expected K = {b.shape[2]} columns (from b [E, N, K]), got {a.shape[1]}")
    if b.shape[0] != plan.num_experts:
        raise ValueError(f"b: expected {plan.num_experts} experts (from the plan), got {b.shape[0]}")
    if a.dtype != b.dtype:
        raise ValueError(f"a: expected dtype {b.dtype} like b, got {a.dtype}")


def _buf(given, shape, dtype, device, name):
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(given.shape) != tuple(shape) or given.dtype != dtype or given.device != torch.device(device):
        raise ValueError(f"{name}: expected a {dtype} buffer of shape {tuple(shape)} on {device}, "
                         f"got {given.dtype} {tuple(given.shape)} on {given.device}")
    if given.dim() == 2 and given.shape[1] > 1 and given.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride along its last dimension, got strides {given.stride()}")
    return given


def _tf32_allowed(matmul, backends) -> bool:
    prec = getattr(matmul, "fp32_precision", None)
    if prec is not None:  # torch >= 2.9: "tf32", "ieee", or "none" = the global setting
        if prec == "none":
            prec = getattr(backends, "fp32_precision", "none")
        return prec == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # a mix of the legacy and new APIs: torch refuses to answer
        return False


def tf32_allowed() -> bool:
    """Whether torch's fp32 matmuls may use TF32: ``torch.backends.cuda.matmul.fp32_precision``
    where it exists (torch >= 2.9; reading the legacy ``allow_tf32`` there raises once a
    user set the new API), else ``allow_tf32``."""
    return _tf32_allowed(torch.backends.cuda.matmul, torch.backends)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use TF32 only when torch's own matmuls would (:func:`tf32_allowed`)."""
    if dtype == torch.float32 and tf32_allowed():
        return "tf32"
    return "ieee"


def _prepare(a, b, plan, *, a_rows, c_rows, epilogue, activation, interleaved, bias, row_scale, store_c, store_pre,
             store_h, pre, bias_dot, wpart, dw_final, combine, c, h, dw, out, config):
    """Checks and output buffers shared by the launcher and its twin: (outputs, N, config)."""
    _check_args(a, b, plan, a_rows, c_rows, epilogue, activation, combine)
    act = activation
    gated = bool(act is not None and act.gated)
    e, nb, k = b.shape
    s, t, dev = plan.slot_token.shape[0], plan.num_tokens, a.device
    n = nb // 2 if (epilogue == "act" and gated) else nb
    rc = _rows(plan, c_rows)
    cfg = config or gemm_config(e, n, k, a.dtype, capability_of(dev), plan.block_m,
                                gated_b=epilogue == "act" and gated, heavy_epilogue=epilogue == "act_bwd")
    if cfg.BLOCK_M != plan.block_m:
        raise ValueError(f"config: BLOCK_M={cfg.BLOCK_M} must equal the plan's block_m={plan.block_m}")
    num_pid_n = triton.cdiv(n, cfg.BLOCK_N)
    res = GemmOutputs()
    nc = 2 * n if (epilogue == "act_bwd" and gated) else n
    if store_c:
        res.c = _buf(c, (rc, nc), a.dtype, dev, "c")
    if epilogue == "act" and store_pre:
        res.pre = _buf(pre, (rc, nb), a.dtype, dev, "pre")
    if epilogue == "act_bwd":
        if pre is None or tuple(pre.shape) != (rc, nc):
            raise ValueError(f"pre: epilogue='act_bwd' reads the saved pre-activation, expected shape {(rc, nc)}")
        res.pre = pre
        res.wpart = _buf(wpart, (s, num_pid_n), torch.float32, dev, "wpart")
        if store_h:
            res.h = _buf(h, (rc, n), a.dtype, dev, "h")
    if dw_final:
        if wpart is None or wpart.dim() != 2 or wpart.shape[0] != s:
            raise ValueError(f"wpart: dw_final needs the [S={s}, blocks] fp32 partials of the act_bwd GEMM")
        res.wpart = wpart
        res.dw = _buf(dw, (s,), torch.float32, dev, "dw")
    if combine == "fused":
        res.out = _buf(out, (t, n), a.dtype, dev, "out")
    if bias is not None and tuple(bias.shape) != (e, nb):
        raise ValueError(f"bias: expected shape {(e, nb)}, got {tuple(bias.shape)}")
    if bias_dot is not None and tuple(bias_dot.shape) != (e, k):
        raise ValueError(f"bias_dot: expected shape {(e, k)}, got {tuple(bias_dot.shape)}")
    return res, n, cfg


_AUTOTUNED = []


def _autotuned():
    """The kernel under ``triton.autotune`` (``autotune=True``): BLOCK_K, warps and
    stages are tuned per (N, K, dtype, mode); BLOCK_M is the plan's and BLOCK_N stays the
    heuristic's, since buffer shapes (partials, counters) depend on it. Benchmark runs
    repeat the kernel, which is idempotent except for the combine counters: restored."""
    if not _AUTOTUNED:
        cands = [triton.Config(c, num_warps=w, num_stages=st) for c, w, st in autotune_configs()]
        heur = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_grouped_gemm_kernel)
        _AUTOTUNED.append(triton.autotune(cands, key=["N", "K", "A_ROWS", "EPI", "ACT", "GATED", "BLOCK_M", "BLOCK_N"],
                                          restore_value=["counter_ptr"])(heur))
    return _AUTOTUNED[0]


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, plan, *, a_rows: str, c_rows: str = "slot", epilogue: str = "none",
    activation: Activation | None = None, interleaved: bool = False, bias: torch.Tensor | None = None,
    row_scale: bool = False, store_c: bool = True, store_pre: bool = False, store_h: bool = False,
    pre: torch.Tensor | None = None, bias_dot: torch.Tensor | None = None, wpart: torch.Tensor | None = None,
    dw_final: bool = False, combine: str = "none", prologue: Prologue | None = None,
    c: torch.Tensor | None = None, h: torch.Tensor | None = None, dw: torch.Tensor | None = None,
    out: torch.Tensor | None = None, counters: torch.Tensor | None = None, config: GemmConfig | None = None,
    autotune: bool = False,
) -> GemmOutputs:
    """One launch of the grouped GEMM. ``b`` is logically [E, NB, K]; ``N`` (the output
    columns) is NB, or NB/2 for ``epilogue="act"`` with a gated activation. Output
    buffers are allocated unless given (``c``, ``pre`` for ``store_pre``, ``h``, ``wpart``,
    ``dw``, ``out``, ``counters``). ``plan`` is a DispatchPlan (or any object with its
    fields). See the module docstring for the modes."""
    res, n, cfg = _prepare(a, b, plan, a_rows=a_rows, c_rows=c_rows, epilogue=epilogue, activation=activation,
                          interleaved=interleaved, bias=bias, row_scale=row_scale, store_c=store_c,
                          store_pre=store_pre, store_h=store_h, pre=pre, bias_dot=bias_dot, wpart=wpart,
                          dw_final=dw_final, combine=combine, c=c, h=h, dw=dw, out=out, config=config)
    act, e, k = activation, b.shape[0], b.shape[2]
    gated = bool(act is not None and act.gated)
    s, t, num_pid_n = plan.slot_token.shape[0], plan.num_tokens, triton.cdiv(n, cfg.BLOCK_N)
    if combine == "fused" and (counters is None or counters.numel() != t * num_pid_n):
        raise ValueError(f"counters: the fused combine needs {t}x{num_pid_n} int32 counters zeroed by the "
                         f"previous kernel's prologue")
    pro = prologue or Prologue()
    nblocks = plan.block_expert.shape[0]
    grid = (nblocks * num_pid_n,)
    if grid[0] == 0:
        return res
    dummy = plan.padded_slot  # any tensor: pointers of disabled features are never read
    ks = plan.token_slots.shape[1]
    two_dots = epilogue == "act" and gated and not interleaved
    b_tile_n = 2 * cfg.BLOCK_N if (epilogue == "act" and gated and interleaved) else cfg.BLOCK_N
    pre_t = res.pre if res.pre is not None else dummy
    args = (
        a, b, res.c if res.c is not None else dummy, bias if bias is not None else dummy, pre_t,
        res.h if res.h is not None else dummy, res.wpart if res.wpart is not None else dummy,
        bias_dot if bias_dot is not None else dummy, res.dw if res.dw is not None else dummy,
        plan.padded_slot, plan.slot_token, plan.slot_weight, plan.block_expert, plan.token_slots,
        counters if counters is not None else dummy, res.out if res.out is not None else dummy,
        pro.counters if pro.counters is not None else dummy, pro.out if pro.out is not None else dummy,
        pro.zero_f32 if pro.zero_f32 is not None else dummy,
        t, n, k, ks, nblocks, res.wpart.shape[1] if res.wpart is not None else 1,
        pro.counters.numel() if pro.counters is not None else 0,
        pro.out.shape[1] if pro.out is not None else 0,
        pro.zero_f32.numel() if pro.zero_f32 is not None else 0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        res.c.stride(0) if res.c is not None else 0, bias.stride(0) if bias is not None else 0,
        pre_t.stride(0) if res.pre is not None else 0, res.h.stride(0) if res.h is not None else 0,
        bias_dot.stride(0) if bias_dot is not None else 0, res.out.stride(0) if res.out is not None else 0,
        pro.out.stride(0) if pro.out is not None else 0,
        float(act.alpha) if act is not None else 0.0, float(act.limit) if act is not None else 0.0,
    )
    meta = dict(
        A_ROWS=_A_ROWS[a_rows], C_ROWS=_C_ROWS[c_rows], EPI=_EPI[epilogue],
        ACT=ACT_CODES[act.name] if act is not None else 0, GATED=gated, INTERLEAVED=bool(interleaved and gated),
        TWO_DOTS=two_dots, B_TILE_N=b_tile_n, HAS_BIAS=bias is not None, STORE_C=store_c,
        STORE_PRE=res.pre is not None and epilogue == "act", STORE_H=res.h is not None, ROW_SCALE=row_scale,
        BIAS_DOT=bias_dot is not None, DW_FINAL=dw_final, FUSED_COMBINE=combine == "fused",
        PRO_COUNTERS=pro.counters is not None, PRO_EMPTY_ROWS=pro.out is not None, PRO_F32=pro.zero_f32 is not None,
        KS_BLOCK=ks_block(ks), DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, GROUP_M=cfg.GROUP_M, PRO_BLOCK=_PRO_BLOCK,
    )
    with on_device(a):
        if a.is_cuda and autotune:
            _autotuned()[grid](*args, **meta)
        else:
            _grouped_gemm_kernel[grid](*args, **meta, BLOCK_K=cfg.BLOCK_K, EVEN_K=k % cfg.BLOCK_K == 0,
                                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return res


# --------------------------------------------------------------------------- twin


def grouped_gemm_torch(
    a: torch.Tensor, b: torch.Tensor, plan, *, a_rows: str, c_rows: str = "slot", epilogue: str = "none",
    activation: Activation | None = None, interleaved: bool = False, bias: torch.Tensor | None = None,
    row_scale: bool = False, store_c: bool = True, store_pre: bool = False, store_h: bool = False,
    pre: torch.Tensor | None = None, bias_dot: torch.Tensor | None = None, wpart: torch.Tensor | None = None,
    dw_final: bool = False, combine: str = "none", prologue: Prologue | None = None,
    c: torch.Tensor | None = None, h: torch.Tensor | None = None, dw: torch.Tensor | None = None,
    out: torch.Tensor | None = None, counters: torch.Tensor | None = None, config: GemmConfig | None = None,
    autotune: bool = False,
) -> GemmOutputs:
    """Pure-PyTorch twin of :func:`grouped_gemm` (same signature, same buffers written,
    fp32 math): writes only the rows the kernel writes."""
    pro = prologue or Prologue()
    if pro.counters is not None:
        pro.counters.zero_()
    if pro.zero_f32 is not None:
        pro.zero_f32.zero_()
    if pro.out is not None:
        pro.out[(plan.token_slots < 0).all(dim=1)] = 0
    res, n, cfg = _prepare(a, b, plan, a_rows=a_rows, c_rows=c_rows, epilogue=epilogue, activation=activation,
                          interleaved=interleaved, bias=bias, row_scale=row_scale, store_c=store_c,
                          store_pre=store_pre, store_h=store_h, pre=pre, bias_dot=bias_dot, wpart=wpart,
                          dw_final=dw_final, combine=combine, c=c, h=h, dw=dw, out=out, config=config)
    act, s, t, dev, dt = activation, plan.slot_token.shape[0], plan.num_tokens, a.device, a.dtype
    nb, num_pid_n = b.shape[1], triton.cdiv(n, cfg.BLOCK_N)

    padded = plan.padded_slot.long()
    rows = torch.arange(padded.shape[0], device=dev)
    expert = plan.block_expert.long()[rows // plan.block_m]
    valid = (padded >= 0) & (expert >= 0)
    vr, vs, ve = rows[valid], padded[valid], expert[valid]
    tok = plan.slot_token.long()[vs]
    a_idx = {"token": tok, "slot": vs, "padded": vr}[a_rows]
    c_idx = vs if c_rows == "slot" else vr
    av = a[a_idx].float()
    acc = torch.zeros(vr.shape[0], nb, dtype=torch.float32, device=dev)
    for x in ve.unique().tolist():
        sel = ve == x
        acc[sel] = av[sel] @ b[x].float().t()
    w = plan.slot_weight[vs].float().unsqueeze(1)
    if epilogue == "act":
        if bias is not None:
            acc = acc + bias[ve].float()
        if res.pre is not None:
            res.pre[c_idx] = acc.to(dt)
        if store_c:
            res.c[c_idx] = apply_activation(acc, act, interleaved).to(dt)
    elif epilogue == "act_bwd":
        pv = pre[c_idx].float().requires_grad_(True)
        with torch.enable_grad():
            hv = apply_activation(pv, act, interleaved)
            (dpre,) = torch.autograd.grad(hv, pv, acc * w)
        hv = hv.detach().to(dt).float()
        prod = torch.nn.functional.pad(acc * hv, (0, num_pid_n * cfg.BLOCK_N - n))
        part = prod.view(-1, num_pid_n, cfg.BLOCK_N).sum(-1)
        if bias_dot is not None:
            part[:, 0] += (av * bias_dot[ve].float()).sum(1)
        res.wpart[vs] = part
        if store_h:
            res.h[c_idx] = hv.to(dt)
        if store_c:
            res.c[c_idx] = dpre.to(dt)
    else:
        v = acc
        if bias is not None:
            v = v + bias[ve].float()
        if row_scale:
            v = v * w
        if store_c:
            res.c[c_idx] = v.to(dt)
        if dw_final:
            res.dw[vs] = wpart[vs].sum(1)
        if combine == "fused":
            has = (plan.token_slots >= 0).any(dim=1)
            res.out[has] = combine_slots(res.c.float(), plan.token_slots)[has].to(dt)
    return res
