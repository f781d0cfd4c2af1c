"""The MoE nn.Module: every router config builds, runs forward and backward on
[B, L, H], matches the loop reference, and its aux losses behave."""

import pytest
import torch

from moe_kernels import MoE, MoEConfig, expert_params, moe_reference, route, z_loss
from moe_kernels.testing import assert_close

B, L, H, I, E = 2, 5, 12, 10, 6

CONFIGS = {
    "softmax_topk": dict(router="softmax_topk", top_k=2),
    "softmax_topk_plain_bias": dict(router="softmax_topk", top_k=3, renormalize=False, activation="gelu", bias=True),
    "grouped_sigmoid_topk": dict(router="grouped_sigmoid_topk", top_k=2, n_group=3, topk_group=2,
                                 routed_scaling_factor=2.5),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
    "switch": dict(router="switch", capacity_factor=1.0, jitter_eps=0.1),
    "switch_nocap": dict(router="switch", capacity_factor=None),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.25),
    "dense": dict(router="dense", activation="swiglu_oai", bias=True),
}
WITH_BALANCE_LOSS = ("softmax_topk", "softmax_topk_plain_bias", "noisy_topk", "switch", "switch_nocap")


def make(case, **over):
    cfg = dict(hidden_size=H, intermediate_size=I, num_experts=E, backend="torch")
    cfg.update(CONFIGS[case])
    cfg.update(over)
    layer = MoE(**cfg).double()
    if layer.b13 is not None:
        with torch.no_grad():  # nonzero biases so they matter
            layer.b13.normal_(std=0.1)
            layer.b2.normal_(std=0.1)
    return layer


def reference_of(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's output rebuilt from its parameters with the loop reference (eval mode)."""
    c = layer.config
    x2d = x.reshape(-1, H)
    logits = x2d @ layer.router_weight.t()
    opts = layer.router_options()
    if c.router == "noisy_topk":
        opts = dict(top_k=c.top_k, training=False)
    r = route(logits, c.router, **opts)
    params = expert_params(layer.w13, layer.w2, layer.b13, layer.b2, activation=layer.activation)
    return moe_reference(x2d, r, params).reshape(x.shape)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_layer_forward_backward(case):
    layer = make(case)
    x = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    layer.eval()
    assert_close(layer(x), reference_of(layer, x))
    layer.train()
    y = layer(x)
    assert y.shape == (B, L, H) and y.dtype == torch.float64
    assert layer.aux_loss is not None and layer.aux_loss.dim() == 0
    loss = (y * torch.randn_like(y)).sum() + layer.aux_loss
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for n, g in zip(names, grads):
        if n == "noise_weight":
            continue  # reaches the output only through the training noise's scale
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


@pytest.mark.parametrize("case", WITH_BALANCE_LOSS)
def test_aux_loss_reaches_router_weight(case):
    layer = make(case).train()
    x = torch.randn(B, L, H, dtype=torch.float64)
    layer(x)
    assert set(layer.losses) >= ({"importance", "load"} if case == "noisy_topk" else {"load_balancing"})
    (g,) = torch.autograd.grad(layer.aux_loss, layer.router_weight)
    assert g.abs().sum() > 0
    balance = sum(v for k, v in layer.losses.items() if k in ("load_balancing", "importance", "load"))
    assert layer.aux_loss.item() == pytest.approx(layer.config.aux_loss_coef * balance.item(), rel=1e-12)


@pytest.mark.parametrize("case", ["softmax_topk", "expert_choice", "dense"])
def test_z_loss_coef_adds_the_z_loss(case):
    torch.manual_seed(1)
    base = make(case, z_loss_coef=0.0).eval()
    torch.manual_seed(1)
    withz = make(case, z_loss_coef=0.3).eval()
    x = torch.randn(B, L, H, dtype=torch.float64)
    base(x)
    withz(x)
    assert "z_loss" not in base.losses
    logits = x.reshape(-1, H) @ withz.router_weight.t()
    lse = torch.logsumexp(logits.detach(), dim=-1)
    hand = (lse * lse).mean().item()
    assert withz.losses["z_loss"].item() == pytest.approx(hand, rel=1e-12)
    assert z_loss(logits).item() == pytest.approx(hand, rel=1e-12)
    assert withz.aux_loss.item() == pytest.approx(base.aux_loss.item() + 0.3 * hand, rel=1e-12)
    (g,) = torch.autograd.grad(withz.aux_loss, withz.router_weight)
    assert g.abs().sum() > 0


def test_noisy_topk_train_vs_eval():
    layer = make("noisy_topk")
    x = torch.randn(B, L, H, dtype=torch.float64)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)  # no noise in eval
    assert_close(a, reference_of(layer, x))
    layer.train()
    c, d = layer(x), layer(x)
    assert not torch.equal(c, d) and not torch.equal(c, a)  # fresh noise each training call


def test_switch_jitter_only_in_training():
    layer = make("switch", jitter_eps=0.2, capacity_factor=None)
    x2d = torch.randn(B * L, H, dtype=torch.float64)
    layer.eval()
    r1, r2 = layer.route(x2d), layer.route(x2d)
    assert torch.equal(r1.slot_weight, r2.slot_weight)
    clean = route(x2d @ layer.router_weight.t(), "switch", capacity_factor=None)
    assert torch.equal(r1.slot_weight, clean.slot_weight)
    layer.train()
    r3 = layer.route(x2d)
    assert not torch.equal(r3.slot_weight, clean.slot_weight)
    # jitter multiplies the router input by U(1 - eps, 1 + eps): weights move, but not far
    assert (r3.slot_weight - clean.slot_weight).abs().max() < 0.5
    no_jitter = make("switch", jitter_eps=0.0, capacity_factor=None).train()
    no_jitter.load_state_dict(layer.state_dict())
    assert torch.equal(no_jitter.route(x2d).slot_weight, clean.slot_weight)


def test_switch_layer_drops_give_zero_output():
    layer = make("switch", jitter_eps=0.0, capacity_factor=0.5).eval()
    x = torch.randn(1, 24, H, dtype=torch.float64)
    y = layer(x)
    r = layer.route(x.reshape(-1, H))
    dropped = (r.slot_expert == E).reshape(1, 24)
    assert dropped.any()
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))
    assert layer.losses["dropped_fraction"].item() == pytest.approx(dropped.double().mean().item())


def test_grouped_sigmoid_selection_bias_is_a_buffer():
    layer = make("grouped_sigmoid_topk")
    assert "selection_bias" in dict(layer.named_buffers())
    assert "selection_bias" not in dict(layer.named_parameters())
    x = torch.randn(B, L, H, dtype=torch.float64)
    layer.eval()
    before = layer.route(x.reshape(-1, H))
    with torch.no_grad():
        layer.selection_bias[before.slot_expert[0]] -= 100.0  # steer away from token 0's first expert
    after = layer.route(x.reshape(-1, H))
    assert after.slot_expert[0] != before.slot_expert[0]


def test_layer_empty_and_dtypes():
    layer = MoE(hidden_size=H, intermediate_size=I, num_experts=E, top_k=2, backend="torch")
    y = layer(torch.randn(0, 3, H))  # T = 0
    assert y.shape == (0, 3, H) and y.dtype == torch.float32
    layer32 = MoE(MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, router="expert_choice"))
    y = layer32(torch.randn(4, H))  # [T, H] input works too
    assert y.shape == (4, H)
    assert "router='expert_choice'" in repr(layer32)


def test_config_and_kwargs_are_exclusive():
    with pytest.raises(ValueError, match="config"):
        MoE(MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E), top_k=3)


# --- autocast (mixed precision with float32 master weights) -----------------------------


@pytest.mark.parametrize("router", ["softmax_topk", "switch"])
def test_layer_under_autocast_casts_weights_and_trains_fp32_masters(router):
    # Edge: bf16 activations from autocast meet float32 parameters; the layer must cast
    # like nn.Linear does, return bf16, and give float32 gradients to the masters.
    torch.manual_seed(3)
    topk = {"top_k": 2} if router == "softmax_topk" else {}  # Switch routes to 1 expert: top_k is not its option
    layer = MoE(hidden_size=24, intermediate_size=40, num_experts=5, router=router, backend="torch", **topk)
    x = torch.randn(2, 7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # The same computation done by hand in bf16 (the reference loop on cast weights).
    from moe_kernels import expert_params, moe_reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.route(x.reshape(-1, 24).to(torch.bfloat16))
    p = expert_params(layer.w13.detach().bfloat16(), layer.w2.detach().bfloat16(), activation="swiglu")
    want = moe_reference(x.reshape(-1, 24).bfloat16(), routing, p).reshape(x.shape)
    torch.testing.assert_close(y.float(), want.float(), atol=5e-2, rtol=5e-2)
    y.float().square().sum().backward()
    assert layer.w13.grad is not None and layer.w13.grad.dtype == torch.float32
    assert bool(layer.w13.grad.abs().sum() > 0)


def test_layer_empty_batch_keeps_autograd_connected():
    # Edge: T = 0: the output is empty but backward through it must still work.
    layer = MoE(hidden_size=8, intermediate_size=6, num_experts=3, top_k=1, backend="torch")
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    (y.sum() + layer.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == (0, 8)
