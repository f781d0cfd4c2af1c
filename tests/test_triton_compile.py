"""torch.compile through the triton backend's custom ops (interpreter on the CPU).

* The MoE layer's forward under ``torch.compile(fullgraph=True)`` (inductor): traces
  through routing, plan and expert ops (no graph break) and matches eager.
* A training step (forward, backward through the registered autograd, optimizer step)
  under torch.compile matches eager step by step. It runs with the ``aot_eager``
  backend by default, which traces forward and backward exactly as inductor does
  (Dynamo + AOTAutograd, custom ops opaque) but skips C++ code generation; the inductor
  version (about 45 s cold on 2 cores) runs with MOE_KERNELS_SLOW_TESTS=1.
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_interp import DEVICE, import_or_skip

import_or_skip()

from test_triton_gemm import assert_close, fast_interpreter  # noqa: E402,F401

import moe_kernels as mk  # noqa: E402

_SLOW = pytest.mark.skipif(os.environ.get("MOE_KERNELS_SLOW_TESTS") != "1",
                           reason="slow on the CPU (inductor C++ build): set MOE_KERNELS_SLOW_TESTS=1")


def _layer(router="softmax_topk", **kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=32, num_experts=4, router=router, backend="triton", bias=True)
    if router in ("softmax_topk", "grouped_sigmoid_topk", "noisy_topk"):
        cfg["top_k"] = 2  # MoEConfig refuses a top_k the router would ignore
    cfg.update(kw)
    return mk.MoE(**cfg).to(DEVICE)


@pytest.mark.parametrize("router,backend", [
    pytest.param("softmax_topk", "inductor", id="fused-routing-inductor"),
    pytest.param("expert_choice", "aot_eager", id="torch-router-aot_eager"),
])
def test_layer_forward_fullgraph_matches_eager(router, backend):
    torch._dynamo.reset()
    layer = _layer(router)
    x = torch.randn(2, 5, 32, device=DEVICE)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend=backend)(x)
    assert_close(compiled, eager, 1e-5, "compiled forward")


def _train(step_fn, layer, head, opt, steps):
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(12, 32, generator=g).to(DEVICE)
        y = torch.randint(0, 3, (12,), generator=g).to(DEVICE)
        losses.append(float(step_fn(x, y)))
    return losses


def _setup():
    layer = _layer(z_loss_coef=0.01)
    head = torch.nn.Linear(32, 3).to(DEVICE)
    opt = torch.optim.SGD(list(layer.parameters()) + list(head.parameters()), lr=0.1)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(head(x + layer(x)), y) + layer.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return layer, head, opt, step


def _check_training_step(backend):
    torch._dynamo.reset()
    l1, h1, o1, s1 = _setup()
    l2, h2, o2, s2 = _setup()
    eager = _train(s1, l1, h1, o1, 3)
    compiled = _train(torch.compile(s2, backend=backend), l2, h2, o2, 3)
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (eager, compiled)
    for (n, p), (_, q) in zip(l1.named_parameters(), l2.named_parameters()):
        assert_close(q, p, 1e-5, f"parameter {n} after 3 steps")


def test_training_step_compiled_matches_eager():
    _check_training_step("aot_eager")


@_SLOW
@pytest.mark.slow
def test_training_step_compiled_with_inductor_matches_eager():
    _check_training_step("inductor")


# --------------------------------------------------------------------------- the custom ops themselves


def _op_args(dtype=torch.float32, requires_grad=False):
    from moe_kernels.params import expert_params
    from moe_kernels.backends.triton import experts as ops

    torch.manual_seed(0)
    t, h, i, e = 9, 32, 32, 4
    x = torch.randn(t, h, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    w13 = (torch.randn(e, 2 * i, h, device=DEVICE, dtype=dtype) / 6).requires_grad_(requires_grad)
    w2 = (torch.randn(e, h, i, device=DEVICE, dtype=dtype) / 6).requires_grad_(requires_grad)
    b13 = torch.randn(e, 2 * i, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
    b2 = torch.randn(e, h, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
    be = mk.get_backend("triton", DEVICE)
    params = expert_params(w13, w2, b13, b2)
    routing = be.route(torch.randn(t, e, device=DEVICE), "softmax_topk", {"top_k": 2})
    plan = be.plan(routing, params)
    idx, meta = ops.plan_args(plan)
    sw = plan.slot_weight.detach().clone().requires_grad_(requires_grad)
    return (x, w13, w2, b13, b2, sw, idx, meta, "swiglu", 1.702, 7.0, False), plan


def test_opcheck_experts_forward_and_backward_ops():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the
    forward op (with its registered backward, itself an op)."""
    args, _ = _op_args(requires_grad=True)
    torch.library.opcheck(torch.ops.moe_kernels.experts_fwd.default, (*args, True, "fused"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_opcheck_out_op():
    args, plan = _op_args()
    out = torch.empty(args[0].shape, device=DEVICE)
    torch.library.opcheck(torch.ops.moe_kernels.experts_fwd_out.default, (*args, "fused", out),
                          test_utils=("test_schema", "test_faketensor"))
    # The trailing kernel options (a GEMM pin, autotune) are part of the schema too.
    torch.library.opcheck(torch.ops.moe_kernels.experts_fwd_out.default,
                          (*args, "separate", out, [0, 32, 0, 0, 0, 0], False),
                          test_utils=("test_schema", "test_faketensor"))


def test_out_variant_writes_the_given_buffer_and_matches():
    args, _ = _op_args()
    want, _ = torch.ops.moe_kernels.experts_fwd(*args, False, "fused")
    out = torch.full(args[0].shape, float("nan"), device=DEVICE)
    ptr = out.data_ptr()
    torch.ops.moe_kernels.experts_fwd_out(*args, "fused", out)
    assert out.data_ptr() == ptr and torch.equal(out, want)
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        torch.ops.moe_kernels.experts_fwd_out(*args, "fused", torch.empty(2, 2, device=DEVICE))
