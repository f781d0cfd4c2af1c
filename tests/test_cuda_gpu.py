"""Every CUDA kernel against its pure-PyTorch twin, on a GPU (skipped without one).

Outputs are poisoned first (NaN / -7 / 12345 sentinels) by calling the raw module
moe_kernels._C on preallocated buffers, so an element a kernel fails to write shows
up. References are the twins run on CPU copies of the inputs. Routing weights are
compared with a tolerance (the kernel's expf and sum order differ from torch's); ids,
counts, every plan field, permuted rows and combined rows (fp32 sum in a fixed order,
no FMA: bit for bit) exactly.

MOE_KERNELS_GPU_TEST_DEVICE=cpu runs the same test bodies with the twins standing in
for the kernels (a check of the tests themselves; conftest skips the gpu marker
without CUDA, so call the functions directly).
"""

import os

import pytest
import torch

from moe_kernels.backends import cuda as cb
from moe_kernels.backends.cuda import extension as cops
from moe_kernels.backends.cuda import twins as tw
from moe_kernels import expert_params, moe, moe_reference
from moe_kernels.plan import DispatchPlan, build_plan_torch, max_padded_rows
from moe_kernels.routing import Routing, expert_choice, softmax_topk, switch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device(os.environ.get("MOE_KERNELS_GPU_TEST_DEVICE", "cuda"))
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PLAN_FIELDS = ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "padded_offsets", "padded_slot",
               "block_expert", "token_slots")


def _ext():
    if cops._C is None:
        pytest.fail(f"moe_kernels._C is not built on this GPU machine: {cops._C_ERROR}")
    return cops._C


def _launch(t: torch.Tensor):
    return t.device.index if t.device.index is not None else torch.cuda.current_device(), \
        torch.cuda.current_stream(t.device).cuda_stream


def _i32(shape, fill=-7):
    return torch.full(shape, fill, dtype=torch.int32, device=DEV)


# Raw kernel calls on poisoned outputs (the twin itself when DEV is the CPU).

def kernel_route_softmax(logits, k, renorm):
    if DEV.type != "cuda":
        return tw.route_softmax_topk(logits, k, renorm)
    t, e = logits.shape
    ids, w, counts = _i32((t, k)), torch.full((t, k), float("nan"), device=DEV), _i32((e,), 12345)
    _ext().route_softmax_topk(logits.data_ptr(), ids.data_ptr(), w.data_ptr(), counts.data_ptr(), t, e, k, renorm,
                              CODE[logits.dtype], *_launch(logits))
    torch.cuda.synchronize()
    return ids, w, counts


def kernel_route_grouped(logits, bias, k, ng, tg, scale, renorm):
    if DEV.type != "cuda":
        return tw.route_grouped_sigmoid_topk(logits, bias, k, ng, tg, scale, renorm)
    t, e = logits.shape
    ids, w, counts = _i32((t, k)), torch.full((t, k), float("nan"), device=DEV), _i32((e,), 12345)
    _ext().route_grouped_sigmoid_topk(logits.data_ptr(), 0 if bias is None else bias.data_ptr(), ids.data_ptr(),
                                      w.data_ptr(), counts.data_ptr(), t, e, k, ng, tg, scale, renorm,
                                      CODE[logits.dtype], *_launch(logits))
    torch.cuda.synchronize()
    return ids, w, counts


def kernel_plan(r: Routing, block_m: int):
    top_k = r.top_k or 0
    if DEV.type != "cuda":
        return tw.build_plan(r.slot_expert, r.slot_token, r.num_tokens, r.num_experts, r.max_slots_per_token,
                             top_k, block_m)
    s, e, t, k = r.num_slots, r.num_experts, r.num_tokens, r.max_slots_per_token
    p = max_padded_rows(s, e, block_m)
    out = (_i32((e,)), _i32((e + 1,)), _i32((s,)), _i32((s,)), _i32((e + 1,)), _i32((p,)), _i32((p // block_m,)),
           _i32((t, k)))
    fill = _i32((max(t, 1),), 99)
    words = _ext().plan_scratch_words(s, e)
    scratch = _i32((max(words, 1),), 77)
    _ext().build_plan(r.slot_expert.data_ptr(), r.slot_token.data_ptr(), *[o.data_ptr() for o in out],
                      fill.data_ptr(), scratch.data_ptr(), words, s, e, t, k, top_k, block_m, p,
                      *_launch(r.slot_expert))
    torch.cuda.synchronize()
    return out


def kernel_permute(x, slot_token, row_slot):
    if DEV.type != "cuda":
        return tw.permute_rows(x, slot_token, row_slot)
    out = torch.full((row_slot.shape[0], x.shape[1]), float("nan"), dtype=x.dtype, device=DEV)
    _ext().permute_rows(x.data_ptr(), slot_token.data_ptr(), row_slot.data_ptr(), out.data_ptr(), row_slot.shape[0],
                        x.shape[1], x.element_size(), slot_token.shape[0], x.shape[0], 0, *_launch(x))
    torch.cuda.synchronize()
    return out


def kernel_unpermute(y, slot_row, token_slots, w):
    if DEV.type != "cuda":
        return tw.unpermute_rows(y, slot_row, token_slots, w)
    t, k = token_slots.shape
    out = torch.full((t, y.shape[1]), float("nan"), dtype=y.dtype, device=DEV)
    _ext().unpermute_rows(y.data_ptr(), 0 if slot_row is None else slot_row.data_ptr(), token_slots.data_ptr(),
                          w.data_ptr(), out.data_ptr(), t, k, y.shape[1], CODE[y.dtype], w.shape[0], y.shape[0], 0,
                          *_launch(y))
    torch.cuda.synchronize()
    return out


# --------------------------------------------------------------------------- routing

ROUTE_CASES = [
    pytest.param(1, 8, 2, True, torch.float32, id="T1"),
    pytest.param(77, 13, 3, False, torch.float32, id="E-prime-no-renorm"),
    pytest.param(130, 64, 8, True, torch.float16, id="fp16"),
    pytest.param(65, 37, 5, True, torch.bfloat16, id="bf16-E-prime"),
    pytest.param(64, 512, 32, True, torch.float32, id="E512-k32"),
    pytest.param(33, 512, 32, False, torch.bfloat16, id="E512-k32-bf16"),
    pytest.param(9, 1, 1, True, torch.float32, id="E1"),
    pytest.param(10, 200, 7, True, torch.float32, id="E-not-pow2-vpt8"),
]


@pytest.mark.parametrize("t,e,k,renorm,dtype", ROUTE_CASES)
def test_route_softmax_topk_kernel(t, e, k, renorm, dtype):
    logits = torch.randn(t, e, device=DEV).to(dtype)
    ids, w, counts = kernel_route_softmax(logits, k, renorm)
    rid, rw, rc = tw.route_softmax_topk(logits.cpu(), k, renorm)
    assert torch.equal(ids.cpu(), rid)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    assert torch.equal(counts.cpu(), rc)
    # The registered op (fresh outputs) gives the same.
    oid, ow, oc = cb.route_softmax_topk(logits, k, renorm)
    assert torch.equal(oid, ids) and torch.equal(ow, w) and torch.equal(oc, counts)


def test_route_softmax_topk_ties():
    logits = torch.randint(-2, 2, (300, 48), device=DEV).float()  # many exact ties (edge: ties)
    ids, _, _ = kernel_route_softmax(logits, 6, True)
    assert torch.equal(ids.cpu(), tw.route_softmax_topk(logits.cpu(), 6, True)[0])


GROUPED_CASES = [
    pytest.param(70, 256, 8, 8, 4, 2.5, True, True, torch.float32, id="deepseek-v3"),
    pytest.param(70, 256, 8, 8, 4, 2.5, True, True, torch.bfloat16, id="deepseek-v3-bf16"),
    pytest.param(1, 13, 3, 1, 1, 1.0, True, False, torch.float32, id="T1-E-prime"),
    pytest.param(45, 12, 4, 6, 3, 1.0, False, True, torch.float16, id="fp16-no-renorm"),
    pytest.param(33, 30, 2, 30, 2, 1.0, True, True, torch.float32, id="one-expert-per-group"),
    pytest.param(20, 512, 32, 8, 8, 1.0, True, True, torch.float32, id="E512-k32"),
    pytest.param(20, 160, 6, 32, 5, 1.0, True, True, torch.float32, id="32-groups"),
]


@pytest.mark.parametrize("t,e,k,ng,tg,scale,renorm,use_bias,dtype", GROUPED_CASES)
def test_route_grouped_sigmoid_topk_kernel(t, e, k, ng, tg, scale, renorm, use_bias, dtype):
    logits = torch.randn(t, e, device=DEV).to(dtype)
    bias = torch.randn(e, device=DEV) * 0.5 if use_bias else None
    ids, w, counts = kernel_route_grouped(logits, bias, k, ng, tg, scale, renorm)
    rid, rw, rc = tw.route_grouped_sigmoid_topk(logits.cpu(), None if bias is None else bias.cpu(), k, ng, tg,
                                                scale, renorm)
    assert torch.equal(ids.cpu(), rid)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-6)
    assert torch.equal(counts.cpu(), rc)
    oid, ow, _ = cb.route_grouped_sigmoid_topk(logits, bias, k, ng, tg, scale, renorm)
    assert torch.equal(oid, ids) and torch.equal(ow, w)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e,k", [pytest.param(13, 3, id="vpt1"), pytest.param(300, 8, id="vpt16")])
@pytest.mark.parametrize("renorm", [True, False])
def test_route_softmax_kernel_drops_non_finite_rows(e, k, renorm, dtype):
    # Before the fix a NaN / +inf row wrote id 0x7fffffff and counts[0x7fffffff] += 1:
    # an illegal address. Now: id E, weight 0, not counted (edge: non-finite logits).
    logits = torch.randn(37, e, device=DEV)
    logits[3, 1] = NAN
    logits[8, e - 1] = INF
    logits[20] = -INF
    logits[21, : e // 2] = -INF  # partly -inf: a valid row
    logits = logits.to(dtype)
    ids, w, counts = kernel_route_softmax(logits, k, renorm)
    rid, rw, rc = tw.route_softmax_topk(logits.cpu(), k, renorm)
    assert torch.equal(ids.cpu(), rid) and torch.equal(counts.cpu(), rc)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    assert (ids[[3, 8, 20]] == e).all() and (w[[3, 8, 20]] == 0).all() and (ids[21] < e).all()
    assert int(counts.sum()) == (37 - 3) * k
    if DEV.type == "cuda":  # the context is still alive (on the CPU the op's checks reject NaN)
        assert torch.equal(cb.route_softmax_topk(logits, k, renorm)[0], ids)


GROUPED_NAN = [
    # (logit edits, bias edits, k, n_group, topk_group): edge covered
    pytest.param({(0, 5): NAN, (2, 0): INF, (3, 1): -INF}, {}, 4, 4, 2, id="nan-and-inf-logits"),
    pytest.param({(r, j): NAN for r in (1, 4) for j in range(16)}, {}, 3, 4, 2, id="all-nan-rows"),
    pytest.param({(r, j): NAN for r in range(6) for j in range(12)}, {}, 4, 4, 1, id="kept-groups-run-short"),
    pytest.param({}, {3: NAN, 9: NAN}, 5, 4, 3, id="nan-bias"),
    pytest.param({}, {0: INF, 1: -INF}, 2, 8, 2, id="nan-group-score"),
    pytest.param({(r, j): NAN for r in range(6) for j in range(0, 16, 2)}, {}, 6, 1, 1, id="half-nan-ungrouped"),
]


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("logit_nan,bias_nan,k,ng,tg", GROUPED_NAN)
def test_route_grouped_kernel_never_chooses_nan(logit_nan, bias_nan, k, ng, tg, renorm):
    logits = torch.randn(6, 16)
    bias = torch.randn(16) * 0.3
    for (r, j), v in logit_nan.items():
        logits[r, j] = v
    for j, v in bias_nan.items():
        bias[j] = v
    ids, w, counts = kernel_route_grouped(logits.to(DEV), bias.to(DEV), k, ng, tg, 1.5, renorm)
    rid, rw, rc = tw.route_grouped_sigmoid_topk(logits, bias, k, ng, tg, 1.5, renorm)
    assert torch.equal(ids.cpu(), rid) and torch.equal(counts.cpu(), rc)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-6)
    assert torch.isfinite(w).all()


@pytest.mark.skipif(DEV.type != "cuda", reason="the fused route runs on CUDA tensors only")
def test_backend_routes_non_contiguous_and_nan_logits():
    # The layer's path: CudaBackend.route on a transposed view with a NaN row and a +inf
    # row (edges: non-contiguous, non-finite); then the whole MoE on such logits.
    t, e, h, i = 33, 16, 64, 32
    logits = torch.randn(e, t, device=DEV).t()
    logits[5, 2] = NAN
    logits[9, 0] = INF
    r = cb.CudaBackend().route(logits, "softmax_topk", {"top_k": 2})
    se = r.slot_expert.view(t, 2)
    assert (se[[5, 9]] == e).all() and (r.slot_weight.view(t, 2)[[5, 9]] == 0).all()
    assert torch.isnan(r.losses["load_balancing"])  # NaN probs: the loss says so instead of crashing
    good = [x for x in range(t) if x not in (5, 9)]
    ref = softmax_topk(logits[good].contiguous(), 2)
    assert torch.equal(se[good].reshape(-1), ref.slot_expert)
    x = torch.randn(t, h, device=DEV)
    w13 = torch.randn(e, 2 * i, h, device=DEV) * 0.1
    w2 = torch.randn(e, h, i, device=DEV) * 0.1
    out = moe(x, logits, w13, w2, router="softmax_topk", top_k=2, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(out[[5, 9]], torch.zeros(2, h, device=DEV))  # every slot dropped
    want = moe(x[good], logits[good].contiguous(), w13, w2, router="softmax_topk", top_k=2, backend="torch")
    assert _rel_err(out[good], want) < 3e-3


@pytest.mark.skipif(DEV.type != "cuda", reason="asks the GPU")
def test_unavailable_agrees_with_this_gpu():
    info = cb.extension_info()
    cap = torch.cuda.get_device_capability()
    want = cb.compatibility_reason(cap, info, info["driver_version"])
    assert cb.CudaBackend().unavailable(torch.device("cuda")) == want
    assert want is None, want  # the test machine is one the default build supports


def test_route_gradients_on_gpu():
    logits = torch.randn(50, 40, device=DEV, requires_grad=True)
    _, w, _ = cb.route_softmax_topk(logits, 4, True)
    g = torch.randn_like(w)
    (got,) = torch.autograd.grad((w * g).sum(), logits)
    r = softmax_topk(logits, 4, True)
    (want,) = torch.autograd.grad((r.slot_weight.view(50, 4) * g).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- plan


def plan_routings():
    yield "softmax-E-prime", softmax_topk(torch.randn(90, 7, device=DEV), 3)
    yield "T1", softmax_topk(torch.randn(1, 5, device=DEV), 2)
    yield "expert-choice", expert_choice(torch.randn(100, 6, device=DEV), 1.5)
    yield "switch-dropped", switch(torch.randn(120, 4, device=DEV), 0.5)
    ids = torch.tensor([[0, 2], [2, 0], [0, 2]] * 11, device=DEV)
    yield "empty-experts", Routing.from_topk(ids, torch.rand(33, 2, device=DEV), 4)
    yield "all-to-one", Routing.from_topk(torch.full((70, 1), 2, device=DEV), torch.rand(70, 1, device=DEV), 5)
    yield "E1024", softmax_topk(torch.randn(300, 1024, device=DEV), 8)
    yield "E4000", softmax_topk(torch.randn(20, 4000, device=DEV), 4)
    yield "many-slots", softmax_topk(torch.randn(8192, 256, device=DEV), 8)
    yield "expert-choice-wide", expert_choice(torch.randn(700, 97, device=DEV), 2.0)


@pytest.mark.parametrize("block_m", [1, 16, 64, 128])
def test_plan_kernel(block_m):
    for name, r in plan_routings():
        got = kernel_plan(r, block_m)
        rc = Routing(r.slot_token.cpu(), r.slot_expert.cpu(), r.slot_weight.cpu(), r.num_tokens, r.num_experts,
                     r.max_slots_per_token, r.top_k)
        want = tw.build_plan(rc.slot_expert, rc.slot_token, rc.num_tokens, rc.num_experts, rc.max_slots_per_token,
                             rc.top_k or 0, block_m)
        core = build_plan_torch(rc, block_m)
        for field, g, w in zip(PLAN_FIELDS, got, want):
            assert torch.equal(g.cpu(), w), (name, field)
            assert torch.equal(w, getattr(core, field)), (name, field)


def test_backend_plan_is_a_valid_dispatch_plan():
    r = expert_choice(torch.randn(50, 11, device=DEV), 1.3)
    params = expert_params(torch.randn(11, 8, 6, device=DEV), torch.randn(11, 6, 4, device=DEV))
    plan = cb.CudaBackend().plan(r, params)
    assert isinstance(plan, DispatchPlan)
    plan.check_values()


# --------------------------------------------------------------------------- permutation

PERMUTE_CASES = [
    pytest.param(torch.float32, 64, False, id="fp32-vec"),
    pytest.param(torch.float16, 72, False, id="fp16-vec"),
    pytest.param(torch.bfloat16, 4096, False, id="bf16-vec-wide"),
    pytest.param(torch.float32, 7, False, id="fp32-odd-H"),
    pytest.param(torch.bfloat16, 13, False, id="bf16-odd-H"),
    pytest.param(torch.float16, 64, True, id="fp16-misaligned"),
]


def _tensor(t, h, dtype, misaligned):
    if not misaligned:
        return torch.randn(t, h, device=DEV).to(dtype)
    return torch.randn(t * h + 1, device=DEV).to(dtype)[1:].view(t, h)  # 2 bytes off a 16-byte boundary


@pytest.mark.parametrize("dtype,h,misaligned", PERMUTE_CASES)
def test_permute_kernel(dtype, h, misaligned):
    x = _tensor(37, h, dtype, misaligned)
    slot_token = torch.randint(0, 37, (101,), dtype=torch.int32, device=DEV)
    row_slot = torch.cat([torch.randperm(101, device=DEV).int(), torch.full((19,), -1, dtype=torch.int32, device=DEV)])
    row_slot = row_slot[torch.randperm(120, device=DEV)]  # padding rows among the others
    out = kernel_permute(x, slot_token, row_slot)
    assert torch.equal(out.cpu(), tw.permute_rows(x.cpu(), slot_token.cpu(), row_slot.cpu()))


@pytest.mark.parametrize("dtype,h,misaligned", PERMUTE_CASES)
def test_unpermute_kernel_is_bit_exact(dtype, h, misaligned):
    y = _tensor(90, h, dtype, misaligned)
    w = torch.rand(90, device=DEV)
    slot_row = torch.randperm(90, device=DEV).int()
    cells = torch.randperm(90, device=DEV).int().view(30, 3)
    cells[::4, 1:] = -1  # tokens with fewer slots
    token_slots = torch.cat([cells, torch.full((2, 3), -1, dtype=torch.int32, device=DEV)])  # tokens with none
    out = kernel_unpermute(y, slot_row, token_slots, w)
    want = tw.unpermute_rows(y.cpu(), slot_row.cpu(), token_slots.cpu(), w.cpu())
    assert torch.equal(out.cpu(), want)
    again = kernel_unpermute(y, slot_row, token_slots, w)
    assert torch.equal(again, out)  # deterministic
    ident = kernel_unpermute(y, None, token_slots, w)
    assert torch.equal(ident.cpu(), tw.unpermute_rows(y.cpu(), None, token_slots.cpu(), w.cpu()))


@pytest.mark.parametrize("h", [pytest.param(65536, id="vector"), pytest.param(65535, id="scalar")])
def test_permute_and_unpermute_past_2_31_elements(h):
    # rows * H > 2^31 elements, counted in the kernels' own units on the scalar path
    # (edge: 64-bit indexing). About 9 GB of device memory.
    r = 32770
    x = torch.randn(4, h, device=DEV).to(torch.bfloat16)
    slot_token = torch.tensor([3, 1, 0, 2], dtype=torch.int32, device=DEV).repeat(r // 4 + 1)[:r].contiguous()
    row_slot = torch.arange(r, dtype=torch.int32, device=DEV)
    out = kernel_permute(x, slot_token, row_slot)
    assert out.numel() > 2**31
    for row in (0, r // 2, r - 2, r - 1):
        assert torch.equal(out[row], x[slot_token[row]]), row
    token_slots = torch.arange(r, dtype=torch.int32, device=DEV).view(r, 1)
    w = torch.full((r,), 0.5, device=DEV)
    comb = kernel_unpermute(out, None, token_slots, w)
    for row in (0, r // 2, r - 1):
        assert torch.equal(comb[row], (0.5 * out[row].float()).to(torch.bfloat16)), row
    del out, comb


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router,opts", [("softmax_topk", {"top_k": 2}),
                                         ("grouped_sigmoid_topk", {"top_k": 4, "n_group": 4, "topk_group": 2}),
                                         ("expert_choice", {"capacity_factor": 1.5})])
def test_cuda_backend_end_to_end(dtype, router, opts):
    t, h, i, e = 37, 64, 48, 16
    # Error relative to the largest magnitude: the cuda backend's GEMMs may be Triton's
    # (TF32 for fp32) while the torch backend's are torch's.
    tol = {torch.float32: 3e-3, torch.bfloat16: 3e-2}[dtype]
    x = torch.randn(t, h, device=DEV).to(dtype).requires_grad_()
    w13 = (torch.randn(e, 2 * i, h, device=DEV) * 0.1).to(dtype).requires_grad_()
    w2 = (torch.randn(e, h, i, device=DEV) * 0.1).to(dtype).requires_grad_()
    logits = torch.randn(t, e, device=DEV, requires_grad=True)
    out, routing = moe(x, logits, w13, w2, router=router, backend="cuda", return_routing=True, **opts)
    ref_out, ref_routing = moe(x, logits, w13, w2, router=router, backend="torch", return_routing=True, **opts)
    assert torch.equal(routing.slot_expert, ref_routing.slot_expert)
    assert _rel_err(out, ref_out) < tol
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x, logits, w13, w2])
    want = torch.autograd.grad((ref_out * g).sum(), [x, logits, w13, w2])
    for name, a, b in zip(("x", "logits", "w13", "w2"), got, want):
        assert _rel_err(a, b) < tol, name


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def test_experts_permuted_on_gpu_matches_reference():
    t, h, i, e = 29, 40, 24, 7
    x = torch.randn(t, h, device=DEV)
    params = expert_params(torch.randn(e, 2 * i, h, device=DEV) * 0.2, torch.randn(e, h, i, device=DEV) * 0.2)
    r = switch(torch.randn(t, e, device=DEV), 0.7)  # dropped slots
    out = cb.experts_permuted(x, cb.CudaBackend().plan(r, params), params)
    torch.testing.assert_close(out, moe_reference(x, r, params), rtol=1e-4, atol=1e-4)


def _pipeline(logits, x):
    ids, w, _ = cb.route_softmax_topk(logits, 2, True)
    t = logits.shape[0]
    se, st = ids.reshape(-1), torch.arange(t, device=logits.device, dtype=torch.int32).repeat_interleave(2)
    counts, offs, order, pos, poffs, padded, blocks, table = cb.build_plan(se, st, t, logits.shape[1], 2, 2, 16)
    rows = cb.permute_rows(x, st, order, pos, table)
    return cb.unpermute_rows(rows * 2, pos, table, w.reshape(-1))


@pytest.mark.skipif(DEV.type != "cuda", reason="CUDA graphs")
def test_cuda_graph_capture_and_replay():
    logits = torch.randn(64, 32, device=DEV)
    x = torch.randn(64, 128, device=DEV)
    eager = _pipeline(logits, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (loads the images) off the capture
        _pipeline(logits, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _pipeline(logits, x)
    new_logits, new_x = torch.randn_like(logits), torch.randn_like(x)
    logits.copy_(new_logits)
    x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _pipeline(new_logits, new_x))
    assert not torch.equal(captured, eager)


_CAPTURE_SCRIPT = """
import sys, torch
from moe_kernels.backends import cuda as cb
from moe_kernels.backends.cuda import extension as cops
logits = torch.randn(64, 32, device="cuda")
x = torch.randn(64, 128, device="cuda")
assert not cops._C.images_loaded()
if sys.argv[1] == "load_kernels":
    cb.load_kernels()
    assert cops._C.images_loaded()
else:
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            cb.route_softmax_topk(logits, 2, True)
    except RuntimeError as exc:
        assert "before capturing" in str(exc) and "route_softmax_topk" in str(exc), str(exc)
        print("refused:", exc)
    else:
        raise AssertionError("the first call inside capture did not raise")
    assert not cops._C.images_loaded()
    torch.cuda.synchronize()
    cb.route_softmax_topk(logits, 2, True)  # a plain call after the refusal loads and runs
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out = cb.route_softmax_topk(logits, 2, True)[1]
new = torch.randn_like(logits)
logits.copy_(new)
graph.replay()
torch.cuda.synchronize()
assert torch.equal(out, cb.route_softmax_topk(new, 2, True)[1])
print("ok")
"""


@pytest.mark.skipif(DEV.type != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("warmup", ["none", "load_kernels"])
def test_first_call_inside_capture(warmup, tmp_path):
    # A fresh process (the images load once per process): a first call inside capture
    # is refused with a clear error and leaves things usable; load_kernels() ahead of
    # the capture is enough for it to work (edge: image loading vs CUDA-graph capture).
    import subprocess
    import sys

    script = tmp_path / "capture.py"
    script.write_text(_CAPTURE_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script), warmup], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.skipif(DEV.type != "cuda", reason="torch.compile of the CUDA ops")
def test_torch_compile_fullgraph():
    logits = torch.randn(16, 24, device=DEV)
    x = torch.randn(16, 64, device=DEV)
    compiled = torch.compile(_pipeline, fullgraph=True)
    assert torch.equal(compiled(logits, x), _pipeline(logits, x))


@pytest.mark.skipif(DEV.type != "cuda", reason="streams")
def test_launch_on_a_side_stream():
    y = torch.randn(50, 64, device=DEV)
    table = torch.arange(50, dtype=torch.int32, device=DEV).view(25, 2)
    w = torch.rand(50, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = cb.unpermute_rows(y, None, table, w)
    side.synchronize()
    assert torch.equal(out.cpu(), tw.unpermute_rows(y.cpu(), None, table.cpu(), w.cpu()))


@pytest.mark.skipif(DEV.type != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_keeps_the_current_device():
    y = torch.randn(8, 32, device="cuda:1")
    table = torch.arange(8, dtype=torch.int32, device="cuda:1").view(4, 2)
    out = cb.unpermute_rows(y, None, table, torch.ones(8, device="cuda:1"))
    assert torch.cuda.current_device() == 0
    assert torch.equal(out.cpu(), tw.unpermute_rows(y.cpu(), None, table.cpu(), torch.ones(8)))
