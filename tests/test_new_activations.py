"""The activations and the post-expert norm added for transformers' remaining families:
``swiglu_clamp`` (DeepSeek-V4), ``swiglu_softcap`` (Inkling2), ``relu2`` (Nemotron-H),
:class:`PostNorm` (MuseSpark). Formulas against scalar math; the torch and Triton
backends against the reference, forward and gradients, at odd shapes."""

from __future__ import annotations

import math

import pytest
import torch

from triton_interp import DEVICE
from test_triton_gemm import assert_close, make_routing

import moe_kernels as mk
from moe_kernels.activations import Activation, PostNorm, apply_activation, apply_post_norm
from moe_kernels.reference import moe_reference


def _silu(v):
    return v / (1 + math.exp(-v))


def test_formulas():
    g = [-12.0, -2.5, -0.3, 0.0, 0.4, 3.0, 11.0, 30.0]
    u = [0.7, -14.0, 2.2, 1.0, -0.5, 12.0, -0.2, 9.0]
    h13 = torch.tensor([g + u], dtype=torch.float64)
    a = Activation.clamped(10.0)
    want = [_silu(min(x, 10.0)) * max(-10.0, min(y, 10.0)) for x, y in zip(g, u)]
    assert apply_activation(h13, a).flatten().tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    a = Activation.softcapped(4.0, 25.0)
    want = [4 * math.tanh(x / 4) / (1 + math.exp(-x)) * 25 * math.tanh(y / 25) for x, y in zip(g, u)]
    assert apply_activation(h13, a).flatten().tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    want = [max(x, 0.0) ** 2 for x in g]
    assert apply_activation(torch.tensor([g], dtype=torch.float64), Activation("relu2")).flatten().tolist() == \
        pytest.approx(want, rel=1e-12)


def test_post_norm_formulas():
    y = torch.randn(3, 10, dtype=torch.float64)
    w = torch.linspace(-0.5, 0.5, 10, dtype=torch.float64)
    z = y * (1 + w)
    want = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(apply_post_norm(y, PostNorm(w, 1e-6)), want, rtol=1e-6)
    want = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.allclose(apply_post_norm(y, PostNorm(w, 1e-6, "rms")), want, rtol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="limit"):
        Activation("swiglu_clamp", limit=0.0)
    with pytest.raises(ValueError, match="alpha"):
        Activation("swiglu_softcap", alpha=-1.0, limit=3.0)
    with pytest.raises(ValueError, match="kind"):
        PostNorm(torch.ones(4), 1e-6, "layer")
    with pytest.raises(ValueError, match="eps"):
        PostNorm(torch.ones(4), 0.0)
    w13, w2 = torch.randn(3, 16, 12), torch.randn(3, 12, 8)
    with pytest.raises(ValueError, match="post_norm"):
        mk.expert_params(w13, w2, post_norm=PostNorm(torch.ones(5), 1e-6))


ACTS = [Activation.clamped(0.8), Activation.softcapped(1.5, 2.0), Activation("relu2")]


def _setup(act, t=13, h=40, i=24, e=5, norm=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = act.width_factor
    w13 = (torch.randn(e, n * i, h, generator=g) / h ** 0.5).to(DEVICE)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(DEVICE)
    x = (torch.randn(t, h, generator=g) * 2).to(DEVICE)
    pn = PostNorm(torch.linspace(-0.4, 0.4, h).to(DEVICE), 1e-6) if norm else None
    routing, logits = make_routing("empty_expert", t, e, seed=seed)  # prime E, an expert with no token
    return x, routing, w13, w2, pn


def _grads(backend, act, x, routing, w13, w2, pn):
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, w13, w2, routing.slot_weight)]
    xx, a, b, sw = leaves
    r = mk.Routing(routing.slot_token, routing.slot_expert, sw, routing.num_tokens, routing.num_experts,
                   max_slots_per_token=routing.max_slots_per_token, top_k=routing.top_k) \
        if hasattr(mk, "Routing") else routing
    p = mk.expert_params(a, b, activation=act, post_norm=pn)
    out = moe_reference(xx, r, p) if backend == "reference" else mk.fused_experts(xx, r, p, backend=backend)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device)
    grads = torch.autograd.grad((out * up).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("act", ACTS, ids=[a.name for a in ACTS])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_match_reference_forward_and_backward(act, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    x, routing, w13, w2, _ = _setup(act)
    want, gw = _grads("reference", act, x, routing, w13, w2, None)
    got, gg = _grads(backend, act, x, routing, w13, w2, None)
    assert_close(got, want, 1e-5, f"{act.name} out")
    for name, a, b in zip(("x", "w13", "w2", "slot_weight"), gg, gw):
        assert_close(a, b, 1e-4, f"{act.name} d{name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_post_norm_forward_and_backward(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    act = Activation("swiglu")
    x, routing, w13, w2, pn = _setup(act, norm=True)
    want, gw = _grads("reference", act, x, routing, w13, w2, pn)
    got, gg = _grads(backend, act, x, routing, w13, w2, pn)  # triton: autograd falls back to the torch path
    assert_close(got, want, 1e-5, "post-norm out")
    for name, a, b in zip(("x", "w13", "w2", "slot_weight"), gg, gw):
        assert_close(a, b, 1e-4, f"post-norm d{name}")
    if backend == "triton":  # inference: the Triton GEMMs and the post-norm combine kernel
        with torch.no_grad():
            p = mk.expert_params(w13, w2, post_norm=pn)
            got = mk.fused_experts(x, routing, p, backend="triton")
            again = mk.fused_experts(x, routing, p, backend="triton")
        assert_close(got, want, 1e-5, "post-norm kernel")
        assert torch.equal(got, again)
