"""backend="triton" backward: every gradient (x, W13, W2, b13, b2, router logits through
the slot weights) against the loop reference's autograd, for every router, at small
odd shapes; recompute_h; determinism; poisoned gradient buffers; the layer's aux and
z losses; a short training run that must follow the torch backend's loss curve.
"""

from __future__ import annotations

import pytest
import torch

from triton_interp import DEVICE, bf16_interp, import_or_skip, poison_empty  # noqa: F401

import_or_skip()

from test_triton_gemm import assert_close, fast_interpreter, make_routing, make_weights  # noqa: E402,F401

import moe_kernels as mk  # noqa: E402
from moe_kernels.params import expert_params  # noqa: E402
from moe_kernels.reference import moe_reference  # noqa: E402
from moe_kernels.backends.triton import experts as ops, wgrad  # noqa: E402

_NAMES = ("x", "logits", "w13", "w2", "b13", "b2")


def _leaves(t, h, i, e, act, dtype, bias, transposed, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    w13, w2, b13, b2 = make_weights(e, h, i, act, dtype, bias=bias, transposed=transposed, seed=seed)
    x = torch.randn(t, h, generator=g).to(device=DEVICE, dtype=dtype)
    logits = torch.randn(t, e, generator=g).to(DEVICE)
    return [x, logits, w13, w2, b13, b2]


def _run(backend, leaves, router, opts, act, transposed, interleaved, logits_edit=None, **kw):
    """Forward + backward of sum(out * upstream); returns (out, grads by name)."""
    vals = [None if v is None else v.detach().clone().requires_grad_(True) for v in leaves]
    if backend == "reference":
        vals = [None if v is None else v.detach().float().requires_grad_(True) for v in leaves]
    x, logits, w13, w2, b13, b2 = vals
    lg = logits_edit(logits) if logits_edit is not None else logits
    if backend == "reference":
        routing = mk.route(lg, router, **opts)
        params = expert_params(w13, w2, b13, b2, activation=act, transposed=transposed, interleaved=interleaved)
        out = moe_reference(x, routing, params)
    else:
        routing = mk.get_backend("triton", DEVICE).route(lg, router, opts)
        params = expert_params(w13, w2, b13, b2, activation=act, transposed=transposed, interleaved=interleaved)
        plan = mk.get_backend("triton", DEVICE).plan(routing, params)
        out = ops.moe_experts(x, plan, params, **kw)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    (out.float() * up).sum().backward()
    return out, {n: (v.grad if v is not None else None) for n, v in zip(_NAMES, vals)}


def _check_grads(got, want, rtol, skip=()):
    for n in _NAMES:
        if n in skip or want[n] is None:
            continue
        assert got[n] is not None, f"d{n} missing"
        assert got[n].dtype == got[n].dtype
        assert_close(got[n], want[n], rtol, f"d{n}")
        assert want[n].abs().max() > 0, f"d{n}: the case must exercise this gradient"


_EMPTY = (lambda lg: torch.cat([lg[:, :-1], torch.full_like(lg[:, -1:], -30.0)], 1))  # no token picks expert E-1
_ONE = (lambda lg: torch.cat([lg[:, :1] + 30.0, lg[:, 1:]], 1))  # every token's first choice: expert 0

# (router, opts, T, H, I, E, dtype, activation, bias, transposed, interleaved, logits edit)
_CASES = [
    pytest.param("softmax_topk", {"top_k": 2}, 33, 64, 96, 8, torch.float32, "swiglu", True, False, False, None,
                 id="softmax-k2-bias"),
    pytest.param("softmax_topk", {"top_k": 6}, 1, 96, 64, 13, torch.float32, "geglu", False, False, False, None,
                 id="decode-T1-k6-E13"),
    pytest.param("softmax_topk", {"top_k": 2, "renormalize": False}, 222, 64, 64, 4, torch.float32, "gelu", True,
                 False, False, None, id="T222-no-renorm-plain-gelu"),
    pytest.param("grouped_sigmoid_topk", {"top_k": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
                 64, 96, 64, 8, torch.float32, "swiglu_oai", True, True, True, None,
                 id="deepseek-sigmoid-gptoss-interleaved-transposed"),
    pytest.param("noisy_topk", {"top_k": 2}, 33, 64, 200, 13, torch.float32, "geglu_tanh", False, False, True, None,
                 id="noisy-interleaved"),
    pytest.param("switch", {"capacity_factor": 0.5}, 64, 96, 96, 4, torch.float32, "relu", True, False, False, None,
                 id="switch-capacity-drops"),
    pytest.param("expert_choice", {"capacity_factor": 1.0}, 33, 64, 64, 8, torch.float32, "silu", False, True,
                 False, None, id="expert-choice-transposed"),
    pytest.param("dense", {}, 9, 64, 96, 4, torch.float32, "swiglu", True, False, False, None, id="dense"),
    pytest.param("softmax_topk", {"top_k": 2}, 64, 64, 64, 8, torch.float32, "swiglu", True, False, False, _EMPTY,
                 id="expert-with-no-rows"),
    pytest.param("softmax_topk", {"top_k": 2}, 50, 64, 64, 4, torch.float32, "swiglu", True, False, False, _ONE,
                 id="all-tokens-one-expert"),
    pytest.param("softmax_topk", {"top_k": 2}, 33, 64, 96, 8, torch.float16, "swiglu", True, False, False, None,
                 id="softmax-fp16"),
    pytest.param("expert_choice", {"capacity_factor": 2.0}, 20, 96, 64, 4, torch.float16, "gelu_tanh", True, True,
                 False, None, id="expert-choice-fp16-transposed"),
]


@pytest.mark.parametrize("router,opts,t,h,i,e,dtype,act,bias,transposed,interleaved,edit", _CASES)
def test_gradients_match_reference(monkeypatch, router, opts, t, h, i, e, dtype, act, bias, transposed,
                                   interleaved, edit):
    for mod in (ops, wgrad):
        poison_empty(monkeypatch, mod)  # every gradient element must be written
    leaves = _leaves(t, h, i, e, act, dtype, bias, transposed)
    out, got = _run("triton", leaves, router, opts, act, transposed, interleaved, edit)
    ref_out, want = _run("reference", leaves, router, opts, act, transposed, interleaved, edit)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close(out, ref_out, rtol, "out")
    for n in ("x", "w13", "w2", "b13", "b2"):
        if got[n] is not None:
            assert got[n].dtype == dtype and not torch.isnan(got[n]).any(), f"d{n}"
    _check_grads(got, want, rtol * (3 if dtype == torch.float16 else 1))
    if edit is _EMPTY:  # the unused expert's gradients are written zeros
        w13_grad = got["w13"].transpose(1, 2) if transposed else got["w13"]
        assert (w13_grad[e - 1] == 0).all() and (got["w2"][e - 1] == 0).all() and (got["b13"][e - 1] == 0).all()
    if transposed:  # the gradient comes back in the storage layout, without a copy
        assert got["w13"].is_contiguous() and got["w2"].is_contiguous()


def test_slot_weight_gradient_with_dropped_slots():
    """Slots dropped by expert-parallel sentinels (from_topk) get a zero weight gradient;
    every other slot's is dOut[t] . y[s]."""
    t, h, i, e, k = 31, 64, 64, 6, 3
    routing, _ = make_routing("dropped", t, e, k=k)
    w = routing.slot_weight.detach().clone().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    w13, w2, b13, b2 = make_weights(e, h, i, "swiglu", torch.float32, bias=True)
    x = torch.randn(t, h, device=DEVICE)
    params = expert_params(w13, w2, b13, b2)
    up = torch.randn(t, h, device=DEVICE)
    r1 = mk.Routing(routing.slot_token, routing.slot_expert, w, t, e, k, top_k=k)
    r2 = mk.Routing(routing.slot_token, routing.slot_expert, w_ref, t, e, k, top_k=k)
    (mk.fused_experts(x, r1, params, backend="triton") * up).sum().backward()
    (moe_reference(x, r2, params) * up).sum().backward()
    assert_close(w.grad, w_ref.grad, 1e-4, "dslot_weight")
    dropped = routing.slot_expert == e
    assert dropped.any() and (w.grad[dropped] == 0).all()


def test_recompute_h_and_separate_combine_give_the_same_bits():
    leaves = _leaves(40, 64, 96, 6, "swiglu", torch.float16, True, False)
    args = ("softmax_topk", {"top_k": 2}, "swiglu", False, False)
    out_a, a = _run("triton", leaves, *args)
    out_b, b = _run("triton", leaves, *args)
    out_c, c = _run("triton", leaves, *args, recompute_h=True)
    out_d, d = _run("triton", leaves, *args, combine="separate")
    for other in (b, c, d):
        for n in _NAMES:
            assert torch.equal(a[n], other[n]), f"d{n} differs"
    assert torch.equal(out_a, out_c) and torch.equal(out_a, out_d)


def test_recompute_h_saves_no_pre_activation():
    leaves = _leaves(20, 64, 64, 4, "swiglu", torch.float32, False, False)
    x, logits, w13, w2, _, _ = [None if v is None else v.requires_grad_(True) for v in leaves]
    params = expert_params(w13, w2)
    be = mk.get_backend("triton", DEVICE)
    plan = be.plan(be.route(logits, "softmax_topk", {"top_k": 2}), params)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(tuple(v.shape)) or v, lambda v: v):
        ops.moe_experts(x, plan, params, recompute_h=True)
    assert (plan.num_slots, 2 * 64) not in saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(tuple(v.shape)) or v, lambda v: v):
        ops.moe_experts(x, plan, params, recompute_h=False)
    assert (plan.num_slots, 2 * 64) in saved


def test_layer_aux_and_z_losses_train_the_router():
    """MoE layer: out + aux_loss + z_loss, all parameter gradients equal across backends."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, intermediate_size=64, num_experts=8, top_k=2, bias=True, aux_loss_coef=0.1,
               z_loss_coef=0.01)
    ref = mk.MoE(**cfg, backend="torch").to(DEVICE)
    tri = mk.MoE(**cfg, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, 64, device=DEVICE)
    for layer in (ref, tri):
        y = layer(x)
        (y.square().mean() + layer.aux_loss).backward()
    assert tri.aux_loss is not None and abs(float(tri.aux_loss.detach()) - float(ref.aux_loss.detach())) < 1e-6
    for (n, p), (_, q) in zip(ref.named_parameters(), tri.named_parameters()):
        assert_close(q.grad, p.grad, 1e-4, f"grad {n}")


# --------------------------------------------------------------------------- training check


def train_curve(backend: str, steps: int, *, hidden=32, inter=32, experts=4, top_k=2, batch=32, classes=4,
                device=DEVICE, dtype=torch.float32, seed=0, lr=3e-2):
    """A tiny MoE classifier on a synthetic task (class = which of ``classes`` random
    directions the input is nearest, plus noise); returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, hidden, generator=g)
    torch.manual_seed(seed)
    layer = mk.MoE(hidden_size=hidden, intermediate_size=inter, num_experts=experts, top_k=top_k,
                   backend=backend, aux_loss_coef=0.01).to(device=device, dtype=dtype)
    head = torch.nn.Linear(hidden, classes).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(list(layer.parameters()) + list(head.parameters()), lr=lr)
    losses = []
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        x = (centers[y] + 0.5 * torch.randn(batch, hidden, generator=g)).to(device=device, dtype=dtype)
        h = x + layer(x)
        loss = torch.nn.functional.cross_entropy(head(h).float(), y.to(device)) + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_training_curve_matches_torch_backend():
    # The task is learned by step 5 (loss 1.5 -> 0.01): 30 steps cover the descent and
    # a plateau long enough for a drift between the backends to show.
    steps = 30
    ref = train_curve("torch", steps)
    tri = train_curve("triton", steps)
    assert ref[-1] < 0.5 * ref[0], "the task must be learnable in the steps given"
    for s, (a, b) in enumerate(zip(ref, tri)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), f"step {s}: torch {a:.6f} vs triton {b:.6f}"


def test_bf16_forward_and_gradients_with_interpreter_shim(bf16_interp):
    """bf16 end to end (on the CPU through triton_interp's bf16 shim, on a GPU natively)
    against the float32 reference."""
    leaves = _leaves(29, 64, 96, 6, "swiglu", torch.bfloat16, True, False)
    out, got = _run("triton", leaves, "softmax_topk", {"top_k": 2}, "swiglu", False, False)
    ref_out, want = _run("reference", leaves, "softmax_topk", {"top_k": 2}, "swiglu", False, False)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref_out, 2e-2, "out")
    _check_grads(got, want, 5e-2)
