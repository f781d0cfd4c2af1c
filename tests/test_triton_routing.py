"""The Triton routing kernel (moe_kernels.backends.triton.routing) against its pure-PyTorch twin.

Runs in Triton's interpreter on CPU tensors without a GPU (tests/conftest.py sets
TRITON_INTERPRET=1), on the GPU otherwise. Ids and counts must match exactly (ties
included); weights and gradients to float32 rounding.
"""

import pytest
import torch

from triton_interp import DEVICE, assert_no_poison, import_or_skip, poison_empty

import_or_skip()

from moe_kernels import routing as R  # noqa: E402
from moe_kernels.backends.triton import routing as TR  # noqa: E402
from moe_kernels.primitives import fused_topk_args  # noqa: E402
from moe_kernels.backends.triton.routing import fused_topk, fused_topk_torch, route_fused  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _logits(t, e, dtype=torch.float32, kind="randn"):
    if kind == "randn":
        x = torch.randn(t, e) * 2
    elif kind == "ties":  # three values only: most rows have tied experts (and tied groups).
        # No two values with s(a) + s(b) == s(c) + s(d) unless {a, b} == {c, d} (as -1, 0, 1
        # would: s(1) + s(-1) == 2 s(0)), so every tie is exact in any exp implementation.
        x = torch.tensor([-1.0, 0.25, 1.5])[torch.randint(0, 3, (t, e))]
    elif kind == "one_expert":  # every token prefers expert 2; expert 0 never chosen
        x = torch.randn(t, e)
        x[:, 2] += 20.0
        x[:, 0] -= 20.0
    return x.to(dtype).to(DEVICE)


def _check(got, want, name):
    ids, w, counts = got
    rids, rw, rcounts = want
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and counts.dtype == torch.int32
    assert torch.equal(ids, rids), f"{name}: ids differ"
    torch.testing.assert_close(w, rw, atol=2e-6, rtol=2e-6, msg=lambda m: f"{name}: weights: {m}")
    assert torch.equal(counts, rcounts), f"{name}: counts differ"


SOFTMAX_CASES = [
    # (T, E, k, renormalize, dtype, logits kind)    edge covered
    pytest.param(1, 13, 6, True, "fp32", "randn", id="T1-prime-E-k6"),
    pytest.param(33, 8, 2, True, "fp32", "randn", id="T33-one-program-counts"),
    pytest.param(222, 13, 1, False, "fp32", "randn", id="T222-k1-no-renorm-atomic-counts"),
    pytest.param(64, 4, 2, True, "fp16", "randn", id="fp16-logits"),
    pytest.param(33, 13, 2, True, "bf16", "randn", id="bf16-logits"),
    pytest.param(64, 8, 6, False, "fp32", "ties", id="ties-lowest-index-first"),
    pytest.param(33, 8, 2, True, "fp16", "one_expert", id="all-tokens-one-expert+empty-expert"),
    pytest.param(9, 512, 32, True, "fp32", "randn", id="E512-k32-two-programs"),
]


@pytest.mark.parametrize("t,e,k,renorm,dtype,kind", SOFTMAX_CASES)
def test_softmax_matches_twin(monkeypatch, t, e, k, renorm, dtype, kind):
    poison_empty(monkeypatch, TR)
    x = _logits(t, e, DTYPES[dtype], kind)
    got = fused_topk(x, k, renormalize=renorm)
    for name, v in zip(("ids", "weights", "counts"), got):
        assert_no_poison(v, name)
    _check(got, fused_topk_torch(x, k, renormalize=renorm), "softmax")
    if kind == "one_expert":
        assert int(got[2][2]) == t and int(got[2][0]) == 0


SIGMOID_CASES = [
    # (T, E, k, n_group, topk_group, bias, scale, renorm, kind)    edge covered
    pytest.param(64, 64, 6, 8, 3, True, 2.5, True, "randn", id="deepseek-like-groups-bias-scale"),
    pytest.param(33, 8, 2, 1, 1, False, 1.0, False, "randn", id="plain-sigmoid-no-renorm"),
    pytest.param(1, 16, 4, 4, 2, True, 1.0, True, "randn", id="T1-groups"),
    pytest.param(33, 8, 3, 8, 4, False, 1.0, True, "randn", id="groups-of-one-expert"),
    pytest.param(65, 12, 4, 4, 2, False, 1.0, True, "ties", id="ties-in-groups-and-experts-atomic"),
    pytest.param(33, 13, 2, 1, 1, True, 1.0, True, "one_expert", id="all-tokens-one-expert-prime-E"),
]


@pytest.mark.parametrize("t,e,k,ng,tg,bias,scale,renorm,kind", SIGMOID_CASES)
def test_sigmoid_matches_twin(monkeypatch, t, e, k, ng, tg, bias, scale, renorm, kind):
    poison_empty(monkeypatch, TR)
    x = _logits(t, e, torch.float32, kind)
    b = (torch.randn(e) * 0.1).to(DEVICE) if bias else None
    kw = dict(router="grouped_sigmoid_topk", bias=b, n_group=ng, topk_group=tg, routed_scaling_factor=scale, renormalize=renorm)
    got = fused_topk(x, k, **kw)
    for name, v in zip(("ids", "weights", "counts"), got):
        assert_no_poison(v, name)
    _check(got, fused_topk_torch(x, k, **kw), "sigmoid")


def test_empty_batch():
    # T = 0: no launch, empty outputs, zero counts, an empty gradient
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    ids, w, counts = fused_topk(x, 2, router="grouped_sigmoid_topk")
    assert ids.shape == (0, 2) and w.shape == (0, 2) and torch.equal(counts, torch.zeros_like(counts))
    w.sum().backward()
    assert x.grad.shape == (0, 8)


def test_bias_changes_choice_not_weights():
    # A large bias on expert 5 must select it for every token, with its sigmoid weight.
    x = _logits(16, 8)
    b = torch.zeros(8, device=DEVICE)
    b[5] = 10.0
    ids, w, _ = fused_topk(x, 2, router="grouped_sigmoid_topk", bias=b, renormalize=False)
    assert bool((ids == 5).any(dim=1).all())
    pick = (ids == 5).int().argmax(dim=1)
    torch.testing.assert_close(w.gather(1, pick[:, None])[:, 0], torch.sigmoid(x[:, 5].float()))


def test_strided_logits():
    # logits as a column slice of a wider tensor (row stride != E)
    wide = torch.randn(33, 20, device=DEVICE)
    x = wide[:, 3:16]
    _check(fused_topk(x, 3), fused_topk_torch(x.contiguous(), 3), "strided")


GRAD_CASES = [
    pytest.param("softmax_topk", True, 1.0, 1, 1, "fp32", id="softmax-renorm"),
    pytest.param("softmax_topk", False, 1.0, 1, 1, "fp32", id="softmax-no-renorm"),
    pytest.param("softmax_topk", True, 1.0, 1, 1, "fp16", id="softmax-fp16"),
    pytest.param("grouped_sigmoid_topk", True, 2.5, 4, 2, "fp32", id="sigmoid-renorm-groups-scale"),
    pytest.param("grouped_sigmoid_topk", False, 1.0, 1, 1, "fp32", id="sigmoid-no-renorm"),
]


@pytest.mark.parametrize("scoring,renorm,scale,ng,tg,dtype", GRAD_CASES)
def test_gradient_matches_twin_autograd(monkeypatch, scoring, renorm, scale, ng, tg, dtype):
    poison_empty(monkeypatch, TR)
    t, e, k = 37, 12, 3
    x = _logits(t, e, DTYPES[dtype])
    bias = (torch.randn(e) * 0.1).to(DEVICE) if scoring == "grouped_sigmoid_topk" else None
    kw = dict(router=scoring, renormalize=renorm, bias=bias, n_group=ng, topk_group=tg, routed_scaling_factor=scale)
    g = torch.randn(t, k, device=DEVICE)
    x1 = x.clone().requires_grad_(True)
    ids, w, _ = fused_topk(x1, k, **kw)
    (w * g).sum().backward()
    x2 = x.clone().requires_grad_(True)
    rids, rw, _ = fused_topk_torch(x2, k, **kw)
    (rw * g).sum().backward()
    assert torch.equal(ids, rids)
    assert x1.grad.dtype == x.dtype
    assert_no_poison(x1.grad, "dlogits")
    tol = 1e-5 if dtype == "fp32" else 1e-3
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), atol=tol, rtol=tol)
    assert float(x1.grad.abs().max()) > 0


def test_route_fused_is_the_reference_routing(monkeypatch):
    poison_empty(monkeypatch, TR)
    x = _logits(33, 13)
    r = route_fused(x, fused_topk_args("softmax_topk", {"top_k": 4}))
    assert_no_poison(r.slot_token, "slot_token")
    ref = R.softmax_topk(x, 4)
    assert torch.equal(r.slot_token, ref.slot_token) and torch.equal(r.slot_expert, ref.slot_expert)
    torch.testing.assert_close(r.slot_weight, ref.slot_weight.float())
    assert r.top_k == 4 and r.max_slots_per_token == 4 and r.num_experts == 13
    torch.testing.assert_close(r.losses["load_balancing"], ref.losses["load_balancing"].float())


def test_custom_op_registration():
    # schema, fake implementation and autograd registration all consistent
    x = _logits(9, 8).requires_grad_(True)
    torch.library.opcheck(torch.ops.moe_kernels.topk_route.default, (x, None, 2, False, True, 1, 1, 1.0, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    ids = fused_topk(x.detach(), 2)[0]
    torch.library.opcheck(torch.ops.moe_kernels.topk_route_backward.default,
                          (x.detach(), ids, torch.randn(9, 2, device=DEVICE), True, True, 2.0),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_traces():
    x = _logits(17, 8).requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(logits):
        ids, w, counts = fused_topk(logits, 2, router="grouped_sigmoid_topk", n_group=2, topk_group=1)
        return w.sum(), ids, counts

    loss, ids, counts = f(x)
    loss.backward()
    rids, rw, rcounts = fused_topk_torch(x.detach(), 2, router="grouped_sigmoid_topk", n_group=2, topk_group=1)
    assert torch.equal(ids, rids) and torch.equal(counts, rcounts)
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=9), "top_k"),
    (dict(top_k=2, router="tanh"), "router"),
    (dict(top_k=2, bias=torch.zeros(8)), "bias"),
    (dict(top_k=2, router="grouped_sigmoid_topk", n_group=3), "n_group"),
    (dict(top_k=2, router="grouped_sigmoid_topk", n_group=2, topk_group=3), "topk_group"),
    (dict(top_k=5, router="grouped_sigmoid_topk", n_group=4, topk_group=2), "top_k"),
    (dict(top_k=2, router="grouped_sigmoid_topk", bias=torch.zeros(7)), "bias"),
    (dict(top_k=2, routed_scaling_factor=0.0), "routed_scaling_factor"),
])
def test_bad_arguments(kwargs, match):
    x = _logits(4, 8)
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        fused_topk(x, **kwargs)
    with pytest.raises(ValueError, match=match):
        fused_topk_torch(x, **kwargs)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        fused_topk(torch.randn(4, 8, dtype=torch.float64, device=DEVICE), 2)
    with pytest.raises(ValueError, match="number of experts"):
        fused_topk(torch.randn(2, 1025, device=DEVICE), 2)
    with pytest.raises(ValueError, match="logits"):
        fused_topk(torch.randn(8, device=DEVICE), 2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN rows, in the interpreter
@pytest.mark.parametrize("scoring,e,inf", [
    pytest.param("softmax_topk", 8, False, id="softmax-nan-row-E8-BLOCK_E16"),
    pytest.param("softmax_topk", 16, True, id="softmax-inf-logit-E-pow2"),
    pytest.param("grouped_sigmoid_topk", 13, False, id="sigmoid-nan-row-prime-E"),
])
def test_nan_rows_are_dropped_never_past_E(monkeypatch, scoring, e, inf):
    """A NaN row (the public API rejects NaN only where it can check, on the CPU, so the
    launcher is called directly): every id is E, every weight 0, no counts, zero
    gradient; the other rows are untouched. Without the clamp a NaN row's argmax finds
    no column holding the (NaN-ignoring) max, or only padding columns: ids >= E, and
    weights NaN."""
    poison_empty(monkeypatch, TR)
    t, k = 37, 3
    x = _logits(t, e)
    bad_rows = [0, 5, 36]  # the first, one inside, the last (tail of the second program)
    x[0, 2] = float("nan")  # one NaN logit
    x[5] = float("nan")  # a whole NaN row
    x[36, 1] = float("inf") if inf else float("nan")
    sig = scoring == "grouped_sigmoid_topk"
    ids, w, counts, tok = TR._launch_fwd(x, None, k, sig, True, 1, 1, 1.0, True)
    assert int(ids.max()) <= e, f"ids past the dropped sentinel E={e}: {ids[bad_rows].tolist()}"
    assert (ids[bad_rows] == e).all(), ids[bad_rows].tolist()
    assert (w[bad_rows] == 0).all(), f"a dropped row's weights must be 0, got {w[bad_rows].tolist()}"
    for name, v in (("ids", ids), ("weights", w), ("counts", counts), ("tokens", tok)):
        assert_no_poison(v, name)
    good = torch.ones(t, dtype=torch.bool, device=DEVICE)
    good[bad_rows] = False
    rids, rw, _ = fused_topk_torch(x[good], k, router=scoring)
    _check((ids[good], w[good], counts), (rids, rw, torch.bincount(rids.view(-1).long(), minlength=e).int()),
           "good rows")
    if inf and not sig:
        return
    g = torch.randn(t, k, device=DEVICE)
    dx = TR._launch_bwd(x, ids, g, sig, True, 1.0)
    assert_no_poison(dx[good], "dlogits")
    assert (dx[bad_rows] == 0).all(), "a dropped row's weights are constant zeros"
    assert torch.isfinite(dx[good]).all()
