"""backend="triton" on a real GPU: bf16/fp16 at model sizes, backward, CUDA-graph
capture, determinism of the fused combine under real concurrency, autotune, both TF32
APIs, rows past 2^31 elements, launches on the tensors' GPU (two GPUs).

Every test is marked ``gpu`` and skipped without CUDA. Sizes: Mixtral-8x7B (E=8,
H=4096, I=14336, k=2) and Qwen3-30B-A3B (E=128, H=2048, I=768, k=8) at T = 1, 128,
2048. The reference is the torch backend (grouped matmuls in the same dtype), compared
relative to the output's scale.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels.params import expert_params

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = {
    "mixtral": dict(e=8, h=4096, i=14336, k=2),
    "qwen3-30b-a3b": dict(e=128, h=2048, i=768, k=8),
}
_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _weights(e, h, i, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=dtype, generator=g) * h ** -0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=dtype, generator=g) * i ** -0.5
    return w13, w2


def _rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("t", [1, 128, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_model_sizes(model, t, dtype):
    m = MODELS[model]
    w13, w2 = _weights(m["e"], m["h"], m["i"], dtype)
    x = torch.randn(t, m["h"], device="cuda", dtype=dtype)
    logits = torch.randn(t, m["e"], device="cuda", dtype=torch.float32)
    out, routing = mk.moe(x, logits, w13, w2, top_k=m["k"], backend="triton", return_routing=True)
    ref = mk.fused_experts(x, routing, w13, w2, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel_err(out, ref) < _TOL[dtype]


@pytest.mark.parametrize("router,opts", [("switch", {"capacity_factor": 1.0}), ("expert_choice", {"capacity_factor": 1.0}),
                                         ("dense", {}), ("grouped_sigmoid_topk", {"top_k": 8, "n_group": 8,
                                                                                  "topk_group": 4})])
def test_forward_other_routers_bf16(router, opts):
    e = 64 if router != "dense" else 8
    w13, w2 = _weights(e, 1024, 512, torch.bfloat16)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(512, e, device="cuda")
    out, routing = mk.moe(x, logits, w13, w2, router=router, backend="triton", return_routing=True, **opts)
    ref = mk.fused_experts(x, routing, w13, w2, backend="torch")
    assert _rel_err(out, ref) < _TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_matches_torch_backend(dtype):
    e, h, i, k, t = 16, 1024, 512, 2, 1024
    w13, w2 = _weights(e, h, i, dtype)
    leaves = {"x": torch.randn(t, h, device="cuda", dtype=dtype), "logits": torch.randn(t, e, device="cuda"),
              "w13": w13, "w2": w2}
    up = torch.randn(t, h, device="cuda", dtype=dtype)
    grads = {}
    for backend in ("torch", "triton"):
        v = {n: x.detach().clone().requires_grad_(True) for n, x in leaves.items()}
        out = mk.moe(v["x"], v["logits"], v["w13"], v["w2"], top_k=k, backend=backend)
        (out.float() * up.float()).sum().backward()
        grads[backend] = {n: x.grad for n, x in v.items()}
    for n in leaves:
        assert _rel_err(grads["triton"][n], grads["torch"][n]) < 5e-2, n


def test_fused_combine_is_deterministic_and_equals_separate_kernel():
    """The last-arriver combine under real inter-CTA concurrency: bitwise equal to the
    separate combine kernel and to itself over repeated runs, forward and backward."""
    m = MODELS["qwen3-30b-a3b"]
    w13, w2 = _weights(m["e"], m["h"], m["i"], torch.bfloat16)
    x = torch.randn(4096, m["h"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(4096, m["e"], device="cuda")
    be = mk.get_backend("triton", "cuda")
    params = expert_params(w13, w2)
    routing = be.route(logits, "softmax_topk", {"top_k": m["k"]})
    plan = be.plan(routing, params)
    from moe_kernels.backends.triton.experts import moe_experts
    sep = moe_experts(x, plan, params, combine="separate")
    (dx_sep,) = torch.autograd.grad(sep.float().sum(), x)
    for _ in range(10):
        fused = moe_experts(x, plan, params, combine="fused")
        assert torch.equal(fused, sep)
        (dx,) = torch.autograd.grad(fused.float().sum(), x)
        assert torch.equal(dx, dx_sep)


def test_cuda_graph_capture_of_the_forward():
    m = MODELS["qwen3-30b-a3b"]
    w13, w2 = _weights(m["e"], m["h"], m["i"], torch.bfloat16)
    x = torch.randn(8, m["h"], device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(8, m["e"], device="cuda")
    run = (lambda: mk.moe(x, logits, w13, w2, top_k=m["k"], backend="triton"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, run())


@pytest.mark.parametrize("api", ["fp32_precision", "allow_tf32"])
def test_fp32_matches_without_tf32(api):
    """IEEE fp32 set through either torch API (the new one makes reading the legacy flag
    raise); restored afterwards."""
    m = torch.backends.cuda.matmul
    if api == "fp32_precision" and not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = getattr(m, api)
    setattr(m, api, "ieee" if api == "fp32_precision" else False)
    try:
        w13, w2 = _weights(8, 512, 256, torch.float32)
        x = torch.randn(300, 512, device="cuda")
        logits = torch.randn(300, 8, device="cuda")
        out, routing = mk.moe(x, logits, w13, w2, top_k=2, backend="triton", return_routing=True)
        ref = mk.fused_experts(x, routing, w13, w2, backend="torch")
        assert _rel_err(out, ref) < 1e-5
    finally:
        setattr(m, api, saved)


def test_rows_past_2_31_elements():
    """x and out with more than 2^31 elements (4.3 GB of bf16): the routed tokens sit
    past row 2^31 / H, so a 32-bit row offset would address the wrong memory."""
    h, i, e = 2048, 256, 4
    t = 2**31 // h + 1024
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs about 20 GB of GPU memory")
    w13, w2 = _weights(e, h, i, torch.bfloat16)
    x = torch.zeros(t, h, device="cuda", dtype=torch.bfloat16)
    tail = torch.randn(96, h, device="cuda", dtype=torch.bfloat16)
    x[-96:] = tail
    ids = torch.full((t, 2), -1, dtype=torch.int32, device="cuda")  # only the last 96 tokens are routed
    ids[-96:] = torch.randint(0, e, (96, 2), device="cuda", dtype=torch.int32)
    ids[-96:, 1] = (ids[-96:, 0] + 1) % e
    w = torch.rand(t, 2, device="cuda")
    out = mk.fused_experts(x, mk.Routing.from_topk(ids, w, e), w13, w2, backend="triton")
    ref = mk.fused_experts(tail, mk.Routing.from_topk(ids[-96:].contiguous(), w[-96:].contiguous(), e), w13, w2,
                           backend="torch")
    assert x.numel() > 2**31 and torch.isfinite(out[-96:]).all()
    assert _rel_err(out[-96:], ref) < _TOL[torch.bfloat16]
    assert not out[:-96].any(), "tokens without a slot get zero rows"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_follow_the_tensors_device_not_the_current_one():
    """Tensors on cuda:1 while the current device is cuda:0: every kernel runs on
    cuda:1 (Triton launches on the current device unless the launcher switches)."""
    w13, w2 = _weights(8, 512, 256, torch.bfloat16)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(64, 8, device="cuda", requires_grad=True)
    ref, routing = mk.moe(x, logits, w13, w2, top_k=2, backend="triton", return_routing=True)
    ref.float().sum().backward()
    ref_grad = logits.grad.clone()
    dev = torch.device("cuda", 1)
    x1, w13_1, w2_1 = x.to(dev), w13.to(dev), w2.to(dev)
    logits1 = logits.detach().to(dev).requires_grad_(True)
    torch.cuda.set_device(0)
    out = mk.moe(x1, logits1, w13_1, w2_1, top_k=2, backend="triton")
    out.float().sum().backward()
    torch.cuda.synchronize(dev)
    assert out.device == dev and torch.equal(out.cpu(), ref.cpu())
    assert torch.equal(logits1.grad.cpu(), ref_grad.cpu())


def test_autotune_flag(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_AUTOTUNE", "1")
    w13, w2 = _weights(8, 1024, 512, torch.bfloat16)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(256, 8, device="cuda")
    out, routing = mk.moe(x, logits, w13, w2, top_k=2, backend="triton", return_routing=True)
    ref = mk.fused_experts(x, routing, w13, w2, backend="torch")
    assert _rel_err(out, ref) < _TOL[torch.bfloat16]


def test_training_curve_matches_torch_backend_on_gpu():
    from test_triton_backward import train_curve
    ref = train_curve("torch", 100, hidden=256, inter=512, experts=8, top_k=2, batch=512, device="cuda")
    tri = train_curve("triton", 100, hidden=256, inter=512, experts=8, top_k=2, batch=512, device="cuda")
    assert ref[-1] < 0.5 * ref[0]
    for a, b in zip(ref, tri):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(a))
