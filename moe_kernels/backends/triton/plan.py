"""The dispatch plan in Triton: one program at decode sizes, many at prefill sizes.

Decode-sized plans (``S <= 4096`` slots and ``S * next_pow2(E) <= 2^19``, see
:func:`uses_many_programs`) run ``_plan_fwd_kernel`` as ONE program (one launch, the
latency target's shape); larger ones run the many-program pipeline of
:mod:`.plan_multi` (histogram per chunk of slots, scans, placement from prefix sums,
block map, token table: 5 to 10 launches, each spread over ``O(S / CHUNK)`` programs of
fixed work). :func:`launch_shape` says which launches a size takes. The one program:

1. count: a one-hot ``[BLOCK_S, E]`` tile per chunk of ``slot_expert``, summed →
   ``expert_counts``; exclusive prefix sums → ``expert_offsets`` and (counts rounded up
   to ``block_m``) ``padded_offsets``;
2. place: per chunk, a slot's rank among the chunk's slots of its expert is a cumsum
   over the one-hot tile; plus the expert's running count and its offset it gives the
   slot's sorted position (``sorted_slot``, ``slot_position``) and padded row
   (``padded_slot``). Dropped slots (expert ``E``; any id outside ``[0, E)`` counts as
   dropped) follow the valid ones in slot order.
   Chunks are visited in slot order, so the order within an expert is stable, as
   ``torch.sort(stable=True)`` in :func:`moe_kernels.plan.build_plan_torch`;
3. blocks: each row block's expert (how many padded segments end at or before its first
   row; ``-1`` past the last), and ``-1`` in the padding rows of its segment (disjoint
   from the rows step 2 wrote, so no barrier is needed);
4. ``token_slots``: for token-major routings (``top_k`` set) a direct formula (slot
   ``t*top_k + j`` or ``-1`` when dropped, ``-1`` columns past ``top_k``); for
   expert-choice routings the table is filled with ``-1`` and each chunk appends its
   slots to their tokens' rows through a per-token cursor in a scratch buffer, with a
   block barrier between the cursor's reads and writes.

Every output is allocated with ``torch.empty`` and every element is written by a
kernel, so building a plan needs no host synchronisation: all sizes come from ``S``,
``E``, ``T`` and ``block_m`` (see :func:`moe_kernels.plan.max_padded_rows`), and the
choice between the two shapes is made on them too. The one program's cost grows as
``S * E`` one-hot element operations on one SM (about 2 ms at S = 65,536, E = 256 by
instruction count), which is why prefill sizes take the many-program pipeline (cost in
docs/PERFORMANCE.md). No backward: the plan holds indices only.

Exposed as the ``torch.library`` custom op ``moe_kernels::dispatch_plan`` (a tuple of
index tensors, fake implementation for ``torch.compile``); :func:`build_plan_triton`
assembles the :class:`~moe_kernels.plan.DispatchPlan` around it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._checks import check_int
from ...plan import DispatchPlan, max_padded_rows
from ...routing import Routing
from ...limits import TRITON
from . import check_device, on_device
from .plan_multi import launch_shape as multi_launch_shape, plan_multi

__all__ = ["build_plan_triton", "launch_shape", "uses_many_programs"]

# Allocation hook: tests replace it to pre-fill outputs with poison.
_empty = torch.empty


@triton.jit
def _plan_fwd_kernel(
    slot_expert_ptr,  # [S] int32 expert of each slot, E = dropped
    slot_token_ptr,  # [S] int32 token of each slot (read for expert-choice layouts only)
    counts_ptr,  # [E] int32 out: expert_counts
    offsets_ptr,  # [E+1] int32 out: expert_offsets
    sorted_slot_ptr,  # [S] int32 out: position -> slot
    slot_position_ptr,  # [S] int32 out: slot -> position
    padded_offsets_ptr,  # [E+1] int32 out
    padded_slot_ptr,  # [P] int32 out: padded row -> slot, -1 for padding
    block_expert_ptr,  # [NB] int32 out: row block -> expert, -1 past the end
    token_slots_ptr,  # [T, K] int32 out: token -> its slots, -1 pad
    cursor_ptr,  # [T] int32 scratch: slots placed per token (expert-choice layouts only)
    S, E, T, P, NB, K, TOP_K,
    BLOCK_M: tl.constexpr, BM_POW2: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
):
    cols = tl.arange(0, E_POW2)
    cvalid = cols < E

    # 1. counts and offsets
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        e = tl.load(slot_expert_ptr + offs, mask=offs < S, other=-1)
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), 0)
    counts = tl.where(cvalid, counts, 0)
    offsets = tl.cumsum(counts, 0) - counts
    num_valid = tl.sum(counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, 0)
    pstart = pend - padded
    num_padded = tl.sum(padded, 0)
    tl.store(counts_ptr + cols, counts, mask=cvalid)
    tl.store(offsets_ptr + cols, offsets, mask=cvalid)
    tl.store(offsets_ptr + E, num_valid)
    tl.store(padded_offsets_ptr + cols, pstart, mask=cvalid)
    tl.store(padded_offsets_ptr + E, num_padded)

    # 2. sorted positions and padded rows, stable within each expert
    placed = tl.zeros([E_POW2], dtype=tl.int32)
    dropped_placed = num_valid * 0
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        smask = offs < S
        e = tl.load(slot_expert_ptr + offs, mask=smask, other=-1)
        onehot = ((e[:, None] == cols[None, :]) & cvalid[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - 1
        pos = tl.sum(onehot * (rank + (offsets + placed)[None, :]), 1)
        row = tl.sum(onehot * (rank + (pstart + placed)[None, :]), 1)
        # Only 0 <= e < E has a one-hot column: any other id (E, or a negative one that
        # slipped past the checks on a GPU) is dropped, never placed at row 0 through
        # its all-zero one-hot row.
        valid = smask & (e >= 0) & (e < E)
        dropped = (smask & ~valid).to(tl.int32)
        pos = tl.where(valid, pos, num_valid + dropped_placed + tl.cumsum(dropped, 0) - 1)
        tl.store(sorted_slot_ptr + pos, offs, mask=smask)
        tl.store(slot_position_ptr + offs, pos, mask=smask)
        tl.store(padded_slot_ptr + row, offs, mask=valid)
        placed += tl.sum(onehot, 0)
        dropped_placed += tl.sum(dropped, 0)

    # 3. block -> expert, and -1 in every padded row no slot occupies
    jrow = tl.arange(0, BM_POW2)
    for start in range(0, NB, BLOCK_B):
        blk = start + tl.arange(0, BLOCK_B)
        bmask = blk < NB
        first = blk * BLOCK_M
        in_seg = ((pstart[None, :] <= first[:, None]) & (first[:, None] < pend[None, :])).to(tl.int32)
        owner = tl.sum(in_seg * cols[None, :], 1)
        used = tl.sum(in_seg, 1) > 0
        tl.store(block_expert_ptr + blk, tl.where(used, owner, -1), mask=bmask)
        seg_start = tl.sum(in_seg * pstart[None, :], 1)
        seg_count = tl.sum(in_seg * counts[None, :], 1)
        r = first[:, None] + jrow[None, :]
        pad = (~used[:, None]) | (r - seg_start[:, None] >= seg_count[:, None])
        tl.store(padded_slot_ptr + r, tl.full([BLOCK_B, BM_POW2], -1, tl.int32),
                 mask=bmask[:, None] & (jrow < BLOCK_M)[None, :] & pad)

    # 4. token -> slots
    if TOKEN_MAJOR:
        for start in range(0, T * K, BLOCK_S):
            cell = start + tl.arange(0, BLOCK_S)
            cmask = cell < T * K
            t = cell // K
            j = cell - t * K
            slot = t * TOP_K + j
            live = cmask & (j < TOP_K)
            e = tl.load(slot_expert_ptr + slot, mask=live, other=-1)
            tl.store(token_slots_ptr + cell, tl.where(live & (e >= 0) & (e < E), slot, -1), mask=cmask)
    else:
        total = tl.cast(T, tl.int64) * K
        for start in range(0, total, BLOCK_S):
            cell = start + tl.arange(0, BLOCK_S).to(tl.int64)
            tl.store(token_slots_ptr + cell, tl.full([BLOCK_S], -1, tl.int32), mask=cell < total)
        for start in range(0, T, BLOCK_S):
            tt = start + tl.arange(0, BLOCK_S)
            tl.store(cursor_ptr + tt, tl.zeros([BLOCK_S], dtype=tl.int32), mask=tt < T)
        tl.debug_barrier()
        ii = tl.arange(0, BLOCK_C)
        for start in range(0, S, BLOCK_C):
            offs = start + ii
            smask = offs < S
            e = tl.load(slot_expert_ptr + offs, mask=smask, other=-1)
            tok = tl.load(slot_token_ptr + offs, mask=smask, other=-1)
            valid = smask & (e >= 0) & (e < E)
            same = (tok[:, None] == tok[None, :]) & valid[:, None] & valid[None, :]
            rank = tl.sum((same & (ii[None, :] < ii[:, None])).to(tl.int32), 1)
            last = tl.sum((same & (ii[None, :] > ii[:, None])).to(tl.int32), 1) == 0
            base = tl.load(cursor_ptr + tok, mask=valid, other=0)
            tl.debug_barrier()  # every read of the cursors before any write
            tl.store(token_slots_ptr + tok.to(tl.int64) * K + base + rank, offs, mask=valid)
            tl.store(cursor_ptr + tok, base + rank + 1, mask=valid & last)
            tl.debug_barrier()  # the writes land before the next chunk reads


def _config(num_experts: int, block_m: int) -> dict:
    """Tile sizes keyed on E and block_m: one-hot tiles of about 4K int32 (16K for
    E = 1024, with 8 warps), which keeps the program free of register spills."""
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    bm_pow2 = triton.next_power_of_2(block_m)
    return dict(E_POW2=e_pow2, BLOCK_S=max(16, min(128, 4096 // e_pow2)),
                BLOCK_B=max(1, min(64, 4096 // max(e_pow2, bm_pow2))), BLOCK_C=32, BM_POW2=bm_pow2,
                num_warps=4 if e_pow2 <= 256 else 8)


# One program is enough while its one-hot work (S * next_pow2(E) int32 elements) stays
# below this; past it (or S above 4096) the many-program pipeline of plan_multi runs.
SINGLE_PROGRAM_MAX_WORK = 1 << 19
SINGLE_PROGRAM_MAX_SLOTS = 4096
MULTI_MAX_K = 4096  # token rows are sorted as one [BLOCK_T, next_pow2(K)] tile


def uses_many_programs(num_slots: int, num_experts: int, max_slots_per_token: int, top_k: int) -> bool:
    """Whether a plan of these (static) sizes runs the many-program pipeline."""
    if num_slots == 0 or (top_k == 0 and max_slots_per_token > MULTI_MAX_K):
        return False
    work = num_slots * max(16, triton.next_power_of_2(num_experts))
    return num_slots > SINGLE_PROGRAM_MAX_SLOTS or work > SINGLE_PROGRAM_MAX_WORK


def launch_shape(num_slots: int, num_experts: int, num_tokens: int, max_slots_per_token: int, top_k: int,
                 block_m: int, many: bool | None = None) -> list:
    """The launches a plan of these sizes takes (``plan_multi.Launch``: kernel, grid, the
    most loop iterations of any program). One program at decode sizes, whose loops walk
    all ``S`` slots; many programs past them, none of whose trip counts grows with ``S``."""
    if many is None:
        many = uses_many_programs(num_slots, num_experts, max_slots_per_token, top_k)
    if many:
        return multi_launch_shape(num_slots, num_experts, num_tokens, max_slots_per_token, top_k, block_m)
    from .plan_multi import Launch

    cfg = _config(num_experts, block_m)
    trips = -(-num_slots // cfg["BLOCK_S"])
    return [Launch("_plan_fwd_kernel", (1,), 2 * trips + -(-num_tokens * max_slots_per_token // cfg["BLOCK_S"]))]


def _launch(slot_expert, slot_token, num_tokens, num_experts, max_slots_per_token, top_k, block_m, many=None):
    s, e, t, k = slot_expert.shape[0], num_experts, num_tokens, max_slots_per_token
    dev = slot_expert.device
    p = max_padded_rows(s, e, block_m)
    nb = p // block_m
    i32 = torch.int32
    counts = _empty((e,), dtype=i32, device=dev)
    offsets = _empty((e + 1,), dtype=i32, device=dev)
    sorted_slot = _empty((s,), dtype=i32, device=dev)
    position = _empty((s,), dtype=i32, device=dev)
    poffs = _empty((e + 1,), dtype=i32, device=dev)
    padded_slot = _empty((p,), dtype=i32, device=dev)
    block_expert = _empty((nb,), dtype=i32, device=dev)
    token_slots = _empty((t, k), dtype=i32, device=dev)
    outs = (counts, offsets, sorted_slot, position, poffs, padded_slot, block_expert, token_slots)
    if many is None:
        many = uses_many_programs(s, e, k, top_k)
    with on_device(slot_expert):
        if many and s > 0:
            plan_multi(slot_expert, slot_token, outs, t, e, k, top_k, block_m)
            return outs
        cursor = torch.empty((t,), dtype=i32, device=dev) if top_k == 0 else token_slots
        _plan_fwd_kernel[(1,)](
            slot_expert, slot_token, counts, offsets, sorted_slot, position, poffs, padded_slot, block_expert,
            token_slots, cursor, s, e, t, p, nb, k, top_k,
            BLOCK_M=block_m, TOKEN_MAJOR=top_k > 0, **_config(e, block_m),
        )
    return outs


@torch.library.custom_op("moe_kernels::dispatch_plan", mutates_args=())
def _dispatch_plan_op(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
                      max_slots_per_token: int, top_k: int, block_m: int) -> tuple[
                          torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(slot_expert, slot_token, num_tokens, num_experts, max_slots_per_token, top_k, block_m)


@_dispatch_plan_op.register_fake
def _(slot_expert, slot_token, num_tokens, num_experts, max_slots_per_token, top_k, block_m):
    s, e = slot_expert.shape[0], num_experts
    p = max_padded_rows(s, e, block_m)

    def new(*shape):
        return slot_expert.new_empty(shape, dtype=torch.int32)

    return (new(e), new(e + 1), new(s), new(s), new(e + 1), new(p), new(p // block_m),
            new(num_tokens, max_slots_per_token))


def build_plan_triton(routing: Routing, block_m: int = 64) -> DispatchPlan:
    """The :class:`~moe_kernels.plan.DispatchPlan` of ``routing`` in one Triton launch;
    every field equals :func:`moe_kernels.plan.build_plan_torch`'s bit for bit.
    ``E <= 1024``; ``block_m`` any int >= 1 (the GEMMs use powers of two)."""
    if not isinstance(routing, Routing):
        raise ValueError(f"routing: expected a moe_kernels.routing.Routing, got {type(routing).__name__}")
    check_int("block_m", block_m, low=1, high=4096)
    e = routing.num_experts
    if not TRITON.plans(e):
        raise ValueError(f"routing.num_experts: expected <= {TRITON.plan_max_experts} for the Triton plan kernel, "
                         f"got {e}")
    check_device("routing.slot_expert", routing.slot_expert)
    se, st = routing.slot_expert.contiguous(), routing.slot_token.contiguous()
    out = _dispatch_plan_op(se, st, routing.num_tokens, e, routing.max_slots_per_token,
                            routing.top_k or 0, block_m)
    return DispatchPlan.from_fields(routing, block_m, out)
