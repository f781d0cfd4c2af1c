"""The per-token combine ``out[t] = sum_j y[token_slots[t, j]]``: fused into a GEMM's
epilogue (default), or as its own kernel.

Fused (``_fused_combine``, called by gemm.py's kernel with ``FUSED_COMBINE``): after a
program stores its tile of ``y`` it counts, per (token, column block), how many of the
token's valid slots are done: a CTA barrier orders every thread's stores before an
int32 ``atomic_add`` (acq_rel, GPU scope) per row, and the program whose add completes
a token (the last arriver) sums ``y[token_slots[t, 0..K-1]]`` in column order, reading
the other programs' rows through L2. The threadfence-reduction pattern: no float
atomics, no waiting (no deadlock whatever the scheduling), and the sum's order is fixed,
so the result is bitwise deterministic. The counters [T, column blocks] and the output
rows of tokens without a valid slot are zeroed by the *previous* kernel's prologue
(``_zero_prologue``: GEMM1 for GEMM2, dGEMM2 for dGEMM1), which stream order makes
visible before the combining kernel starts.

The fused combine and the prologue read ``token_slots`` rows ``KS_BLOCK`` (<= 16)
columns at a time: Expert Choice and dense routings have ``KS = E`` columns, and one
[rows, E] int32 tile would spill.

Separate (``_combine_fwd_kernel``): ``combine="separate"``, or what ``"auto"`` picks
for many slots per token (configs.combine_mode: the fused tail grows with K), at the
cost of one extra launch, and the reference the fused path is checked against bit for bit: both
sum the same ``y`` values in fp32 in ``token_slots`` column order. A token with no
valid slot gets a zero row. No backward of its own: the experts' autograd (ops.py)
differentiates the whole layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...primitives import combine_slots
from . import on_device

__all__ = ["combine", "combine_torch", "ks_block"]


@triton.jit
def _zero_prologue(
    pid, nprog, T, KS, pro_count, pro_n, pro_f32_len,
    token_slots_ptr,    # [T, KS] int32
    pro_counter_ptr,    # [pro_count] int32, zeroed for the next kernel's combine
    pro_out_ptr,        # [T, pro_n] next kernel's combined output: empty tokens' rows zeroed
    pro_f32_ptr,        # [pro_f32_len] fp32 zeroed (the slot-weight gradient)
    stride_pro_om,
    PRO_COUNTERS: tl.constexpr, PRO_EMPTY_ROWS: tl.constexpr, PRO_F32: tl.constexpr,
    KS_BLOCK: tl.constexpr, BLOCK: tl.constexpr, PRO_T: tl.constexpr, PRO_N: tl.constexpr,
):
    # Grid-stride loops over every program of the launch, before its early exit. The
    # bounds are 64-bit: past 2^21 programs (x 1024) an int32 start would wrap and the
    # counters would not be zeroed.
    offs = tl.arange(0, BLOCK)
    pid64 = pid.to(tl.int64)
    nprog64 = nprog.to(tl.int64)
    if PRO_COUNTERS:
        for i0 in range(pid64 * BLOCK, pro_count, nprog64 * BLOCK):
            tl.store(pro_counter_ptr + i0 + offs, tl.zeros([BLOCK], tl.int32), mask=i0 + offs < pro_count)
    if PRO_F32:
        for i0 in range(pid64 * BLOCK, pro_f32_len, nprog64 * BLOCK):
            tl.store(pro_f32_ptr + i0 + offs, tl.zeros([BLOCK], tl.float32), mask=i0 + offs < pro_f32_len)
    if PRO_EMPTY_ROWS:
        rows = tl.arange(0, PRO_T)
        cols = tl.arange(0, PRO_N)
        for t0 in range(pid64 * PRO_T, T, nprog64 * PRO_T):
            tok = t0 + rows
            tok_ok = tok < T
            best = _max_slot(token_slots_ptr, tok, tok_ok, KS, KS_BLOCK, PRO_T)
            empty = tok_ok & (best < 0)  # no valid slot: nobody else writes these rows
            if tl.max(empty.to(tl.int32), axis=0) > 0:
                for n0 in range(0, pro_n, PRO_N):
                    tl.store(pro_out_ptr + tok[:, None] * stride_pro_om + (n0 + cols)[None, :],
                             tl.zeros((PRO_T, PRO_N), tl.float32).to(pro_out_ptr.dtype.element_ty),
                             mask=empty[:, None] & (n0 + cols < pro_n)[None, :])


@triton.jit
def _max_slot(token_slots_ptr,  # [T, KS] int32, -1 padded
              tok, tok_ok, KS, KS_BLOCK: tl.constexpr, ROWS: tl.constexpr):
    # Largest slot id in each token's row (-1: no valid slot), KS_BLOCK columns at a
    # time: KS is E for Expert Choice and dense routings (256 and more), and a whole
    # [ROWS, KS] int32 tile is ROWS*KS/threads registers a thread (the fused combine's
    # 64 x 256 tile: 128 registers, and GEMM2 spilled on sm_90).
    ks = tl.arange(0, KS_BLOCK)
    best = tl.full([ROWS], -1, tl.int32)
    for k0 in range(0, KS, KS_BLOCK):
        ts = tl.load(token_slots_ptr + tok[:, None] * KS + (k0 + ks)[None, :],
                     mask=tok_ok[:, None] & (k0 + ks < KS)[None, :], other=-1)
        best = tl.maximum(best, tl.max(ts, axis=1))
    return best


@triton.jit
def _count_slots(token_slots_ptr,  # [T, KS] int32, -1 padded
                 tok, tok_ok, KS, KS_BLOCK: tl.constexpr, ROWS: tl.constexpr):
    # Valid slots of each token, KS_BLOCK columns at a time (see _max_slot).
    ks = tl.arange(0, KS_BLOCK)
    n = tl.zeros([ROWS], tl.int32)
    for k0 in range(0, KS, KS_BLOCK):
        ts = tl.load(token_slots_ptr + tok[:, None] * KS + (k0 + ks)[None, :],
                     mask=tok_ok[:, None] & (k0 + ks < KS)[None, :], other=-1)
        n += tl.sum((ts >= 0).to(tl.int32), axis=1)
    return n


@triton.jit
def _fused_combine(c_ptr,            # [S, N] this program's y rows were just stored (slot order)
                   token_slots_ptr,  # [T, KS] int32
                   counter_ptr,      # [T, num_pid_n] int32, zeroed by the previous kernel
                   out_ptr,          # [T, N] combined rows
                   token64, row_ok, cols, col_ok, offs_n, pid_n, num_pid_n, KS, stride_cm, stride_om,
                   KS_BLOCK: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Every thread's y stores happen before the counter update (one CTA barrier, then
    # acq_rel atomics); one atomic per row: a [BLOCK_M, ATOM_W] pointer tile with only
    # column 0 live, so each live element has exactly one owning thread and its own
    # return value. TOP_K > 0 (a top-k routing, KS = TOP_K <= 16 columns) makes the slot
    # count and the sum over the token's slots compile-time loops that unroll.
    tl.debug_barrier()
    if TOP_K > 0:
        n_valid = _count_slots(token_slots_ptr, token64, row_ok, TOP_K, KS_BLOCK, BLOCK_M)
    else:
        n_valid = _count_slots(token_slots_ptr, token64, row_ok, KS, KS_BLOCK, BLOCK_M)
    # The atomic tile is [BLOCK_M, 32], not [BLOCK_M, BLOCK_N]: wide enough that no
    # element is replicated across threads (BLOCK_M * 32 >= 256 threads), and a quarter
    # of the 64-bit pointer registers of a 128-wide tile (128x128 GEMM2 tiles spilled).
    ATOM_W: tl.constexpr = 32 if BLOCK_N >= 32 else BLOCK_N
    offs_a = tl.arange(0, ATOM_W)
    first = row_ok[:, None] & (offs_a == 0)[None, :]
    cnt_ptrs = counter_ptr + token64[:, None] * num_pid_n + pid_n + offs_a[None, :] * 0
    old = tl.atomic_add(cnt_ptrs, tl.full((BLOCK_M, ATOM_W), 1, tl.int32), mask=first, sem="acq_rel", scope="gpu")
    old_row = tl.max(tl.where(first, old, -1), axis=1)
    last = row_ok & (old_row == n_valid - 1)
    tl.debug_barrier()  # the acquiring threads' view reaches the threads that load below
    if tl.max(last.to(tl.int32), axis=0) > 0:
        # .cg: the other programs' rows are read from L2, never from a stale L1 line.
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if TOP_K > 0:
            for j in tl.static_range(TOP_K):
                total += _slot_row(c_ptr, token_slots_ptr, token64, last, cols, col_ok, j, TOP_K, stride_cm)
        else:
            for j in range(0, KS):
                total += _slot_row(c_ptr, token_slots_ptr, token64, last, cols, col_ok, j, KS, stride_cm)
        tl.store(out_ptr + token64[:, None] * stride_om + cols[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=last[:, None] & col_ok[None, :])


@triton.jit
def _slot_row(c_ptr,            # [S, N] y rows
              token_slots_ptr,  # [T, KS] int32
              token64, last, cols, col_ok, j, KS, stride_cm):
    # y[token_slots[t, j]] in fp32 for the rows this program completes (0 elsewhere).
    sj = tl.load(token_slots_ptr + token64 * KS + j, mask=last, other=-1)
    ok = last & (sj >= 0)
    yj = tl.load(c_ptr + tl.where(ok, sj, 0).to(tl.int64)[:, None] * stride_cm + cols[None, :],
                 mask=ok[:, None] & col_ok[None, :], other=0.0, cache_modifier=".cg")
    return yj.to(tl.float32)


def top_k_constexpr(ks: int) -> int:
    """``token_slots``' column count as a compile-time constant for top-k routings (k <=
    16: the combine's loops unroll), 0 for wider tables (a runtime loop)."""
    return ks if 0 < ks <= 16 else 0


def ks_block(ks: int) -> int:
    """Columns of ``token_slots`` the fused combine and the prologue read at a time: the
    whole row for top-k routings (k <= 16), 16-column steps for wider tables."""
    return min(16, triton.next_power_of_2(max(ks, 1)))


@triton.jit
def _combine_fwd_kernel(
    y_ptr,            # [S, N] weighted per-slot rows
    token_slots_ptr,  # [T, KS] int32 slots of each token, -1 padded
    out_ptr,          # [T, N] combined rows
    N, KS, stride_ym, stride_om,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, KS):
        # The slot id broadcast along the row (one address: one transaction).
        s = tl.load(token_slots_ptr + t * KS + j + tl.zeros((BLOCK_N,), dtype=tl.int64))
        ok = col_ok & (s >= 0)
        v = tl.load(y_ptr + tl.where(ok, s, 0).to(tl.int64) * stride_ym + cols, mask=ok, other=0.0)
        total += v.to(tl.float32)
    tl.store(out_ptr + t * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


def _check(y: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if y.dim() != 2:
        raise ValueError(f"y: expected [S, N], got shape {tuple(y.shape)}")
    if token_slots.dim() != 2 or token_slots.dtype != torch.int32 or not token_slots.is_contiguous():
        raise ValueError(f"token_slots: expected a contiguous int32 [T, K] tensor, got {token_slots.dtype} "
                         f"{tuple(token_slots.shape)}")
    t = token_slots.shape[0]
    if out is None:
        return torch.empty(t, y.shape[1], dtype=y.dtype, device=y.device)
    if tuple(out.shape) != (t, y.shape[1]) or out.dtype != y.dtype:
        raise ValueError(f"out: expected {y.dtype} [{t}, {y.shape[1]}], got {out.dtype} {tuple(out.shape)}")
    return out


def combine(y: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum each token's slot rows of ``y`` [S, N] (unit column stride) into ``out`` [T, N]."""
    out = _check(y, token_slots, out)
    t, ks = token_slots.shape
    n = y.shape[1]
    if y.stride(1) != 1 and n > 1:
        raise ValueError(f"y: expected unit stride along its columns, got strides {y.stride()}")
    if t == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    with on_device(y):
        _combine_fwd_kernel[(t, triton.cdiv(n, block))](y, token_slots, out, n, ks, y.stride(0), out.stride(0),
                                                        BLOCK_N=block, num_warps=4)
    return out


def combine_torch(y: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`combine`: the torch backend's
    :func:`~moe_kernels.primitives.combine_slots` on fp32 rows, rounded to
    ``out``'s dtype. It sums the same values in fp32, possibly in another association
    order than the kernel (equal to fp32 rounding, not bit for bit)."""
    out = _check(y, token_slots, out)
    out.copy_(combine_slots(y.float(), token_slots).to(out.dtype))
    return out
