"""DispatchPlan: its invariants on many random routings, and each invariant check firing.

The plans built here are checked twice: by ``DispatchPlan.check_values`` (run in
``__post_init__`` on the CPU) and by ``py_expected_plan``, a list-based rebuild written
independently of the torch code; the corruption tests show the checks can fail.
"""

import dataclasses
import math
import zlib

import pytest
import torch

from moe_kernels import routing as R
from moe_kernels.plan import DispatchPlan, build_plan_torch, max_padded_rows
from moe_kernels.routing import Routing


def py_expected_plan(r: Routing, bm: int) -> dict:
    """The plan of ``r`` from its definition, with Python lists."""
    s, e, t = r.num_slots, r.num_experts, r.num_tokens
    se, st = r.slot_expert.tolist(), r.slot_token.tolist()
    counts = [se.count(x) for x in range(e)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    order = sorted(range(s), key=lambda i: (se[i], i))  # by expert, then slot id; dropped (E) last
    position = [0] * s
    for p, i in enumerate(order):
        position[i] = p
    padded = [math.ceil(c / bm) * bm for c in counts]
    poffs = [0]
    for c in padded:
        poffs.append(poffs[-1] + c)
    p_rows = max_padded_rows(s, e, bm)
    padded_slot = [-1] * p_rows
    block_expert = [-1] * (p_rows // bm)
    for x in range(e):
        for j in range(counts[x]):
            padded_slot[poffs[x] + j] = order[offsets[x] + j]
        for b in range(poffs[x] // bm, poffs[x + 1] // bm):
            block_expert[b] = x
    token_slots = [[] for _ in range(t)]
    for i in range(s):
        if se[i] < e:
            token_slots[st[i]].append(i)
    # -1 marks an empty cell; the token-major layout may leave one mid-row (a dropped
    # slot keeps its cell), so rows are compared without them, in order
    return dict(expert_counts=counts, expert_offsets=offsets, sorted_slot=order, slot_position=position,
                padded_offsets=poffs, padded_slot=padded_slot, block_expert=block_expert, token_slots=token_slots)


def random_routing(name: str, t: int, e: int, gen: torch.Generator) -> Routing:
    logits = torch.randn(t, e, generator=gen)
    if name == "skewed_switch":  # many drops
        logits[:, 0] += 4
        return R.switch(logits, capacity_factor=1.0)
    if name == "sentinels":  # expert-parallel ids outside [0, E)
        k = min(3, e)
        ids = torch.randint(-2, e + 3, (t, k), generator=gen)
        return Routing.from_topk(ids, torch.rand(t, k, generator=gen), e)
    opts = {
        "softmax_topk": dict(top_k=min(2, e)),
        "grouped_sigmoid_topk": dict(top_k=min(3, e)),
        "noisy_topk": dict(top_k=min(2, e), noise_logits=torch.randn(t, e, generator=gen)),
        "switch": dict(capacity_factor=1.25),
        "expert_choice": dict(capacity_factor=2.0),
        "dense": {},
    }[name]
    return R.route(logits, name, **opts)


ROUTINGS = ["softmax_topk", "grouped_sigmoid_topk", "noisy_topk", "switch", "skewed_switch", "expert_choice",
            "dense", "sentinels"]


@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize("name", ROUTINGS)
def test_plan_matches_definition(name, block_m):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{block_m}".encode()))
    # T = 1; E = 1; a prime E; E > T (empty experts); T >> E (full blocks)
    for t, e in [(1, 1), (1, 5), (7, 13), (33, 4), (130, 3)]:
        r = random_routing(name, t, e, gen)
        plan = build_plan_torch(r, block_m)
        plan.check_values()
        exp = py_expected_plan(r, block_m)
        for field, value in exp.items():
            got = getattr(plan, field)
            assert got.dtype == torch.int32, field
            if field == "token_slots":
                assert tuple(got.shape) == (t, r.max_slots_per_token)
                got = [[v for v in row if v >= 0] for row in got.tolist()]
                assert got == value, f"{name} T={t} E={e}: token_slots"
                continue
            assert got.tolist() == value, f"{name} T={t} E={e} block_m={block_m}: {field}"
        assert plan.slot_weight is r.slot_weight and plan.top_k == r.top_k
        assert plan.num_padded_rows == max_padded_rows(r.num_slots, e, block_m)
        assert plan.num_blocks * block_m == plan.num_padded_rows


@pytest.mark.parametrize("block_m", [1, 16])
def test_plan_empty_routing(block_m):  # T = 0: every field empty, nothing fails
    for r in (R.softmax_topk(torch.zeros(0, 4), top_k=2), R.expert_choice(torch.zeros(0, 4))):
        plan = build_plan_torch(r, block_m)
        assert plan.num_slots == 0 and plan.num_padded_rows == 0 and plan.num_blocks == 0
        assert plan.expert_counts.tolist() == [0] * 4 and plan.padded_offsets.tolist() == [0] * 5
        assert tuple(plan.token_slots.shape) == (0, r.max_slots_per_token)


def test_plan_all_slots_dropped():  # S > 0 but no valid slot
    r = Routing.from_topk(torch.full((3, 2), 9), torch.rand(3, 2), 4)
    plan = build_plan_torch(r, 16)
    assert plan.expert_offsets.tolist() == [0] * 5
    assert (plan.padded_slot == -1).all() and (plan.block_expert == -1).all() and (plan.token_slots == -1).all()
    assert sorted(plan.sorted_slot.tolist()) == list(range(6))


def test_max_padded_rows_hand():
    # S=10, E=4, block 16: 10 + 4*15 = 70 -> 64 (e.g. counts 7,1,1,1 use 4 blocks)
    assert max_padded_rows(10, 4, 16) == 64
    # S=3, E=8: at most 3 non-empty experts: 3 + 3*15 = 48
    assert max_padded_rows(3, 8, 16) == 48
    # S=100, E=2, block 64: 100 + 2*63 = 226 -> 192 (counts 99 + 1 use 128 + 64)
    assert max_padded_rows(100, 2, 64) == 192
    assert max_padded_rows(0, 8, 64) == 0
    assert max_padded_rows(37, 5, 1) == 37
    assert max_padded_rows(64, 1, 64) == 64


def test_max_padded_rows_is_a_bound_and_reached():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        e = int(torch.randint(1, 10, (1,), generator=gen))
        bm = int(torch.randint(1, 20, (1,), generator=gen))
        s = int(torch.randint(0, 60, (1,), generator=gen))
        counts = torch.bincount(torch.randint(0, e + 1, (s,), generator=gen), minlength=e + 1)[:e].tolist()
        used = sum(math.ceil(c / bm) * bm for c in counts)
        assert used <= max_padded_rows(s, e, bm)
    # reached: E experts each with 1 slot, then the rest on one expert
    s, e, bm = 40, 6, 8
    counts = [s - (e - 1)] + [1] * (e - 1)
    assert sum(math.ceil(c / bm) * bm for c in counts) == max_padded_rows(s, e, bm)


# --------------------------------------------------------------------------- corruption


def base_plan():
    """E=3, block 4, counts (3, 0, 5) plus one dropped slot: 9 slots, token-major top-3."""
    ids = torch.tensor([[0, 2, 2], [2, 0, 9], [2, 2, 0]])
    r = Routing.from_topk(ids, torch.rand(3, 3), 3)
    plan = build_plan_torch(r, 4)
    assert plan.expert_counts.tolist() == [3, 0, 5]
    return plan


def swapped(t: torch.Tensor, i: int, j: int) -> torch.Tensor:
    t = t.clone()
    t[i], t[j] = t[j].clone(), t[i].clone()
    return t


def with_value(t: torch.Tensor, idx, value) -> torch.Tensor:
    t = t.clone()
    t[idx] = value
    return t


def corruptions(plan: DispatchPlan) -> dict:
    """field -> a wrong value, one per invariant."""
    perm = plan.sorted_slot
    return {
        # 1: counts do not add up to the valid slots
        "inv1 counts sum": dict(expert_counts=with_value(plan.expert_counts, 1, 1)),
        # 1: counts add up but one expert's count is another's
        "inv1 counts per expert": dict(expert_counts=torch.tensor([5, 0, 3], dtype=torch.int32),
                                       expert_offsets=torch.tensor([0, 5, 5, 8], dtype=torch.int32)),
        "offsets": dict(expert_offsets=with_value(plan.expert_offsets, 1, 2)),
        # 2: not a permutation / inverse broken
        "inv2 not a permutation": dict(sorted_slot=with_value(perm, 0, perm[1])),
        "inv2 inverse": dict(slot_position=swapped(plan.slot_position, 0, 1)),
        # 3: two slots of different experts swapped in the sort (slot_position kept consistent)
        "inv3 grouping": dict(sorted_slot=swapped(perm, 0, 3),
                              slot_position=swapped(plan.slot_position, int(perm[0]), int(perm[3]))),
        # 4: a wrong padded offset
        "inv4 padded offset": dict(padded_offsets=with_value(plan.padded_offsets, 2, 8)),
        # 5: padded rows disagree with the sort, or padding that is not -1
        "inv5 swapped rows": dict(padded_slot=swapped(plan.padded_slot, 0, 4)),
        "inv5 padding row": dict(padded_slot=with_value(plan.padded_slot, 3, 8)),
        # 6: a wrong block_expert, and a used block past the end
        "inv6 wrong expert": dict(block_expert=with_value(plan.block_expert, 0, 2)),
        "inv6 past the end": dict(block_expert=with_value(plan.block_expert, -1, 0)),
        # 7: a valid slot missing, twice, or in another token's row
        "inv7 missing": dict(token_slots=with_value(plan.token_slots, (0, 0), -1)),
        "inv7 twice": dict(token_slots=with_value(plan.token_slots, (1, 2), 1)),
        "inv7 wrong token": dict(token_slots=swapped(plan.token_slots.view(-1), 0, 3).view(3, 3)),
    }


@pytest.mark.parametrize("case", list(corruptions(base_plan())))
def test_each_invariant_check_fires(case, monkeypatch):
    monkeypatch.delenv("MOE_KERNELS_DEBUG", raising=False)  # the suite may run in debug mode
    plan = base_plan()
    change = corruptions(plan)[case]
    # not on the hot path: without debug mode only shapes and dtypes are checked
    dataclasses.replace(plan, **change)
    # through __post_init__ in debug mode
    monkeypatch.setenv("MOE_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="invariant violated"):
        dataclasses.replace(plan, **change)
    monkeypatch.delenv("MOE_KERNELS_DEBUG")
    # and through check_values() on a plan corrupted after construction
    for field, value in change.items():
        object.__setattr__(plan, field, value)
    with pytest.raises(ValueError, match="invariant violated"):
        plan.check_values()


@pytest.mark.parametrize("field,value", [
    ("padded_slot", torch.full((12,), -1, dtype=torch.int32)),   # worst case is 16 rows, not the used 12
    ("block_expert", torch.full((3,), -1, dtype=torch.int32)),   # 4 blocks, not the used 3
    ("token_slots", torch.full((3, 2), -1, dtype=torch.int32)),
    ("expert_counts", torch.zeros(3, dtype=torch.int64)),         # int64 instead of int32
    ("slot_position", torch.zeros(8, dtype=torch.int32)),
])
def test_shape_and_dtype_checks_fire(field, value):
    plan = base_plan()
    assert plan.num_padded_rows == 16  # 9 slots + 3 experts * 3 spare rows = 18, rounded down to block 4
    with pytest.raises(ValueError, match=f"DispatchPlan.{field}"):
        dataclasses.replace(plan, **{field: value})


def test_block_m_checked():
    plan = base_plan()
    with pytest.raises(ValueError, match="block_m"):
        build_plan_torch(Routing.from_topk(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1), 2), 0)
    with pytest.raises(ValueError, match="block_m"):
        dataclasses.replace(plan, block_m=0)


def test_plan_needs_no_host_sync_sizes():
    # every size is a function of (S, E, block_m) only: two routings with the same S and
    # very different expert loads get plans of identical shapes
    a = Routing.from_topk(torch.zeros(8, 2, dtype=torch.int64).add_(torch.tensor([0, 1])), torch.rand(8, 2), 5)
    b = Routing.from_topk(torch.arange(16).view(8, 2) % 5, torch.rand(8, 2), 5)
    pa, pb = build_plan_torch(a, 4), build_plan_torch(b, 4)
    for f in ("padded_slot", "block_expert", "token_slots", "sorted_slot"):
        assert getattr(pa, f).shape == getattr(pb, f).shape
