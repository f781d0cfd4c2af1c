"""The fast torch backend against the loop reference, in value and gradient.

Gradients are taken with ``torch.autograd.grad`` for x, the stored (possibly transposed)
weights, both biases and the router logits (through the slot weights), on fresh random
inputs, for every router and every activation.
"""

import math

import pytest
import torch

from moe_kernels import Activation, expert_params, fused_experts, moe, moe_reference, route
from moe_kernels.activations import apply_activation
from moe_kernels.primitives import combine_slots
from moe_kernels.backends.torch.experts import experts_torch
from moe_kernels.plan import build_plan_torch
from moe_kernels.routing import Routing
from moe_kernels.testing import TOLERANCES, assert_close

ACTS = ["swiglu", "geglu", "geglu_tanh", "swiglu_oai", "gelu", "gelu_tanh", "relu", "silu"]
ROUTERS = ["softmax_topk", "softmax_topk_norenorm", "grouped_sigmoid_topk", "noisy_topk", "switch", "expert_choice",
           "dense"]


def router_options(name: str, t: int, e: int, dtype, k: int = 2) -> tuple[str, dict]:
    k = min(k, e)
    if name == "softmax_topk":
        return name, dict(top_k=k)
    if name == "softmax_topk_norenorm":
        return "softmax_topk", dict(top_k=k, renormalize=False)
    if name == "grouped_sigmoid_topk":
        groups = 3 if e % 3 == 0 and e >= 6 else 1
        return name, dict(top_k=k, bias=torch.randn(e, dtype=dtype), n_group=groups, topk_group=min(2, groups),
                          routed_scaling_factor=2.5)
    if name == "noisy_topk":  # training noise, drawn here so both paths see one routing
        return name, dict(top_k=k, noise_logits=torch.randn(t, e, dtype=dtype, requires_grad=True),
                          noise=torch.randn(t, e, dtype=dtype), training=True)
    if name == "switch":
        return name, dict(capacity_factor=1.0)  # with T > E some tokens drop
    if name == "expert_choice":
        return name, dict(capacity_factor=1.5)
    return name, {}


class Case:
    """Leaf tensors of one MoE call, the routing built from them, and the params."""

    def __init__(self, router="softmax_topk", t=9, e=6, h=12, i=10, act="swiglu", dtype=torch.float32,
                 bias=False, transposed=False, interleaved=False, k=2, logits=None, options=None):
        act = act if isinstance(act, Activation) else Activation(act)
        n = act.width_factor
        self.x = torch.randn(t, h, dtype=dtype, requires_grad=True)
        shape13, shape2 = ((e, h, n * i), (e, i, h)) if transposed else ((e, n * i, h), (e, h, i))
        self.w13 = (torch.randn(shape13, dtype=dtype) * h ** -0.5).requires_grad_()
        self.w2 = (torch.randn(shape2, dtype=dtype) * i ** -0.5).requires_grad_()
        self.b13 = (torch.randn(e, n * i, dtype=dtype) * 0.1).requires_grad_() if bias else None
        self.b2 = (torch.randn(e, h, dtype=dtype) * 0.1).requires_grad_() if bias else None
        self.params = expert_params(self.w13, self.w2, self.b13, self.b2, activation=act, transposed=transposed,
                                    interleaved=interleaved)
        logits = torch.randn(t, e, dtype=dtype) if logits is None else logits.to(dtype)
        self.logits = logits.requires_grad_()
        name, opts = router_options(router, t, e, dtype, k)
        if options is not None:
            opts = options
        self.routing = route(self.logits, name, **opts)
        self.extra = [v for v in opts.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def named_inputs(self):
        pairs = [("x", self.x), ("w13", self.w13), ("w2", self.w2), ("b13", self.b13), ("b2", self.b2),
                 ("logits", self.logits)] + [("noise_logits", v) for v in self.extra]
        return [(n, v) for n, v in pairs if v is not None]

    def inputs(self):
        return [v for _, v in self.named_inputs()]


def grads(out, inputs, g):
    got = torch.autograd.grad(out, inputs, g, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(v) if d is None else d for v, d in zip(inputs, got)]


def check_against_reference(case: Case, dtype=None):
    dtype = dtype or case.x.dtype
    out = fused_experts(case.x, case.routing, case.params, backend="torch")
    ref = moe_reference(case.x, case.routing, case.params)
    assert out.dtype == case.x.dtype and out.shape == case.x.shape
    assert_close(out, ref, dtype)
    g = torch.randn_like(ref)
    names = [n for n, _ in case.named_inputs()]
    for name, a, b in zip(names, grads(out, case.inputs(), g), grads(ref, case.inputs(), g)):
        scale = max(1.0, b.abs().max().item())
        assert_close(a, b, dtype, scale=scale, name=f"grad {name}")
    return out, ref


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_every_activation_fp32(router, act):
    check_against_reference(Case(router, act=act, bias=ACTS.index(act) % 2 == 1))


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_every_router_fp64(router, act):
    check_against_reference(Case(router, act=act, dtype=torch.float64, bias=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed,interleaved", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("act", ["swiglu", Activation("swiglu_oai", alpha=1.702, limit=0.4)])  # clamps active
def test_layouts(transposed, interleaved, bias, dtype, act):
    check_against_reference(Case("softmax_topk", act=act, dtype=dtype, bias=bias, transposed=transposed,
                                 interleaved=interleaved))


@pytest.mark.parametrize("transposed", [False, True])
def test_plain_activation_transposed(transposed):  # plain MLP: W13 has I rows, not 2I
    check_against_reference(Case("expert_choice", act="relu", bias=True, transposed=transposed))


def test_layouts_agree():
    """One set of weights stored four ways gives one output."""
    e, h, i = 4, 8, 5
    w13 = torch.randn(e, 2 * i, h)
    w2 = torch.randn(e, h, i)
    x = torch.randn(6, h)
    r = route(torch.randn(6, e), "softmax_topk", top_k=2)
    gate, up = w13[:, :i], w13[:, i:]
    inter = torch.stack([gate, up], dim=2).reshape(e, 2 * i, h)  # gate 0, up 0, gate 1, ...
    base = fused_experts(x, r, w13, w2, backend="torch")
    torch.testing.assert_close(fused_experts(x, r, inter, w2, interleaved=True, backend="torch"), base)
    torch.testing.assert_close(fused_experts(x, r, w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(),
                                             transposed=True, backend="torch"), base)
    torch.testing.assert_close(fused_experts(x, r, inter.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(),
                                             transposed=True, interleaved=True, backend="torch"), base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    c = Case("softmax_topk", dtype=dtype, bias=True)
    out = fused_experts(c.x, c.routing, c.params, backend="torch")
    assert out.dtype == dtype
    assert_close(out, moe_reference(c.x, c.routing, c.params), dtype)


# --------------------------------------------------------------------------- odd shapes


@pytest.mark.parametrize("router", ROUTERS)
def test_single_token(router):  # T = 1
    check_against_reference(Case(router, t=1, e=5, h=7, i=3, bias=True))


@pytest.mark.parametrize("router", ["softmax_topk", "expert_choice", "switch"])
def test_sizes_not_multiples_of_16_prime_experts(router):  # H=13, I=7, E=13 (prime), k=3
    check_against_reference(Case(router, t=17, e=13, h=13, i=7, k=3, bias=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_equals_e(dtype):  # every token to every expert, by top-k
    c = Case("softmax_topk", t=6, e=5, k=5, dtype=dtype)
    assert c.routing.slot_expert.view(6, 5).sort(-1).values.tolist() == [list(range(5))] * 6
    check_against_reference(c)


def test_one_expert():  # E = 1
    for router in ["softmax_topk", "switch", "expert_choice", "dense", "grouped_sigmoid_topk"]:
        check_against_reference(Case(router, t=5, e=1, k=1))


@pytest.mark.parametrize("router", ["softmax_topk", "grouped_sigmoid_topk", "switch", "noisy_topk"])
def test_expert_with_no_tokens(router):
    logits = torch.randn(11, 6)
    logits[:, 3] = -30.0  # expert 3 never chosen
    c = Case(router, t=11, e=6, logits=logits, bias=True)
    if router == "grouped_sigmoid_topk":
        c = Case(router, t=11, e=6, logits=logits, bias=True,
                 options=dict(top_k=2, bias=torch.zeros(6)))  # no selection bias that could pull it back
    plan = build_plan_torch(c.routing, 4)
    assert plan.expert_counts[3].item() == 0
    check_against_reference(c)


@pytest.mark.parametrize("router", ["softmax_topk", "switch_nocap", "grouped_sigmoid_topk"])
def test_every_token_to_one_expert(router):
    logits = torch.randn(10, 5)
    logits[:, 2] += 30.0
    if router == "switch_nocap":
        c = Case("switch", t=10, e=5, logits=logits, options=dict(capacity_factor=None))
    else:  # top-1, and no selection bias that could pull the choice away
        c = Case(router, t=10, e=5, logits=logits, options=dict(top_k=1))
    assert (c.routing.slot_expert == 2).all()
    check_against_reference(c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_empty_input(dtype):  # T = 0
    c = Case("softmax_topk", t=0, e=4, h=8, i=6, dtype=dtype)
    out = fused_experts(c.x, c.routing, c.params, backend="torch")
    assert out.shape == (0, 8) and out.dtype == dtype
    out2 = moe(c.x, c.logits, c.w13, c.w2, top_k=2, backend="torch")
    assert out2.shape == (0, 8) and out2.dtype == dtype
    for router, opts in [("expert_choice", {}), ("switch", {}), ("dense", {})]:
        out3 = moe(c.x, c.logits, c.w13, c.w2, router=router, backend="torch", **opts)
        assert out3.shape == (0, 8) and out3.dtype == dtype


def test_all_slots_dropped_stay_connected():
    # S > 0 but every slot dropped (expert-parallel sentinels): output exactly zero, and
    # every gradient exists and is zero, even with inf in x (0 * inf would be NaN).
    x = torch.randn(3, 8)
    x[0, 0] = float("inf")
    x.requires_grad_()
    c = Case("softmax_topk", t=3, e=4, h=8, i=6, bias=True)
    w = torch.rand(3, 2, requires_grad=True)
    r = Routing.from_topk(torch.full((3, 2), 7), w, 4)
    out = fused_experts(x, r, c.params, backend="torch")
    assert torch.equal(out, torch.zeros(3, 8))
    inputs = [x, c.w13, c.w2, c.b13, c.b2, w]
    for d in torch.autograd.grad(out, inputs, torch.randn(3, 8)):
        assert torch.equal(d, torch.zeros_like(d))


def test_no_slots_with_tokens():  # T > 0, S = 0 (a hand-made routing)
    c = Case("softmax_topk", t=3, e=4, h=8, i=6)
    empty = torch.zeros(0, dtype=torch.int32)
    w = torch.zeros(0, requires_grad=True)
    r = Routing(empty, empty, w, 3, 4, 1)
    out = fused_experts(c.x, r, c.params, backend="torch")
    assert torch.equal(out, torch.zeros(3, 8))
    for d in torch.autograd.grad(out, [c.x, c.w13, c.w2, w], torch.randn(3, 8)):
        assert torch.equal(d, torch.zeros_like(d))


# --------------------------------------------------------------------------- functional and determinism


@pytest.mark.parametrize("router", ["softmax_topk", "expert_choice", "switch", "dense"])
def test_moe_functional_matches_reference(router):
    name, opts = router_options(router, 9, 6, torch.float32)
    x, logits = torch.randn(9, 12), torch.randn(9, 6)
    c = Case(router, t=9, e=6, bias=True)
    out, r = moe(x, logits, c.w13, c.w2, c.b13, c.b2, router=name, backend="torch", return_routing=True, **opts)
    assert_close(out, moe_reference(x, route(logits, name, **opts), c.params))
    assert r.num_tokens == 9 and r.num_experts == 6


@pytest.mark.parametrize("router", ["softmax_topk", "expert_choice", "dense"])
def test_deterministic(router):
    c = Case(router, t=33, e=6, h=16, i=8, bias=True)
    runs = []
    for _ in range(2):
        out = fused_experts(c.x, c.routing, c.params, backend="torch")
        g = torch.ones_like(out)
        runs.append([out, *torch.autograd.grad(out, c.inputs(), g, retain_graph=True)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_combine_slots_chunked_matches_naive():
    # expert choice's token table is [T, E] with few live cells: combined a few columns at a time
    gen = torch.Generator().manual_seed(3)
    t, k, s, h = 7, 9, 12, 5
    y = torch.randn(s, h, dtype=torch.float64, generator=gen)
    table = torch.full((t, k), -1, dtype=torch.int32)
    owner = torch.randint(0, t, (s,), generator=gen)
    for slot in range(s):
        row = int(owner[slot])
        col = int((table[row] >= 0).sum())
        table[row, col] = slot
    expected = torch.zeros(t, h, dtype=torch.float64).index_add_(0, owner, y)
    torch.testing.assert_close(combine_slots(y, table), expected)
    assert combine_slots(y[:0], torch.zeros(0, 3, dtype=torch.int32)).shape == (0, h)


def test_experts_torch_on_plan_with_every_block_m():
    c = Case("expert_choice", t=20, e=7, bias=True)
    ref = moe_reference(c.x, c.routing, c.params)
    for bm in (1, 16, 64):
        assert_close(experts_torch(c.x, build_plan_torch(c.routing, bm), c.params), ref)


def test_tolerances_are_tight_enough_to_fail():
    # the comparison helper must catch a one-ulp-of-the-problem error
    c = Case("softmax_topk", dtype=torch.float64)
    out = fused_experts(c.x, c.routing, c.params, backend="torch")
    bad = out.detach().clone()
    bad[3, 4] += 10 * TOLERANCES[torch.float64][0] + 1e-9
    with pytest.raises(AssertionError):
        assert_close(bad, moe_reference(c.x, c.routing, c.params).detach())


# --------------------------------------------------------------------------- the ground truth itself
# The reference and the torch backend share apply_activation, so a wrong activation would
# pass every comparison above: check both against formulas written out here.


def py_act(name, g, u=None, alpha=1.702, limit=7.0):
    gelu = 0.5 * g * (1 + math.erf(g / math.sqrt(2)))
    gelu_tanh = 0.5 * g * (1 + math.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    silu = g / (1 + math.exp(-g))
    if name == "swiglu_oai":
        gc, uc = min(g, limit), max(-limit, min(u, limit))
        return (uc + 1) * gc / (1 + math.exp(-alpha * gc))
    base = {"swiglu": silu, "silu": silu, "geglu": gelu, "gelu": gelu, "geglu_tanh": gelu_tanh,
            "gelu_tanh": gelu_tanh, "relu": max(g, 0.0)}[name]
    return base * u if u is not None else base


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_activation_formulas(act, interleaved):
    a = Activation(act, alpha=1.5, limit=1.25) if act == "swiglu_oai" else Activation(act)
    if interleaved and not a.gated:
        return
    vals = [-2.5, -1.0, -0.3, 0.0, 0.4, 1.1, 2.0, 3.0]
    g_vals, u_vals = vals, [0.7, -1.6, 2.2, 1.0, -0.5, 1.4, -0.2, 0.9]
    if a.gated:
        h13 = torch.tensor([[*g_vals, *u_vals]], dtype=torch.float64) if not interleaved else \
            torch.tensor([[v for pair in zip(g_vals, u_vals) for v in pair]], dtype=torch.float64)
        expected = [py_act(act, g, u, alpha=1.5, limit=1.25) for g, u in zip(g_vals, u_vals)]
    else:
        h13 = torch.tensor([g_vals], dtype=torch.float64)
        expected = [py_act(act, g) for g in g_vals]
    got = apply_activation(h13, a, interleaved)
    assert got.flatten().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_reference_hand_written_per_token():
    """moe_reference against out[t] = sum_s w_s * (act(x_t W13[e]^T + b13[e]) W2[e]^T + b2[e])
    computed token by token, slot by slot (a different loop order from the reference)."""
    c = Case("expert_choice", t=6, e=3, h=5, i=4, dtype=torch.float64, bias=True)
    p, r = c.params, c.routing
    expected = torch.zeros(6, 5, dtype=torch.float64)
    for s in range(r.num_slots):
        tok, ex, w = int(r.slot_token[s]), int(r.slot_expert[s]), float(r.slot_weight[s].detach())
        h13 = p.w13[ex] @ c.x[tok] + p.b13[ex]
        gate, up = h13[:4], h13[4:]
        hidden = torch.nn.functional.silu(gate) * up
        expected[tok] += w * (p.w2[ex] @ hidden + p.b2[ex])
    torch.testing.assert_close(moe_reference(c.x, r, p), expected.detach())
