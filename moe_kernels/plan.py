"""The dispatch plan: where each slot's row goes, in pure PyTorch.

:func:`build_plan` turns a :class:`~moe_kernels.routing.Routing` into a
:class:`DispatchPlan`: slots sorted by expert (for grouped GEMMs over contiguous
segments), the same order padded per expert to ``block_m`` rows with a block→expert
map (so a GEMM kernel's row block never straddles two experts), and a token→slots
table for a deterministic per-token combine.

Every size is a worst-case bound computed from ``S``, ``E`` and ``block_m`` alone,
never from the data, so building a plan on a GPU needs no host synchronisation and
can be captured in a CUDA graph. Blocks past the last used one are marked ``-1`` and
skipped by the kernels.

The Triton and CUDA backends build the same plan with their own kernels; this module
is their pure-PyTorch twin (``build_plan_torch``).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from ._checks import _compiling, check_int, deep_checks_enabled
from .routing import Routing

__all__ = ["DispatchPlan", "PLAN_INDEX_FIELDS", "build_plan", "build_plan_torch", "max_padded_rows"]

# The index tensors a plan kernel computes, in the order every plan kernel returns them.
PLAN_INDEX_FIELDS = ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "padded_offsets",
                     "padded_slot", "block_expert", "token_slots")
# What a custom op receives of a plan: the routing's index tensors, then the computed ones.
_OP_FIELDS = ("slot_token", "slot_expert") + PLAN_INDEX_FIELDS


def max_padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case rows after padding every expert's segment to a multiple of
    ``block_m``: each non-empty expert (at most ``min(E, S)`` of them) wastes at most
    ``block_m - 1`` rows, and the total is a multiple of ``block_m``."""
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return (bound // block_m) * block_m


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """How slots map to expert segments and back to tokens.

    Shapes (``S`` slots, ``E`` experts, ``T`` tokens, ``K = max_slots_per_token``,
    ``P = max_padded_rows(S, E, block_m)``, ``B = P // block_m``); all index tensors
    int32 on the routing's device:

    ================  =========  ==========================================================
    field             shape      meaning
    ================  =========  ==========================================================
    slot_token        [S]        token of each slot (from the routing)
    slot_expert       [S]        expert of each slot; ``E`` = dropped
    slot_weight       [S]        weight of each slot (differentiable; 0 for dropped)
    expert_counts     [E]        valid slots per expert
    expert_offsets    [E+1]      exclusive prefix sum of ``expert_counts``;
                                 ``expert_offsets[E]`` = number of valid slots ``V``
    sorted_slot       [S]        the sort permutation: position → slot, by expert then
                                 slot id (stable); positions ``>= V`` hold dropped slots
    slot_position     [S]        its inverse: slot → position
    padded_offsets    [E+1]      start row of each expert in the padded order; each
                                 segment is ``expert_counts`` rounded up to ``block_m``
    padded_slot       [P]        padded row → slot, ``-1`` for padding and unused rows
    block_expert      [B]        row block → expert, ``-1`` past the last used block
    token_slots       [T, K]     token → its valid slots in increasing slot order,
                                 ``-1`` where it has fewer than ``K``; a ``-1`` may
                                 sit mid-row (token-major routings keep a dropped
                                 slot's cell), so readers skip it, never stop at it
    ================  =========  ==========================================================

    Invariants (checked in ``__post_init__``: shapes and dtypes always; values with
    ``MOE_KERNELS_DEBUG=1``, or by calling :meth:`check_values`):

    1. ``sum(expert_counts) == V`` = number of slots with ``slot_expert < E``.
    2. ``sorted_slot`` is a permutation of ``0..S-1``; ``slot_position[sorted_slot[p]] == p``.
    3. ``slot_expert[sorted_slot[p]] == e`` for ``expert_offsets[e] <= p < expert_offsets[e+1]``.
    4. ``padded_offsets[e+1] - padded_offsets[e] == ceil(expert_counts[e] / block_m) * block_m``.
    5. ``padded_slot[padded_offsets[e] + r] == sorted_slot[expert_offsets[e] + r]`` for
       ``r < expert_counts[e]``; every other padded row is ``-1``.
    6. ``block_expert[b] == e`` iff block ``b`` lies in expert ``e``'s padded segment.
    7. Each valid slot appears exactly once in ``token_slots``, in its token's row.
    """

    num_tokens: int
    num_experts: int
    block_m: int
    max_slots_per_token: int
    slot_token: torch.Tensor
    slot_expert: torch.Tensor
    slot_weight: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_slot: torch.Tensor
    slot_position: torch.Tensor
    padded_offsets: torch.Tensor
    padded_slot: torch.Tensor
    block_expert: torch.Tensor
    token_slots: torch.Tensor
    top_k: int | None = None
    # ``expert_offsets`` as a Python list when the builder already read it on the host
    # (the CPU builder does, to skip work when nothing is dropped); ``None`` otherwise.
    # Not an init field: ``dataclasses.replace`` never carries a stale copy over.
    host_offsets: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_slots(self) -> int:
        return self.slot_token.shape[0]

    @property
    def num_padded_rows(self) -> int:
        return self.padded_slot.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    @classmethod
    def from_fields(cls, routing: Routing, block_m: int, fields: Sequence[torch.Tensor]) -> "DispatchPlan":
        """The plan of ``routing`` from a plan kernel's outputs (:data:`PLAN_INDEX_FIELDS` order)."""
        return cls(num_tokens=routing.num_tokens, num_experts=routing.num_experts, block_m=block_m,
                   max_slots_per_token=routing.max_slots_per_token, slot_token=routing.slot_token,
                   slot_expert=routing.slot_expert, slot_weight=routing.slot_weight, top_k=routing.top_k,
                   **dict(zip(PLAN_INDEX_FIELDS, fields, strict=True)))

    @classmethod
    def _trusted(cls, routing: Routing, block_m: int, fields: Sequence[torch.Tensor],
                 host_offsets: list[int] | None = None) -> "DispatchPlan":
        """:meth:`from_fields` for a plan this module just built from a checked routing:
        skips the generated frozen ``__init__`` and the per-field shape loop (a fixed
        cost of several microseconds per layer call on the CPU's small-``T`` path). In
        debug mode (``MOE_KERNELS_DEBUG=1``) it runs every check ``__post_init__`` runs."""
        plan = object.__new__(cls)
        d = plan.__dict__
        d.update(num_tokens=routing.num_tokens, num_experts=routing.num_experts, block_m=block_m,
                 max_slots_per_token=routing.max_slots_per_token, slot_token=routing.slot_token,
                 slot_expert=routing.slot_expert, slot_weight=routing.slot_weight, top_k=routing.top_k)
        d.update(zip(PLAN_INDEX_FIELDS, fields, strict=True))
        d["host_offsets"] = host_offsets
        if deep_checks_enabled():
            plan.__post_init__()
        return plan

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """The plan as custom-op arguments: its index tensors and its sizes
        (:meth:`from_op_args` rebuilds it inside the op)."""
        return ([getattr(self, f) for f in _OP_FIELDS],
                [self.num_tokens, self.num_experts, self.block_m, self.max_slots_per_token, self.top_k or 0])

    @classmethod
    def from_op_args(cls, idx: Sequence[torch.Tensor], meta: Sequence[int], slot_weight: torch.Tensor) -> "DispatchPlan":
        t, e, bm, k, top_k = meta
        return cls(num_tokens=t, num_experts=e, block_m=bm, max_slots_per_token=k, slot_weight=slot_weight,
                   top_k=top_k or None, **dict(zip(_OP_FIELDS, idx, strict=True)))

    def __post_init__(self) -> None:
        s, e, t, k = self.num_slots, self.num_experts, self.num_tokens, self.max_slots_per_token
        check_int("block_m", self.block_m, low=1)
        p = max_padded_rows(s, e, self.block_m)
        shapes = {
            "slot_token": (s,), "slot_expert": (s,), "slot_weight": (s,),
            "expert_counts": (e,), "expert_offsets": (e + 1,), "sorted_slot": (s,),
            "slot_position": (s,), "padded_offsets": (e + 1,), "padded_slot": (p,),
            "block_expert": (p // self.block_m,), "token_slots": (t, k),
        }
        dev = self.slot_token.device
        i32 = torch.int32
        for name, shape in shapes.items():
            v = getattr(self, name)
            if v.shape != shape:
                raise ValueError(f"DispatchPlan.{name}: expected shape {shape}, got {tuple(v.shape)}")
            if v.dtype != i32 and name != "slot_weight":
                raise ValueError(f"DispatchPlan.{name}: expected int32, got {v.dtype}")
            if v.device != dev:
                raise ValueError(f"DispatchPlan.{name}: expected device {dev}, got {v.device}")
        # The value checks read the data back many times: the API boundary checks the
        # routing, and a plan built from a valid routing is valid by construction, so
        # they run in debug mode only (MOE_KERNELS_DEBUG=1, any device).
        if deep_checks_enabled():
            self.check_values()

    def check_values(self) -> None:
        """Check invariants 1-7 on the data (synchronises with the device)."""
        s, e, bm = self.num_slots, self.num_experts, self.block_m
        dev = self.slot_token.device

        def fail(what: str) -> None:
            raise ValueError(f"DispatchPlan: invariant violated: {what}")

        se = self.slot_expert.long()
        valid = se < e
        v = int(valid.sum())
        counts = self.expert_counts.long()
        if int(counts.sum()) != v or (counts < 0).any():
            fail("sum(expert_counts) == number of valid slots")
        if not torch.equal(torch.bincount(se[valid], minlength=e)[:e], counts):
            fail("expert_counts[e] == slots routed to e")
        offs = self.expert_offsets.long()
        if int(offs[0]) != 0 or not torch.equal(offs[1:], torch.cumsum(counts, 0)):
            fail("expert_offsets is the exclusive prefix sum of expert_counts")
        perm = self.sorted_slot.long()
        if s and not torch.equal(torch.sort(perm).values, torch.arange(s, device=dev)):
            fail("sorted_slot is a permutation")
        if s and not torch.equal(self.slot_position.long()[perm], torch.arange(s, device=dev)):
            fail("slot_position is the inverse of sorted_slot")
        # Vectorised (no Python loop over experts): cheap enough for debug runs on large plans.
        experts = torch.arange(e, device=dev)
        pos_expert = torch.full((s,), e, dtype=torch.long, device=dev)
        pos_expert[:v] = torch.repeat_interleave(experts, counts)  # counts are exact by now
        if not torch.equal(se[perm], pos_expert):
            fail("sorted_slot groups slots by expert, dropped last")
        padded_counts = (counts + bm - 1) // bm * bm
        poffs = self.padded_offsets.long()
        if int(poffs[0]) != 0 or not torch.equal(poffs[1:], torch.cumsum(padded_counts, 0)):
            fail("padded_offsets is the prefix sum of counts rounded up to block_m")
        expected_rows = torch.full((self.num_padded_rows,), -1, dtype=torch.long, device=dev)
        x_of = pos_expert[:v]
        expected_rows[poffs[x_of] + torch.arange(v, device=dev) - offs[x_of]] = perm[:v]
        used_blocks = torch.repeat_interleave(experts, padded_counts // bm)
        expected_blocks = torch.full((self.num_blocks,), -1, dtype=torch.long, device=dev)
        expected_blocks[:used_blocks.numel()] = used_blocks
        if not torch.equal(self.padded_slot.long(), expected_rows):
            fail("padded_slot holds each expert's slots at its padded offset, -1 elsewhere")
        if not torch.equal(self.block_expert.long(), expected_blocks):
            fail("block_expert maps each used block to its expert, -1 past the end")
        table = self.token_slots.long()
        present = table[table >= 0]
        if present.numel() != v or not torch.equal(torch.sort(present).values, torch.nonzero(valid).flatten()):
            fail("token_slots lists every valid slot exactly once")
        rows = torch.arange(self.num_tokens, device=dev).unsqueeze(1).expand_as(table)
        if not torch.equal(self.slot_token.long()[present], rows[table >= 0]):
            fail("token_slots[t] holds slots of token t")


def _token_slots(routing: Routing, valid: torch.Tensor) -> torch.Tensor:
    """The plan's ``token_slots`` [T, K] (int64) of ``routing``; ``valid`` [S] marks the
    slots with ``slot_expert < E``."""
    t, s, k = routing.num_tokens, routing.num_slots, routing.max_slots_per_token
    dev = routing.slot_token.device
    se = routing.slot_expert.long()
    if routing.top_k is not None:
        slots = torch.arange(s, device=dev)
        token_slots = torch.where(valid, slots, torch.full_like(slots, -1)).view(t, routing.top_k)
        if routing.top_k < k:
            token_slots = torch.cat([token_slots, token_slots.new_full((t, k - routing.top_k), -1)], 1)
    else:
        # Stable sort by token (dropped slots keyed past the end), then rank within token.
        key = torch.where(valid, routing.slot_token.long(), torch.full_like(se, t))
        key_sorted, by_token = torch.sort(key, stable=True)
        tok_counts = torch.zeros(t + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
        tok_offsets = torch.cumsum(tok_counts, 0) - tok_counts
        rank = torch.arange(s, device=dev) - tok_offsets[key_sorted]
        cell = torch.where(key_sorted < t, key_sorted * k + rank, torch.full_like(rank, t * k))
        token_slots = torch.full((t * k + 1,), -1, dtype=torch.long, device=dev).scatter_(0, cell, by_token)[:t * k]
        token_slots = token_slots.view(t, k)
    return token_slots


# Up to this many token-major slots the CPU plan is computed on the host in plain Python
# and made into tensors with one copy: a dozen small ATen ops cost more than the
# arithmetic at a handful of slots. Past 16 the Python work itself costs more, with the
# caches cold between layers (32 and 64 slots: 4-10% of the layer, measured side by side).
HOST_PLAN_MAX_SLOTS = 16
_I32_CODE = "i" if array("i").itemsize == 4 else "l"  # the array typecode of a 4-byte int


def _build_plan_rows_host(routing: Routing) -> DispatchPlan:
    """:func:`build_plan_torch` for ``block_m = 1``, a token-major routing with few slots,
    on the CPU: one read of ``slot_expert``, the fields in Python, one int32 tensor."""
    e, s, t, k = routing.num_experts, routing.num_slots, routing.num_tokens, routing.max_slots_per_token
    se = routing.slot_expert.tolist()
    counts = [0] * (e + 1)
    for x in se:
        counts[x] += 1
    offsets = [0, *accumulate(counts[:e])]
    perm = sorted(range(s), key=se.__getitem__)  # stable: by expert, then slot id; dropped last
    position = [0] * s
    for p, slot in enumerate(perm):
        position[slot] = p
    v = offsets[e]
    pad = [-1] * (s - v)
    token_slots = [slot if se[slot] < e else -1 for slot in range(s)]
    # array -> frombuffer converts the ints in C (torch.tensor on a list walks them one
    # by one: ~20 us more with E = 256); the tensor keeps the array alive.
    buf = torch.frombuffer(array(_I32_CODE, counts[:e] + offsets + perm + position + perm[:v] + pad
                                 + [se[q] for q in perm[:v]] + pad + token_slots), dtype=torch.int32)
    cnt, offs, srt, pos, pslot, bexp, tok = torch.split(buf, [e, e + 1, s, s, s, s, t * k])
    return DispatchPlan._trusted(routing, 1, (cnt, offs, srt, pos, offs, pslot, bexp, tok.view(t, k)), offsets)


def _build_plan_rows_cpu(routing: Routing) -> DispatchPlan:
    """:func:`build_plan_torch` for ``block_m = 1`` on the CPU in the fewest ops (the
    torch backend builds one per layer call): int32 throughout, counts by ``bincount``,
    the padded order the sorted order, and one host read of the offsets (which the
    torch experts need anyway) to skip the masking when no slot is dropped."""
    e, s = routing.num_experts, routing.num_slots
    i32 = torch.int32
    se = routing.slot_expert
    counts = torch.bincount(se, minlength=e + 1)[:e]
    offsets = torch.zeros(e + 1, dtype=i32)
    torch.cumsum(counts, 0, out=offsets[1:])
    host = offsets.tolist()
    sorted_expert, perm = torch.sort(se, stable=True)
    perm32 = perm.to(i32)
    slots = torch.arange(s, dtype=i32)
    position = torch.empty_like(perm32).scatter_(0, perm, slots)
    token_major = routing.top_k is not None and routing.top_k == routing.max_slots_per_token
    if host[-1] == s:  # nothing dropped
        padded_slot, block_expert = perm32, sorted_expert
        token_slots = slots.view(routing.num_tokens, routing.top_k) if token_major else None
    else:
        kept = sorted_expert < e
        padded_slot, block_expert = torch.where(kept, perm32, -1), torch.where(kept, sorted_expert, -1)
        token_slots = torch.where(se < e, slots, -1).view(routing.num_tokens, routing.top_k) if token_major else None
    if token_slots is None:
        token_slots = _token_slots(routing, se < e).to(i32).contiguous()
    return DispatchPlan._trusted(routing, 1, (counts.to(i32), offsets, perm32, position, offsets, padded_slot,
                                              block_expert, token_slots), host)


def build_plan_torch(routing: Routing, block_m: int = 64) -> DispatchPlan:
    """Build the :class:`DispatchPlan` of ``routing`` with ordinary torch ops (no host
    synchronisation on a GPU). The reference for the Triton and CUDA plan kernels."""
    check_int("block_m", block_m, low=1)
    if block_m == 1 and routing.slot_token.device.type == "cpu" and not _compiling():
        if routing.num_slots <= HOST_PLAN_MAX_SLOTS and routing.top_k == routing.max_slots_per_token:
            return _build_plan_rows_host(routing)
        return _build_plan_rows_cpu(routing)
    e = routing.num_experts
    s = routing.num_slots
    dev = routing.slot_token.device
    i32 = torch.int32
    se = routing.slot_expert.long()
    valid = se < e

    counts_all = torch.zeros(e + 1, dtype=torch.long, device=dev).scatter_add_(0, se, torch.ones_like(se))
    counts = counts_all[:e]
    offsets = torch.zeros(e + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_expert, perm = torch.sort(se, stable=True)
    position = torch.empty_like(perm)
    position[perm] = torch.arange(s, device=dev)

    if block_m == 1:
        # One-row blocks: the padded order is the sorted order (P = S), dropped rows -1.
        poffs = offsets
        kept = sorted_expert < e
        padded_slot = torch.where(kept, perm, -1)
        block_expert = torch.where(kept, sorted_expert, -1)
    else:
        padded_counts = (counts + block_m - 1) // block_m * block_m
        poffs = torch.zeros(e + 1, dtype=torch.long, device=dev)
        poffs[1:] = torch.cumsum(padded_counts, 0)
        p = max_padded_rows(s, e, block_m)
        # Sorted position q of expert x lands on padded row poffs[x] + (q - offsets[x]);
        # dropped positions land on the dump row p, sliced off.
        clamp_expert = sorted_expert.clamp(max=e - 1)
        rows = poffs[clamp_expert] + torch.arange(s, device=dev) - offsets[clamp_expert]
        rows = torch.where(sorted_expert < e, rows, torch.full_like(rows, p))
        padded_slot = torch.full((p + 1,), -1, dtype=torch.long, device=dev).scatter_(0, rows, perm)[:p]

        nb = p // block_m
        block_start = torch.arange(nb, device=dev) * block_m
        block_expert = torch.searchsorted(poffs[1:].contiguous(), block_start, right=True)
        block_expert = torch.where(block_expert < e, block_expert, torch.full_like(block_expert, -1))

    token_slots = _token_slots(routing, valid)
    return DispatchPlan.from_fields(routing, block_m, (
        counts.to(i32), offsets.to(i32), perm.to(i32), position.to(i32), poffs.to(i32), padded_slot.to(i32),
        block_expert.to(i32), token_slots.to(i32).contiguous()))


def build_plan(routing: Routing, block_m: int = 64) -> DispatchPlan:
    """Build the dispatch plan (pure PyTorch; backends with plan kernels use their own)."""
    return build_plan_torch(routing, block_m)
