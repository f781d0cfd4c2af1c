"""backend="triton" forward against the loop reference, for every router, at small odd
shapes; launch count; determinism; fused vs separate combine; availability.

Runs in the Triton interpreter on the CPU (the GPU versions at real sizes live in
test_triton_gpu.py). Each case id names the edge it covers.
"""

from __future__ import annotations

import pytest
import torch

from triton_interp import DEVICE, POISON_INT, import_or_skip, interpreting, poison_empty

import_or_skip()

from test_triton_gemm import assert_close, fast_interpreter, make_routing, make_weights  # noqa: E402,F401

import moe_kernels as mk  # noqa: E402
from moe_kernels.backends import get_backend  # noqa: E402
from moe_kernels.params import expert_params  # noqa: E402
from moe_kernels.plan import build_plan_torch  # noqa: E402
from moe_kernels.reference import moe_reference  # noqa: E402
from moe_kernels.backends.triton import experts as ops  # noqa: E402
from moe_kernels.backends.triton.backend import TritonBackend  # noqa: E402


def _reference(x, routing, w13, w2, b13, b2, act, transposed, interleaved):
    """The loop reference in float32 (the kernels accumulate in float32 whatever the dtype)."""
    f = (lambda v: None if v is None else v.float())
    params = expert_params(f(w13), f(w2), f(b13), f(b2), activation=act, transposed=transposed,
                           interleaved=interleaved)
    return moe_reference(x.float(), routing, params)


_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2}

# (router, T, H, I, E, k, dtype, activation, bias, transposed, interleaved)
_CASES = [
    pytest.param("softmax_topk", 1, 64, 96, 8, 2, torch.float32, "swiglu", False, False, False, id="decode-T1"),
    pytest.param("softmax_topk", 33, 96, 64, 13, 6, torch.float16, "swiglu", True, False, False,
                 id="prime-E13-k6-fp16-bias"),
    pytest.param("softmax_topk", 222, 64, 64, 4, 1, torch.float32, "gelu", True, False, False, id="T222-k1-plain"),
    pytest.param("grouped_sigmoid_topk", 64, 200, 96, 8, 2, torch.float32, "swiglu_oai", True, True, True,
                 id="deepseek-gptoss-interleaved-transposed"),
    pytest.param("noisy_topk", 33, 64, 200, 13, 2, torch.float16, "geglu", False, False, False, id="noisy-fp16"),
    pytest.param("switch", 64, 96, 96, 4, 1, torch.float32, "relu", True, False, False, id="switch-capacity-drops"),
    pytest.param("expert_choice", 33, 64, 64, 8, 0, torch.float32, "silu", False, True, False,
                 id="expert-choice-transposed"),
    pytest.param("dense", 33, 64, 96, 4, 0, torch.float16, "geglu_tanh", True, False, True,
                 id="dense-interleaved-fp16"),
    pytest.param("empty_expert", 64, 64, 64, 8, 2, torch.float32, "swiglu", False, False, False, id="expert-with-no-rows"),
    pytest.param("one_expert", 64, 64, 96, 4, 1, torch.float16, "swiglu", True, False, False, id="all-tokens-one-expert"),
    pytest.param("dropped", 33, 96, 64, 13, 6, torch.float32, "gelu_tanh", True, True, False,
                 id="from_topk-sentinels-transposed"),
]


@pytest.mark.parametrize("router,t,h,i,e,k,dtype,act,bias,transposed,interleaved", _CASES)
def test_forward_matches_reference(monkeypatch, router, t, h, i, e, k, dtype, act, bias, transposed, interleaved):
    for mod in (ops,):
        poison_empty(monkeypatch, mod)  # every output element must be written
    routing, logits = make_routing(router, t, e, k=max(k, 1))
    w13, w2, b13, b2 = make_weights(e, h, i, act, dtype, bias=bias, transposed=transposed)
    x = torch.randn(t, h, device=DEVICE).to(dtype)
    out = mk.fused_experts(x, routing, w13, w2, b13, b2, activation=act, transposed=transposed,
                           interleaved=interleaved, backend="triton")
    assert out.dtype == dtype and out.shape == (t, h)
    assert not torch.isnan(out).any(), "some output element was never written"
    want = _reference(x, routing, w13, w2, b13, b2, act, transposed, interleaved)
    assert_close(out, want, _RTOL[dtype], "out")
    dropped_tokens = ~(routing.slot_expert < e).view(t, -1).any(1) if routing.top_k else None
    if dropped_tokens is not None and dropped_tokens.any():
        assert (out[dropped_tokens] == 0).all()


@pytest.mark.parametrize("router,opts", [
    pytest.param("softmax_topk", {"top_k": 2}, id="softmax"),
    pytest.param("softmax_topk", {"top_k": 3, "renormalize": False}, id="softmax-no-renorm"),
    pytest.param("grouped_sigmoid_topk", {"top_k": 4, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
                 id="sigmoid-grouped"),
])
def test_moe_with_fused_routing_matches_torch_routers(router, opts):
    """moe(): the backend's fused routing picks the torch router's experts and weights."""
    t, h, i, e = 45, 64, 64, 8
    x = torch.randn(t, h, device=DEVICE)
    logits = torch.randn(t, e, device=DEVICE)
    if router == "grouped_sigmoid_topk":
        opts = dict(opts, bias=torch.randn(e, device=DEVICE) * 0.1)
    w13, w2, _, _ = make_weights(e, h, i, "swiglu", torch.float32, bias=False)
    out, routing = mk.moe(x, logits, w13, w2, router=router, backend="triton", return_routing=True, **opts)
    ref_routing = mk.route(logits, router, **opts)
    assert torch.equal(routing.slot_expert, ref_routing.slot_expert)
    assert torch.allclose(routing.slot_weight, ref_routing.slot_weight.float(), atol=1e-6)
    assert_close(out, _reference(x, ref_routing, w13, w2, None, None, "swiglu", False, False), 1e-4, "out")


@pytest.mark.parametrize("t,h,i,e,k", [
    pytest.param(40, 64, 96, 6, 3, id="k3-auto-fused"),
    pytest.param(37, 72, 40, 13, 8, id="k8-prime-E13-auto-separate"),
])
def test_fused_and_separate_combine_agree_bitwise_and_runs_are_deterministic(t, h, i, e, k):
    routing, _ = make_routing("softmax_topk", t, e, k=k)
    w13, w2, b13, b2 = make_weights(e, h, i, "swiglu", torch.float16, bias=True)
    x = torch.randn(t, h, device=DEVICE).half()
    params = expert_params(w13, w2, b13, b2)
    be = get_backend("triton", DEVICE)
    plan = be.plan(routing, params)
    a = ops.moe_experts(x, plan, params, combine="fused")
    b = ops.moe_experts(x, plan, params, combine="fused")
    c = ops.moe_experts(x, plan, params, combine="separate")
    assert torch.equal(a, b), "same input twice must give the same bits"
    assert torch.equal(a, c), "the fused combine sums the same values in the same order as the combine kernel"
    assert torch.equal(a, ops.moe_experts(x, plan, params, combine="auto")), "auto runs one of the two"
    twin = ops.moe_experts_torch(x, build_plan_torch(routing, plan.block_m), params)
    assert_close(a, twin, 2e-3, "kernels vs their twins")


# --------------------------------------------------------------------------- launch count


def _launch_log(monkeypatch, fn):
    """Run ``fn``; return (Triton kernel launches, names of torch compute ops run outside
    them and outside the load-balancing loss, names of the loss's torch ops). Torch ops
    that launch a GPU kernel count; allocations and views do not."""
    import triton.runtime.interpreter as interp
    from torch.profiler import ProfilerActivity, profile, record_function
    from triton.runtime.jit import JITFunction

    from moe_kernels import primitives as tbackend  # the fused routers' loss glue

    launches = []
    for cls in (interp.InterpretedFunction, JITFunction):
        real = cls.run

        def run(self, *a, _real=real, **kw):
            launches.append(self.fn.__name__)
            with record_function("__triton_launch__"):
                return _real(self, *a, **kw)

        monkeypatch.setattr(cls, "run", run)
    real_loss = tbackend._balance_loss

    def loss(*a, **kw):
        with record_function("__balance_loss__"):
            return real_loss(*a, **kw)

    monkeypatch.setattr(tbackend, "_balance_loss", loss)
    # As on a GPU: no data-dependent argument checks (they are host syncs, off there).
    import moe_kernels._checks as checks
    import moe_kernels.plan as plan_mod
    import moe_kernels.routing as routing_mod
    for mod in (checks, routing_mod):
        monkeypatch.setattr(mod, "value_checks_enabled", lambda t: False)
    monkeypatch.setattr(plan_mod, "deep_checks_enabled", lambda: False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    free = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::view", "aten::_unsafe_view",
            "aten::as_strided", "aten::transpose", "aten::t", "aten::expand", "aten::slice", "aten::select",
            "aten::detach", "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::reshape",
            "aten::lift_fresh", "aten::contiguous", "aten::resolve_conj", "aten::resolve_neg"}
    compute, loss_ops = set(), set()
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.name in free:
            continue
        p, where = ev.cpu_parent, None
        while p is not None:
            if p.name in ("__triton_launch__", "__balance_loss__"):
                where = p.name
            p = p.cpu_parent
        if where is None:
            compute.add(ev.name)
        elif where == "__balance_loss__":
            loss_ops.add(ev.name)
    return launches, compute, loss_ops


# The load-balancing loss (always reported, as by the torch and cuda backends; see
# backend.py): a clamp, a softmax and topk_load_balancing_loss's few reductions, torch
# ops outside the 4 Triton kernels of the expert path. Names across torch versions.
_LOSS_OPS = {"aten::clamp_max", "aten::clamp", "aten::softmax", "aten::_softmax", "aten::_to_copy", "aten::to",
             "aten::copy_", "aten::zeros", "aten::zero_", "aten::fill_", "aten::scatter_add_", "aten::scatter_add",
             "aten::ones", "aten::div", "aten::div_", "aten::mean", "aten::sum", "aten::mul", "aten::mul_",
             "aten::_to_dim_order_copy", "aten::empty_like", "aten::ones_like"}


@pytest.mark.parametrize("router,opts", [
    pytest.param("softmax_topk", {"top_k": 2}, id="softmax-topk"),
    pytest.param("grouped_sigmoid_topk", {"top_k": 2, "n_group": 2, "topk_group": 1}, id="grouped-sigmoid"),
])
def test_forward_is_four_launches_for_topk_routers(monkeypatch, router, opts):
    """Routing + plan + GEMM1 + GEMM2 (combine fused, what auto picks here): 4 launches and no torch
    compute op (torch.zeros would be a fill kernel on a GPU) on the expert path, for
    inference; the softmax router's load-balancing loss is the only other work."""
    t, h, i, e = 7, 32, 32, 4
    x = torch.randn(t, h, device=DEVICE)
    logits = torch.randn(t, e, device=DEVICE)
    w13, w2, _, _ = make_weights(e, h, i, "swiglu", torch.float32, bias=True)
    run = (lambda: mk.moe(x, logits, w13, w2, router=router, backend="triton", **opts))
    with torch.no_grad():
        run()  # warm caches (imports, backend registry)
        launches, compute, loss_ops = _launch_log(monkeypatch, run)
    assert compute == set(), f"torch ops that would launch GPU kernels: {sorted(compute)}"
    assert len(launches) == 4, launches
    assert launches.count("_grouped_gemm_kernel") == 2
    assert loss_ops <= _LOSS_OPS, f"the loss runs unexpected ops: {sorted(loss_ops - _LOSS_OPS)}"
    assert bool(loss_ops) == (router == "softmax_topk")


def test_separate_combine_is_five_launches(monkeypatch):
    t, h, i, e = 7, 32, 32, 4
    x, logits = torch.randn(t, h, device=DEVICE), torch.randn(t, e, device=DEVICE)
    w13, w2, _, _ = make_weights(e, h, i, "swiglu", torch.float32, bias=False)
    monkeypatch.setenv(mk.options.ENV_COMBINE, "separate")
    with torch.no_grad():
        launches, compute, _ = _launch_log(monkeypatch, lambda: mk.moe(x, logits, w13, w2, top_k=2, backend="triton"))
    assert compute == set() and len(launches) == 5 and "_combine_fwd_kernel" in launches


@pytest.mark.parametrize("grad", [False, True], ids=["eval-no-grad", "training"])
def test_losses_match_torch_backend_in_eval_and_training(grad):
    """routing.losses has the torch backend's keys and values with and without grad."""
    t, e = 21, 7
    logits = torch.randn(t, e, device=DEVICE, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        got = get_backend("triton", DEVICE).route(logits, "softmax_topk", {"top_k": 2})
        want = get_backend("torch", DEVICE).route(logits, "softmax_topk", {"top_k": 2})
    assert set(got.losses) == set(want.losses) == {"load_balancing"}
    torch.testing.assert_close(got.losses["load_balancing"], want.losses["load_balancing"].float())
    if grad:
        got.losses["load_balancing"].backward()
        assert logits.grad is not None and float(logits.grad.abs().max()) > 0


# --------------------------------------------------------------------------- availability and bad input


def test_unavailable_reasons(monkeypatch):
    be = TritonBackend()
    if interpreting():
        assert be.unavailable(torch.device("cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = be.unavailable(torch.device("cpu"))
    assert reason and "TRITON_INTERPRET=1" in reason and "backend='torch'" in reason
    assert "not on device type 'meta'" in be.unavailable(torch.device("meta"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert "8.0 or newer" in be.unavailable(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert be.unavailable(torch.device("cuda")) is None


def test_bad_input_value_errors():
    t, h, i, e = 4, 32, 32, 4
    routing, _ = make_routing("softmax_topk", t, e, k=2)
    w13, w2, _, _ = make_weights(e, h, i, "swiglu", torch.float64, bias=False)
    with pytest.raises(ValueError, match="x: the triton backend computes in float16, bfloat16 or float32"):
        mk.fused_experts(torch.randn(t, h, dtype=torch.float64, device=DEVICE), routing, w13, w2, backend="triton")
    with pytest.raises(ValueError, match="combine"):
        mk.KernelOptions(combine="atomic")
    x = torch.randn(t, h, device=DEVICE)
    with pytest.raises(ValueError, match="combine: expected one of"):
        mk.fused_experts(x, routing, w13.float(), w2.float(), backend="triton", combine="atomic")


def test_every_slot_dropped_gives_zeros_and_zero_gradients():
    """No valid slot at all (expert-parallel: every token routed to another rank)."""
    t, h, i, e = 6, 32, 32, 4
    ids = torch.full((t, 2), -1, dtype=torch.int32, device=DEVICE)
    w = torch.rand(t, 2, device=DEVICE, requires_grad=True)
    routing = mk.Routing.from_topk(ids, w, e)
    w13, w2, b13, b2 = make_weights(e, h, i, "swiglu", torch.float32, bias=True)
    leaves = [v.requires_grad_(True) for v in (w13, w2, b13, b2)]
    x = torch.randn(t, h, device=DEVICE, requires_grad=True)
    out = mk.fused_experts(x, routing, *leaves, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for v in (x, w, *leaves):
        assert v.grad is not None and torch.equal(v.grad, torch.zeros_like(v.grad))


def test_noisy_and_switch_route_through_torch_routers():
    be = get_backend("triton", DEVICE)
    logits = torch.randn(9, 4, device=DEVICE)
    r = be.route(logits, "switch", {"capacity_factor": 1.0})
    ref = mk.route(logits, "switch", capacity_factor=1.0)
    assert torch.equal(r.slot_expert, ref.slot_expert) and "load_balancing" in r.losses


def test_poisoned_plan_and_routing_buffers(monkeypatch):
    """With every allocation of routing, plan and experts poisoned, the output is exact."""
    from moe_kernels.backends.triton import plan as tplan
    from moe_kernels.backends.triton import routing as trouting
    for mod in (ops, tplan, trouting):
        poison_empty(monkeypatch, mod)
    t, h, i, e = 19, 64, 64, 5
    x, logits = torch.randn(t, h, device=DEVICE), torch.randn(t, e, device=DEVICE)
    w13, w2, b13, b2 = make_weights(e, h, i, "swiglu", torch.float32, bias=True)
    out, routing = mk.moe(x, logits, w13, w2, b13, b2, top_k=2, backend="triton", return_routing=True)
    assert not (routing.slot_token == POISON_INT).any()
    assert_close(out, _reference(x, routing, w13, w2, b13, b2, "swiglu", False, False), 1e-4, "out")


# --------------------------------------------------------------------------- device of the launches


def test_on_device_context():
    """Launches go to the tensors' GPU: torch.cuda.device(dev) for a CUDA device (built
    without touching a GPU), a no-op on the CPU."""
    import contextlib

    from moe_kernels.backends.triton import on_device
    ctx = on_device(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(on_device("cuda:3"), torch.cuda.device) and on_device("cuda:3").idx == 3
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_inside_the_device_context(monkeypatch):
    """Forward and backward (fused and separate combine, routing, plan, GEMMs, wgrad):
    each Triton launch happens inside on_device() of its tensors' device."""
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    import moe_kernels.backends.triton as tpkg
    from moe_kernels.backends.triton import combine, gemm, plan, routing, wgrad
    depth, entered, outside = [0], [], []
    real_ctx = tpkg.on_device

    class Tracked:
        def __init__(self, t):
            self.dev = t.device if isinstance(t, torch.Tensor) else torch.device(t)
            self.inner = real_ctx(t)

        def __enter__(self):
            depth[0] += 1
            entered.append(self.dev)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            depth[0] -= 1
            return self.inner.__exit__(*exc)

    for mod in (ops, routing, plan, wgrad, combine, gemm):
        assert mod.on_device is real_ctx, f"{mod.__name__} must launch through moe_kernels.backends.triton.on_device"
        monkeypatch.setattr(mod, "on_device", Tracked)
    launches = []
    for cls in (interp.InterpretedFunction, JITFunction):
        real = cls.run

        def run(self, *a, _real=real, **kw):
            launches.append(self.fn.__name__)
            if depth[0] == 0:
                outside.append(self.fn.__name__)
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, "run", run)
    t, h, i, e = 9, 32, 32, 4
    x = torch.randn(t, h, device=DEVICE, requires_grad=True)
    logits = torch.randn(t, e, device=DEVICE, requires_grad=True)
    w13, w2, b13, b2 = (v.requires_grad_(True) for v in make_weights(e, h, i, "swiglu", torch.float32, bias=True))
    for comb in ("fused", "separate"):
        monkeypatch.setenv(mk.options.ENV_COMBINE, comb)
        out = mk.moe(x, logits, w13, w2, b13, b2, top_k=2, backend="triton")
        out.square().sum().backward()
    assert not outside, f"launched outside on_device: {outside}"
    assert {"_topk_route_fwd_kernel", "_topk_route_bwd_kernel", "_plan_fwd_kernel", "_grouped_gemm_kernel",
            "_expert_wgrad_bwd_kernel", "_combine_fwd_kernel"} <= set(launches)
    assert entered and all(d == x.device for d in entered)


@pytest.mark.parametrize("value,want", [("1", True), ("true", True), ("0", False), ("", False)])
def test_one_reading_of_triton_interpret(monkeypatch, value, want):
    """TRITON_INTERPRET has one parser (moe_kernels.backends.triton.interpreting), which the
    backend's availability and the tests' helper both use."""
    import triton_interp

    from moe_kernels.backends import triton as tpkg
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert tpkg.interpreting() is want and triton_interp.interpreting() is want
    assert (TritonBackend().unavailable(torch.device("cpu")) is None) is want
