"""Every GEMM regime on a real GPU in bf16 against the torch twin: the regime's own
config (the heuristic's pick for the GPU: split-K at decode, TMA and the persistent loop
at prefill on sm_90+), forward and backward of a layer, plus split-K's bitwise
repeatability under real concurrency (the order in which the splits of a tile arrive is
the hardware's). Marked ``gpu``; skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (E, k, H, I, T) per regime: T*k/E rows per expert in the regime's bucket.
CASES = {
    "decode-mixtral": (8, 2, 4096, 14336, 1),
    "decode-qwen3": (128, 8, 2048, 768, 3),
    "small-mixtral": (8, 2, 4096, 14336, 100),
    "medium-qwen3": (128, 8, 2048, 768, 1000),
    "prefill-mixtral": (8, 2, 4096, 14336, 2048),
    "prefill-gpt-oss": (32, 4, 2880, 2880, 4096),
}


def _rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def _layer(name, dtype=torch.bfloat16, requires_grad=False):
    e, k, h, i, t = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    gpt = name.startswith("prefill-gpt")
    w13 = (torch.randn(e, 2 * i, h, device="cuda", dtype=dtype, generator=g) * h ** -0.5)
    w2 = (torch.randn(e, h, i, device="cuda", dtype=dtype, generator=g) * i ** -0.5)
    params = mk.expert_params(w13.requires_grad_(requires_grad), w2.requires_grad_(requires_grad),
                              activation="swiglu_oai" if gpt else "swiglu")
    x = torch.randn(t, h, device="cuda", dtype=dtype, generator=g).requires_grad_(requires_grad)
    logits = torch.randn(t, e, device="cuda", generator=g)
    routing = mk.route(logits, "softmax_topk", top_k=k)
    return x, routing, params


@pytest.mark.parametrize("name", list(CASES))
def test_regime_forward_and_backward_bf16(name):
    from moe_kernels.backends import get_backend
    from moe_kernels.backends.triton.configs import REGIME_BLOCK_M, regime_of
    x, routing, params = _layer(name, requires_grad=True)
    be = get_backend("triton", x.device)
    assert be.plan(routing, params).block_m == REGIME_BLOCK_M[regime_of(routing.num_slots, params.num_experts)]
    out = mk.fused_experts(x, routing, params, backend="triton")
    ref = mk.fused_experts(x, routing, params, backend="torch")
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 3e-2
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, params.w13, params.w2), g)
    want = torch.autograd.grad(ref, (x, params.w13, params.w2), g)
    for a, b, what in zip(got, want, ("dx", "dw13", "dw2")):
        assert _rel_err(a, b) < 5e-2, what


@pytest.mark.parametrize("name", ["decode-mixtral", "decode-qwen3"])
def test_split_k_bitwise_repeatable_on_the_gpu(name):
    x, routing, params = _layer(name)
    outs = [mk.fused_experts(x, routing, params, backend="triton") for _ in range(20)]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
