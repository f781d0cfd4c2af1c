"""The many-CTA CUDA plan's decomposition on the CPU: moe_kernels.backends.cuda.twins.
build_plan_blocked (histogram per chunk, level scans, placement from prefix sums, block
map per row, token rows appended in any order then sorted) must equal build_plan_torch
bit for bit, and launch_shape must spread the plan over more CTAs as S grows without
any loop growing with S. The kernels themselves are checked against the twins on a GPU
(test_cuda_gpu.py).
"""

import pytest
import torch

from moe_kernels.backends.cuda import extension as cops
from moe_kernels.backends.cuda import plan as cplan
from moe_kernels.backends.cuda import twins as tw
from moe_kernels.plan import build_plan_torch
from moe_kernels.routing import Routing, expert_choice

FIELDS = ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "padded_offsets", "padded_slot",
          "block_expert", "token_slots")


def _check(r, block_m, **kw):
    got = tw.build_plan_blocked(r.slot_expert, r.slot_token, r.num_tokens, r.num_experts, r.max_slots_per_token,
                                r.top_k or 0, block_m, **kw)
    want = build_plan_torch(r, block_m)
    for f, g in zip(FIELDS, got):
        assert g.dtype == torch.int32 and torch.equal(g, getattr(want, f)), f


def _ids(t, k, e, gen):
    return torch.randint(0, e, (t, k), generator=gen)


@pytest.mark.parametrize("s,e,bm", [
    # (slots, experts, block_m)   edge covered
    pytest.param(1, 1, 16, id="S1-E1"),
    pytest.param(5000, 1, 64, id="E1-one-segment"),
    pytest.param(4097, 8, 16, id="just-past-one-CTA"),
    pytest.param(9001, 13, 24, id="prime-E-block_m-24"),
    pytest.param(20000, 128, 64, id="E128"),
    pytest.param(65536, 256, 64, id="E256-S2^16"),
    pytest.param(65536, 1024, 1, id="E1024-block_m-1"),
    pytest.param(12000, 4000, 16, id="E4000-most-experts-empty"),
])
def test_blocked_twin_top1(s, e, bm):
    gen = torch.Generator().manual_seed(s + e)
    ids = _ids(s, 1, e, gen)
    ids[torch.rand(s, 1, generator=gen) < 0.05] = e  # some dropped
    _check(Routing.from_topk(ids, torch.rand(s, 1), e), bm)


def test_blocked_twin_topk_and_deep_levels():
    # small chunks and groups: three scan levels on a small S (the kernels' shape at 2^31)
    gen = torch.Generator().manual_seed(0)
    r = Routing.from_topk(_ids(3000, 8, 256, gen), torch.rand(3000, 8), 256)
    _check(r, 64)
    _check(r, 64, chunk=8, scan_rows=4)


def test_blocked_twin_edges():
    gen = torch.Generator().manual_seed(1)
    _check(Routing.from_topk(torch.full((6000, 1), 3), torch.rand(6000, 1), 13), 16)  # all to one expert
    _check(Routing.from_topk(torch.full((3000, 2), 13), torch.rand(3000, 2), 13), 16)  # all dropped
    ids = torch.randint(-1, 9, (2500, 2), generator=gen)  # -1 and >= E: dropped sentinels
    _check(Routing.from_topk(ids, torch.rand(2500, 2), 7), 16)
    ids = torch.randint(0, 4, (5000, 1), generator=gen) * 2  # odd experts empty
    _check(Routing.from_topk(ids, torch.rand(5000, 1), 8), 16)


def test_blocked_twin_negative_ids():
    # ids < 0 straight into the op's arguments (Routing maps them; the kernels must too)
    gen = torch.Generator().manual_seed(2)
    se = torch.randint(-3, 9, (6000,), generator=gen, dtype=torch.int32)
    st = torch.arange(6000, dtype=torch.int32)
    got = tw.build_plan_blocked(se, st, 6000, 7, 1, 1, 16)
    want = tw.build_plan(se, st, 6000, 7, 1, 1, 16)
    for f, g, w in zip(FIELDS, got, want):
        assert torch.equal(g, w), f


@pytest.mark.parametrize("order", ["slot", "reversed", "random"])
def test_blocked_twin_expert_choice_any_append_order(order):
    # the token rows come out the same whatever order the atomic appends land in
    torch.manual_seed(3)
    r = expert_choice(torch.randn(600, 13), 1.3)
    s = r.num_slots
    perm = {"slot": torch.arange(s), "reversed": torch.arange(s).flip(0), "random": torch.randperm(s)}[order]
    _check(r, 16, append_order=perm, chunk=64, scan_rows=4)


def test_launch_shape_grows_with_slots():
    e, k, bm = 256, 8, 64
    one = cplan.launch_shape(8, e, 1, k, k, bm)
    assert [n for n, _, _ in one] == ["_plan_build_fwd_kernel"] and one[0][1] == 1  # decode: one launch
    shapes = {s: cplan.launch_shape(s, e, s // k, k, k, bm) for s in (2**13, 2**17, 2**20, 2**24, 2**30)}
    big = shapes[2**17]
    assert max(ctas for _, ctas, _ in big) > 100  # S = 131,072, E = 256: one launch fills 132 SMs
    per_kernel = {}
    for shape in shapes.values():
        for name, _, tr in shape:
            per_kernel.setdefault(name, set()).add(tr)
    assert all(len(v) == 1 for v in per_kernel.values()), per_kernel  # no kernel's loops grow with S
    hist = [shape[0][1] for _, shape in sorted(shapes.items())]
    assert hist == sorted(hist) and hist[-1] == 2**30 // cplan.CHUNK
    # the one-CTA kernel's loops do grow with S: why the launcher switches
    assert cplan.launch_shape(4096, e, 512, k, k, bm)[0][2] > cplan.launch_shape(512, e, 64, k, k, bm)[0][2]
    for e in (1, 13, 4000):
        per_e = {max(tr for _, _, tr in cplan.launch_shape(s, e, s, 1, 1, 16)) for s in (2**13, 2**28)}
        assert len(per_e) == 1, e
    assert len(cplan.scan_levels(2**31 - 1)) - 1 <= cplan.MAX_LEVELS


def test_shape_constants_match_the_module():
    c = cops._C
    if c is None or not hasattr(c, "PLAN_CHUNK"):
        pytest.skip("moe_kernels._C not built from this csrc/")
    assert (c.PLAN_SINGLE_MAX_SLOTS, c.PLAN_CHUNK, c.PLAN_SCAN_ROWS) == (cplan.SINGLE_MAX_SLOTS, cplan.CHUNK,
                                                                         cplan.SCAN_ROWS)
    for s, e in ((100, 8), (4096, 256), (4097, 256), (10**6, 4000)):
        assert c.plan_scratch_words(s, e) == cplan.scratch_words(s, e)
