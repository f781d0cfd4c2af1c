"""The pure-PyTorch twins of the CUDA kernels (moe_kernels.backends.cuda.twins) and the custom
ops around them (moe_kernels.backends.cuda), on the CPU, where each op's kernel is
its twin.

Twins are checked against the core (moe_kernels.routing, build_plan_torch), against
naive Python loops written from the kernels' contracts (tie rule, stable order,
summation order), and the ops' hand-written backward against autograd through the
core. The kernels themselves are checked against these twins in test_cuda_gpu.py.
"""

import math

import pytest
import torch

from moe_kernels.primitives import fused_topk_args

from moe_kernels.backends import cuda as cb
from moe_kernels.backends.cuda import extension as cops
from moe_kernels.backends.cuda import twins as tw
from moe_kernels import expert_params, moe_reference
from moe_kernels.plan import DispatchPlan, build_plan_torch
from moe_kernels.routing import Routing, expert_choice, grouped_sigmoid_topk, softmax_topk, switch

PLAN_FIELDS = ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "padded_offsets", "padded_slot",
               "block_expert", "token_slots")


def naive_topk(scores: list, k: int) -> list:
    """k largest, ties to the lowest index: the kernels' selection rule."""
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    return order[:k]


# --------------------------------------------------------------------------- routing

SOFTMAX_CASES = [
    pytest.param(1, 8, 2, True, torch.float32, id="T1"),
    pytest.param(7, 13, 3, False, torch.float32, id="E-prime-no-renorm"),
    pytest.param(33, 64, 8, True, torch.float16, id="fp16"),
    pytest.param(5, 37, 5, True, torch.bfloat16, id="bf16-E-prime"),
    pytest.param(9, 512, 32, True, torch.float32, id="E512-k32"),
    pytest.param(4, 1, 1, True, torch.float32, id="E1"),
    pytest.param(3, 6, 6, False, torch.float32, id="k-equals-E"),
]


@pytest.mark.parametrize("t,e,k,renorm,dtype", SOFTMAX_CASES)
def test_softmax_topk_twin_matches_routing(t, e, k, renorm, dtype):
    logits = torch.randn(t, e).to(dtype)
    ids, w, counts = tw.route_softmax_topk(logits, k, renorm)
    ref = softmax_topk(logits, k, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and counts.dtype == torch.int32
    assert torch.equal(ids.reshape(-1), ref.slot_expert)
    torch.testing.assert_close(w.reshape(-1), ref.slot_weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, torch.bincount(ids.reshape(-1).long(), minlength=e).int())


def test_softmax_topk_ties_go_to_the_lowest_index():
    # Integer logits in a tiny range: many exact ties in every row (edge: ties).
    logits = torch.randint(-2, 2, (40, 24)).float()
    ids, _, _ = tw.route_softmax_topk(logits, 7, True)
    for row, got in zip(logits.tolist(), ids.tolist()):
        assert got == naive_topk(row, 7)
    assert torch.equal(ids.reshape(-1), softmax_topk(logits, 7).slot_expert)


def naive_select(scores: list, k: int) -> list:
    """k picks, largest first, ties to the lowest index, NaN never; None for a pick with
    nothing left (the kernels' rule with non-finite scores)."""
    order = sorted((e for e in range(len(scores)) if not math.isnan(scores[e])), key=lambda e: (-scores[e], e))
    return (order + [None] * k)[:k]


def naive_grouped(logits, bias, k, n_group, topk_group, scale, renorm):
    t, e = logits.shape
    per = e // n_group
    ids, ws = [], []
    for row in range(t):
        s = [float(torch.sigmoid(logits[row, j].float())) for j in range(e)]
        c = [s[j] + (float(bias[j]) if bias is not None else 0.0) for j in range(e)]
        if n_group > 1:
            gscore = []
            for g in range(n_group):
                vals = sorted((v for v in c[g * per:(g + 1) * per] if not math.isnan(v)), reverse=True)
                gscore.append(sum((vals + [-math.inf] * 2)[:min(2, per)]))  # inf + -inf: NaN, never kept
            keep = {g for g in naive_select(gscore, topk_group) if g is not None}
            c = [c[j] if j // per in keep or math.isnan(c[j]) else -math.inf for j in range(e)]
        chosen = naive_select(c, k)
        w = [s[j] if j is not None else 0.0 for j in chosen]
        total = sum(w)
        ids.append([j if j is not None else e for j in chosen])
        ws.append([(x / (total + 1e-20) if renorm else x) * scale for x in w])
    return ids, ws


GROUPED_CASES = [
    pytest.param(6, 256, 8, 8, 4, 2.5, True, True, torch.float32, id="deepseek-v3"),
    pytest.param(1, 13, 3, 1, 1, 1.0, True, False, torch.float32, id="T1-E-prime-one-group"),
    pytest.param(9, 12, 4, 6, 3, 1.0, False, True, torch.float16, id="fp16-no-renorm"),
    pytest.param(5, 30, 2, 30, 2, 1.0, True, True, torch.bfloat16, id="bf16-one-expert-per-group"),
    pytest.param(3, 512, 32, 8, 8, 1.0, True, True, torch.float32, id="E512-k32"),
]


@pytest.mark.parametrize("t,e,k,ng,tg,scale,renorm,use_bias,dtype", GROUPED_CASES)
def test_grouped_sigmoid_twin_matches_routing_and_loop(t, e, k, ng, tg, scale, renorm, use_bias, dtype):
    logits = torch.randn(t, e).to(dtype)
    bias = torch.randn(e) * 0.5 if use_bias else None
    ids, w, counts = tw.route_grouped_sigmoid_topk(logits, bias, k, ng, tg, scale, renorm)
    ref = grouped_sigmoid_topk(logits, k, bias, ng, tg, scale, renorm)
    assert torch.equal(ids.reshape(-1), ref.slot_expert)
    torch.testing.assert_close(w.reshape(-1), ref.slot_weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, torch.bincount(ids.reshape(-1).long(), minlength=e).int())
    loop_ids, loop_w = naive_grouped(logits, bias, k, ng, tg, scale, renorm)
    assert ids.tolist() == loop_ids
    torch.testing.assert_close(w, torch.tensor(loop_w), rtol=1e-5, atol=1e-6)


def test_grouped_sigmoid_ties_in_groups_and_experts():
    # Equal logits everywhere, bias breaking nothing: every group and expert ties (edge: ties).
    logits = torch.zeros(3, 16)
    bias = torch.tensor([0.0, 1.0] * 8)
    ids, _, _ = tw.route_grouped_sigmoid_topk(logits, bias, 3, 4, 2, 1.0, True)
    loop_ids, _ = naive_grouped(logits, bias, 3, 4, 2, 1.0, True)
    assert ids.tolist() == loop_ids == [[1, 3, 5]] * 3


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("renorm", [True, False])
def test_softmax_twin_drops_rows_with_non_finite_logits(renorm, dtype):
    e, k = 11, 3
    logits = torch.randn(7, e)
    logits[1, 4] = NAN  # edge: one NaN logit
    logits[3, 0] = INF  # edge: +inf (softmax gives inf - inf = NaN)
    logits[4] = -INF  # edge: every logit -inf
    logits[5, :6] = -INF  # edge: some -inf logits: a valid row (they get p = 0)
    logits = logits.to(dtype)
    ids, w, counts = tw.route_softmax_topk(logits, k, renorm)
    bad = [1, 3, 4]
    good = [r for r in range(7) if r not in bad]
    assert (ids[bad] == e).all() and (w[bad] == 0).all()
    ref = softmax_topk(logits[good].clamp(min=-1e4), k, renorm)  # the router wants finite logits; p is 0 alike
    assert torch.equal(ids[good].reshape(-1), ref.slot_expert)
    torch.testing.assert_close(w[good].reshape(-1), ref.slot_weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, torch.bincount(ids[good].reshape(-1).long(), minlength=e).int())
    assert int(counts.sum()) == len(good) * k


NAN_GROUPED_CASES = [
    # (logit edits, bias edits, k, n_group, topk_group): edge covered
    pytest.param({(0, 5): NAN}, {}, 3, 1, 1, id="nan-logit-ungrouped"),
    pytest.param({(0, 5): NAN, (2, 0): INF, (3, 1): -INF}, {}, 4, 4, 2, id="nan-and-inf-logits-grouped"),
    pytest.param({(r, j): NAN for r in (1, 4) for j in range(16)}, {}, 3, 4, 2, id="all-nan-rows"),
    pytest.param({(r, j): NAN for r in range(6) for j in range(12)}, {}, 4, 4, 1, id="kept-groups-run-short"),
    pytest.param({}, {3: NAN, 9: NAN}, 5, 4, 3, id="nan-bias"),
    pytest.param({}, {0: INF, 1: -INF}, 2, 8, 2, id="nan-group-score-from-inf-biases"),
    pytest.param({(r, j): NAN for r in range(6) for j in range(0, 16, 2)}, {}, 6, 8, 3, id="half-nan-one-per-group"),
]


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("logit_nan,bias_nan,k,ng,tg", NAN_GROUPED_CASES)
def test_grouped_twin_never_chooses_nan_and_drops_what_is_left(logit_nan, bias_nan, k, ng, tg, renorm):
    t, e = 6, 16
    logits = torch.randn(t, e)
    bias = torch.randn(e) * 0.3
    for (r, j), v in logit_nan.items():
        logits[r, j] = v
    for j, v in bias_nan.items():
        bias[j] = v
    ids, w, counts = tw.route_grouped_sigmoid_topk(logits, bias, k, ng, tg, 1.5, renorm)
    loop_ids, loop_w = naive_grouped(logits, bias, k, ng, tg, 1.5, renorm)
    assert ids.tolist() == loop_ids
    torch.testing.assert_close(w, torch.tensor(loop_w), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(w).all() and (w[ids == e] == 0).all()
    chosen = ids[ids < e].long()
    assert not torch.isnan(torch.sigmoid(logits.gather(1, ids.long().clamp(max=e - 1)))[ids < e]).any()
    assert torch.equal(counts, torch.bincount(chosen, minlength=e).int())


def test_grouped_twin_nan_edge_cases_by_hand():
    # Groups of 4 experts, keep 1 group, choose 3; logits 0 (s = 0.5) plus a bias that
    # makes group 1 the best; expert 5 of it is NaN, so the kept group has 3 valid
    # experts: 4, 6, 7 by bias order. Then rows where it runs short (edge: masked experts
    # at -inf fill in, lowest index first, skipping a NaN one).
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3, 0.4, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0])
    logits = torch.zeros(3, 12)
    logits[:, 5] = NAN
    logits[1, 4] = NAN
    logits[2, 4] = NAN
    logits[2, 0] = NAN
    ids, w, counts = tw.route_grouped_sigmoid_topk(logits, bias, 3, 3, 1, 1.0, False)
    assert ids.tolist() == [[4, 6, 7], [6, 7, 0], [6, 7, 1]]
    assert torch.equal(w, torch.full((3, 3), 0.5))
    # Every logit NaN: every slot dropped, and the renormalisation gives 0, not 0/0.
    ids, w, counts = tw.route_grouped_sigmoid_topk(torch.full((2, 12), NAN), None, 2, 3, 2, 2.0, True)
    assert (ids == 12).all() and torch.equal(w, torch.zeros(2, 2)) and counts.sum() == 0


def test_route_op_backward_with_dropped_rows():
    # A row with NaN / +inf logits is dropped whole: zero gradient there, and the other
    # rows' gradient is what they get alone (edge: dropped slots in the backward).
    logits = torch.randn(6, 9)
    logits[2, 3] = NAN
    logits[4, 0] = INF
    good = [0, 1, 3, 5]
    for renorm in (True, False):
        x = logits.clone().requires_grad_()
        _, w, _ = torch.ops.moe_kernels_cuda.route_softmax_topk(x, 3, renorm)
        g = torch.randn_like(w)
        (got,) = torch.autograd.grad((w * g).sum(), x)
        xg = logits[good].clone().requires_grad_()
        (want,) = torch.autograd.grad((softmax_topk(xg, 3, renorm).slot_weight.view(4, 3) * g[good]).sum(), xg)
        assert torch.equal(got[[2, 4]], torch.zeros(2, 9))
        torch.testing.assert_close(got[good], want, rtol=1e-5, atol=1e-6)

    # Grouped: the NaN experts get no gradient, the rest matches autograd through the twin
    # on rows with the NaN logits replaced by anything (they are never chosen).
    logits = torch.randn(5, 12)
    logits[1, 2] = NAN
    logits[3] = NAN  # a row dropped whole
    for renorm in (True, False):
        x = logits.clone().requires_grad_()
        ids, w, _ = torch.ops.moe_kernels_cuda.route_grouped_sigmoid_topk(x, None, 3, 3, 2, 1.3, renorm)
        g = torch.randn_like(w)
        (got,) = torch.autograd.grad((w * g).sum(), x)
        assert torch.isfinite(got).all() and got[1, 2] == 0 and torch.equal(got[3], torch.zeros(12))
        ok = [0, 1, 2, 4]
        xf = logits[ok].nan_to_num(-30.0).requires_grad_()  # s = sigmoid(-30): never chosen again
        ref = grouped_sigmoid_topk(xf, 3, None, 3, 2, 1.3, renorm)
        assert torch.equal(ref.slot_expert.view(4, 3), ids[ok])
        (want,) = torch.autograd.grad((ref.slot_weight.view(4, 3) * g[ok]).sum(), xf)
        want[1, 2] = 0.0
        torch.testing.assert_close(got[ok], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renorm", [True, False])
def test_softmax_route_op_gradient_matches_autograd(renorm):
    logits = torch.randn(11, 13, requires_grad=True)
    ids, w, _ = cb.route_softmax_topk(logits, 4, renorm)
    ref = softmax_topk(logits, 4, renorm)
    g = torch.randn_like(w)
    (got,) = torch.autograd.grad((w * g).sum(), logits)
    (want,) = torch.autograd.grad((ref.slot_weight.view(11, 4) * g).sum(), logits)
    assert torch.equal(ids.reshape(-1), ref.slot_expert)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("renorm", [True, False])
def test_grouped_route_op_gradient_matches_autograd(renorm):
    logits = torch.randn(7, 24, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    ids, w, _ = cb.route_grouped_sigmoid_topk(logits, bias, 5, 4, 3, 1.7, renorm)
    ref = grouped_sigmoid_topk(logits, 5, bias, 4, 3, 1.7, renorm)
    g = torch.randn_like(w)
    (got,) = torch.autograd.grad((w * g).sum(), logits)
    (want,) = torch.autograd.grad((ref.slot_weight.view(7, 5) * g).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert bias.grad is None  # the selection bias never gets a gradient


# --------------------------------------------------------------------------- plan


def routings():
    torch.manual_seed(1)
    yield "softmax-E-prime", softmax_topk(torch.randn(9, 7), 3)
    yield "T1", softmax_topk(torch.randn(1, 5), 2)
    yield "expert-choice", expert_choice(torch.randn(10, 6), 1.5)
    yield "switch-dropped", switch(torch.randn(12, 4), 0.5)
    ids = torch.tensor([[0, 2], [2, 0], [0, 2]])  # experts 1 and 3 get nothing
    yield "empty-experts", Routing.from_topk(ids, torch.rand(3, 2), 4)
    yield "all-to-one", Routing.from_topk(torch.full((6, 1), 2), torch.rand(6, 1), 5)
    yield "ep-sentinels", Routing.from_topk(torch.tensor([[0, -1], [7, 1], [1, 0]]), torch.rand(3, 2), 3)
    yield "E1024", softmax_topk(torch.randn(40, 1024), 8)


@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_plan_twin_matches_build_plan_torch(block_m):
    for name, r in routings():
        want = build_plan_torch(r, block_m)
        got = tw.build_plan(r.slot_expert, r.slot_token, r.num_tokens, r.num_experts, r.max_slots_per_token,
                            r.top_k or 0, block_m)
        for field, value in zip(PLAN_FIELDS, got):
            assert value.dtype == torch.int32, (name, field)
            assert torch.equal(value, getattr(want, field)), (name, field)
        DispatchPlan(num_tokens=r.num_tokens, num_experts=r.num_experts, block_m=block_m,
                     max_slots_per_token=r.max_slots_per_token, slot_token=r.slot_token, slot_expert=r.slot_expert,
                     slot_weight=r.slot_weight, top_k=r.top_k, **dict(zip(PLAN_FIELDS, got)))  # checks invariants


def test_plan_twin_against_a_loop_with_out_of_range_ids():
    # The kernel's rule: ids outside [0, E) are dropped like the sentinel E (edge: bad ids).
    se = torch.tensor([3, -1, 0, 9, 3, 1, 0, 3], dtype=torch.int32)
    st = torch.arange(8, dtype=torch.int32)
    e, bm = 4, 2
    counts, offsets, order, position, poffs, padded, blocks, table = tw.build_plan(se, st, 8, e, 1, 1, bm)
    bucket = [x if 0 <= x < e else e for x in se.tolist()]
    want_order = sorted(range(8), key=lambda s: (bucket[s], s))
    assert order.tolist() == want_order
    assert [want_order.index(s) for s in range(8)] == position.tolist()
    assert counts.tolist() == [2, 1, 0, 3]
    assert offsets.tolist() == [0, 2, 3, 3, 6]
    assert poffs.tolist() == [0, 2, 4, 4, 8]
    assert padded.tolist()[:8] == [2, 6, 5, -1, 0, 4, 7, -1] and set(padded.tolist()[8:]) <= {-1}
    assert blocks.tolist()[:4] == [0, 1, 3, 3] and set(blocks.tolist()[4:]) <= {-1}
    assert table.view(-1).tolist() == [0, -1, 2, -1, 4, 5, 6, 7]


# --------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_permute_twin_against_loop(dtype):
    x = torch.randn(5, 7).to(dtype)  # H = 7: not a multiple of 16 bytes (edge: odd H)
    slot_token = torch.tensor([4, 0, 0, 2, 3, 1], dtype=torch.int32)
    row_slot = torch.tensor([5, -1, 0, 2, -1, 1, 3], dtype=torch.int32)
    out = tw.permute_rows(x, slot_token, row_slot)
    for r, s in enumerate(row_slot.tolist()):
        want = torch.zeros(7, dtype=dtype) if s < 0 else x[slot_token[s]]
        assert torch.equal(out[r], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpermute_twin_is_the_fixed_order_fp32_sum(dtype):
    y = torch.randn(9, 5).to(dtype)
    w = torch.rand(6)
    slot_row = torch.tensor([8, 0, 3, 5, 1, 2], dtype=torch.int32)
    token_slots = torch.tensor([[0, 3, -1], [-1, -1, -1], [5, 1, 2], [4, -1, -1]], dtype=torch.int32)
    out = tw.unpermute_rows(y, slot_row, token_slots, w)
    for t, cells in enumerate(token_slots.tolist()):
        acc = torch.zeros(5, dtype=torch.float32)
        for s in cells:
            if s >= 0:
                acc = acc + w[s] * y[slot_row[s]].float()
        assert torch.equal(out[t], acc.to(dtype)), t
    assert torch.equal(out[1], torch.zeros(5, dtype=dtype))  # a token with no slots (edge: empty row)
    identity = tw.unpermute_rows(y[:6], None, token_slots, w)  # slot_row None: row = slot
    assert torch.equal(identity[3], (w[4] * y[4].float()).to(dtype))


def test_permute_and_unpermute_op_gradients():
    x = torch.randn(4, 6, requires_grad=True)
    slot_token = torch.tensor([0, 1, 1, 3, 2], dtype=torch.int32)
    sorted_slot = torch.tensor([3, 0, 4, 2, 1], dtype=torch.int32)
    position = torch.argsort(sorted_slot).int()
    token_slots = torch.tensor([[0, -1], [1, 2], [4, -1], [3, -1]], dtype=torch.int32)
    rows = cb.permute_rows(x, slot_token, sorted_slot, position, token_slots)
    g = torch.randn_like(rows)
    (got,) = torch.autograd.grad((rows * g).sum(), x)
    (want,) = torch.autograd.grad((tw.permute_rows(x, slot_token, sorted_slot) * g).sum(), x)
    torch.testing.assert_close(got, want)

    y = torch.randn(5, 6, requires_grad=True)
    w = torch.rand(5, requires_grad=True)
    out = cb.unpermute_rows(y, position, token_slots, w)
    go = torch.randn_like(out)
    got = torch.autograd.grad((out * go).sum(), [y, w])
    want = torch.autograd.grad((tw.unpermute_rows(y, position, token_slots, w) * go).sum(), [y, w])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_unpermute_backward_with_dropped_slot_and_identity_rows():
    # Slot 2 is listed nowhere (dropped): its row and weight get zero gradient (edge: dropped).
    y = torch.randn(4, 3, requires_grad=True)
    w = torch.rand(4, requires_grad=True)
    token_slots = torch.tensor([[1, 0], [3, -1]], dtype=torch.int32)
    out = cb.unpermute_rows(y, None, token_slots, w)
    go = torch.randn_like(out)
    dy, dw = torch.autograd.grad((out * go).sum(), [y, w])
    want = torch.autograd.grad((tw.unpermute_rows(y, None, token_slots, w) * go).sum(), [y, w])
    torch.testing.assert_close(dy, want[0])
    torch.testing.assert_close(dw, want[1])
    assert torch.equal(dy[2], torch.zeros(3)) and dw[2] == 0


def test_op_schemas_fakes_and_autograd_registration():
    x = torch.randn(4, 6)
    slot_token = torch.tensor([0, 1, 1, 3, 2], dtype=torch.int32)
    sorted_slot = torch.tensor([3, 0, 4, 2, 1], dtype=torch.int32)
    position = torch.argsort(sorted_slot).int()
    token_slots = torch.tensor([[0, -1], [1, 2], [4, -1], [3, -1]], dtype=torch.int32)
    r = softmax_topk(torch.randn(6, 5), 2)
    cases = [
        (torch.ops.moe_kernels_cuda.route_softmax_topk, (torch.randn(5, 9, requires_grad=True), 3, True)),
        (torch.ops.moe_kernels_cuda.route_grouped_sigmoid_topk,
         (torch.randn(5, 8, requires_grad=True), torch.randn(8), 2, 4, 2, 1.5, True)),
        (torch.ops.moe_kernels_cuda.build_plan, (r.slot_expert, r.slot_token, 6, 5, 2, 2, 4)),
        (torch.ops.moe_kernels_cuda.permute_rows, (x.requires_grad_(), slot_token, sorted_slot, position, token_slots)),
        (torch.ops.moe_kernels_cuda.unpermute_rows,
         (torch.randn(5, 6, requires_grad=True), position, token_slots, torch.rand(5, requires_grad=True))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------- the backend on the CPU


@pytest.mark.parametrize("router", ["softmax", "switch-dropped", "expert-choice"])
def test_experts_permuted_matches_reference_forward_and_backward(router):
    t, h, i, e = 9, 12, 10, 5  # odd sizes, E prime
    x = torch.randn(t, h, requires_grad=True)
    w13 = (torch.randn(e, 2 * i, h) * 0.3).requires_grad_()
    w2 = (torch.randn(e, h, i) * 0.3).requires_grad_()
    logits = torch.randn(t, e, requires_grad=True)
    routing = {"softmax": lambda: softmax_topk(logits, 2), "switch-dropped": lambda: switch(logits, 0.6),
               "expert-choice": lambda: expert_choice(logits, 1.5)}[router]()
    params = expert_params(w13, w2, activation="swiglu")
    out = cb.experts_permuted(x, build_plan_torch(routing, 4), params)
    ref = moe_reference(x, routing, params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x, logits, w13, w2], retain_graph=True)
    want = torch.autograd.grad((ref * g).sum(), [x, logits, w13, w2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_fused_takes_non_contiguous_logits_and_reports_the_loss(dtype):
    # The layer's logits may be a transposed view (edge: non-contiguous); the public op
    # wrapper rejects that, the backend's route must not. Loss: routing's, with its gradient.
    base = torch.randn(13, 9).to(dtype)  # [E, T]
    logits = base.t().requires_grad_() if dtype == torch.float32 else base.t()
    assert not logits.is_contiguous()
    with pytest.raises(ValueError, match="logits"):
        cb.route_softmax_topk(logits, 3, True)
    got = cb.route_fused(logits, fused_topk_args("softmax_topk", {"top_k": 3, "renormalize": False}))
    ref = softmax_topk(logits.contiguous(), 3, False)
    assert torch.equal(got.slot_expert, ref.slot_expert) and torch.equal(got.slot_token, ref.slot_token)
    torch.testing.assert_close(got.slot_weight, ref.slot_weight, rtol=1e-6, atol=1e-7)
    assert set(got.losses) == set(ref.losses) == {"load_balancing"}
    torch.testing.assert_close(got.losses["load_balancing"], ref.losses["load_balancing"], rtol=1e-6, atol=1e-7)
    if logits.requires_grad:
        (a,) = torch.autograd.grad(got.losses["load_balancing"] + got.slot_weight.sum(), logits)
        (b,) = torch.autograd.grad(ref.losses["load_balancing"] + ref.slot_weight.sum(), logits)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    bias = torch.randn(13)
    opts = {"top_k": 4, "bias": bias, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.0}
    got = cb.route_fused(logits, fused_topk_args("grouped_sigmoid_topk", opts))
    ref = grouped_sigmoid_topk(logits.contiguous(), 4, bias, 1, 1, 2.0)
    assert torch.equal(got.slot_expert, ref.slot_expert) and got.losses == ref.losses == {}
    # An option the fused kernels do not take: no fused arguments, and the backend's
    # route (the torch router) names it.
    assert fused_topk_args("softmax_topk", {"top_k": 2, "jitter": 0.1}) is None
    with pytest.raises(ValueError, match="jitter"):
        cb.CudaBackend().route(logits, "softmax_topk", {"top_k": 2, "jitter": 0.1})
    empty = cb.route_fused(torch.randn(0, 13), fused_topk_args("softmax_topk", {"top_k": 2}))  # edge: T = 0, as the torch router
    assert empty.num_slots == 0 and empty.losses == softmax_topk(torch.randn(0, 13), 2).losses == {}


def test_backend_on_cpu_is_unavailable_and_routes_with_torch():
    backend = cb.CudaBackend()
    reason = backend.unavailable(torch.device("cpu"))
    assert reason is not None and ("CUDA devices only" in reason or "not available" in reason)
    logits = torch.randn(5, 7)
    r = backend.route(logits, "softmax_topk", {"top_k": 2})
    assert torch.equal(r.slot_expert, softmax_topk(logits, 2).slot_expert)


def test_backend_reports_a_missing_extension(monkeypatch):
    monkeypatch.setattr(cops, "_C", None)
    monkeypatch.setattr(cops, "_C_ERROR", "ModuleNotFoundError: No module named 'moe_kernels._C'")
    reason = cb.CudaBackend().unavailable(torch.device("cuda"))
    assert "moe_kernels._C" in reason and "nvcc" in reason
    assert cb.extension_info()["built"] is False
    with pytest.raises(RuntimeError, match="route_softmax_topk.*not available"):
        cops._ext("route_softmax_topk")


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_errors_naming_the_argument():
    logits = torch.randn(4, 8)
    i32 = torch.zeros(4, dtype=torch.int32)
    cases = [
        (lambda: cb.route_softmax_topk(logits.double(), 2, True), "logits"),
        (lambda: cb.route_softmax_topk(torch.randn(4, 513), 2, True), "logits"),
        (lambda: cb.route_softmax_topk(logits, 33, True), "top_k"),
        (lambda: cb.route_softmax_topk(logits, 0, True), "top_k"),
        (lambda: cb.route_softmax_topk(logits.t(), 2, True), "logits"),
        (lambda: cb.route_softmax_topk(logits, 2, 1), "renormalize"),
        (lambda: cb.route_grouped_sigmoid_topk(logits, None, 2, 3, 1, 1.0, True), "n_group"),
        (lambda: cb.route_grouped_sigmoid_topk(logits, None, 5, 4, 2, 1.0, True), "top_k"),
        (lambda: cb.route_grouped_sigmoid_topk(logits, torch.randn(7), 2, 1, 1, 1.0, True), "bias"),
        (lambda: cb.route_grouped_sigmoid_topk(logits, None, 2, 1, 1, 0.0, True), "routed_scaling_factor"),
        (lambda: cb.build_plan(i32.long(), i32, 4, 3, 1, 1, 4), "slot_expert"),
        (lambda: cb.build_plan(i32, i32[:3], 4, 3, 1, 1, 4), "slot_token"),
        (lambda: cb.build_plan(i32, i32, 4, 5000, 1, 1, 4), "num_experts"),
        (lambda: cb.build_plan(i32, i32, 3, 3, 1, 1, 4), "top_k"),
        (lambda: cb.build_plan(i32, i32, 4, 3, 1, 1, 0), "block_m"),
        (lambda: cb.permute_rows(torch.randn(4, 6).double(), i32, i32), "x"),
        (lambda: cb.permute_rows(torch.randn(6, 4).t(), i32, i32), "x"),
        (lambda: cb.permute_rows(torch.randn(4, 6), i32.long(), i32), "slot_token"),
        (lambda: cb.permute_rows(torch.randn(4, 6), i32, i32.view(2, 2)), "row_slot"),
        (lambda: cb.permute_rows(torch.randn(4, 6), i32, i32, i32[:2]), "slot_row"),
        (lambda: cb.unpermute_rows(torch.randn(4, 6), None, i32, torch.rand(4)), "token_slots"),
        (lambda: cb.unpermute_rows(torch.randn(4, 6), i32[:3], i32.view(4, 1), torch.rand(4)), "slot_row"),
        (lambda: cb.unpermute_rows(torch.randn(4, 6), None, i32.view(4, 1), torch.rand(4, 1)), "slot_weight"),
        (lambda: cb.unpermute_rows(torch.randn(2, 6), None, i32.view(4, 1), torch.rand(4)), "y"),
        # device mismatches, with meta tensors standing in for a second device
        (lambda: cb.permute_rows(torch.randn(4, 6), i32.to("meta"), i32), "slot_token"),
        (lambda: cb.unpermute_rows(torch.randn(4, 6), None, i32.view(4, 1), torch.rand(4, device="meta")),
         "slot_weight"),
        (lambda: cb.build_plan(i32, i32.to("meta"), 4, 3, 1, 1, 4), "slot_token"),
        (lambda: cb.route_grouped_sigmoid_topk(logits, torch.randn(8, device="meta"), 2, 1, 1, 1.0, True), "bias"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
