"""Routers against hand-derived expectations on tiny inputs, plus their invariants.

Expected numbers come from plain Python (``math.exp``, ``math.erf``, lists), never from
the torch code path under test.
"""

import math
import statistics

import pytest
import torch

from moe_kernels import routing as R
from moe_kernels.routing import Routing
from moe_kernels.testing import random_params


def py_softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def py_sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def py_softplus(v):
    return math.log1p(math.exp(v))


def py_phi(v):
    return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))


def py_cv2(xs):
    return statistics.variance(xs) / (statistics.fmean(xs) ** 2 + 1e-10)


def py_topk(row, k):
    """Indices of the k largest, ties to the lowest index."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


def approx(values, rel=1e-6, abs=1e-7):
    if isinstance(values, list) and values and isinstance(values[0], list):
        values = sum(values, [])  # compare nested lists flat (pytest.approx is flat only)
    return pytest.approx(values, rel=rel, abs=abs)


# --------------------------------------------------------------------------- softmax top-k

# 3 tokens, 4 experts: a plain case, a three-way tie (lowest index wins), a pair tie.
SOFTMAX_LOGITS = [[1.0, 2.0, 0.5, -1.0],
                  [0.0, 0.0, 3.0, 0.0],
                  [-2.0, 1.5, 1.5, 0.25]]
SOFTMAX_IDS = [[1, 0], [2, 0], [1, 2]]  # written out by hand


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_softmax_topk_hand(dtype):
    r = R.softmax_topk(torch.tensor(SOFTMAX_LOGITS, dtype=dtype), top_k=2)
    assert r.slot_expert.tolist() == sum(SOFTMAX_IDS, [])
    assert r.slot_token.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.top_k == 2 and r.max_slots_per_token == 2 and r.num_slots == 6
    expected = []
    for row, ids in zip(SOFTMAX_LOGITS, SOFTMAX_IDS):
        den = sum(math.exp(row[i]) for i in ids)
        expected += [math.exp(row[i]) / den for i in ids]
    # routing math is fp32 even for bf16 logits (the logits themselves are exact in bf16 here)
    assert r.slot_weight.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert r.slot_weight.tolist() == approx(expected)
    # load balancing: E * sum_i f_i P_i, f_i = assignments to i / (T*k), P_i = mean prob
    probs = [py_softmax(row) for row in SOFTMAX_LOGITS]
    counts = [sum(ids.count(e) for ids in SOFTMAX_IDS) for e in range(4)]
    lb = 4 * sum(counts[e] / 6 * statistics.fmean(p[e] for p in probs) for e in range(4))
    assert r.losses["load_balancing"].item() == approx(lb)


def test_softmax_topk_no_renormalize_hand():
    r = R.softmax_topk(torch.tensor(SOFTMAX_LOGITS), top_k=2, renormalize=False)
    expected = [py_softmax(row)[i] for row, ids in zip(SOFTMAX_LOGITS, SOFTMAX_IDS) for i in ids]
    assert r.slot_weight.tolist() == approx(expected)


@pytest.mark.parametrize("t,e,k", [(1, 1, 1), (9, 13, 3), (17, 8, 8)])  # E=1; prime E; k = E
def test_softmax_topk_invariants(t, e, k):
    logits = torch.randn(t, e) * 3
    r = R.softmax_topk(logits, top_k=k)
    w = r.slot_weight.view(t, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(t))
    assert (w[:, :-1] >= w[:, 1:]).all()  # sorted, largest first
    ids = r.slot_expert.view(t, k)
    for row in range(t):
        assert ids[row].tolist() == py_topk(logits[row].tolist(), k)
    assert len(set(ids[0].tolist())) == k  # no expert twice


def test_tied_router_scores_pick_lowest_index():
    # A zero-initialised router: every score ties; every router must pick the lowest index.
    logits = torch.zeros(5, 6)
    assert R.softmax_topk(logits, top_k=3).slot_expert.view(5, 3).tolist() == [[0, 1, 2]] * 5
    assert R.grouped_sigmoid_topk(logits, top_k=2, n_group=3, topk_group=2).slot_expert.view(5, 2).tolist() == [[0, 1]] * 5
    assert R.noisy_topk(logits, top_k=2, training=False).slot_expert.view(5, 2).tolist() == [[0, 1]] * 5
    assert R.switch(logits, capacity_factor=None).slot_expert.tolist() == [0] * 5
    ec = R.expert_choice(torch.zeros(6, 3), capacity_factor=1.0)  # C = 2
    assert ec.slot_token.tolist() == [0, 1] * 3


# --------------------------------------------------------------------------- grouped sigmoid


def test_grouped_sigmoid_bias_changes_choice_not_weights():
    logits = [0.0, 1.0, 2.0, -1.0]
    x = torch.tensor([logits])
    plain = R.grouped_sigmoid_topk(x, top_k=2)
    assert plain.slot_expert.tolist() == [2, 1]
    biased = R.grouped_sigmoid_topk(x, top_k=2, bias=torch.tensor([5.0, 0.0, 0.0, 0.0]), routed_scaling_factor=2.5)
    assert biased.slot_expert.tolist() == [0, 2]  # the bias pulls expert 0 in
    s0, s2 = py_sigmoid(0.0), py_sigmoid(2.0)  # 0.5, 0.8808: weights from sigmoid, never from s + bias
    assert biased.slot_weight.tolist() == approx([2.5 * s0 / (s0 + s2), 2.5 * s2 / (s0 + s2)])
    unnorm = R.grouped_sigmoid_topk(x, top_k=2, bias=torch.tensor([5.0, 0.0, 0.0, 0.0]), renormalize=False,
                                    routed_scaling_factor=2.5)
    assert unnorm.slot_weight.tolist() == approx([2.5 * s0, 2.5 * s2])


def test_grouped_sigmoid_groups_hand():
    # 6 experts in 3 groups of 2. Expert 0 has the best single score, but group 1
    # (experts 2, 3) has the best top-2 sum: 0.881 + 0.881 > 0.982 + 0.018, so with one
    # group kept the choice is {2, 3}; without groups it would be {0, 2}.
    logits = torch.tensor([[4.0, -4.0, 2.0, 2.0, 0.0, 0.0]])
    g = R.grouped_sigmoid_topk(logits, top_k=2, n_group=3, topk_group=1)
    assert g.slot_expert.tolist() == [2, 3]
    assert g.slot_weight.tolist() == approx([0.5, 0.5])
    flat = R.grouped_sigmoid_topk(logits, top_k=2)
    assert flat.slot_expert.tolist() == [0, 2]
    s0, s2 = py_sigmoid(4.0), py_sigmoid(2.0)
    assert flat.slot_weight.tolist() == approx([s0 / (s0 + s2), s2 / (s0 + s2)])


def py_grouped(row, bias, k, n_group, topk_group, rsf):
    """DeepSeek-V3 selection written with Python lists."""
    e = len(row)
    per = e // n_group
    s = [py_sigmoid(v) for v in row]
    c = [s[i] + bias[i] for i in range(e)]
    gscore = [sum(sorted(c[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
    keep = py_topk(gscore, topk_group)
    masked = [c[i] if i // per in keep else -math.inf for i in range(e)]
    ids = py_topk(masked, k)
    den = sum(s[i] for i in ids)
    return ids, [rsf * s[i] / den for i in ids], keep


@pytest.mark.parametrize("e,n_group,topk_group,k", [(8, 4, 2, 3), (12, 3, 1, 4), (16, 8, 3, 6), (5, 1, 1, 5)])
def test_grouped_sigmoid_invariants(e, n_group, topk_group, k):
    t = 11
    logits = torch.randn(t, e, dtype=torch.float64) * 2
    bias = torch.randn(e, dtype=torch.float64)
    r = R.grouped_sigmoid_topk(logits, top_k=k, bias=bias, n_group=n_group, topk_group=topk_group,
                               routed_scaling_factor=1.7)
    ids = r.slot_expert.view(t, k)
    w = r.slot_weight.view(t, k)
    per = e // n_group
    for row in range(t):
        exp_ids, exp_w, keep = py_grouped(logits[row].tolist(), bias.tolist(), k, n_group, topk_group, 1.7)
        assert ids[row].tolist() == exp_ids
        assert w[row].tolist() == approx(exp_w, rel=1e-12, abs=1e-12)
        assert all(int(i) // per in keep for i in ids[row])  # masked groups never chosen
    # the bias never changes the weights: they are the scaled, renormalised sigmoids
    s = torch.sigmoid(logits).gather(1, ids.long())
    torch.testing.assert_close(w, 1.7 * s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(w.sum(-1), torch.full((t,), 1.7, dtype=torch.float64))


# --------------------------------------------------------------------------- noisy top-k

NOISY_CLEAN = [[0.5, -0.3, 1.2, 0.1], [2.0, 0.4, -1.0, 0.3], [0.0, 0.9, 0.2, 1.1]]
NOISY_RAW = [[0.1, -0.5, 0.3, 0.0], [-1.0, 0.2, 0.0, 0.6], [0.4, 0.4, -0.2, 0.1]]
NOISE = [[1.0, 2.5, -1.5, 0.3], [0.2, -0.4, 1.7, 0.0], [-2.0, 0.5, 1.0, -0.1]]


def py_noisy(k, eps=1e-2):
    t, e = len(NOISY_CLEAN), len(NOISY_CLEAN[0])
    std = [[py_softplus(v) + eps for v in row] for row in NOISY_RAW]
    h = [[NOISY_CLEAN[i][j] + NOISE[i][j] * std[i][j] for j in range(e)] for i in range(t)]
    ids, weights, gates, load = [], [], [[0.0] * e for _ in range(t)], [[0.0] * e for _ in range(t)]
    for i in range(t):
        top = py_topk(h[i], k)
        den = sum(math.exp(h[i][j]) for j in top)
        ids.append(top)
        weights.append([math.exp(h[i][j]) / den for j in top])
        for j, w in zip(top, weights[-1]):
            gates[i][j] = w
        ranked = sorted(h[i], reverse=True)
        for j in range(e):
            # k-th largest noisy logit among the *other* experts
            theta = ranked[k] if j in top else ranked[k - 1]
            load[i][j] = py_phi((NOISY_CLEAN[i][j] - theta) / std[i][j])
    importance = py_cv2([sum(g[j] for g in gates) for j in range(e)])
    load_loss = py_cv2([sum(p[j] for p in load) for j in range(e)])
    return ids, weights, importance, load_loss


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_topk_hand(k):
    r = R.noisy_topk(torch.tensor(NOISY_CLEAN, dtype=torch.float64), top_k=k,
                     noise_logits=torch.tensor(NOISY_RAW, dtype=torch.float64),
                     noise=torch.tensor(NOISE, dtype=torch.float64), training=True)
    ids, weights, importance, load = py_noisy(k)
    assert r.slot_expert.view(3, k).tolist() == ids
    assert r.slot_weight.tolist() == approx(weights, rel=1e-12, abs=1e-12)
    assert r.losses["importance"].item() == approx(importance, rel=1e-10)
    assert r.losses["load"].item() == approx(load, rel=1e-10)


def test_noisy_topk_eval_has_no_noise():
    clean = torch.tensor(NOISY_CLEAN)
    kw = dict(top_k=2, noise_logits=torch.tensor(NOISY_RAW), noise=torch.tensor(NOISE))
    r_eval = R.noisy_topk(clean, training=False, **kw)
    r_clean = R.softmax_topk(clean, top_k=2)  # noiseless noisy top-k == renormalised softmax top-k
    assert r_eval.slot_expert.tolist() == r_clean.slot_expert.tolist()
    torch.testing.assert_close(r_eval.slot_weight, r_clean.slot_weight)
    # without noise the load loss is the cv^2 of the token counts per expert
    counts = [sum(e in row for row in [[2, 0], [0, 1], [3, 1]]) for e in range(4)]
    assert r_eval.slot_expert.view(3, 2).tolist() == [[2, 0], [0, 1], [3, 1]]
    assert r_eval.losses["load"].item() == approx(py_cv2(counts), rel=1e-6)
    # the same call in training mode with the given noise differs
    r_train = R.noisy_topk(clean, training=True, **kw)
    assert r_train.slot_expert.tolist() != r_eval.slot_expert.tolist()


def test_noisy_topk_draws_fresh_noise_in_training():
    clean, raw = torch.randn(64, 8), torch.randn(64, 8)
    a = R.noisy_topk(clean, top_k=2, noise_logits=raw)
    b = R.noisy_topk(clean, top_k=2, noise_logits=raw)
    assert not torch.equal(a.slot_weight, b.slot_weight)


# --------------------------------------------------------------------------- Switch

SWITCH_LOGITS = [[2.0, 0.0], [1.0, -1.0], [0.0, 3.0], [0.5, 0.0], [4.0, 1.0]]  # argmax 0, 0, 1, 0, 0


def test_switch_hand():
    r = R.switch(torch.tensor(SWITCH_LOGITS), capacity_factor=1.0)
    # capacity = ceil(1.0 * 5 / 2) = 3: expert 0 keeps tokens 0, 1, 3; token 4 is dropped
    assert R.switch_capacity(5, 2, 1.0) == 3
    assert r.slot_token.tolist() == [0, 1, 2, 3, 4]
    assert r.slot_expert.tolist() == [0, 0, 1, 0, 2]  # 2 = E, the dropped sentinel
    probs = [py_softmax(row) for row in SWITCH_LOGITS]
    expected_w = [max(p) for p in probs[:4]] + [0.0]
    assert r.slot_weight.tolist() == approx(expected_w)
    # f counts argmax before dropping: 4/5 and 1/5
    lb = 2 * (4 / 5 * statistics.fmean(p[0] for p in probs) + 1 / 5 * statistics.fmean(p[1] for p in probs))
    assert r.losses["load_balancing"].item() == approx(lb)
    assert r.losses["dropped_fraction"].item() == approx(1 / 5)
    assert r.top_k == 1 and r.max_slots_per_token == 1
    # capacity_factor=None drops nothing; cf=0.5 gives capacity ceil(1.25) = 2
    assert R.switch(torch.tensor(SWITCH_LOGITS), capacity_factor=None).slot_expert.tolist() == [0, 0, 1, 0, 0]
    assert R.switch(torch.tensor(SWITCH_LOGITS), capacity_factor=0.5).slot_expert.tolist() == [0, 0, 1, 2, 2]


def test_switch_load_balancing_is_one_when_uniform():
    # every expert argmax for the same number of tokens: E * sum_i (1/E) P_i = sum_i P_i = 1
    e, m = 4, 3
    logits = torch.randn(e * m, e)
    logits[torch.arange(e * m), torch.arange(e * m) % e] += 10
    assert R.switch(logits).losses["load_balancing"].item() == approx(1.0, rel=1e-6)
    # uniform probabilities: any f gives 1 as well
    assert R.switch(torch.zeros(7, 5)).losses["load_balancing"].item() == approx(1.0, rel=1e-6)


@pytest.mark.parametrize("cf", [0.3, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("t,e", [(1, 1), (37, 5), (64, 13)])
def test_switch_capacity_invariants(cf, t, e):
    logits = torch.randn(t, e)
    logits[:, 0] += 1.0  # skew toward expert 0 so something overflows
    r = R.switch(logits, capacity_factor=cf)
    cap = math.ceil(cf * t / e)
    assert R.switch_capacity(t, e, cf) == cap
    argmax = logits.argmax(-1).tolist()
    kept = [0] * e
    for tok in range(t):
        a = argmax[tok]
        if kept[a] < cap:  # the first `cap` tokens in token order stay
            kept[a] += 1
            assert r.slot_expert[tok].item() == a
            assert r.slot_weight[tok].item() == approx(max(py_softmax(logits[tok].tolist())))
        else:
            assert r.slot_expert[tok].item() == e and r.slot_weight[tok].item() == 0.0
    counts = torch.bincount(r.slot_expert.long(), minlength=e + 1)[:e]
    assert (counts <= cap).all()


def test_switch_dropped_tokens_give_zero_output():
    from moe_kernels import fused_experts, moe_reference

    t, e, h = 12, 3, 8
    logits = torch.randn(t, e)
    logits[:, 1] += 3  # most tokens to expert 1, capacity ceil(12/3) = 4
    r = R.switch(logits, capacity_factor=1.0)
    dropped = r.slot_expert == e
    assert dropped.sum() >= 4
    params = random_params(e, h, 6, bias=True)  # biases would make a wrongly computed dropped row nonzero
    x = torch.randn(t, h)
    out = fused_experts(x, r, params, backend="torch")
    assert torch.equal(out[dropped], torch.zeros(int(dropped.sum()), h))
    assert (out[~dropped].abs().sum(-1) > 0).all()
    torch.testing.assert_close(out, moe_reference(x, r, params))


# --------------------------------------------------------------------------- Expert Choice


def test_expert_choice_hand():
    # 4 tokens, 2 experts, cf = 1: C = ceil(4/2) = 2.
    logits = [[2.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [3.0, 0.0]]
    r = R.expert_choice(torch.tensor(logits), capacity_factor=1.0)
    p = [py_softmax(row) for row in logits]
    # expert 0's column: .881, .5, .119, .953 -> tokens 3, 0; expert 1's: .119, .5, .881, .047 -> 2, 1
    assert r.slot_expert.tolist() == [0, 0, 1, 1]
    assert r.slot_token.tolist() == [3, 0, 2, 1]
    assert r.slot_weight.tolist() == approx([p[3][0], p[0][0], p[2][1], p[1][1]])
    assert r.top_k is None and r.max_slots_per_token == 2 and r.losses == {}


def test_expert_choice_tokens_get_zero_to_e_experts_and_ties():
    # 4 tokens, 2 experts, C = ceil(4/2) = 2. p: t0 (.5, .5), t1 (.881, .119), t2 (.119, .881),
    # t3 (.5, .5). Expert 0 takes t1, then t0 over t3 (a tie: lowest index); expert 1 takes
    # t2, then t0. So t0 gets E = 2 experts and t3 gets none.
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    r = R.expert_choice(logits, capacity_factor=1.0)
    assert r.slot_token.tolist() == [1, 0, 2, 0]
    assert torch.bincount(r.slot_token.long(), minlength=4).tolist() == [2, 1, 1, 0]
    r2 = R.expert_choice(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), capacity_factor=1.0)  # C = 2
    assert r2.slot_token.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("t,e,cf", [(1, 1, 1.0), (10, 4, 1.0), (10, 4, 2.5), (7, 13, 1.0), (3, 2, 10.0), (50, 8, 0.1)])
def test_expert_choice_capacity_invariants(t, e, cf):
    r = R.expert_choice(torch.randn(t, e), capacity_factor=cf)
    c = min(t, math.ceil(cf * t / e))
    assert R.expert_choice_capacity(t, e, cf) == c
    assert r.num_slots == e * c
    assert torch.equal(torch.bincount(r.slot_expert.long(), minlength=e), torch.full((e,), c))  # exactly C each
    assert r.slot_expert.tolist() == [x for x in range(e) for _ in range(c)]  # expert-major
    for x in range(e):  # no token twice in one expert
        assert len(set(r.slot_token[x * c:(x + 1) * c].tolist())) == c
    per_token = torch.bincount(r.slot_token.long(), minlength=t)
    assert int(per_token.max()) <= e


# --------------------------------------------------------------------------- dense, z-loss, from_topk


def test_dense_hand():
    logits = [[0.0, 1.0, -1.0], [2.0, 2.0, 0.5]]
    r = R.dense_softmax(torch.tensor(logits))
    assert r.num_slots == 6 and r.top_k == 3 and r.max_slots_per_token == 3
    assert r.slot_token.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.slot_expert.tolist() == [0, 1, 2, 0, 1, 2]
    assert r.slot_weight.tolist() == approx(py_softmax(logits[0]) + py_softmax(logits[1]))


def test_z_loss_hand():
    logits = [[0.0, 1.0, -1.0], [2.0, 2.0, 0.5], [10.0, -3.0, 4.0]]
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    expected = statistics.fmean(v * v for v in lse)
    assert R.z_loss(torch.tensor(logits)).item() == approx(expected)
    assert R.z_loss(torch.tensor(logits, dtype=torch.float64)).item() == approx(expected, rel=1e-14)
    assert R.z_loss(torch.zeros(0, 3)).item() == 0.0


def test_from_topk_expert_parallel_sentinels():
    ids = torch.tensor([[0, 5], [-1, 2], [3, 4]])  # E = 4: 5, -1 and 4 are other ranks' experts
    w = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    r = Routing.from_topk(ids, w, num_experts=4)
    assert r.slot_expert.tolist() == [0, 4, 4, 2, 3, 4]
    assert r.slot_weight.tolist() == approx([0.6, 0.0, 0.0, 0.7, 0.5, 0.0])
    assert r.slot_token.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.slot_expert.dtype == torch.int32 and r.top_k == 2
    # dropped slots contribute nothing to the output
    from moe_kernels import fused_experts, moe_reference

    params = random_params(4, 8, 6, bias=True)
    x = torch.randn(3, 8)
    out = fused_experts(x, r, params, backend="torch")
    keep = Routing.from_topk(torch.tensor([[0], [2], [3]]), torch.tensor([[0.6], [0.7], [0.5]]), 4)
    torch.testing.assert_close(out, moe_reference(x, keep, params))


# --------------------------------------------------------------------------- all routers

ROUTER_CASES = {
    "softmax_topk": dict(top_k=2),
    "softmax_topk_norenorm": dict(top_k=3, renormalize=False),
    "grouped_sigmoid_topk": dict(top_k=3, n_group=2, topk_group=1, routed_scaling_factor=2.0),
    "noisy_topk": dict(top_k=2, training=False),
    "switch": dict(capacity_factor=1.0),
    "expert_choice": dict(capacity_factor=1.5),
    "dense": {},
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_every_router_empty_input(case):  # T = 0
    name = case.replace("_norenorm", "")
    r = R.route(torch.zeros(0, 6), name, **ROUTER_CASES[case])
    assert r.num_slots == 0 and r.num_tokens == 0 and r.num_experts == 6
    for v in r.losses.values():
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_every_router_gradient_reaches_logits(case):
    name = case.replace("_norenorm", "")
    logits = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    r = R.route(logits, name, **ROUTER_CASES[case])
    (g,) = torch.autograd.grad((r.slot_weight * torch.randn_like(r.slot_weight)).sum(), logits)
    assert g.abs().sum() > 0
    assert r.slot_expert.dtype == torch.int32 and r.slot_token.dtype == torch.int32


def test_one_slot_per_row_routings_are_well_formed():
    # k = 1 (or C = 1) slices one column out of a [T, E] sort: the slots must still be
    # contiguous 1-D tensors, and the weights the right column
    logits = torch.randn(7, 5)
    r = R.softmax_topk(logits, top_k=1, renormalize=False)
    assert r.slot_weight.tolist() == approx([max(py_softmax(row)) for row in logits.tolist()])
    R.grouped_sigmoid_topk(logits, top_k=1, renormalize=False)
    R.noisy_topk(logits, top_k=1, training=False)
    ec = R.expert_choice(logits, capacity_factor=0.5)  # C = ceil(0.5 * 7 / 5) = 1
    assert ec.num_slots == 5
    probs = [py_softmax(row) for row in logits.tolist()]
    for e in range(5):
        best = max(range(7), key=lambda t: (probs[t][e], -t))
        assert ec.slot_token[e].item() == best
        assert ec.slot_weight[e].item() == approx(probs[best][e])
