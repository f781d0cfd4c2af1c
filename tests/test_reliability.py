"""Reliability of the single-process API (issue 16): copying a layer after a step, no
stale per-step state, T = 0 gradients, validation of every public entry point, a stable
z-loss, the bf16 interpreter warning, per-router config fields, the backend warning,
expert load and auxiliary-loss-free balancing. (Ranks that disagree: test_parallel.py.)"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

from moe_kernels import (Activation, MoE, MoEConfig, Routing, expert_params, fused_experts, moe, moe_reference, route,
                         z_loss)
from moe_kernels.balance import update_selection_bias
from moe_kernels.routing import grouped_sigmoid_topk, noisy_topk, softmax_topk, switch

H, I, E = 12, 10, 5  # not multiples of 16; a prime number of experts


def layer_of(**kw):
    cfg = dict(hidden_size=H, intermediate_size=I, num_experts=E, backend="torch")
    cfg.update(kw)
    return MoE(**cfg).double()


def weights(e=E, gen=None):
    g = gen or torch.Generator().manual_seed(7)
    return (torch.randn(e, 2 * I, H, generator=g, dtype=torch.float64),
            torch.randn(e, H, I, generator=g, dtype=torch.float64))


# --------------------------------------------------------------------------- per-step state


@pytest.mark.parametrize("router", ["softmax_topk", "switch", "noisy_topk"])
def test_deepcopy_and_pickle_after_a_training_forward(router):
    # Edge: the non-leaf aux_loss/losses of a step with grad enabled used to make
    # copy.deepcopy raise ("Only Tensors created explicitly by the user ...").
    layer = layer_of(router=router, z_loss_coef=0.1)
    x = torch.randn(7, H, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.aux_loss is not None and layer.aux_loss.grad_fn is not None
    twin = copy.deepcopy(layer)
    assert twin.aux_loss is None and twin.losses == {} and twin.last_expert_load is None
    assert layer.aux_loss is not None, "copying must not clear the original's state"
    for (n, p), (n2, q) in zip(layer.named_parameters(), twin.named_parameters()):
        assert n == n2 and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    x2 = torch.randn(4, H, dtype=torch.float64)
    torch.testing.assert_close(twin(x2), layer(x2), rtol=0, atol=0) if router != "noisy_topk" else None
    buf = io.BytesIO()
    torch.save(layer, buf)  # pickles the module: no graph inside
    assert pickle.loads(pickle.dumps(layer)).aux_loss is None


def test_failed_forward_leaves_no_stale_aux_loss():
    # Edge: a forward that raises after a good one: the previous step's loss must not
    # read as current (a training loop adding it would train on a stale graph).
    layer = layer_of(router="softmax_topk")
    layer(torch.randn(5, H, dtype=torch.float64))
    assert layer.aux_loss is not None and layer.losses and layer.last_expert_load is not None
    with pytest.raises(ValueError, match="^x: expected last dimension"):
        layer(torch.randn(5, H + 1, dtype=torch.float64))
    assert layer.aux_loss is None and layer.losses == {} and layer.last_expert_load is None
    with pytest.raises(ValueError, match="^x: expected dtype"):  # fails later, inside the checks
        layer(torch.randn(5, H, dtype=torch.float32).to(torch.int32))
    assert layer.aux_loss is None


# --------------------------------------------------------------------------- T = 0


@pytest.mark.parametrize("entry", ["moe", "fused_experts", "layer"])
def test_empty_batch_keeps_the_graph(entry):
    # Edge: T = 0 with x requiring grad: out.requires_grad and backward() gives zero
    # gradients (it raised "element 0 of tensors does not require grad" for moe/fused_experts).
    w13, w2 = weights()
    w13.requires_grad_()
    x = torch.zeros(0, H, dtype=torch.float64, requires_grad=True)
    logits = torch.zeros(0, E, dtype=torch.float64, requires_grad=True)
    if entry == "moe":
        out = moe(x, logits, w13, w2, top_k=2, backend="torch")
    elif entry == "fused_experts":
        out = fused_experts(x, softmax_topk(logits, 2), w13, w2, backend="torch")
    else:
        out = layer_of()(x)
    assert out.shape == (0, H) and out.requires_grad
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, H)
    if entry != "layer":
        assert w13.grad is not None and torch.count_nonzero(w13.grad) == 0


# --------------------------------------------------------------------------- validation


def test_moe_reference_validates_like_the_other_entry_points():
    w13, w2 = weights(4)
    params = expert_params(w13, w2)
    x = torch.randn(6, H, dtype=torch.float64)
    logits6 = torch.randn(6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="^routing: expected num_experts = 4"):  # slots of experts 4, 5 were dropped
        moe_reference(x, softmax_topk(logits6, 2), params)
    with pytest.raises(ValueError, match="^routing: expected num_tokens = 6"):  # rows 4, 5 came back zero
        moe_reference(x, softmax_topk(torch.randn(4, 4, dtype=torch.float64), 2), params)
    with pytest.raises(ValueError, match="^params: expected an ExpertParams"):
        moe_reference(x, softmax_topk(torch.randn(6, 4, dtype=torch.float64), 2), (w13, w2))
    good = moe_reference(x, softmax_topk(torch.randn(6, 4, dtype=torch.float64), 2), params)
    assert good.shape == (6, H) and torch.count_nonzero(good) > 0


@pytest.mark.parametrize("value", ["no", None, 1, "False"])
def test_renormalize_must_be_a_bool(value):
    # "no" was True on the torch backend and None was False; the Triton backend rejected both.
    logits = torch.randn(4, E, dtype=torch.float64)
    with pytest.raises(ValueError, match="^renormalize: expected True or False"):
        softmax_topk(logits, 2, renormalize=value)
    with pytest.raises(ValueError, match="^renormalize: expected True or False"):
        grouped_sigmoid_topk(logits, 2, renormalize=value)
    w13, w2 = weights()
    with pytest.raises(ValueError, match="^renormalize: expected True or False"):
        moe(torch.randn(4, H, dtype=torch.float64), logits, w13, w2, top_k=2, renormalize=value, backend="torch")
    with pytest.raises(ValueError, match="^renormalize: expected True or False"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, renormalize=value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=float("nan")), "^alpha: expected a finite number"),        # NaN output before
    (dict(alpha="x"), "^alpha: expected a finite number"),                 # TypeError inside forward before
    (dict(limit=float("inf")), "^limit: expected a finite number"),
    (dict(limit=-1.0), "^limit: expected > 0"),
])
def test_activation_constants_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Activation("swiglu_oai", **kwargs)
    with pytest.raises(ValueError, match=match):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, activation="swiglu_oai", **kwargs)


@pytest.mark.parametrize("field, value, match", [
    ("aux_loss_coef", float("nan"), "finite number"),
    ("aux_loss_coef", -0.5, ">= 0.0"),
    ("z_loss_coef", -1, ">= 0.0"),
    ("z_loss_coef", "0.1", "finite number"),   # TypeError deep inside forward before
    ("jitter_eps", "0.1", "finite number"),
    ("routed_scaling_factor", float("nan"), "finite number"),
    ("bias", "yes", "True or False"),
])
def test_config_numbers_are_validated(field, value, match):
    with pytest.raises(ValueError, match=f"^{field}: expected.*{match}"):
        MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, **{field: value})


def test_noisy_topk_noise_is_validated():
    clean = torch.randn(6, E, dtype=torch.float64)
    noise_logits = torch.randn(6, E, dtype=torch.float64)
    bad = torch.randn(6, E, dtype=torch.float64)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="^noise: expected finite values"):
        noisy_topk(clean, 2, noise_logits=noise_logits, noise=bad)
    for eps in (-5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="^noise_epsilon: expected"):
            noisy_topk(clean, 2, noise_logits=noise_logits, noise_epsilon=eps)
    ok = noisy_topk(clean, 2, noise_logits=noise_logits, noise=torch.randn(6, E, dtype=torch.float64))
    assert torch.isfinite(ok.slot_weight).all()


@pytest.mark.parametrize("cf", [1e30, 1e300, 1.7e308])
def test_huge_capacity_factor_drops_nothing(cf):
    # OverflowError before (a capacity past int64 compared with a tensor).
    logits = torch.randn(9, 3, dtype=torch.float64)
    logits[:, 0] += 3  # everything to expert 0: a normal capacity would drop
    r = switch(logits, capacity_factor=cf)
    assert (r.slot_expert < 3).all() and float(r.losses["dropped_fraction"]) == 0.0
    ec = route(logits, "expert_choice", capacity_factor=cf)
    assert ec.num_slots == 3 * 9  # C = T: every expert takes every token
    layer = layer_of(router="switch", capacity_factor=cf)
    assert torch.isfinite(layer(torch.randn(4, H, dtype=torch.float64))).all()


def test_routing_must_be_a_routing():
    w13, w2 = weights()
    x = torch.randn(4, H, dtype=torch.float64)
    r = softmax_topk(torch.randn(4, E, dtype=torch.float64), 2)
    ids, w = r.slot_expert.view(4, 2), r.slot_weight.view(4, 2)
    with pytest.raises(ValueError, match="^routing: expected a Routing .*got tuple"):  # AttributeError before
        fused_experts(x, (ids, w), w13, w2, backend="torch")
    out = fused_experts(x, Routing.from_topk(ids, w, E), w13, w2, backend="torch")  # what the message suggests
    torch.testing.assert_close(out, fused_experts(x, r, w13, w2, backend="torch"))


def test_layer_route_checks_hidden_size():
    layer = layer_of()
    with pytest.raises(ValueError, match=rf"^x2d: expected a \[T, hidden_size={H}\] tensor, got \(3, {H + 1}\)"):
        layer.route(torch.randn(3, H + 1, dtype=torch.float64))  # a bare matmul error before
    with pytest.raises(ValueError, match="^x2d: expected"):
        layer.route(torch.randn(2, 3, H, dtype=torch.float64))


# --------------------------------------------------------------------------- z-loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_z_loss_of_huge_logits_is_finite(dtype):
    # logsumexp(1e20)^2 = 1e40 overflowed float32 to inf.
    big = 1e20 if dtype != torch.float16 else 6e4
    logits = torch.full((3, E), big, dtype=torch.float32).to(dtype)
    logits[1, 2] = -big
    logits.requires_grad_()
    z = z_loss(logits)
    lse = torch.logsumexp(logits.detach().double(), dim=-1)
    assert torch.isfinite(z) and z.dtype == torch.float64
    torch.testing.assert_close(z, lse.square().mean(), rtol=1e-6, atol=0)
    z.backward()
    assert torch.isfinite(logits.grad.float()).all()
    # through the layer: losses["z_loss"] finite, and the weighted aux loss too
    layer = MoE(hidden_size=H, intermediate_size=I, num_experts=E, z_loss_coef=1e-3, backend="torch")
    with torch.no_grad():
        layer.router_weight.fill_(1e19)
    layer(torch.ones(2, H))
    assert torch.isfinite(layer.losses["z_loss"]) and torch.isfinite(layer.aux_loss)


# --------------------------------------------------------------------------- bf16 in the interpreter


def test_bf16_under_the_triton_interpreter_warns(monkeypatch):
    pytest.importorskip("triton")
    from moe_kernels.backends.triton import InterpreterBf16Warning, warn_if_bf16_interpreted

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    with pytest.warns(InterpreterBf16Warning, match="bfloat16 under the Triton interpreter"):
        warn_if_bf16_interpreted(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_bf16_interpreted(x.float(), x.half())  # fp32/fp16 are right in the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        warn_if_bf16_interpreted(x)  # not interpreting: real kernels
    # end to end through the public API (the fused router: small and fast in the interpreter)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w13, w2 = (w.to(torch.bfloat16) for w in weights())
    with pytest.warns(InterpreterBf16Warning):
        moe(torch.randn(2, H, dtype=torch.bfloat16), torch.randn(2, E, dtype=torch.bfloat16), w13, w2, top_k=2,
            backend="triton")


# --------------------------------------------------------------------------- per-router config fields


def test_config_rejects_options_the_router_ignores():
    # Issue 15: accepted silently before (the repr even showed top_k=2 for Switch).
    with pytest.raises(ValueError, match="^top_k: router 'switch' routes each token to 1 expert"):
        MoE(hidden_size=H, intermediate_size=I, num_experts=E, router="switch", top_k=2)
    with pytest.raises(ValueError, match="^capacity_factor: not an option of router 'softmax_topk'"):
        MoE(hidden_size=H, intermediate_size=I, num_experts=E, router="softmax_topk", capacity_factor=1.25)
    for router in ("expert_choice", "dense"):
        with pytest.raises(ValueError, match=f"^top_k: not an option of router '{router}_?"):
            MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, router=router, top_k=2)
    # defaults resolve per router; explicit values that agree with the router stay accepted
    base = dict(hidden_size=H, intermediate_size=I, num_experts=E)
    assert (MoEConfig(**base).top_k, MoEConfig(**base).capacity_factor) == (2, None)
    sw = MoEConfig(**base, router="switch")
    assert (sw.top_k, sw.capacity_factor) == (1, 1.0)
    assert MoEConfig(**base, router="switch", top_k=1, capacity_factor=None).capacity_factor is None
    ec = MoEConfig(**base, router="expert_choice", capacity_factor=2.0)
    assert (ec.top_k, ec.capacity_factor) == (None, 2.0)
    assert MoEConfig(**base, router="softmax_topk", capacity_factor=None).top_k == 2
    assert "top_k=1" in repr(MoE(**base, router="switch"))


def test_unavailable_backend_warns_at_construction():
    base = dict(hidden_size=H, intermediate_size=I, num_experts=E)
    if torch.cuda.is_available():
        pytest.skip("the cuda backend may be available here")
    with pytest.warns(UserWarning, match=r"backend='cuda' is not available on any device of this process.*cpu"):
        layer = MoE(**base, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available on device cpu"):
        layer(torch.randn(2, H))  # the same reason at the forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoE(**base, backend="torch")
        MoE(**base)  # auto
        pytest.importorskip("triton")
        from moe_kernels.backends.triton import interpreting
        if interpreting():
            MoE(**base, backend="triton")  # runs on the CPU under the interpreter: no warning


# --------------------------------------------------------------------------- expert load and balancing


@pytest.mark.parametrize("router, kw", [
    ("softmax_topk", dict(top_k=2)),
    ("switch", dict(capacity_factor=0.5)),       # dropped slots are not load
    ("expert_choice", dict(capacity_factor=1.0)),
    ("grouped_sigmoid_topk", dict(top_k=2)),
])
def test_expert_load_counts_valid_slots(router, kw):
    logits = torch.randn(11, E, dtype=torch.float64)
    logits[:, 0] += 2  # skewed: Switch drops, one expert is hot
    r = route(logits, router, **kw)
    want = torch.bincount(r.slot_expert[r.slot_expert < E].long(), minlength=E)
    assert r.expert_load().tolist() == want.tolist() and r.expert_load().device == logits.device
    layer = layer_of(router=router, **kw)
    y = layer(torch.randn(9, H, dtype=torch.float64, requires_grad=True))
    load = layer.last_expert_load
    assert load.shape == (E,) and not load.requires_grad and int(load.sum()) > 0
    if router != "expert_choice":
        assert int(load.sum()) <= 9 * kw.get("top_k", 1)
    assert y.requires_grad


def test_update_selection_bias_moves_toward_balance():
    layer = layer_of(router="grouped_sigmoid_topk", top_k=2)
    with torch.no_grad():
        layer.router_weight[0] += 1.0  # expert 0 hot
    x = torch.randn(64, H, dtype=torch.float64).abs()
    layer(x)
    load = layer.last_expert_load.clone()
    before = layer.selection_bias.clone()
    imbalance = update_selection_bias(layer, rate=0.01)
    step = layer.selection_bias - before
    torch.testing.assert_close(imbalance, load.float().mean() - load.float())
    torch.testing.assert_close(step, 0.01 * torch.sign(imbalance).to(step.dtype))
    assert step[load.argmax()] < 0 and step[load.argmin()] > 0
    assert layer.selection_bias.grad_fn is None
    # repeated updates balance the load: the hottest expert's count falls
    for _ in range(40):
        layer(x)
        update_selection_bias(layer, rate=0.05)
    assert int(layer.last_expert_load.max()) < int(load.max())
    with pytest.raises(ValueError, match="^layer: expected a MoE layer with router='grouped_sigmoid_topk'"):
        update_selection_bias(layer_of(), rate=0.01)
    with pytest.raises(ValueError, match="^load: the layer has run no forward"):
        update_selection_bias(layer_of(router="grouped_sigmoid_topk", top_k=2), rate=0.01)
    with pytest.raises(ValueError, match="^rate: expected"):
        update_selection_bias(layer, rate=float("nan"))
    with pytest.raises(ValueError, match=rf"^load: expected shape \({E},\)"):
        update_selection_bias(layer, rate=0.01, load=torch.ones(E + 1))
    assert math.isfinite(float(layer.selection_bias.abs().max()))


def test_per_step_state_is_written_under_torch_compile():
    # The StepState writes (losses, aux_loss, last_expert_load) are side effects Dynamo
    # must replay: fullgraph, and the values equal the eager forward's. bf16: the CPU
    # torch._grouped_mm traces in bf16 (float32: issue 15, see test_hf_compile.py).
    torch.manual_seed(0)
    layer = MoE(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, z_loss_coef=0.1,
                backend="torch").to(torch.bfloat16)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    try:
        y = compiled(x)
        aux, load, keys = layer.aux_loss, layer.last_expert_load, set(layer.losses)
        layer.aux_loss = None
        y_eager = layer(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(y, y_eager)
    assert keys == {"load_balancing", "z_loss"} and torch.equal(aux, layer.aux_loss)
    assert torch.equal(load, layer.last_expert_load) and int(load.sum()) == 12
