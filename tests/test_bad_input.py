"""Every bad input is a ValueError that names the argument (issue item 7).

``pytest.raises(ValueError, match=...)`` checks the argument's name is in the message;
device mismatches are emulated with the "meta" device.
"""

import re

import pytest
import torch

from moe_kernels import MoE, MoEConfig, Routing, expert_params, fused_experts, get_backend, moe, route, z_loss
from moe_kernels import routing as R
from moe_kernels.activations import Activation
from moe_kernels.plan import build_plan_torch

T, E, H, I = 5, 4, 8, 6


def weights(**kw):
    d = dict(dtype=torch.float32)
    d.update(kw)
    return dict(w13=torch.randn(E, 2 * I, H, **d), w2=torch.randn(E, H, I, **d),
                b13=torch.randn(E, 2 * I, **d), b2=torch.randn(E, H, **d))


def good_routing(t=T):
    return R.softmax_topk(torch.randn(t, E), top_k=2)


def call(x=None, routing=None, **over):
    """fused_experts with good defaults, some replaced."""
    w = weights()
    w.update({k: v for k, v in over.items() if k in w})
    opts = {k: v for k, v in over.items() if k not in w}
    opts.setdefault("backend", "torch")
    x = torch.randn(T, H) if x is None else x
    return fused_experts(x, routing or good_routing(), w["w13"], w["w2"], w["b13"], w["b2"], **opts)


def call_moe(x=None, logits=None, **over):
    w = weights()
    w.update({k: v for k, v in over.items() if k in w})
    opts = {k: v for k, v in over.items() if k not in w}
    if opts.get("router", "softmax_topk") == "softmax_topk":
        opts.setdefault("top_k", 2)
    x = torch.randn(T, H) if x is None else x
    logits = torch.randn(T, E) if logits is None else logits
    opts.setdefault("backend", "torch")
    return moe(x, logits, w["w13"], w["w2"], w["b13"], w["b2"], **opts)


def test_good_calls_pass():  # the baseline every case below perturbs
    assert call().shape == (T, H)
    assert call_moe().shape == (T, H)


# --------------------------------------------------------------------------- ranks and shapes

SHAPES = {
    "x 1-D": (dict(x=torch.randn(H)), "x"),
    "x 3-D": (dict(x=torch.randn(1, T, H)), "x"),
    "x wrong hidden": (dict(x=torch.randn(T, H + 1)), "x"),
    "w13 2-D": (dict(w13=torch.randn(2 * I, H)), "w13"),
    "w13 4-D": (dict(w13=torch.randn(1, E, 2 * I, H)), "w13"),
    "w13 wrong rows (I not 2I)": (dict(w13=torch.randn(E, I, H)), "w13"),
    "w2 2-D": (dict(w2=torch.randn(H, I)), "w2"),
    "w2 wrong hidden": (dict(w2=torch.randn(E, H + 1, I)), "w2"),
    "w2 wrong experts": (dict(w2=torch.randn(E + 1, H, I)), "w2"),
    "b13 1-D": (dict(b13=torch.randn(2 * I)), "b13"),
    "b13 wrong width": (dict(b13=torch.randn(E, I)), "b13"),
    "b13 not a tensor": (dict(b13=[0.0] * 2 * I), "b13"),
    "b2 wrong shape": (dict(b2=torch.randn(E, H - 1)), "b2"),
    "b2 3-D": (dict(b2=torch.randn(E, H, 1)), "b2"),
    "routing of other T": (dict(routing=good_routing(T + 1)), "routing"),
    "routing of other E": (dict(routing=R.softmax_topk(torch.randn(T, E + 1), top_k=2)), "routing"),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_shapes(case):
    over, name = SHAPES[case]
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}"):
        call(**over)


@pytest.mark.parametrize("logits,name", [
    (torch.randn(T), "router_logits"),            # 1-D
    (torch.randn(T, E + 1), "router_logits"),     # wrong number of experts
    (torch.randn(T + 1, E), "router_logits"),     # wrong number of tokens
    (torch.randint(0, 3, (T, E)), "router_logits"),  # integer logits
])
def test_logits_shapes(logits, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        call_moe(logits=logits)


@pytest.mark.parametrize("router", ["softmax_topk", "switch", "expert_choice", "dense"])
def test_route_logits_rank_and_dtype(router):
    opts = dict(top_k=1) if router == "softmax_topk" else {}
    with pytest.raises(ValueError, match="^logits"):
        route(torch.randn(T), router, **opts)
    with pytest.raises(ValueError, match="^logits"):
        route(torch.zeros(T, E, dtype=torch.int64), router, **opts)


# --------------------------------------------------------------------------- dtype and device


@pytest.mark.parametrize("over,name", [
    (dict(x=torch.randn(T, H, dtype=torch.float64)), "w13"),   # x fp64, weights fp32
    (dict(w2=torch.randn(E, H, I, dtype=torch.float16)), "w2"),
    (dict(b13=torch.randn(E, 2 * I, dtype=torch.bfloat16)), "b13"),
    (dict(b2=torch.randn(E, H, dtype=torch.float64)), "b2"),
    (dict(x=torch.randint(0, 3, (T, H))), "x"),                  # integer activations
])
def test_dtype_mismatch(over, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected dtype"):
        call(**over)


def test_integer_weights():
    w = weights()
    with pytest.raises(ValueError, match="^w13: expected dtype"):
        fused_experts(torch.randn(T, H), good_routing(), w["w13"].long(), w["w2"].long(), backend="torch")


@pytest.mark.parametrize("over,name", [
    (dict(x=torch.randn(T, H, device="meta")), "w13"),   # x on another device than the weights
    (dict(w2=torch.randn(E, H, I, device="meta")), "w2"),
    (dict(b13=torch.randn(E, 2 * I, device="meta")), "b13"),
    (dict(b2=torch.randn(E, H, device="meta")), "b2"),
])
def test_device_mismatch(over, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected device"):
        call(**over)


def test_device_mismatch_routing_and_logits():
    meta = torch.zeros(T * 2, dtype=torch.int32, device="meta")
    r = Routing(meta, meta, torch.zeros(T * 2, device="meta"), T, E, 2, top_k=2)
    with pytest.raises(ValueError, match="^routing.slot_token: expected device"):
        call(routing=r)
    w = {k: v.to("meta") for k, v in weights().items()}
    with pytest.raises(ValueError, match="^router_logits: expected device"):
        moe(torch.randn(T, H, device="meta"), torch.randn(T, E), w["w13"], w["w2"], top_k=2, backend="torch")
    with pytest.raises(ValueError, match="^slot_expert: expected device"):
        Routing(torch.zeros(2, dtype=torch.int32), meta[:2], torch.zeros(2), 1, E, 2, top_k=2)


# --------------------------------------------------------------------------- router options


@pytest.mark.parametrize("router", ["softmax_topk", "grouped_sigmoid_topk", "noisy_topk"])
@pytest.mark.parametrize("k", [0, -1, E + 1, 2.0, True])
def test_top_k_out_of_range(router, k):
    with pytest.raises(ValueError, match="^top_k"):
        route(torch.randn(T, E), router, top_k=k)


@pytest.mark.parametrize("k", [0, E + 1])
def test_top_k_config_and_moe(k):
    with pytest.raises(ValueError, match="^top_k"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=k)
    with pytest.raises(ValueError, match="^top_k"):
        call_moe(top_k=k)


@pytest.mark.parametrize("router", ["switch", "expert_choice"])
@pytest.mark.parametrize("cf", [0, 0.0, -1.0, float("nan"), float("inf"), "1.0"])
def test_capacity_factor(router, cf):
    with pytest.raises(ValueError, match="^capacity_factor"):
        route(torch.randn(T, E), router, capacity_factor=cf)
    with pytest.raises(ValueError, match="^capacity_factor"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, router=router, capacity_factor=cf)
    with pytest.raises(ValueError, match="^capacity_factor"):
        call_moe(router=router, capacity_factor=cf)


def test_grouped_sigmoid_options():
    x = torch.randn(T, 6)
    with pytest.raises(ValueError, match="^n_group"):
        route(x, "grouped_sigmoid_topk", top_k=2, n_group=4)  # 6 % 4
    with pytest.raises(ValueError, match="^topk_group"):
        route(x, "grouped_sigmoid_topk", top_k=2, n_group=3, topk_group=4)
    with pytest.raises(ValueError, match="^top_k"):
        route(x, "grouped_sigmoid_topk", top_k=3, n_group=3, topk_group=1)  # only 2 experts left
    with pytest.raises(ValueError, match="^bias"):
        route(x, "grouped_sigmoid_topk", top_k=2, bias=torch.zeros(5))
    with pytest.raises(ValueError, match="^bias"):
        route(x, "grouped_sigmoid_topk", top_k=2, bias=torch.full((6,), float("nan")))
    with pytest.raises(ValueError, match="^bias: expected device"):
        route(x, "grouped_sigmoid_topk", top_k=2, bias=torch.zeros(6, device="meta"))
    with pytest.raises(ValueError, match="^routed_scaling_factor"):
        route(x, "grouped_sigmoid_topk", top_k=2, routed_scaling_factor=0.0)
    with pytest.raises(ValueError, match="^n_group"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=6, router="grouped_sigmoid_topk", n_group=4)


def test_noisy_options():
    x = torch.randn(T, E)
    with pytest.raises(ValueError, match="^noise_logits"):
        route(x, "noisy_topk", top_k=2, noise_logits=torch.randn(T, E + 1))
    with pytest.raises(ValueError, match="^noise_logits"):
        route(x, "noisy_topk", top_k=2, noise_logits=torch.full((T, E), float("inf")))
    with pytest.raises(ValueError, match="^noise"):
        route(x, "noisy_topk", top_k=2, noise_logits=torch.randn(T, E), noise=torch.randn(T))


def test_route_options_named():
    with pytest.raises(ValueError, match="^top_k: not an option of router 'switch'"):
        route(torch.randn(T, E), "switch", top_k=2)
    with pytest.raises(ValueError, match="^top_k: required by router 'softmax_topk'"):
        route(torch.randn(T, E), "softmax_topk")
    with pytest.raises(ValueError, match="^capacity_factor: not an option"):
        call_moe(router="dense", capacity_factor=1.0)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("router", ["softmax_topk", "grouped_sigmoid_topk", "noisy_topk", "switch", "expert_choice",
                                    "dense"])
def test_non_finite_logits(router, bad):
    logits = torch.randn(T, E)
    logits[2, 1] = bad
    opts = dict(top_k=2) if "topk" in router else {}
    with pytest.raises(ValueError, match="logits: expected finite"):
        route(logits, router, **opts)
    with pytest.raises(ValueError, match="logits: expected finite"):
        call_moe(logits=logits, router=router, **opts)


def test_non_finite_z_loss():
    with pytest.raises(ValueError, match="^logits: expected finite"):
        z_loss(torch.tensor([[0.0, float("nan")]]))


def test_routing_ids_out_of_range():
    tok = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    exp = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    w = torch.rand(4)
    Routing(tok, exp, w, 2, 3, 2, top_k=2)  # fine: with E = 3, id 3 is the dropped sentinel
    with pytest.raises(ValueError, match=r"^slot_expert: expected values in \[0, 2\]"):
        Routing(tok, exp, w, 2, 2, 2, top_k=2)  # E = 2: id 3 is past the sentinel
    bad = torch.tensor([0, 5, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="^slot_expert: expected values"):
        Routing(tok, bad, w, 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^slot_expert: expected values"):
        Routing(tok, torch.tensor([0, -1, 2, 3], dtype=torch.int32), w, 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^slot_token: expected values"):
        Routing(torch.tensor([0, 0, 1, 2], dtype=torch.int32), exp, w, 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^slot_token: expected values"):
        Routing(torch.tensor([0, -3, 1, 1], dtype=torch.int32), exp, w, 2, 4, 2, top_k=2)


def test_routing_structure():
    tok = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    exp = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    w = torch.rand(4)
    with pytest.raises(ValueError, match="^slot_token: expected dtype"):
        Routing(tok.long(), exp, w, 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^slot_expert: expected dtype"):
        Routing(tok, exp.float(), w, 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^slot_weight: expected dtype"):
        Routing(tok, exp, exp, 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^slot_expert: expected 4 slots"):
        Routing(tok, exp[:3], w, 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^slot_weight: expected 4 slots"):
        Routing(tok, exp, w[:3], 2, 4, 2, top_k=2)
    with pytest.raises(ValueError, match="^top_k: token-major layout"):
        Routing(tok, exp, w, 2, 4, 2, top_k=1)
    with pytest.raises(ValueError, match="^max_slots_per_token"):
        Routing(tok, exp, w, 2, 4, 1, top_k=2)
    with pytest.raises(ValueError, match="^max_slots_per_token"):  # token 0 has 2 valid slots, room for 1
        Routing(tok, exp, w, 2, 4, 1, top_k=None)
    with pytest.raises(ValueError, match="^num_experts"):
        Routing(tok, exp, w, 2, 0, 2, top_k=2)
    with pytest.raises(ValueError, match="^topk_ids: expected dtype"):
        Routing.from_topk(torch.zeros(2, 2), torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="^topk_weights: expected dtype"):
        Routing.from_topk(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="^topk_weights: expected shape"):
        Routing.from_topk(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 3), 4)


# --------------------------------------------------------------------------- contiguity


@pytest.mark.parametrize("over,name", [
    (dict(x=torch.randn(H, T).t()), "x"),
    (dict(w13=torch.randn(E, H, 2 * I).transpose(1, 2)), "w13"),  # transposed storage without transposed=True
    (dict(w2=torch.randn(E, 2 * H, I)[:, ::2]), "w2"),
    (dict(b13=torch.randn(2 * I, E).t()), "b13"),
    (dict(b2=torch.randn(E, 2 * H)[:, ::2]), "b2"),
])
def test_non_contiguous(over, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected a contiguous tensor"):
        call(**over)


def test_non_contiguous_logits():
    with pytest.raises(ValueError, match="^router_logits: expected a contiguous"):
        call_moe(logits=torch.randn(E, T).t())
    with pytest.raises(ValueError, match="^logits: expected a contiguous"):
        route(torch.randn(E, T).t(), "dense")


# --------------------------------------------------------------------------- names


def test_unknown_router():
    with pytest.raises(ValueError, match="^router: expected one of"):
        route(torch.randn(T, E), "top2")
    with pytest.raises(ValueError, match="^router"):
        call_moe(router="top2")
    with pytest.raises(ValueError, match="^router"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, router="top2")


def test_unknown_activation():
    with pytest.raises(ValueError, match="^activation: expected one of"):
        call(activation="swish")
    with pytest.raises(ValueError, match="^activation"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, activation="swish")
    with pytest.raises(ValueError, match="^limit"):
        Activation("swiglu_oai", limit=0.0)
    with pytest.raises(ValueError, match="^interleaved"):
        w = weights()
        expert_params(w["w13"][:, :I].contiguous(), w["w2"], activation="gelu", interleaved=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match="^backend: expected one of"):
        call(backend="cutlass")
    with pytest.raises(ValueError, match="^backend"):
        get_backend("cutlass", "cpu")
    with pytest.raises(ValueError, match="^backend"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, backend="cutlass")


def test_unavailable_backend_says_why_and_how():
    with pytest.raises(RuntimeError) as info:
        get_backend("cuda", "cpu")
    msg = str(info.value)
    assert "backend='cuda' is not available on device cpu" in msg
    tail = msg.split(":", 1)[1]
    assert re.search(r"install|nvcc|GPU|CUDA", tail), msg  # how to get it
    with pytest.raises(RuntimeError, match="cuda"):
        call(backend="cuda")


def test_layer_bad_input():
    layer = MoE(hidden_size=H, intermediate_size=I, num_experts=E, top_k=2, backend="torch")
    with pytest.raises(ValueError, match="^x: expected last dimension"):
        layer(torch.randn(2, 3, H + 1))
    with pytest.raises(ValueError, match="^w13: expected dtype"):
        layer(torch.randn(2, 3, H, dtype=torch.float64))
    for field, value in [("hidden_size", 0), ("intermediate_size", -1), ("num_experts", 0), ("jitter_eps", 1.5)]:
        kw = dict(hidden_size=H, intermediate_size=I, num_experts=E)
        kw[field] = value
        with pytest.raises(ValueError, match=f"^{field}"):
            MoEConfig(**kw)


def test_block_m():
    with pytest.raises(ValueError, match="^block_m"):
        build_plan_torch(good_routing(), 0)
