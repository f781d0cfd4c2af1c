"""The one-launch Triton dispatch plan (moe_kernels.backends.triton.plan) against build_plan_torch.

Every field must be equal bit for bit, for every router's slot layout: token-major top-k
(with dropped sentinel ids), Switch with capacity (dropped slots), Expert Choice (tokens
with 0..E slots, expert-major layout), dense, and a routing whose token rows have more
columns than top_k. Outputs come from poisoned allocations, so an element the kernel
forgot to write fails the comparison (and the explicit poison check).
"""

import pytest
import torch

from triton_interp import DEVICE, assert_no_poison, import_or_skip, poison_empty

import_or_skip()

from moe_kernels import routing as R  # noqa: E402
from moe_kernels.plan import build_plan_torch  # noqa: E402
from moe_kernels.routing import Routing  # noqa: E402
from moe_kernels.backends.triton import plan as TP  # noqa: E402
from moe_kernels.backends.triton import plan_multi as TM  # noqa: E402
from moe_kernels.backends.triton.plan import build_plan_triton  # noqa: E402

FIELDS = ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "padded_offsets", "padded_slot",
          "block_expert", "token_slots")


def _compare(monkeypatch, routing, block_m):
    poison_empty(monkeypatch, TP)
    got = build_plan_triton(routing, block_m)
    want = build_plan_torch(routing, block_m)
    for f in FIELDS:
        g, w = getattr(got, f), getattr(want, f)
        assert_no_poison(g, f)
        assert g.dtype == torch.int32 and g.shape == w.shape, f
        assert torch.equal(g, w), f"{f} differs:\n{g}\nvs\n{w}"
    assert got.top_k == want.top_k and got.num_padded_rows == want.num_padded_rows
    got.check_values()
    return got


def _logits(t, e):
    return torch.randn(t, e, device=DEVICE)


TOPK_CASES = [
    # (T, E, k, block_m)   edge covered
    pytest.param(1, 13, 6, 16, id="T1-prime-E"),
    pytest.param(33, 8, 2, 16, id="T33"),
    pytest.param(64, 4, 2, 64, id="T64-block-of-64"),
    pytest.param(222, 13, 1, 16, id="T222-k1-many-chunks"),
    pytest.param(33, 13, 6, 1, id="block_m-1"),
    pytest.param(40, 5, 2, 24, id="block_m-not-power-of-two"),
    pytest.param(64, 1024, 8, 16, id="E1024"),
]


@pytest.mark.parametrize("t,e,k,bm", TOPK_CASES)
def test_topk_routing(monkeypatch, t, e, k, bm):
    plan = _compare(monkeypatch, R.softmax_topk(_logits(t, e), k), bm)
    if e > t * k:
        assert bool((plan.expert_counts == 0).any())  # experts without tokens


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_empty_batch(monkeypatch, router):
    # T = 0 (S = 0, P = 0): only the counts and offsets have elements, all zero
    x = _logits(0, 6)
    r = R.softmax_topk(x, 2) if router == "topk" else R.expert_choice(x)
    plan = _compare(monkeypatch, r, 16)
    assert plan.num_padded_rows == 0 and int(plan.expert_offsets[-1]) == 0


def test_all_tokens_one_expert(monkeypatch):
    x = _logits(37, 7)
    x[:, 3] += 30.0  # every token's first choice is expert 3; with k=1 experts != 3 are empty
    plan = _compare(monkeypatch, R.softmax_topk(x, 1), 16)
    assert int(plan.expert_counts[3]) == 37 and int(plan.expert_counts.sum()) == 37


def test_from_topk_with_dropped_sentinels(monkeypatch):
    # expert-parallel style ids: -1 and >= E mean "not on this rank" -> dropped slots
    ids = torch.randint(-1, 7, (29, 3), device=DEVICE)
    r = Routing.from_topk(ids, torch.rand(29, 3, device=DEVICE), 6)
    assert bool((r.slot_expert == 6).any())
    _compare(monkeypatch, r, 16)


def test_all_slots_dropped(monkeypatch):
    ids = torch.full((5, 2), 9, device=DEVICE)
    plan = _compare(monkeypatch, Routing.from_topk(ids, torch.rand(5, 2, device=DEVICE), 4), 16)
    assert bool((plan.token_slots == -1).all()) and bool((plan.padded_slot == -1).all())


def test_switch_with_capacity_drops(monkeypatch):
    x = _logits(45, 4)
    x[:, 1] += 2.0  # overload expert 1 so its extra tokens are dropped
    r = R.switch(x, capacity_factor=0.75)
    assert bool((r.slot_expert == 4).any())
    _compare(monkeypatch, r, 16)


@pytest.mark.parametrize("t,e,cf,bm", [
    pytest.param(33, 5, 1.0, 16, id="T33-E5"),
    pytest.param(64, 4, 2.0, 16, id="many-slots-per-token-across-chunks"),
    pytest.param(1, 3, 1.0, 16, id="T1"),
    pytest.param(50, 13, 0.5, 8, id="prime-E-tokens-with-no-slot"),
])
def test_expert_choice(monkeypatch, t, e, cf, bm):
    r = R.expert_choice(_logits(t, e), capacity_factor=cf)
    assert r.top_k is None
    _compare(monkeypatch, r, bm)


def test_expert_choice_layout_with_dropped_slots(monkeypatch):
    # a top_k=None routing whose slots are not grouped by expert and include dropped ones
    s, t, e = 70, 20, 6
    tok = torch.randint(0, t, (s,), dtype=torch.int32, device=DEVICE)
    exp = torch.randint(0, e + 1, (s,), dtype=torch.int32, device=DEVICE)
    r = Routing(tok, exp, torch.rand(s, device=DEVICE), t, e, max_slots_per_token=s, top_k=None)
    _compare(monkeypatch, r, 16)


@pytest.mark.parametrize("layout", ["token-major", "expert-choice"])
def test_negative_expert_ids_are_dropped(monkeypatch, layout):
    """Ids < 0 (the checks that reject them are host syncs, off on a GPU) are dropped
    slots like E, never placed at padded row 0 through an all-zero one-hot row. Routing
    rejects them on the CPU, so the launcher is called directly; the reference is the
    torch plan of the same ids with every negative one mapped to E."""
    poison_empty(monkeypatch, TP)
    t, e, k = 23, 5, 3
    ids = torch.randint(0, e, (t, k), dtype=torch.int32, device=DEVICE)
    ids[0, 0] = -1  # the first slot: the one whose padded row 0 a bad id would overwrite
    ids[torch.rand(t, k, device=DEVICE) < 0.2] = -1
    ids[7, 1] = -5
    ids[9] = -1  # a token with no valid slot
    se = ids.view(-1).contiguous()
    tok = torch.arange(t, dtype=torch.int32, device=DEVICE).repeat_interleave(k)
    if layout == "token-major":
        top_k, width = k, k
    else:  # the same slots as an expert-choice (top_k=None) layout: table filled per token
        top_k, width = 0, k
    got = dict(zip(FIELDS, TP._launch(se, tok, t, e, width, top_k, 16)))
    mapped = torch.where(se < 0, torch.full_like(se, e), se)
    want = build_plan_torch(Routing(tok, mapped, torch.rand(t * k, device=DEVICE), t, e, width,
                                    top_k=top_k or None), 16)
    for f in FIELDS:
        assert_no_poison(got[f], f)
        assert torch.equal(got[f], getattr(want, f)), f"{f} differs:\n{got[f]}\nvs\n{getattr(want, f)}"


def test_dense(monkeypatch):
    _compare(monkeypatch, R.dense_softmax(_logits(7, 5)), 16)


def test_more_columns_than_top_k(monkeypatch):
    # max_slots_per_token > top_k: token_slots gets -1 columns past top_k
    ids = torch.randint(0, 6, (11, 2), dtype=torch.int32, device=DEVICE)
    tok = torch.arange(11, dtype=torch.int32, device=DEVICE).repeat_interleave(2)
    r = Routing(tok, ids.view(-1), torch.rand(22, device=DEVICE), 11, 6, max_slots_per_token=4, top_k=2)
    plan = _compare(monkeypatch, r, 16)
    assert bool((plan.token_slots[:, 2:] == -1).all())


def test_custom_op_and_compile():
    r = R.softmax_topk(_logits(21, 6), 2)
    args = (r.slot_expert, r.slot_token, 21, 6, 2, 2, 16)
    torch.library.opcheck(torch.ops.moe_kernels.dispatch_plan.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(slot_expert, slot_token, slot_weight):
        routing = Routing(slot_token, slot_expert, slot_weight, 21, 6, 2, top_k=2)
        plan = build_plan_triton(routing, 16)
        return plan.padded_slot, plan.block_expert, plan.token_slots

    got = f(r.slot_expert, r.slot_token, r.slot_weight)
    want = build_plan_torch(r, 16)
    assert torch.equal(got[0], want.padded_slot) and torch.equal(got[1], want.block_expert)
    assert torch.equal(got[2], want.token_slots)


def test_bad_arguments():
    r = R.softmax_topk(_logits(4, 6), 2)
    with pytest.raises(ValueError, match="block_m"):
        build_plan_triton(r, 0)
    with pytest.raises(ValueError, match="routing"):
        build_plan_triton(r.slot_expert, 16)
    big = Routing.from_topk(torch.zeros(2, 1, dtype=torch.int32, device=DEVICE), torch.ones(2, 1, device=DEVICE), 1025)
    with pytest.raises(ValueError, match="num_experts"):
        build_plan_triton(big, 16)


# --------------------------------------------------------------------------- many programs
# The prefill pipeline (plan_multi), forced on small inputs so each case runs many
# programs (chunks of CHUNK slots x tiles of experts, one to three scan levels).


def _compare_many(monkeypatch, routing, block_m):
    poison_empty(monkeypatch, TP)
    se, st = routing.slot_expert.contiguous(), routing.slot_token.contiguous()
    shape = TP.launch_shape(se.shape[0], routing.num_experts, routing.num_tokens, routing.max_slots_per_token,
                            routing.top_k or 0, block_m, many=True)
    assert shape[0].kernel == "_plan_hist_fwd_kernel"
    got = TP._launch(se, st, routing.num_tokens, routing.num_experts, routing.max_slots_per_token,
                     routing.top_k or 0, block_m, many=True)
    want = build_plan_torch(routing, block_m)
    for f, g in zip(FIELDS, got):
        assert_no_poison(g, f)
        assert torch.equal(g, getattr(want, f)), f"{f} differs:\n{g}\nvs\n{getattr(want, f)}"
    return shape


MANY_TOPK = [
    # (T, E, k, block_m)   edge covered
    pytest.param(1, 13, 6, 16, id="T1-prime-E-one-chunk"),
    pytest.param(700, 1, 1, 16, id="E1"),
    pytest.param(300, 8, 2, 16, id="E8-many-chunks"),
    pytest.param(257, 13, 3, 24, id="prime-E-block_m-24"),
    pytest.param(129, 128, 8, 64, id="E128"),
    pytest.param(40, 256, 8, 1, id="E256-block_m-1-empty-experts"),
    pytest.param(33, 1024, 4, 16, id="E1024-mostly-empty"),
]


@pytest.mark.parametrize("t,e,k,bm", MANY_TOPK)
def test_many_programs_topk(monkeypatch, t, e, k, bm):
    shape = _compare_many(monkeypatch, R.softmax_topk(_logits(t, e), k), bm)
    assert shape[0].programs >= (t * k) // 4096  # at least one program per chunk of slots


@pytest.mark.parametrize("t,levels", [pytest.param(2000, 2, id="two-levels"), pytest.param(5000, 3, id="three")])
def test_many_programs_scan_levels(monkeypatch, t, levels):
    # NBK = S / CHUNK > SCAN_ROWS: several scan launches, whose level sums placement adds.
    # SCAN_ROWS shrunk to 4 so that the interpreter reaches them on a small S.
    real = TM.multi_config
    monkeypatch.setattr(TM, "multi_config", lambda *a: dict(real(*a), SCAN_ROWS=4))
    shape = _compare_many(monkeypatch, R.softmax_topk(_logits(t, 13), 1), 16)
    assert sum(ln.kernel == "_plan_scan_fwd_kernel" for ln in shape) == levels


def test_many_programs_all_to_one_expert_and_all_dropped(monkeypatch):
    x = _logits(600, 13)
    x[:, 5] += 30.0  # every slot to expert 5: one segment spanning every chunk
    _compare_many(monkeypatch, R.softmax_topk(x, 1), 16)
    ids = torch.full((300, 2), 13, device=DEVICE)  # every slot dropped: bucket E only
    _compare_many(monkeypatch, Routing.from_topk(ids, torch.rand(300, 2, device=DEVICE), 13), 16)


def test_many_programs_negative_ids_dropped(monkeypatch):
    poison_empty(monkeypatch, TP)
    t, e, k = 400, 7, 2
    ids = torch.randint(-2, e + 2, (t, k), dtype=torch.int32, device=DEVICE)  # out-of-range ids both sides
    se = ids.view(-1).contiguous()
    tok = torch.arange(t, dtype=torch.int32, device=DEVICE).repeat_interleave(k)
    for top_k in (k, 0):
        got = TP._launch(se, tok, t, e, k, top_k, 16, many=True)
        mapped = torch.where((se < 0) | (se > e), torch.full_like(se, e), se)
        want = build_plan_torch(Routing(tok, mapped, torch.rand(t * k, device=DEVICE), t, e, k,
                                        top_k=top_k or None), 16)
        for f, g in zip(FIELDS, got):
            assert_no_poison(g, f)
            assert torch.equal(g, getattr(want, f)), f


@pytest.mark.parametrize("t,e,cf", [
    pytest.param(300, 8, 1.0, id="expert-choice"),
    pytest.param(200, 13, 0.5, id="prime-E-tokens-without-slots"),
])
def test_many_programs_expert_choice(monkeypatch, t, e, cf):
    _compare_many(monkeypatch, R.expert_choice(_logits(t, e), capacity_factor=cf), 16)


def test_many_programs_unordered_layout(monkeypatch):
    # slots in no order, some dropped, rows sorted after the atomic appends
    s, t, e = 1500, 50, 6
    tok = torch.randint(0, t, (s,), dtype=torch.int32, device=DEVICE)
    exp = torch.randint(0, e + 1, (s,), dtype=torch.int32, device=DEVICE)
    r = Routing(tok, exp, torch.rand(s, device=DEVICE), t, e, max_slots_per_token=64, top_k=None)
    _compare_many(monkeypatch, r, 16)


@pytest.mark.slow
@pytest.mark.parametrize("s,e", [(65536, 8), (65536, 256), (8192, 1024)])
def test_many_programs_large(monkeypatch, s, e):
    # up to S = 2^16 slots through the public entry point (which picks many programs itself)
    k = 8
    r = R.softmax_topk(_logits(s // k, e), k)
    assert TP.uses_many_programs(r.num_slots, e, k, k)
    _compare(monkeypatch, r, 64)


def test_launch_shape_grows_with_slots():
    """The grid grows with S; no program's loop trip count does (static sizes only)."""
    e, k, bm = 256, 8, 64
    small = TP.launch_shape(8, e, 1, k, k, bm)
    assert len(small) == 1 and small[0].grid == (1,)  # decode: one launch
    shapes = {s: TP.launch_shape(s, e, s // k, k, k, bm) for s in (2**14, 2**17, 2**20, 2**24)}
    big = shapes[2**17]
    assert sum(ln.programs for ln in big) > 100
    assert max(ln.programs for ln in big) > 100  # one launch alone fills 132 SMs
    per_kernel = {}
    for shape in shapes.values():
        for ln in shape:
            per_kernel.setdefault(ln.kernel, set()).add(ln.trips)
    assert all(len(v) == 1 for v in per_kernel.values()), per_kernel  # no kernel's loops grow with S
    for s, shape in shapes.items():
        assert max(ln.trips for ln in shape) <= 8, s  # loops only over expert tiles
        hist = next(ln for ln in shape if ln.kernel == "_plan_hist_fwd_kernel")
        assert hist.programs * 4096 >= s  # each program's one-hot tile is <= 4096 cells
    hist_programs = [next(ln for ln in shapes[s] if ln.kernel == "_plan_hist_fwd_kernel").programs
                     for s in sorted(shapes)]
    assert hist_programs == sorted(hist_programs) and hist_programs[-1] > 1000 * hist_programs[0] // 1024
    # the one-program kernel's trip count does grow with S: that is why the switch exists
    one = [TP.launch_shape(s, e, s // k, k, k, bm, many=False)[0].trips for s in (2**10, 2**14)]
    assert one[1] > one[0]
    for e in (1, 13, 1024):  # E tiles: trip counts bounded by E, never by S
        trips = {max(ln.trips for ln in TP.launch_shape(s, e, s, 1, 1, 16, many=True)) for s in (2**12, 2**22)}
        assert len(trips) == 1
