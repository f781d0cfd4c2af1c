"""The torch backend's grouped-matmul methods (a loop over the active experts,
``torch._grouped_mm`` token-major and feature-major) and its gathered-weights decode
path, each pinned: value and gradients against the reference,
bitwise repeatability at a fixed thread count, host reads on the hot path, and
``torch.compile(fullgraph=True)`` of the layer on every path the dispatcher can choose."""

import pytest
import torch

import moe_kernels.primitives as prim
from moe_kernels import MoE, expert_params, fused_experts, moe_reference
from moe_kernels.plan import build_plan_torch
from moe_kernels.routing import Routing, softmax_topk, switch
from moe_kernels.testing import assert_close, random_weights

# The grouped-matmul methods, and the decode path that gathers each slot's weights
# instead (backends/torch/experts.py); "segments" pins the grouped path off.
METHODS = [*prim.GROUPED_METHODS, "gather"]


@pytest.fixture
def method(request):
    import moe_kernels.backends.torch.planless as tex

    tex._forced_path = "gather" if request.param == "gather" else "segments"
    prim._forced_method = None if request.param == "gather" else request.param
    yield request.param
    prim._forced_method = None
    tex._forced_path = None


def weights(e, h, i, dtype, bias, transposed, gen):
    return list(random_weights(e, h, i, bias=bias, dtype=dtype, transposed=transposed, generator=gen,
                               requires_grad=True))


def grads(out_fn, leaves, dout):
    out = out_fn()
    live = [v for v in leaves if v is not None]
    return [out, *torch.autograd.grad(out, live, dout)]


# H, I multiples of 4 so torch._grouped_mm takes fp32 operands (16-byte rows); E = 7 prime.
@pytest.mark.parametrize("method", METHODS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(t=1, bias=True, transposed=True),     # T = 1: a single token, GPT-OSS layout with biases
    dict(t=13, bias=False, transposed=False),  # odd T; with E=7, k=2 some expert gets no token
    dict(t=40, bias=True, transposed=False, all_to_one=True),  # every token to experts 3 and 5 only
    dict(t=29, bias=True, transposed=False, drop=True),  # Switch over capacity: dropped slots
])
def test_method_matches_reference(method, dtype, case):
    gen = torch.Generator().manual_seed(7)
    e, h, i = 7, 24, 20
    t = case["t"]
    w13, w2, b13, b2 = weights(e, h, i, dtype, case["bias"], case["transposed"], gen)
    params = expert_params(w13, w2, b13, b2, transposed=case["transposed"])
    x = torch.randn(t, h, generator=gen).to(dtype).requires_grad_()
    logits = torch.randn(t, e, generator=gen)
    if case.get("all_to_one"):
        logits[:, 3] += 50
        logits[:, 5] += 40
    if case.get("drop"):
        r = switch(logits, capacity_factor=1.0)
        assert int((r.slot_expert == e).sum()) > 0  # the case really drops slots
    else:
        if case["t"] == 13:
            logits[:, 4] -= 50  # expert 4 gets no token
        r = softmax_topk(logits, top_k=2)
    sw = r.slot_weight.detach().to(dtype).requires_grad_()
    r = Routing(r.slot_token, r.slot_expert, sw, r.num_tokens, r.num_experts, r.max_slots_per_token, top_k=r.top_k)
    dout = torch.randn(t, h, generator=gen).to(dtype)
    leaves = [x, w13, w2, b13, b2, sw]
    got = grads(lambda: fused_experts(x, r, params, backend="torch"), leaves, dout)
    want = grads(lambda: moe_reference(x, r, params), leaves, dout)
    assert_close(got[0], want[0], dtype)
    for g, w in zip(got[1:], want[1:]):  # gradients: tolerance relative to their size, as in test_torch_backend
        assert_close(g, w, dtype, scale=max(1.0, w.abs().max().item()), name="grad")


def _fwd_bwd(x, r, params, dout):
    out = fused_experts(x, r, params, backend="torch")
    return [out, *torch.autograd.grad(out, [x, params.w13, params.w2, params.b13, params.b2, r.slot_weight], dout)]


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_bitwise_repeatable_two_threads(method, two_threads):
    # Many slots per expert and 2 threads: the old bias gather's backward (index_put with
    # accumulate: parallel atomics on the CPU) gave a different b2.grad between reruns.
    gen = torch.Generator().manual_seed(3)
    e, h, i, t = 4, 32, 16, 2048
    w13, w2, b13, b2 = weights(e, h, i, torch.float32, True, False, gen)
    params = expert_params(w13, w2, b13, b2)
    x = torch.randn(t, h, generator=gen, requires_grad=True)
    r = softmax_topk(torch.randn(t, e, generator=gen), top_k=2)
    r = Routing(r.slot_token, r.slot_expert, r.slot_weight.detach().requires_grad_(), t, e, 2, top_k=2)
    dout = torch.randn(t, h, generator=gen)
    first = _fwd_bwd(x, r, params, dout)
    for _ in range(12):
        again = _fwd_bwd(x, r, params, dout)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts tensor → Python reads (item, tolist, bool/int/float of a tensor)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("t,e,k", [(1, 32, 4), (16, 64, 8), (128, 8, 2)])  # loop, grouped_mm, loop
def test_one_host_read_per_call(t, e, k, monkeypatch):
    # The hot path reads the expert offsets once (shared by both matmuls); value checks
    # live at the API boundary (and in debug mode, which this test turns off). Before: 73
    # reads per call at T=1, E=32.
    monkeypatch.delenv("MOE_KERNELS_DEBUG", raising=False)
    gen = torch.Generator().manual_seed(0)
    h, i = 32, 16
    params = expert_params(*weights(e, h, i, torch.float32, True, True, gen), transposed=True, interleaved=True,
                           activation="swiglu_oai")
    x = torch.randn(t, h, generator=gen)
    r = softmax_topk(torch.randn(t, e, generator=gen), top_k=k)
    with torch.no_grad(), HostReads() as reads:
        out = fused_experts(x, r, params, backend="torch")
    assert reads.count <= 1, reads.count
    assert_close(out, moe_reference(x, r, params).detach(), torch.float32)


@pytest.mark.parametrize("method", METHODS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_compiles_fullgraph(method, dtype):
    # Dynamo's fake-tensor pass rejected torch._grouped_mm on float32 CPU operands, and
    # the loop's host read broke the graph: both now run as opaque custom ops.
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoE(hidden_size=32, intermediate_size=16, num_experts=6, top_k=2, backend="torch", bias=True,
                dtype=dtype)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    dx, dw = torch.autograd.grad(out.float().square().sum(), [x, layer.w13])
    ref = layer(x)
    rdx, rdw = torch.autograd.grad(ref.float().square().sum(), [x, layer.w13])
    assert_close(out, ref, dtype)
    assert_close(dx, rdx, dtype)
    assert_close(dw, rdw, dtype)


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_frozen_experts_gradient_of_x_only(method):
    # Weights that do not require grad: the backward computes dx alone and still matches.
    gen = torch.Generator().manual_seed(5)
    w13, w2, b13, b2 = [v.detach() for v in weights(5, 16, 12, torch.float32, True, True, gen)]
    params = expert_params(w13, w2, b13, b2, transposed=True)
    x = torch.randn(9, 16, generator=gen, requires_grad=True)
    r = softmax_topk(torch.randn(9, 5, generator=gen), top_k=2)
    dout = torch.randn(9, 16, generator=gen)
    (got,) = torch.autograd.grad(fused_experts(x, r, params, backend="torch"), [x], dout)
    (want,) = torch.autograd.grad(moe_reference(x, r, params), [x], dout)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("t,e,k,drop", [(1, 8, 2, False), (3, 5, 2, True), (8, 256, 8, False), (7, 13, 3, True)])
def test_cpu_plan_paths_agree(t, e, k, drop):
    # The torch backend's CPU plan (one-row blocks): the host path for few slots, the
    # tensor path, and the general builder give the same fields, all valid.
    from moe_kernels.plan import PLAN_INDEX_FIELDS, _build_plan_rows_cpu, _build_plan_rows_host

    gen = torch.Generator().manual_seed(t * 100 + e)
    ids = torch.randint(0, e, (t, k), generator=gen)
    if drop:  # sentinel ids: dropped slots, first and mid-row
        ids[0, 1], ids[-1, 0] = e + 3, -1
    r = Routing.from_topk(ids, torch.rand(t, k, generator=gen), e)
    host, tens = _build_plan_rows_host(r), _build_plan_rows_cpu(r)
    for f in PLAN_INDEX_FIELDS:
        assert torch.equal(getattr(host, f), getattr(tens, f)), f
    assert host.host_offsets == tens.host_offsets == tens.expert_offsets.tolist()
    host.check_values()
    tens.check_values()
    general = build_plan_torch(r, 2)  # the general builder (two-row blocks): same sort and counts
    for f in ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "token_slots"):
        assert torch.equal(getattr(general, f), getattr(host, f)), f


def test_trusted_plan_matches_checked_constructor(monkeypatch):
    # The CPU builders skip the frozen __init__ and the shape loop (_trusted): the plan
    # must hold exactly what from_fields would, and debug mode must still check it.
    from moe_kernels.plan import PLAN_INDEX_FIELDS, DispatchPlan, _build_plan_rows_host

    monkeypatch.delenv("MOE_KERNELS_DEBUG", raising=False)  # the suite may run in debug mode
    gen = torch.Generator().manual_seed(3)
    e, t, k = 13, 3, 2  # prime E, an expert with no tokens
    ids = torch.randint(0, e, (t, k), generator=gen)
    ids[1, 0] = e  # a dropped slot mid-routing
    r = Routing.from_topk(ids, torch.rand(t, k, generator=gen), e)
    fast = _build_plan_rows_host(r)
    fields = [getattr(fast, f) for f in PLAN_INDEX_FIELDS]
    slow = DispatchPlan.from_fields(r, 1, fields)
    for f in ("num_tokens", "num_experts", "block_m", "max_slots_per_token", "top_k", "slot_token",
              "slot_expert", "slot_weight", *PLAN_INDEX_FIELDS):
        assert getattr(fast, f) is getattr(slow, f), f
    assert fast.host_offsets == fast.expert_offsets.tolist() and slow.host_offsets is None
    assert all(v.dtype == torch.int32 for v in fields)
    fast.check_values()
    bad = list(fields)
    bad[PLAN_INDEX_FIELDS.index("slot_position")] = fields[2].flip(0)  # invariant 2 broken
    DispatchPlan._trusted(r, 1, bad)  # trusted: no check outside debug mode
    monkeypatch.setenv("MOE_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="invariant violated"):
        DispatchPlan._trusted(r, 1, bad)
    bad[PLAN_INDEX_FIELDS.index("expert_counts")] = fields[0].long()
    with pytest.raises(ValueError, match="expected int32"):
        DispatchPlan._trusted(r, 1, bad)


def test_shared_segments_match_per_call_ones():
    # experts_torch passes both matmuls one list of non-empty segments: the same result,
    # bitwise, as each matmul finding them itself (E = 256 with 8 active: the list is short).
    from moe_kernels.primitives import active_segments, grouped_linear

    gen = torch.Generator().manual_seed(11)
    e, t, k, h, n = 256, 1, 8, 24, 20
    r = softmax_topk(torch.randn(t, e, generator=gen), top_k=k)
    plan = build_plan_torch(r, 1)
    offs = plan.expert_offsets.tolist()
    segs = active_segments(offs)
    assert [ex for ex, _, _ in segs] == sorted(set(r.slot_expert.tolist()))
    assert all(hi - lo == offs[ex + 1] - offs[ex] > 0 for ex, lo, hi in segs)
    a = torch.randn(t * k, h, generator=gen, requires_grad=True)
    w = torch.randn(e, n, h, generator=gen, requires_grad=True)
    b = torch.randn(e, n, generator=gen, requires_grad=True)
    g = torch.randn(t * k, n, generator=gen)
    shared = grouped_linear(a, w, b, plan, method="loop", offsets=offs, segments=segs)
    own = grouped_linear(a, w, b, plan, method="loop")
    assert torch.equal(shared, own)
    assert all(torch.equal(u, v) for u, v in zip(torch.autograd.grad(shared, [a, w, b], g),
                                                 torch.autograd.grad(own, [a, w, b], g)))
    ref = torch.stack([a[p] @ w[ex].t() + b[ex] for p, ex in enumerate(r.slot_expert[plan.sorted_slot.long()].tolist())])
    torch.testing.assert_close(own, ref)
