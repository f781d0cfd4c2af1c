"""The CPU matmul forms of one expert segment (moe_kernels/segment_matmul.py) and the
torch backend's gathered-weights decode path: each pinned against the reference (values
and gradients), the form table, bitwise repeatability at two threads, and the fallbacks."""

import pytest
import torch

import moe_kernels.backends.torch.planless as tex
import moe_kernels.primitives as prim
import moe_kernels.segment_matmul as sm
from moe_kernels import expert_params, fused_experts, moe_reference
from moe_kernels.routing import Routing, softmax_topk, switch
from moe_kernels.testing import assert_close, random_weights


@pytest.fixture
def form(request):
    # The loop method (the one that runs segment forms), on the segments path.
    sm._forced_form, prim._forced_method, tex._forced_path = request.param, "loop", "segments"
    yield request.param
    sm._forced_form, prim._forced_method, tex._forced_path = None, None, None


def _weights(e, h, i, dtype, bias, transposed, gen):
    return random_weights(e, h, i, bias=bias, dtype=dtype, transposed=transposed, generator=gen, requires_grad=True)


def _routing(t, e, gen, *, k=2, skew=None, drop=False):
    logits = torch.randn(t, e, generator=gen)
    if skew is not None:
        for ex, boost in skew.items():
            logits[:, ex] += boost
    r = switch(logits, capacity_factor=1.0) if drop else softmax_topk(logits, top_k=k)
    sw = r.slot_weight.detach().requires_grad_()
    return Routing(r.slot_token, r.slot_expert, sw, r.num_tokens, r.num_experts, r.max_slots_per_token, top_k=r.top_k)


def _check(params, x, r, leaves, dtype=torch.float32):
    gen = torch.Generator().manual_seed(99)
    dout = torch.randn(x.shape, generator=gen).to(dtype)
    live = [v for v in leaves if v is not None]
    got = fused_experts(x, r, params, backend="torch")
    want = moe_reference(x, r, params)
    assert_close(got, want, dtype)
    for g, w in zip(torch.autograd.grad(got, live, dout), torch.autograd.grad(want, live, dout)):
        assert_close(g, w, dtype, scale=max(1.0, w.abs().max().item()), name="grad")


# Segment sizes cover each form's range: 1 row, 2-4, 5-15 and 16+ rows per expert.
CASES = [
    dict(t=1, e=7, transposed=True, bias=True, act="swiglu_oai"),   # T = 1: one row per expert, GPT-OSS layout
    dict(t=13, e=7, skew={4: -50.0}),                               # 2-6 rows; expert 4 gets no token (E prime)
    dict(t=40, e=5, bias=True),                                      # ~16 rows per expert
    dict(t=23, e=11, skew={3: 50.0, 5: 40.0}, bias=True),           # all tokens to experts 3 and 5 (23 rows each)
    dict(t=29, e=7, drop=True, bias=True),                           # Switch over capacity: dropped slots
]


@pytest.mark.parametrize("form", sm.SEGMENT_FORMS, indirect=True)
@pytest.mark.parametrize("case", CASES)
def test_each_form_matches_reference(form, case):
    gen = torch.Generator().manual_seed(case["t"] * 7 + case["e"])
    h, i = 24, 20  # not multiples of 16
    w13, w2, b13, b2 = _weights(case["e"], h, i, torch.float32, case.get("bias", False), case.get("transposed", False), gen)
    params = expert_params(w13, w2, b13, b2, transposed=case.get("transposed", False),
                           interleaved=case.get("act") == "swiglu_oai", activation=case.get("act", "swiglu"))
    x = torch.randn(case["t"], h, generator=gen, requires_grad=True)
    r = _routing(case["t"], case["e"], gen, skew=case.get("skew"), drop=case.get("drop", False))
    if case.get("drop"):
        assert int((r.slot_expert == case["e"]).sum()) > 0  # the case really drops slots
    _check(params, x, r, [x, w13, w2, b13, b2, r.slot_weight])


def test_form_table():
    # What segment_form picks (float32; the thresholds of segment_matmul's docstring).
    tiny = torch.empty(96, 128)                   # 12K elements: plain mm, or oneDNN's fixed cost would show
    small = torch.empty(176, 176)                 # 31K: mm; oneDNN from 32 rows
    mid_fm = torch.empty(128, 448)                # 57K: feature-major to 8 rows, oneDNN from 32 rows
    mid = torch.empty(256, 448)                   # 112K: oneDNN from 5 rows, not for one row
    big = torch.empty(1792, 256)                  # 448K elements (Mixtral small w13)
    dnn = "dnn" if sm.dnn_available() else "mm"
    assert [sm.segment_form(m, tiny) for m in (1, 2, 4, 8, 64)] == ["mm"] * 5
    assert [sm.segment_form(m, small) for m in (1, 2, 8, 31, 32)] == ["mm", "mm", "mm", "mm", "mm"]
    assert [sm.segment_form(m, mid_fm) for m in (1, 2, 4, 8, 9, 31, 32)] == ["mm", "fm", "fm", "fm", "mm", "mm", dnn]
    assert [sm.segment_form(m, mid) for m in (1, 3, 5, 64)] == ["mm", "fm", dnn, dnn]
    assert [sm.segment_form(m, big) for m in (1, 2, 4, 5, 64)] == [dnn, "fm", "fm", dnn, dnn]
    # Stored transposed ([K, N] storage viewed as [N, K]): never feature-major.
    big_t = torch.empty(256, 1792).t()
    assert [sm.segment_form(m, big_t) for m in (1, 2, 4, 64)] == ["mm", "mm", dnn, dnn]
    assert [sm.segment_form(m, torch.empty(176, 352).t()) for m in (1, 4, 16, 32)] == ["mm", "mm", "mm", dnn]
    assert [sm.segment_form(m, torch.empty(128, 96).t()) for m in (1, 4, 64)] == ["mm", "mm", "mm"]
    # Other dtypes: plain mm (bf16 mm is oneDNN already).
    assert {sm.segment_form(m, big.to(torch.bfloat16)) for m in (1, 3, 64)} == {"mm"}
    assert {sm.segment_form(m, big.double()) for m in (1, 3, 64)} == {"mm"}


def test_no_onednn_falls_back_to_mm(monkeypatch):
    monkeypatch.setattr(sm, "dnn_available", lambda: False)
    big = torch.empty(1792, 256)
    assert [sm.segment_form(m, big) for m in (1, 3, 8, 64)] == ["mm", "fm", "fm", "mm"]  # fm to 8 rows, then mm
    monkeypatch.setattr(sm, "_forced_form", "dnn")
    assert sm.segment_form(8, big) == "mm"


@pytest.mark.parametrize("form", sm.SEGMENT_FORMS, indirect=True)
def test_form_bitwise_repeatable_two_threads(form, two_threads):
    gen = torch.Generator().manual_seed(5)
    e, h, i, t = 6, 64, 48, 300
    w13, w2, b13, b2 = (v.detach() for v in _weights(e, h, i, torch.float32, True, False, gen))
    params = expert_params(w13, w2, b13, b2)
    x = torch.randn(t, h, generator=gen)
    r = softmax_topk(torch.randn(t, e, generator=gen), top_k=2)
    first = fused_experts(x, r, params, backend="torch")
    for _ in range(8):
        assert torch.equal(fused_experts(x, r, params, backend="torch"), first)


def test_planless_path_is_chosen_from_shapes(monkeypatch):
    # Shapes only: torch.empty weights (planless_path reads no value). The library paths,
    # as chosen where the compiled kernel is not built (its own choice: test_cpu_kernel.py).
    from moe_kernels import cpu_kernel
    monkeypatch.setattr(cpu_kernel, "_load", lambda: (None, "not built (test)"))
    def params(e, h, i):
        return expert_params(torch.empty(e, 2 * i, h), torch.empty(e, h, i))

    small = params(64, 128, 64)       # 96 KiB per expert (w13 + w2)
    large = params(8, 1024, 1024)     # 12 MiB per expert: two slots are over GATHER_MAX_BYTES

    def r(t, e, k):
        return softmax_topk(torch.randn(t, e), top_k=k)

    def x(t, h):
        return torch.randn(t, h)

    with torch.no_grad():
        assert tex.planless_path(x(2, 128), r(2, 64, 8), small) == "gather"      # 16 slots, 1.5 MiB
        assert tex.planless_path(x(8, 128), r(8, 64, 8), small) == "gather"      # S = E = 64
        assert tex.planless_path(x(9, 128), r(9, 64, 8), small) == "grouped"     # S = 72 > E: duplicates
        assert tex.planless_path(x(3, 128), r(3, 16, 8), params(16, 128, 64)) is None  # 16 experts: the loop
        assert tex.planless_path(x(1, 128), r(1, 64, 8), small) == "gather"      # 8 slots, 0.75 MiB: a small copy
        assert tex.planless_path(x(1, 1024), r(1, 8, 1), large) == "slot_order"  # 12 MiB: no copy at decode
        assert tex.planless_path(x(4, 1024), r(4, 8, 2), large) == "slot_order"  # 8 slots
        assert tex.planless_path(x(5, 1024), r(5, 8, 2), large) is None          # 10 slots, 120 MiB
    assert tex.planless_path(x(9, 128), r(9, 64, 8), params(64, 128, 62)) is None  # I = 62: w2 rows unaligned
    # Training: slot order and grouped build no autograd node, so they are not taken; gather is, up to 2 MiB.
    assert tex.planless_path(x(9, 128).requires_grad_(), r(9, 64, 8), small) is None
    assert tex.planless_path(x(1, 1024).requires_grad_(), r(1, 8, 1), large) is None  # 12 MiB of dense copy grads
    assert tex.planless_path(x(1, 1024).requires_grad_(), r(1, 8, 2), large) is None
    assert tex.planless_path(x(2, 128).requires_grad_(), r(2, 64, 8), small) == "gather"


@pytest.mark.parametrize("case", [
    dict(t=1, e=13, k=4, transposed=True, bias=True, act="swiglu_oai"),  # T = 1, GPT-OSS layout, prime E
    dict(t=3, e=5, k=2, drop=True),                                       # a dropped slot, an expert used twice
    dict(t=2, e=7, k=3, norm=True),                                       # post-expert norm (MuseSpark)
    dict(t=16, e=40, k=2, drop=True, bias=True),  # 40 experts: the feature-major grouped matmul, biases, a drop
])
@pytest.mark.parametrize("path", ["gather", "slot_order", "grouped"])
def test_planless_paths_match_reference_through_the_backend(case, path, monkeypatch):
    # fused_experts -> TorchBackend.run: the decode path runs on the routing, no plan.
    from moe_kernels.activations import PostNorm
    from moe_kernels.backends.torch.backend import TorchBackend

    def no_plan(*args, **kwargs):
        raise AssertionError("a decode path built a plan")
    monkeypatch.setattr(TorchBackend, "plan", no_plan)

    gen = torch.Generator().manual_seed(case["t"] + case["e"])
    h, i, e, t, k = 24, 20, case["e"], case["t"], case["k"]
    w13, w2, b13, b2 = (None if v is None else v.detach() for v in _weights(
        e, h, i, torch.float32, case.get("bias", False), case.get("transposed", False), gen))
    params = expert_params(w13, w2, b13, b2, transposed=case.get("transposed", False),
                           interleaved=case.get("act") == "swiglu_oai", activation=case.get("act", "swiglu"))
    if case.get("norm"):
        params = params.with_post_norm(PostNorm(torch.rand(h, generator=gen) - 0.5))
    x = torch.randn(t, h, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    if case.get("drop"):
        ids[1, 0] = e
        ids[2] = ids[0]
    r = Routing.from_topk(ids, torch.rand(t, k, generator=gen), e)
    tex._forced_path = path
    try:
        with torch.no_grad():
            out = fused_experts(x, r, params, backend="torch")
    finally:
        tex._forced_path = None
    assert_close(out, moe_reference(x, r, params), torch.float32)


def test_gather_selects_dropped_slots_away():
    # Edge: a dropped slot computes with expert E-1 and is selected away. Expert E-1 holds
    # inf and no valid slot reaches it: the output must stay finite and match the reference.
    gen = torch.Generator().manual_seed(8)
    e, h, i, t = 5, 16, 12, 6
    w13, w2, b13, b2 = (v.detach() for v in _weights(e, h, i, torch.float32, True, False, gen))
    w13[e - 1] = float("inf")
    params = expert_params(w13, w2, b13, b2)
    x = torch.randn(t, h, generator=gen)
    ids = torch.randint(0, e - 1, (t, 2), generator=gen)
    ids[0, 1], ids[4, 0] = e, e  # dropped slots, first and mid-routing
    r = Routing.from_topk(ids, torch.rand(t, 2, generator=gen), e)
    tex._forced_path = "gather"
    try:
        out = fused_experts(x, r, params, backend="torch")
    finally:
        tex._forced_path = None
    assert torch.isfinite(out).all()
    assert_close(out, moe_reference(x, r, params), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_path_training(dtype):
    # T = 1 and T = 3 (a repeated expert across tokens), GPT-OSS layout: gradients of x,
    # every weight and the slot weights through index_select + bmm.
    gen = torch.Generator().manual_seed(4)
    e, h, i = 13, 24, 20
    w13, w2, b13, b2 = _weights(e, h, i, dtype, True, True, gen)
    params = expert_params(w13, w2, b13, b2, transposed=True, interleaved=True, activation="swiglu_oai")
    tex._forced_path = "gather"
    try:
        for t in (1, 3):
            x = torch.randn(t, h, generator=gen).to(dtype).requires_grad_()
            r = _routing(t, e, gen, k=4)
            r = Routing(r.slot_token, r.slot_expert, r.slot_weight.detach().to(dtype).requires_grad_(), t, e, 4, top_k=4)
            _check(params, x, r, [x, w13, w2, b13, b2, r.slot_weight], dtype)
    finally:
        tex._forced_path = None


def test_gather_path_bitwise_repeatable_two_threads(two_threads, monkeypatch):
    # The gathered weights' gradient is index_select's backward (index_add on the CPU):
    # with experts shared between tokens it must still give the same bits every rerun.
    monkeypatch.setattr(tex, "_forced_path", "gather")
    gen = torch.Generator().manual_seed(12)
    e, h, i, t, k = 6, 48, 40, 5, 4   # 20 slots on 6 experts: every expert repeated
    w13, w2, b13, b2 = _weights(e, h, i, torch.float32, True, False, gen)
    params = expert_params(w13, w2, b13, b2)
    x = torch.randn(t, h, generator=gen, requires_grad=True)
    r = _routing(t, e, gen, k=k)
    dout = torch.randn(t, h, generator=gen)
    leaves = [x, w13, w2, b13, b2, r.slot_weight]

    def run():
        out = fused_experts(x, r, params, backend="torch")
        return [out, *torch.autograd.grad(out, leaves, dout)]
    first = run()
    for _ in range(6):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


@pytest.mark.parametrize("t", [1, 40])  # decode (slot order / gather) and the grouped regime (64 experts)
def test_layer_runs_planless_and_still_reports_the_load(t, monkeypatch):
    # MoE.forward goes through backend.run: at inference on the CPU no plan is built, and
    # last_expert_load is counted from the routing when read (same counts as a plan's).
    from moe_kernels import MoE
    from moe_kernels.backends.torch.backend import TorchBackend
    from moe_kernels.plan import build_plan_torch

    torch.manual_seed(t)
    layer = MoE(hidden_size=32, intermediate_size=16, num_experts=64, top_k=4, backend="torch")
    x = torch.randn(t, 32)

    def no_plan(*args, **kwargs):
        raise AssertionError("the layer built a plan on a planless path")
    monkeypatch.setattr(TorchBackend, "plan", no_plan)
    with torch.no_grad():
        got = layer(x)
        r = layer.route(x, TorchBackend())
        want = moe_reference(x, r, layer._expert_params(torch.float32))
    assert_close(got, want, torch.float32)
    load = layer.last_expert_load
    assert load.dtype == torch.int32 and not load.requires_grad
    assert torch.equal(load, build_plan_torch(r, 1).expert_counts)
