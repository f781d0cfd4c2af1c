"""Pieces of the grouped GEMM kernel (gemm.py): tile coordinates, the K loop (pointer
or TMA weights, a K range for split-K), the split-K reduction and the epilogues.

Split-K (``SPLIT_K > 1``, decode): the ``SPLIT_K`` programs of a tile each run a
contiguous range of K and store their fp32 partial tile to a workspace
``[SPLIT_K, tiles, BLOCK_M, width]``; a CTA barrier orders every thread's stores
before one scalar acq_rel atomic on the tile's counter (one per CTA), and the program
whose add completes the count (the last arriver) re-reads *every* partial, its own
included, in split order and runs the epilogue. The sum is a pure function of the
partials, whichever program arrives last: bitwise deterministic, and equal to the
unsplit kernel up to fp32 reassociation. No waiting (no deadlock whatever the
scheduling), no float atomics. The counters are zeroed by the launcher (one memset
node) and left at ``SPLIT_K``.

TMA (``USE_TMA``, sm_90+): the weight tiles come through a device-side tensor
descriptor (``cp.async.bulk.tensor`` into swizzled shared memory) over the storage:
``[E * NB, K]`` for K-major weights (``B_KMAJOR``), ``[E * K, NB]`` for a transposed
view of N-major storage (GPT-OSS's layout, the backward's ``W.transpose(1, 2)``; only
when ``K % BLOCK_K == 0``, so a K tile never reads the next expert's rows). An N tile
that runs past ``N`` reads the next expert's rows or zeros past the end: only output
columns the epilogue's mask drops. The A rows are still gathered with pointer loads
through the plan.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .act import _act_bwd, _act_fwd
from .combine import _fused_combine


@triton.jit
def _tile_coords(tile, NUM_BLOCKS, num_pid_n, GROUP_M: tl.constexpr):
    # Swizzled order: GROUP_M row blocks (mostly one expert) sweep the N tiles together,
    # so each weight tile comes from HBM once and from L2 for the rest of the group.
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(NUM_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % size_m
    pid_n = (tile % group) // size_m
    return pid_m, pid_n


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
def _mainloop(a_ptr,      # [Ra, K] A rows
              b_ptr,      # [E, NB, K] strided weights (pointer path)
              b_desc,     # descriptor over the [E * NB, K] view (USE_TMA), else unused
              a_rows, row_ok, expert, e64, b_cols, b_ok, b_row0, N, K, NB, k_lo, k_hi,
              stride_am, stride_ak, stride_be, stride_bn, stride_bk,
              TWO_DOTS: tl.constexpr, B_TILE_N: tl.constexpr, USE_TMA: tl.constexpr, B_KMAJOR: tl.constexpr,
              SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, B_TILE_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, B_TILE_N), dtype=tl.float32)
    if SPLIT:
        k_start = k_lo
        k_end = k_hi
    else:
        k_start = 0
        k_end = K
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    if USE_TMA:
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            if B_KMAJOR:  # [E * NB, K] view: a [B_TILE_N, BLOCK_K] tile, zeros past K
                b = b_desc.load([expert * NB + b_row0, k0]).T
            else:  # [E * K, NB] view of a transposed weight (K % BLOCK_K == 0: never crosses an expert)
                b = b_desc.load([expert * K + k0, b_row0])
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if TWO_DOTS:
                if B_KMAJOR:
                    b2 = b_desc.load([expert * NB + b_row0 + N, k0]).T
                else:
                    b2 = b_desc.load([expert * K + k0, b_row0 + N])
                acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
    else:
        b_ptrs = (b_ptr + e64 * stride_be + b_cols[None, :].to(tl.int64) * stride_bn
                  + (k_start + offs_k)[:, None] * stride_bk)
        b2_ptrs = b_ptrs + N * stride_bn  # up rows (TWO_DOTS)
        for k0 in range(k_start, k_end, BLOCK_K):
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
    return acc, acc2


@triton.jit
def _split_reduce(acc, acc2,
                  part_ptr,   # [SPLIT_K, num_tiles, BLOCK_M, PART_W] fp32 partial tiles
                  cnt_ptr,    # [num_tiles] int32 zeroed by the launcher
                  tile_id, pid_k, num_tiles,
                  TWO_DOTS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, B_TILE_N: tl.constexpr):
    # Returns (acc, acc2, last): the full sums for the last arriver (see the module doc).
    PART_W: tl.constexpr = 2 * B_TILE_N if TWO_DOTS else B_TILE_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, B_TILE_N)
    tile_elems: tl.constexpr = BLOCK_M * PART_W
    base = part_ptr + tile_id.to(tl.int64) * tile_elems + rows[:, None] * PART_W + cols[None, :]
    split_stride = num_tiles.to(tl.int64) * tile_elems
    tl.store(base + pid_k * split_stride, acc)
    if TWO_DOTS:
        tl.store(base + pid_k * split_stride + B_TILE_N, acc2)
    tl.debug_barrier()  # every thread's partial is stored before the count (release)
    old = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    last = old == SPLIT_K - 1
    tl.debug_barrier()  # the acquiring thread's view reaches the threads that load below
    tot = tl.zeros((BLOCK_M, B_TILE_N), dtype=tl.float32)
    tot2 = tl.zeros((BLOCK_M, B_TILE_N), dtype=tl.float32)
    mask = (tl.zeros((BLOCK_M, B_TILE_N), dtype=tl.int32) + last.to(tl.int32)) > 0  # the tile-shaped flag
    for s in tl.static_range(SPLIT_K):  # split order: the same sum whoever arrives last
        # .cg: the other programs' partials are read from L2, never from a stale L1 line.
        tot += tl.load(base + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
        if TWO_DOTS:
            tot2 += tl.load(base + s * split_stride + B_TILE_N, mask=mask, other=0.0, cache_modifier=".cg")
    return tot, tot2, last


@triton.jit
def _epilogue(acc, acc2,
              a_ptr,              # [Ra, K] A rows (BIAS_DOT reads them again)
              c_ptr,              # [Rc, NC] main output
              bias_ptr,           # [E, NB]
              pre_ptr,            # [Rc, NB] / [Rc, NC] pre-activation
              h_ptr,              # [Rc, N]
              wpart_ptr,          # [S, NUM_WPART] fp32
              bias_dot_ptr,       # [E, K]
              dw_ptr,             # [S] fp32
              slot_weight_ptr,    # [S]
              token_slots_ptr,    # [T, KS] int32
              counter_ptr,        # [T, num_pid_n] int32 (FUSED_COMBINE)
              out_ptr,            # [T, N] (FUSED_COMBINE)
              a_rows, c_rows, slot64, token64, row_ok, e64, b_cols, b_ok, n0, pid_n, num_pid_n,
              N, K, KS, NUM_WPART,
              stride_am, stride_ak, stride_cm, stride_bias_e, stride_pm, stride_hm, stride_bd_e, stride_om,
              alpha, limit,
              EPI: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
              TWO_DOTS: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_C: tl.constexpr, STORE_PRE: tl.constexpr,
              STORE_H: tl.constexpr, ROW_SCALE: tl.constexpr, BIAS_DOT: tl.constexpr, DW_FINAL: tl.constexpr,
              FUSED_COMBINE: tl.constexpr, KS_BLOCK: tl.constexpr, TOP_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
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
                           pid_n, num_pid_n, KS, stride_cm, stride_om, KS_BLOCK, TOP_K, BLOCK_M, BLOCK_N)


@triton.jit
def _tile(a_ptr, b_ptr, b_desc, c_ptr, bias_ptr, pre_ptr, h_ptr, wpart_ptr, bias_dot_ptr, dw_ptr,
          padded_slot_ptr, slot_token_ptr, slot_weight_ptr, token_slots_ptr, counter_ptr, out_ptr,
          part_ptr, split_cnt_ptr,  # pointers: see _grouped_gemm_kernel
          expert, pid_m, pid_n, pid_k, num_pid_n,
          N, K, KS, NB, NUM_BLOCKS, NUM_WPART, k_split,
          stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_bias_e,
          stride_pm, stride_hm, stride_bd_e, stride_om, alpha, limit,
          A_ROWS: tl.constexpr, C_ROWS: tl.constexpr, EPI: tl.constexpr, ACT: tl.constexpr,
          GATED: tl.constexpr, INTERLEAVED: tl.constexpr, TWO_DOTS: tl.constexpr, B_TILE_N: tl.constexpr,
          HAS_BIAS: tl.constexpr, STORE_C: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr,
          ROW_SCALE: tl.constexpr, BIAS_DOT: tl.constexpr, DW_FINAL: tl.constexpr, FUSED_COMBINE: tl.constexpr,
          KS_BLOCK: tl.constexpr, TOP_K: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
          USE_TMA: tl.constexpr, B_KMAJOR: tl.constexpr):
    # One (row block, N tile[, K split]) of the grouped GEMM: gather, K loop, epilogue.
    e64 = expert.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
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
        b_row0 = n0
        b_cols = n0 + tl.arange(0, B_TILE_N)
        b_ok = b_cols < N
    else:  # interleaved gate/up rows: one contiguous 2*BLOCK_N tile, split in the epilogue
        b_row0 = 2 * n0
        b_cols = 2 * n0 + tl.arange(0, B_TILE_N)
        b_ok = b_cols < 2 * N
    k_lo = pid_k * k_split
    acc, acc2 = _mainloop(a_ptr, b_ptr, b_desc, a_rows, row_ok, expert, e64, b_cols, b_ok, b_row0, N, K, NB,
                          k_lo, tl.minimum(K, k_lo + k_split), stride_am, stride_ak, stride_be, stride_bn, stride_bk,
                          TWO_DOTS, B_TILE_N, USE_TMA, B_KMAJOR, SPLIT_K > 1, DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_K)
    if SPLIT_K > 1:
        acc, acc2, last = _split_reduce(acc, acc2, part_ptr, split_cnt_ptr, pid_m * num_pid_n + pid_n, pid_k,
                                        NUM_BLOCKS * num_pid_n, TWO_DOTS, SPLIT_K, BLOCK_M, B_TILE_N)
    else:
        last = True
    if last:
        _epilogue(acc, acc2, a_ptr, c_ptr, bias_ptr, pre_ptr, h_ptr, wpart_ptr, bias_dot_ptr, dw_ptr,
                  slot_weight_ptr, token_slots_ptr, counter_ptr, out_ptr,
                  a_rows, c_rows, slot64, token64, row_ok, e64, b_cols, b_ok, n0, pid_n, num_pid_n,
                  N, K, KS, NUM_WPART,
                  stride_am, stride_ak, stride_cm, stride_bias_e, stride_pm, stride_hm, stride_bd_e, stride_om,
                  alpha, limit, EPI, ACT, GATED, INTERLEAVED, TWO_DOTS, HAS_BIAS, STORE_C, STORE_PRE, STORE_H,
                  ROW_SCALE, BIAS_DOT, DW_FINAL, FUSED_COMBINE, KS_BLOCK, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K)
