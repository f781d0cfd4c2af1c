"""The dispatch plan over many Triton programs, for prefill-sized plans (large ``S``).

The one-program kernel of :mod:`.plan` does ``O(S * E)`` work on one SM; this pipeline
spreads the same work over ``O(S * E / (CHUNK * E_TILE))`` programs, each with a fixed
amount of work (no loop whose trip count grows with ``S``), and gives the same plan bit
for bit (:func:`moe_kernels.plan.build_plan_torch`). Buckets are the ``E`` experts plus
bucket ``E`` for dropped slots (any id outside ``[0, E)``), so ``W = E + 1`` columns.

1. ``_plan_hist_fwd_kernel``, grid ``(NBK, cdiv(W, E_TILE))``: program ``(b, et)`` counts
   the slots of chunk ``b`` (``CHUNK`` consecutive slots) per bucket of tile ``et`` into
   ``hist[b, :]`` (a one-hot tile summed; plain stores, no atomics);
2. ``_plan_scan_fwd_kernel``, one launch per level: groups of ``SCAN_ROWS`` rows of a
   ``[R, W]`` level are scanned in place (exclusive, down the rows) and each group's
   totals become one row of the next level, until a level has one row: the bucket
   totals. ``ceil(log_SCAN_ROWS(NBK))`` levels (1 up to ``S = CHUNK * SCAN_ROWS``, at
   most 4 below 2^31 slots); the rows of all levels live in one ``levels`` buffer;
3. ``_plan_offsets_fwd_kernel``, one program looping over tiles of experts (its trip
   count grows with ``E``, never with ``S``): ``expert_counts``, ``expert_offsets``
   (``expert_offsets[E]`` = valid slots = where the dropped bucket starts) and
   ``padded_offsets``;
4. ``_plan_place_fwd_kernel``, grid as step 1: a slot's sorted position is its bucket's
   offset + the level sums of the chunks before it (``levels[l][b // SCAN_ROWS^l]``,
   one load per level) + its rank in the chunk (a cumsum over the one-hot tile). Chunks
   and ranks follow slot order, so the sort is stable, as ``torch.sort(stable=True)``;
5. ``_plan_blocks_fwd_kernel``, grid ``cdiv(P / block_m, BLOCK_B)``: each row block's
   expert (how many padded segments end at or before its first row, counted over tiles
   of experts) and ``-1`` in the padding rows (disjoint from the rows step 4 writes);
6. ``token_slots``: token-major routings take a direct formula
   (``_plan_token_major_fwd_kernel``); other layouts fill the table with ``-1``
   (``_plan_token_fill_fwd_kernel``), append each valid slot to its token's row through
   an atomic per-token cursor (``_plan_token_append_fwd_kernel``) and sort every row
   (``_plan_token_sort_fwd_kernel``): the atomics' order never shows in the output.

:func:`launch_shape` gives each launch's grid and its programs' loop trip counts from the
static sizes alone; the launcher uses it, and the tests check that the grid grows with
``S`` while no trip count does. No host synchronisation, every output written by a
kernel, CUDA-graph safe. No backward: the plan holds indices only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Launch", "launch_shape", "multi_config", "plan_multi"]

_INT_MAX = tl.constexpr(2147483647)


@triton.jit
def _plan_hist_fwd_kernel(
    slot_expert_ptr,  # [S] int32 expert of each slot
    hist_ptr,  # [NBK, W] int32 out: slots of chunk b in bucket w
    S, E, W,
    CHUNK: tl.constexpr, E_TILE: tl.constexpr,
):
    b = tl.program_id(0)
    offs = b * CHUNK + tl.arange(0, CHUNK)
    smask = offs < S
    e = tl.load(slot_expert_ptr + offs, mask=smask, other=-1)
    bucket = tl.where(smask, tl.where((e >= 0) & (e < E), e, E), -1)
    cols = tl.program_id(1) * E_TILE + tl.arange(0, E_TILE)
    cnt = tl.sum((bucket[:, None] == cols[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + b.to(tl.int64) * W + cols, cnt, mask=cols < W)


@triton.jit
def _plan_scan_fwd_kernel(
    x_ptr,  # [R, W] int32 in: one level's rows; out: exclusive prefix within each group of SCAN_ROWS rows
    tot_ptr,  # [cdiv(R, SCAN_ROWS), W] int32 out: each group's totals (the next level)
    R, W,
    SCAN_ROWS: tl.constexpr, SCAN_COLS: tl.constexpr,
):
    g = tl.program_id(0)
    rows = g * SCAN_ROWS + tl.arange(0, SCAN_ROWS)
    cols = tl.program_id(1) * SCAN_COLS + tl.arange(0, SCAN_COLS)
    m = (rows < R)[:, None] & (cols < W)[None, :]
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * W + cols[None, :]
    x = tl.load(ptrs, mask=m, other=0)
    tl.store(ptrs, tl.cumsum(x, 0) - x, mask=m)
    tl.store(tot_ptr + g.to(tl.int64) * W + cols, tl.sum(x, 0), mask=cols < W)


@triton.jit
def _plan_offsets_fwd_kernel(
    tot_ptr,  # [W] int32 slots per bucket (the last level)
    counts_ptr,  # [E] int32 out: expert_counts
    offsets_ptr,  # [E+1] int32 out: expert_offsets
    padded_offsets_ptr,  # [E+1] int32 out
    E,
    BLOCK_M: tl.constexpr, E_TILE: tl.constexpr,
):
    carry = E * 0
    pcarry = E * 0
    for start in range(0, E + 1, E_TILE):
        cols = start + tl.arange(0, E_TILE)
        inb = cols <= E
        expert = cols < E
        c = tl.load(tot_ptr + cols, mask=inb, other=0)
        pc = tl.where(expert, (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        tl.store(counts_ptr + cols, c, mask=expert)
        tl.store(offsets_ptr + cols, carry + tl.cumsum(c, 0) - c, mask=inb)
        tl.store(padded_offsets_ptr + cols, pcarry + tl.cumsum(pc, 0) - pc, mask=inb)
        carry += tl.sum(c, 0)
        pcarry += tl.sum(pc, 0)


@triton.jit
def _plan_place_fwd_kernel(
    slot_expert_ptr,  # [S] int32 expert of each slot
    levels_ptr,  # [sum of level rows, W] int32 exclusive prefixes of every scan level
    offsets_ptr,  # [E+1] int32 expert_offsets (bucket starts; [E] = first dropped position)
    padded_offsets_ptr,  # [E+1] int32
    sorted_slot_ptr,  # [S] int32 out: position -> slot
    slot_position_ptr,  # [S] int32 out: slot -> position
    padded_slot_ptr,  # [P] int32 out: padded row -> slot (valid slots only)
    S, E, W, NBK,
    CHUNK: tl.constexpr, E_TILE: tl.constexpr, SCAN_ROWS: tl.constexpr, NUM_LEVELS: tl.constexpr,
):
    b = tl.program_id(0)
    lo = tl.program_id(1) * E_TILE
    offs = b * CHUNK + tl.arange(0, CHUNK)
    smask = offs < S
    e = tl.load(slot_expert_ptr + offs, mask=smask, other=-1)
    bucket = tl.where((e >= 0) & (e < E), e, E)
    cols = lo + tl.arange(0, E_TILE)
    cmask = cols < W
    onehot = ((bucket[:, None] == cols[None, :]) & smask[:, None]).to(tl.int32)
    rank = tl.cumsum(onehot, 0) - 1
    start = tl.load(offsets_ptr + cols, mask=cmask, other=0)
    base = start
    rows = NBK
    row0 = NBK * 0
    idx = b
    for _ in tl.static_range(NUM_LEVELS):
        base += tl.load(levels_ptr + (row0 + idx).to(tl.int64) * W + cols, mask=cmask, other=0)
        row0 += rows
        rows = (rows + SCAN_ROWS - 1) // SCAN_ROWS
        idx = idx // SCAN_ROWS
    pos = tl.sum(onehot * (rank + base[None, :]), 1)
    mine = smask & (bucket >= lo) & (bucket < lo + E_TILE)
    tl.store(sorted_slot_ptr + pos, offs, mask=mine)
    tl.store(slot_position_ptr + offs, pos, mask=mine)
    pstart = tl.load(padded_offsets_ptr + cols, mask=cols < E, other=0)
    row = tl.sum(onehot * (rank + (base - start + pstart)[None, :]), 1)
    tl.store(padded_slot_ptr + row, offs, mask=mine & (bucket < E))


@triton.jit
def _plan_blocks_fwd_kernel(
    counts_ptr,  # [E] int32 expert_counts
    padded_offsets_ptr,  # [E+1] int32
    padded_slot_ptr,  # [P] int32 out: -1 in every padding row
    block_expert_ptr,  # [NB] int32 out: row block -> expert, -1 past the end
    E, NB,
    BLOCK_M: tl.constexpr, BM_POW2: tl.constexpr, BLOCK_B: tl.constexpr, E_TILE: tl.constexpr,
):
    blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = blk < NB
    first = blk * BLOCK_M
    # searchsorted(padded_offsets[1:], first, right=True): segments ending at or before `first`
    owner = tl.zeros([BLOCK_B], dtype=tl.int32)
    for start in range(0, E, E_TILE):
        cols = start + tl.arange(0, E_TILE)
        pend = tl.load(padded_offsets_ptr + cols + 1, mask=cols < E, other=_INT_MAX)
        owner += tl.sum((pend[None, :] <= first[:, None]).to(tl.int32), 1)
    used = owner < E
    safe = tl.where(used, owner, 0)
    seg_start = tl.load(padded_offsets_ptr + safe, mask=bmask, other=0)
    seg_count = tl.load(counts_ptr + safe, mask=bmask, other=0)
    tl.store(block_expert_ptr + blk, tl.where(used, owner, -1), mask=bmask)
    jrow = tl.arange(0, BM_POW2)
    r = first[:, None] + jrow[None, :]
    pad = (~used[:, None]) | (r - seg_start[:, None] >= seg_count[:, None])
    tl.store(padded_slot_ptr + r, tl.full([BLOCK_B, BM_POW2], -1, tl.int32),
             mask=bmask[:, None] & (jrow < BLOCK_M)[None, :] & pad)


@triton.jit
def _plan_token_major_fwd_kernel(
    slot_expert_ptr,  # [S] int32 expert of each slot, S = T * TOP_K
    token_slots_ptr,  # [T, K] int32 out: slot t*TOP_K + j, or -1 (dropped, or j >= TOP_K)
    E, T, K, TOP_K,
    BLOCK: tl.constexpr,
):
    cell = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cell < T.to(tl.int64) * K
    t = cell // K
    j = cell - t * K
    slot = t * TOP_K + j
    live = cmask & (j < TOP_K)
    e = tl.load(slot_expert_ptr + slot, mask=live, other=-1)
    tl.store(token_slots_ptr + cell, tl.where(live & (e >= 0) & (e < E), slot, -1).to(tl.int32), mask=cmask)


@triton.jit
def _plan_token_fill_fwd_kernel(
    token_slots_ptr,  # [T, K] int32 out: -1
    cursor_ptr,  # [T] int32 out: 0
    T, K,
    BLOCK: tl.constexpr,
):
    cell = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(token_slots_ptr + cell, tl.full([BLOCK], -1, tl.int32), mask=cell < T.to(tl.int64) * K)
    tl.store(cursor_ptr + cell, tl.zeros([BLOCK], dtype=tl.int32), mask=cell < T)


@triton.jit
def _plan_token_append_fwd_kernel(
    slot_expert_ptr,  # [S] int32 expert of each slot
    slot_token_ptr,  # [S] int32 token of each slot
    token_slots_ptr,  # [T, K] int32 out: each valid slot in its token's row (any order)
    cursor_ptr,  # [T] int32 scratch: slots appended per token
    S, E, T, K,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    smask = offs < S
    e = tl.load(slot_expert_ptr + offs, mask=smask, other=-1)
    tok = tl.load(slot_token_ptr + offs, mask=smask, other=-1)
    valid = smask & (e >= 0) & (e < E) & (tok >= 0) & (tok < T)
    c = tl.atomic_add(cursor_ptr + tok, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.store(token_slots_ptr + tok.to(tl.int64) * K + c, offs, mask=valid & (c < K))


@triton.jit
def _plan_token_sort_fwd_kernel(
    token_slots_ptr,  # [T, K] int32 in/out: each row sorted ascending, -1 last
    T, K,
    BLOCK_T: tl.constexpr, K_POW2: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, K_POW2)
    m = (t < T)[:, None] & (j < K)[None, :]
    ptrs = token_slots_ptr + t.to(tl.int64)[:, None] * K + j[None, :]
    v = tl.load(ptrs, mask=m, other=-1)
    v = tl.sort(tl.where(v < 0, _INT_MAX, v), dim=1)
    tl.store(ptrs, tl.where(v == _INT_MAX, -1, v), mask=m)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: its grid and the most loop iterations any of its
    programs runs (0 for straight-line programs)."""

    kernel: str
    grid: tuple[int, ...]
    trips: int

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


def multi_config(num_experts: int, block_m: int, max_slots_per_token: int) -> dict:
    """Tile sizes keyed on E, block_m and K (static): one-hot tiles of ``CHUNK x E_TILE``
    = 4096 int32 and scan tiles of 256 x 16, small enough to stay out of register spills."""
    w_pow2 = max(16, triton.next_power_of_2(num_experts + 1))
    e_tile = min(w_pow2, 64)
    bm_pow2 = triton.next_power_of_2(block_m)
    k_pow2 = triton.next_power_of_2(max_slots_per_token)
    return dict(CHUNK=4096 // e_tile, E_TILE=e_tile, SCAN_ROWS=256, SCAN_COLS=16, OFFS_TILE=256,
                BM_POW2=bm_pow2, BLOCK_B=max(1, min(64, 4096 // max(bm_pow2, 64))), BLOCKS_E_TILE=64,
                BLOCK=1024, K_POW2=k_pow2, BLOCK_T=max(1, 2048 // k_pow2))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scan_levels(num_chunks: int, scan_rows: int) -> list[int]:
    """Rows of each scan level: ``[NBK, cdiv(NBK, G), ...]`` down to (and with) the one-row
    totals level."""
    rows = [num_chunks]
    while rows[-1] > 1:
        rows.append(_cdiv(rows[-1], scan_rows))
    return rows


def launch_shape(num_slots: int, num_experts: int, num_tokens: int, max_slots_per_token: int, top_k: int,
                 block_m: int) -> list[Launch]:
    """The launches of :func:`plan_multi` for these sizes, in order, with their grids and
    per-program loop trip counts (functions of ``E``, ``K`` and ``block_m`` only)."""
    s, e, t, k = num_slots, num_experts, num_tokens, max_slots_per_token
    c = multi_config(e, block_m, k)
    w = e + 1
    from ...plan import max_padded_rows

    nbk = _cdiv(s, c["CHUNK"])
    nb = max_padded_rows(s, e, block_m) // block_m
    levels = scan_levels(nbk, c["SCAN_ROWS"])
    out = [Launch("_plan_hist_fwd_kernel", (nbk, _cdiv(w, c["E_TILE"])), 0)]
    for rows in levels[:-1]:
        out.append(Launch("_plan_scan_fwd_kernel", (_cdiv(rows, c["SCAN_ROWS"]), _cdiv(w, c["SCAN_COLS"])), 0))
    out.append(Launch("_plan_offsets_fwd_kernel", (1,), _cdiv(w, c["OFFS_TILE"])))
    out.append(Launch("_plan_place_fwd_kernel", (nbk, _cdiv(w, c["E_TILE"])), 0))
    out.append(Launch("_plan_blocks_fwd_kernel", (max(1, _cdiv(nb, c["BLOCK_B"])),), _cdiv(e, c["BLOCKS_E_TILE"])))
    if top_k > 0:
        out.append(Launch("_plan_token_major_fwd_kernel", (max(1, _cdiv(t * k, c["BLOCK"])),), 0))
    else:
        out.append(Launch("_plan_token_fill_fwd_kernel", (max(1, _cdiv(max(t * k, t), c["BLOCK"])),), 0))
        out.append(Launch("_plan_token_append_fwd_kernel", (max(1, _cdiv(s, c["BLOCK"])),), 0))
        out.append(Launch("_plan_token_sort_fwd_kernel", (max(1, _cdiv(t, c["BLOCK_T"])),), 0))
    return out


def plan_multi(slot_expert: torch.Tensor, slot_token: torch.Tensor, outs: tuple[torch.Tensor, ...], num_tokens: int,
               num_experts: int, max_slots_per_token: int, top_k: int, block_m: int) -> None:
    """Fill ``outs`` (the eight plan fields, allocated by the caller) with the launches of
    :func:`launch_shape`. Needs ``S >= 1``. Call under the tensors' device."""
    counts, offsets, sorted_slot, position, poffs, padded_slot, block_expert, token_slots = outs
    s, e, t, k = slot_expert.shape[0], num_experts, num_tokens, max_slots_per_token
    w = e + 1
    c = multi_config(e, block_m, k)
    shape = {ln.kernel: ln for ln in launch_shape(s, e, t, k, top_k, block_m)}
    nbk = _cdiv(s, c["CHUNK"])
    rows = scan_levels(nbk, c["SCAN_ROWS"])
    levels = torch.empty((sum(rows), w), dtype=torch.int32, device=slot_expert.device)
    _plan_hist_fwd_kernel[shape["_plan_hist_fwd_kernel"].grid](
        slot_expert, levels, s, e, w, CHUNK=c["CHUNK"], E_TILE=c["E_TILE"], num_warps=4)
    row0 = 0
    for r, r_next in zip(rows[:-1], rows[1:]):
        level, nxt = levels[row0:row0 + r], levels[row0 + r:row0 + r + r_next]
        _plan_scan_fwd_kernel[(_cdiv(r, c["SCAN_ROWS"]), _cdiv(w, c["SCAN_COLS"]))](
            level, nxt, r, w, SCAN_ROWS=c["SCAN_ROWS"], SCAN_COLS=c["SCAN_COLS"], num_warps=4)
        row0 += r
    _plan_offsets_fwd_kernel[(1,)](levels[row0], counts, offsets, poffs, e, BLOCK_M=block_m, E_TILE=c["OFFS_TILE"],
                                   num_warps=4)
    _plan_place_fwd_kernel[shape["_plan_place_fwd_kernel"].grid](
        slot_expert, levels, offsets, poffs, sorted_slot, position, padded_slot, s, e, w, nbk,
        CHUNK=c["CHUNK"], E_TILE=c["E_TILE"], SCAN_ROWS=c["SCAN_ROWS"], NUM_LEVELS=len(rows) - 1, num_warps=4)
    nb = block_expert.shape[0]
    _plan_blocks_fwd_kernel[shape["_plan_blocks_fwd_kernel"].grid](
        counts, poffs, padded_slot, block_expert, e, nb, BLOCK_M=block_m, BM_POW2=c["BM_POW2"], BLOCK_B=c["BLOCK_B"],
        E_TILE=c["BLOCKS_E_TILE"], num_warps=4)
    if top_k > 0:
        _plan_token_major_fwd_kernel[shape["_plan_token_major_fwd_kernel"].grid](
            slot_expert, token_slots, e, t, k, top_k, BLOCK=c["BLOCK"], num_warps=4)
    else:
        cursor = torch.empty((max(t, 1),), dtype=torch.int32, device=slot_expert.device)
        _plan_token_fill_fwd_kernel[shape["_plan_token_fill_fwd_kernel"].grid](
            token_slots, cursor, t, k, BLOCK=c["BLOCK"], num_warps=4)
        _plan_token_append_fwd_kernel[shape["_plan_token_append_fwd_kernel"].grid](
            slot_expert, slot_token, token_slots, cursor, s, e, t, k, BLOCK=c["BLOCK"], num_warps=4)
        _plan_token_sort_fwd_kernel[shape["_plan_token_sort_fwd_kernel"].grid](
            token_slots, t, k, BLOCK_T=c["BLOCK_T"], K_POW2=c["K_POW2"], num_warps=4)
