"""Quantized experts: quantizers and dequantizers against transformers' own converters,
error bounds against unquantized weights, the Triton kernels (interpreter on the CPU)
against the dequantizing twin at odd shapes, the public API and its refusals.

Bounds (relative Frobenius error of a layer vs float32 weights; quant.py's docstring):
fp8 weights-only < 0.08, fp8 W8A8 < 0.10, fp4 (MXFP4 / float scales) < 0.30. Kernel vs
twin: 1e-5 of the output's largest magnitude in float32, 1e-2 in float16.
"""

from __future__ import annotations

import types

import pytest
import torch

from triton_interp import DEVICE, import_or_skip
from test_triton_gemm import assert_close, make_routing

import moe_kernels as mk
from moe_kernels.quant import (ExpertQuant, QuantizedWeight, dequantize, experts_quant_torch, quantize_act_fp8,
                               quantize_experts, quantize_fp4, quantize_fp8_block, quantized_params)
from moe_kernels.reference import moe_reference


def _weights(e, h, i, gated=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, (2 if gated else 1) * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------- formats vs transformers


def test_fp8_quantizer_bit_exact_with_transformers():
    fg = pytest.importorskip("transformers.integrations.finegrained_fp8")
    w = torch.randn(3, 256, 384) * 0.05
    for fmt in ("float", "ue8m0"):
        hf = types.SimpleNamespace(quantization_config=types.SimpleNamespace(weight_block_size=(128, 128),
                                                                              scale_fmt=fmt))
        op = fg.Fp8Quantize(hf)
        want = op._quantize_one("w", w)
        got = quantize_fp8_block(w, (128, 128), fmt)
        assert torch.equal(got.data.view(torch.uint8), want["w"].view(torch.uint8)), fmt
        assert torch.equal(got.scale_f32(), want["w_scale_inv"].float()), fmt
        deq = fg.Fp8Dequantize(hf)._dequantize_one(want["w"], want["w_scale_inv"], torch.float32) \
            if hasattr(fg.Fp8Dequantize, "_dequantize_one") else None
        if deq is not None:
            assert torch.equal(dequantize(got), deq.float()), fmt


def test_fp4_dequantizer_bit_exact_with_transformers_mxfp4():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    e, n, k = 3, 40, 96  # GPT-OSS checkpoint layout: blocks [E, N, K/32, 16], scales [E, N, K/32]
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(117, 137, (e, n, k // 32), generator=g, dtype=torch.uint8)
    want = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    qw = QuantizedWeight(blocks.reshape(e, n, k // 2), scales, "fp4", (1, 32))
    assert torch.equal(dequantize(qw), want.transpose(1, 2).float())


def test_fp4_quantizer_round_trip_and_rounding():
    # Every e2m1 value times a power of two survives quantize -> dequantize exactly; the
    # midpoints round to the even mantissa.
    vals = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -.5, -1, -1.5, -2, -3, -4, -6, 6] * 2) * 0.25
    w = vals.reshape(1, 1, 32)
    q = quantize_fp4(w, "ue8m0")
    assert torch.equal(dequantize(q), w)
    mids = torch.tensor([.25, .75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4).reshape(1, 1, 32)
    got = dequantize(quantize_fp4(mids, "float"))
    assert got.flatten()[:8].tolist() == [0, 1, 1, 2, 2, 4, 4, 6]


def test_fp8_ragged_blocks_and_zero_tile():
    w = torch.randn(2, 130, 200) * 0.1
    w[0, :128, :128] = 0  # an all-zero tile: scale 1, zeros back
    q = quantize_fp8_block(w, (128, 128))
    assert tuple(q.scale.shape) == (2, 2, 2)
    d = dequantize(q)
    assert torch.equal(d[0, :128, :128], torch.zeros(128, 128))
    assert _rel(d, w) < 0.04


def test_act_quant_twin():
    x = torch.randn(5, 200) * 3
    x[1] = 0  # a zero row: finite scale, zeros
    q, s = quantize_act_fp8(x, 128)
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (5, 2)
    back = q.float() * s.repeat_interleave(128, 1)[:, :200]
    assert torch.equal(back[1], torch.zeros(200)) and torch.isfinite(s).all()
    assert _rel(back, x) < 0.04


# --------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("fmt,kw,bound", [
    ("fp8_block", {"act_scheme": "none"}, 0.08),
    ("fp8_block", {}, 0.10),
    ("fp8_block", {"scale_fmt": "ue8m0"}, 0.10),
    ("mxfp4", {}, 0.30),
    ("fp4", {}, 0.30),
])
def test_error_bound_against_float_weights(fmt, kw, bound):
    w13, w2 = _weights(8, 256, 128)
    routing, _ = make_routing("softmax_topk", 64, 8, device="cpu")
    x = torch.randn(64, 256)
    ref = moe_reference(x, routing, mk.expert_params(w13.cpu(), w2.cpu()))
    with torch.no_grad():
        got = mk.fused_experts(x, routing, quantize_experts(w13.cpu(), w2.cpu(), format=fmt, **kw), backend="torch")
    err = _rel(got, ref)
    assert 0.005 < err < bound, err  # > 0.005: the quantization really happened


def test_weights_only_twin_equals_reference_on_dequantized_weights():
    w13, w2 = _weights(5, 160, 96)
    routing, _ = make_routing("softmax_topk", 11, 5, device="cpu")
    x = torch.randn(11, 160)
    p = quantize_experts(w13.cpu(), w2.cpu(), format="fp8_block", act_scheme="none")
    ref = moe_reference(x, routing, mk.expert_params(dequantize(p.quant.w13), dequantize(p.quant.w2)))
    with torch.no_grad():
        got = mk.fused_experts(x, routing, p, backend="torch")
    assert_close(got, ref, 1e-5, "W8A16 twin")


# --------------------------------------------------------------------------- Triton kernels vs twin

CASES = [
    # (id, T, H, I, E, routing kind, k, format, kwargs, dtype) — the edge each covers in the id
    ("fp8-dyn-T1", 1, 160, 96, 5, "softmax_topk", 2, "fp8_block", {}, torch.float32),
    ("fp8-dyn-H160-I96-prime-E-empty-expert", 13, 160, 96, 5, "empty_expert", 2, "fp8_block", {}, torch.float32),
    ("fp8-dyn-ue8m0-all-to-one-expert", 9, 128, 128, 3, "one_expert", 1, "fp8_block", {"scale_fmt": "ue8m0"},
     torch.float32),
    ("fp8-dyn-fp16-block64", 7, 192, 64, 3, "softmax_topk", 2, "fp8_block", {"block_size": (64, 128)},
     torch.float16),
    ("fp8-W8A16-ragged-K", 8, 100, 72, 5, "softmax_topk", 2, "fp8_block", {"act_scheme": "none"}, torch.float32),
    ("fp8-W8A16-fp16-dropped-slots", 10, 160, 96, 7, "dropped", 2, "fp8_block", {"act_scheme": "none"},
     torch.float16),
    ("mxfp4-T1", 1, 96, 64, 5, "softmax_topk", 2, "mxfp4", {}, torch.float32),
    ("mxfp4-empty-expert-fp16", 11, 96, 64, 5, "empty_expert", 2, "mxfp4", {}, torch.float16),
    ("fp4-float-scales", 9, 64, 96, 3, "softmax_topk", 2, "fp4", {}, torch.float32),
]


def _case_params(t, h, i, e, fmt, kw, dtype, act="swiglu", bias=False, interleaved=False, seed=0):
    w13, w2 = _weights(e, h, i, gated=Activation_gated(act), seed=seed)
    b13 = b2 = None
    if bias:
        g = torch.Generator().manual_seed(seed + 5)
        b13 = (torch.randn(e, w13.shape[1], generator=g) * 0.1).to(DEVICE)
        b2 = (torch.randn(e, h, generator=g) * 0.1).to(DEVICE)
    return quantize_experts(w13, w2, b13, b2, format=fmt, activation=act, interleaved=interleaved, dtype=dtype, **kw)


def Activation_gated(act):
    return mk.Activation.of(act).gated


def poison_empty(monkeypatch, module):
    """Outputs pre-filled with poison: NaN for floats (e4m3 included), -777 for integers."""
    real = torch.empty

    def empty(*shape, dtype=None, device=None, **kw):
        t = real(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -777)

    monkeypatch.setattr(module, "_empty", empty)


def _run_both(x, routing, p, monkeypatch):
    import_or_skip()
    from quant_interp import fp8_interpreter
    from moe_kernels.backends.triton import quant_experts, quant_gemm

    poison_empty(monkeypatch, quant_gemm)
    poison_empty(monkeypatch, quant_experts)
    with torch.no_grad():
        want = experts_quant_torch(x, mk.backends.get_backend("torch", x.device).plan(routing, p), p)
        with fp8_interpreter():
            got = mk.fused_experts(x, routing, p, backend="triton")
            again = mk.fused_experts(x, routing, p, backend="triton")
    assert torch.equal(got, again), "not deterministic"
    return got, want


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_quantized_experts_match_twin(case, monkeypatch):
    _, t, h, i, e, kind, k, fmt, kw, dtype = case
    p = _case_params(t, h, i, e, fmt, kw, dtype)
    routing, _ = make_routing(kind, t, e, k=k, seed=3)
    x = (torch.randn(t, h, generator=torch.Generator().manual_seed(4)) * 2).to(DEVICE, dtype)
    got, want = _run_both(x, routing, p, monkeypatch)
    assert got.dtype == dtype and got.shape == (t, h)
    assert_close(got, want, 1e-5 if dtype == torch.float32 else 1e-2, case[0])


@pytest.mark.parametrize("act,interleaved,fmt", [
    ("swiglu_oai", True, "mxfp4"),      # GPT-OSS: interleaved rows, biases, clamped SwiGLU, MXFP4
    ("swiglu_clamp", False, "fp8_block"),  # DeepSeek-V4 clamped SiLU, W8A8
    ("swiglu_softcap", False, "fp8_block"),
    ("relu2", False, "fp8_block"),     # plain experts
])
def test_triton_quantized_activations_biases(act, interleaved, fmt, monkeypatch):
    a = mk.Activation(act, 1.702, 0.6) if act in ("swiglu_oai", "swiglu_clamp") else act
    w13, w2 = _weights(5, 128, 64, gated=mk.Activation.of(a).gated, seed=1)
    g = torch.Generator().manual_seed(9)
    b13 = (torch.randn(5, w13.shape[1], generator=g) * 0.1).to(DEVICE)
    b2 = (torch.randn(5, 128, generator=g) * 0.1).to(DEVICE)
    p = quantize_experts(w13, w2, b13, b2, format=fmt, activation=a, interleaved=interleaved)
    routing, _ = make_routing("softmax_topk", 9, 5, seed=2)
    x = (torch.randn(9, 128, generator=g) * 2).to(DEVICE)
    got, want = _run_both(x, routing, p, monkeypatch)
    assert_close(got, want, 1e-5, f"{act}-{fmt}")


def test_triton_static_activation_scales(monkeypatch):
    w13, w2 = _weights(3, 128, 128, seed=2)
    q13, q2 = quantize_fp8_block(w13), quantize_fp8_block(w2)
    s13 = torch.tensor([0.01, 0.02, 0.015], device=DEVICE)
    s2 = torch.tensor([0.002, 0.003, 0.001], device=DEVICE)
    p = quantized_params(q13, q2, dtype=torch.float32, act_scheme="static", act_scale13=s13, act_scale2=s2)
    routing, _ = make_routing("softmax_topk", 6, 3, seed=5)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got, want = _run_both(x, routing, p, monkeypatch)
    assert_close(got, want, 1e-5, "static")


def test_triton_quantized_with_post_norm(monkeypatch):
    w13, w2 = _weights(4, 96, 64, seed=3)
    norm = mk.PostNorm(torch.linspace(-0.3, 0.3, 96, device=DEVICE), 1e-6)
    p = quantize_experts(w13, w2, format="mxfp4", post_norm=norm)
    routing, _ = make_routing("empty_expert", 7, 4, seed=1)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got, want = _run_both(x, routing, p, monkeypatch)
    assert_close(got, want, 1e-5, "post-norm")


# --------------------------------------------------------------------------- API


def test_moe_functional_and_layer_accept_quantized():
    torch.manual_seed(0)
    layer = mk.MoE(hidden_size=128, intermediate_size=64, num_experts=5, top_k=2, backend="torch")
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        ref = layer(x)
        logits = x.reshape(-1, 128) @ layer.router_weight.t()
        p = quantize_experts(layer.w13, layer.w2, format="fp8_block")
        out_moe = mk.moe(x.reshape(-1, 128), logits, p, backend="torch", **layer.router_options())
        layer.quantize_("fp8_block")
        out_layer = layer(x)
    assert layer.w13.dtype == torch.float8_e4m3fn and "w13_scale" in dict(layer.named_buffers())
    assert torch.equal(out_layer.reshape(-1, 128), out_moe)
    assert 0.005 < _rel(out_layer, ref) < 0.10
    with pytest.raises(ValueError, match="inference-only"):
        layer(x)  # the router weight requires grad: no silent training through quantized weights


def test_training_refused_with_clear_error():
    w13, w2 = _weights(3, 64, 32)
    p = quantize_experts(w13.cpu(), w2.cpu(), format="mxfp4")
    routing, _ = make_routing("softmax_topk", 4, 3, device="cpu")
    x = torch.randn(4, 64, requires_grad=True)
    for backend in ("torch",):
        with pytest.raises(ValueError, match="inference-only"):
            mk.fused_experts(x, routing, p, backend=backend)


def test_bad_input():
    w13, w2 = _weights(3, 64, 48)
    with pytest.raises(ValueError, match="format"):
        quantize_experts(w13, w2, format="int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_experts(w13[:, :, :40].contiguous(), w2, format="mxfp4")
    with pytest.raises(ValueError, match="multiple of 32"):  # I = 48 for W2
        quantize_experts(w13, w2, format="mxfp4")
    with pytest.raises(ValueError, match="act_scheme"):
        quantize_experts(*_weights(3, 64, 64), format="mxfp4", act_scheme="dynamic")
    p = quantize_experts(w13.cpu(), w2.cpu(), format="fp8_block")
    routing, _ = make_routing("softmax_topk", 4, 3, device="cpu")
    with pytest.raises(ValueError, match="compute dtype"):
        mk.fused_experts(torch.randn(4, 64, dtype=torch.float16), routing, p, backend="torch")
    q = quantize_fp8_block(w13.cpu())
    with pytest.raises(ValueError, match="scale"):
        QuantizedWeight(q.data, q.scale, "fp8", (32, 128))  # the grid of (128, 128), not (32, 128)
    with pytest.raises(ValueError, match="act_scale13"):
        quantized_params(q, quantize_fp8_block(w2.cpu()), act_scheme="static")
    assert isinstance(p.quant, ExpertQuant) and p.hidden_size == 64 and p.intermediate_size == 48


def test_transposed_storage_quantizes_like_the_standard_layout():
    w13, w2 = _weights(3, 64, 64, seed=4)
    a = quantize_experts(w13.cpu(), w2.cpu(), format="mxfp4", activation="swiglu_oai", interleaved=True)
    b = quantize_experts(w13.cpu().transpose(1, 2).contiguous(), w2.cpu().transpose(1, 2).contiguous(),
                         format="mxfp4", activation="swiglu_oai", interleaved=True, transposed=True)
    assert torch.equal(a.quant.w13.data, b.quant.w13.data) and torch.equal(a.quant.w2.scale, b.quant.w2.scale)


def test_roofline_counts_quantized_weight_bytes():
    from moe_kernels.bench.roofline import SHAPES, expert_weight_bytes, layer_min_bytes
    s = SHAPES["mixtral-8x7b"]
    bf16 = expert_weight_bytes(s, 2)
    assert expert_weight_bytes(s, 2, "fp8_block") == pytest.approx(bf16 / 2, rel=1e-3)
    assert expert_weight_bytes(s, 2, "mxfp4") == pytest.approx(bf16 * 0.53125 / 2, rel=1e-6)
    # a decode step is weight-bound: its floor follows the weight bytes
    assert layer_min_bytes(s, 1, 2, 2, quant="fp8_block") < 0.51 * layer_min_bytes(s, 1, 2, 2)


def test_fp8_bits_decoded_without_an_fp8_type(monkeypatch):
    # sm_80 path (FP8_NATIVE=False): e4m3 bits decoded arithmetically, W8A8 falls back to
    # W8A16. Subnormals, +-448 and zeros included in the weights.
    import_or_skip()
    from moe_kernels.backends.triton import quant_experts, quant_gemm

    monkeypatch.setattr(quant_gemm, "fp8_mma", lambda d: False)
    monkeypatch.setattr(quant_experts, "fp8_mma", lambda d: False)
    w13, w2 = _weights(3, 128, 64, seed=6)
    w13[0, 0, :8] = torch.tensor([0.0, 1e-9, -3e-4, 2e-3, 448.0, -448.0, 1e-5, 0.5])  # wide range in one block
    p = quantize_experts(w13, w2, format="fp8_block")  # dynamic: runs as W8A16 here
    pw = quantize_experts(w13, w2, format="fp8_block", act_scheme="none")
    routing, _ = make_routing("softmax_topk", 7, 3, seed=2)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        got = mk.fused_experts(x, routing, p, backend="triton")
        want = experts_quant_torch(x, mk.get_backend("torch", x.device).plan(routing, pw), pw)
    assert_close(got, want, 1e-5, "decoded e4m3")
