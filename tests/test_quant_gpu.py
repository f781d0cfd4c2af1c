"""Quantized experts on a CUDA GPU (skipped without one): the Triton kernels in bf16 at
model-like shapes against the dequantizing twin, and the memory they save.

Bounds: bf16 outputs, 2e-2 of the output's largest magnitude (the twin runs float32
math; the kernel rounds h to bf16 in W4A16/W8A16 and may break an e4m3 rounding tie the
other way in W8A8)."""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels.quant import experts_quant_torch, quantize_experts

pytestmark = pytest.mark.gpu


def _rel_max(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("fmt,kw", [("fp8_block", {}), ("fp8_block", {"scale_fmt": "ue8m0"}),
                                    ("fp8_block", {"act_scheme": "none"}), ("mxfp4", {})])
@pytest.mark.parametrize("t", [1, 300])
def test_quantized_triton_matches_twin_on_gpu(fmt, kw, t):
    torch.manual_seed(0)
    e, h, i = 16, 2048, 768
    w13 = torch.randn(e, 2 * i, h, device="cuda") / h ** 0.5
    w2 = torch.randn(e, h, i, device="cuda") / i ** 0.5
    p = quantize_experts(w13, w2, format=fmt, dtype=torch.bfloat16, **kw)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    routing = mk.route(torch.randn(t, e, device="cuda"), "softmax_topk", top_k=4)
    with torch.inference_mode():
        got = mk.fused_experts(x, routing, p, backend="triton")
        plan = mk.get_backend("torch", x.device).plan(routing, p)
        want = experts_quant_torch(x, plan, p)
    assert _rel_max(got, want) < 2e-2
    assert p.quant.w13.nbytes < (0.51 if fmt == "fp8_block" else 0.27) * w13.numel() * 2  # vs bf16
