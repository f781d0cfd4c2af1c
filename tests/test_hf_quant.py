"""transformers' quantized experts through ``"moe_kernels"`` on the CPU.

* ``FP8Experts`` (integrations/finegrained_fp8.py) with random quantized weights: fp8 with
  128x128 block scales (float and ue8m0), static activation scales, ragged blocks, and
  ``expert_dtype="fp4"``. Its own forward needs a hub kernel that cannot be installed
  offline, so the reference is independent: weights dequantized by transformers'
  ``Fp8Dequantize`` (or the HF module's F.linear path on dequantized weights), then the
  experts loop written out here, with the per-token-group activation quantization that
  the W8A8 kernels apply. Bound: 1e-5 relative (float32) against that reference; the
  W8A8 result is within 0.10 of the unquantized-activation result.
* ``Mxfp4GptOssExperts`` (integrations/mxfp4.py): a module built by hand with packed
  blocks and scales (on the CPU transformers dequantizes at load, so the quantized module
  only exists on a GPU with the hub kernels), against ``GptOssExperts`` on weights
  decoded by transformers' ``convert_moe_packed_tensors``: 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
fg = pytest.importorskip("transformers.integrations.finegrained_fp8")

from transformers import GptOssConfig, MixtralConfig  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

import moe_kernels.integrations.transformers as mkt  # noqa: E402
from moe_kernels.quant import dequantize, quantize_act_fp8, quantize_fp4, quantize_fp8_block  # noqa: E402


def _cfg(h, i, e=5, **extra):
    cfg = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=2,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **extra)
    return cfg


def _fp8_module(h, i, e=5, impl="moe_kernels", seed=0, **kw):
    cfg = _cfg(h, i, e)
    cfg._experts_implementation = impl
    cls = use_experts_implementation(experts_class=fg.FP8Experts, experts_interface=fg.ALL_FP8_EXPERTS_FUNCTIONS)
    m = cls(cfg, **kw)
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    fp4 = kw.get("expert_dtype") == "fp4"
    with torch.no_grad():
        for name, w in (("gate_up_proj", w13), ("down_proj", w2)):
            if fp4:
                q = quantize_fp4(w, "ue8m0" if kw.get("scale_fmt") == "ue8m0" else "float")
                getattr(m, name).copy_(q.data.view(torch.int8))
                sc = getattr(m, name + "_scale_inv")
                sc.copy_(q.scale.view(sc.dtype) if sc.dtype != torch.float32 else q.scale)
            else:
                q = quantize_fp8_block(w, kw.get("block_size") or (128, 128), kw.get("scale_fmt", "float"))
                getattr(m, name).copy_(q.data)
                getattr(m, name + "_scale_inv").copy_(q.scale)
        if kw.get("activation_scheme") == "static":
            # calibrated-looking scales: amax / 448 for N(0, 1) inputs (~4.5) and h (~6)
            m.gate_up_proj_activation_scale.copy_(torch.rand(e, generator=g) * 0.002 + 0.010)
            m.down_proj_activation_scale.copy_(torch.rand(e, generator=g) * 0.002 + 0.014)
    return m


def _hf_dequant(m, name):
    """transformers' own dequantization of one FP8Experts weight."""
    w, s = getattr(m, name), getattr(m, name + "_scale_inv")
    if w.dtype == torch.int8:
        unpacked = fg.Fp8Dequantize.__new__(fg.Fp8Dequantize)._unpack_fp4(w)  # the method reads only its LUT
        return unpacked.float() * s.float().repeat_interleave(32, -1)
    return fg._dequantize_fp8_weight(w.detach(), s, list(m.block_size), torch.float32)


def _reference(m, x, idx, w, act="dynamic"):
    """The experts loop on transformers-dequantized weights; activations quantized as the
    W8A8 kernels do (``act``: dynamic per 1x128, static per expert, none)."""
    w13, w2 = _hf_dequant(m, "gate_up_proj"), _hf_dequant(m, "down_proj")
    out = torch.zeros(x.shape, dtype=torch.float32)

    def q(v, e, which):
        if act == "dynamic":
            qq, s = quantize_act_fp8(v, 128)
            return qq.float() * s.repeat_interleave(128, 1)[:, :v.shape[1]]
        if act == "static":
            s = (m.gate_up_proj_activation_scale if which == 1 else m.down_proj_activation_scale)[e]
            return (v / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
        return v

    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h13 = q(x[t:t + 1].float(), e, 1) @ w13[e].t()
            g, u = h13.chunk(2, dim=-1)
            hid = torch.nn.functional.silu(g) * u
            if act == "static":
                hid = hid.to(x.dtype).float()
            out[t] += w[t, j] * (q(hid, e, 2) @ w2[e].t())[0]
    return out


@pytest.mark.parametrize("kw,act", [
    ({"block_size": (128, 128)}, "dynamic"),
    ({"block_size": (128, 128), "scale_fmt": "ue8m0"}, "dynamic"),
    ({"block_size": (128, 128), "activation_scheme": "static"}, "static"),
    ({"expert_dtype": "fp4", "block_size": (128, 128)}, "none"),
    ({"expert_dtype": "fp4", "block_size": (128, 128), "scale_fmt": "ue8m0"}, "none"),
], ids=["fp8-float", "fp8-ue8m0", "fp8-static", "fp4-float", "fp4-ue8m0"])
def test_fp8experts_through_moe_kernels(kw, act):
    m = _fp8_module(256, 128, **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 256, generator=g)
    idx = torch.randint(0, 4, (7, 2), generator=g)  # expert 4 gets no token
    w = torch.rand(7, 2, generator=g)
    spec = mkt.resolve(m)
    assert spec.quant is not None and spec.quant.startswith("fp4" if "fp4" in str(kw) else "fp8")
    with torch.no_grad():
        got = m(x, idx, w)  # dispatched through FP8ExpertsInterface by name
    want = _reference(m, x, idx, w, act)
    assert ((got - want).norm() / want.norm()) < 1e-5
    if act != "none":  # the activation quantization is what separates W8A8 from the weights-only result
        w8a16 = _reference(m, x, idx, w, "none")
        assert 1e-4 < ((got - w8a16).norm() / w8a16.norm()) < 0.10


def test_fp8experts_weights_used_in_place():
    m = _fp8_module(256, 128, block_size=(128, 128))
    p = mkt.params_of(m, torch.float32)
    assert p.quant.w13.data.data_ptr() == m.gate_up_proj.data_ptr()
    assert p.quant.w2.scale.data_ptr() == m.down_proj_scale_inv.data_ptr()


def test_fp8experts_ragged_blocks_vs_hf_linear_path():
    # H = 200, I = 96: not multiples of 128 (cdiv scale grids). Reference: the FP8Experts
    # eager loop itself with dequantized float32 weights (its F.linear path), weights-only.
    m = _fp8_module(200, 96, block_size=(128, 128), seed=3)
    ref = _fp8_module(200, 96, block_size=(128, 128), impl="eager", seed=3)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            from moe_kernels.quant import QuantizedWeight
            qw = QuantizedWeight(getattr(m, name), getattr(m, name + "_scale_inv"), "fp8", (128, 128))
            setattr(ref, name, torch.nn.Parameter(dequantize(qw), requires_grad=False))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 200, generator=g)
    idx = torch.randint(0, 5, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g)
    mkt.register("moe_kernels_w8a16_t14", backend="torch")
    with torch.no_grad():
        want = ref(x, idx, w)
        got = m(x, idx, w)
    assert 1e-4 < ((got - want).norm() / want.norm()) < 0.10  # W8A8 vs weights-only


def test_fp8experts_training_refused():
    m = _fp8_module(256, 128, block_size=(128, 128))
    x = torch.randn(3, 256, requires_grad=True)
    with pytest.raises(ValueError, match="inference-only"):
        m(x, torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))


def test_fp8experts_triton_interpreter():
    pytest.importorskip("triton")
    from quant_interp import fp8_interpreter

    mkt.register("moe_kernels_triton_fp8_t14", backend="triton")
    m = _fp8_module(256, 128, block_size=(128, 128), impl="moe_kernels_triton_fp8_t14")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 256, generator=g)
    idx = torch.randint(0, 5, (5, 2), generator=g)
    w = torch.rand(5, 2, generator=g)
    with torch.no_grad(), fp8_interpreter():
        got = m(x, idx, w)
    want = _reference(m, x, idx, w, "dynamic")
    assert ((got - want).norm() / want.norm()) < 1e-5


# --------------------------------------------------------------------------- GPT-OSS MXFP4


def _mxfp4_pair(seed=0):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    e, h, i = 5, 64, 96
    cfg = GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=2,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64)
    cfg._experts_implementation = "eager"
    m = mx.Mxfp4GptOssExperts(cfg)
    g = torch.Generator().manual_seed(seed)
    blocks13 = torch.randint(0, 256, (e, 2 * i, h // 32, 16), generator=g, dtype=torch.uint8)
    scales13 = torch.randint(120, 128, (e, 2 * i, h // 32), generator=g, dtype=torch.uint8)
    blocks2 = torch.randint(0, 256, (e, h, i // 32, 16), generator=g, dtype=torch.uint8)
    scales2 = torch.randint(120, 128, (e, h, i // 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        m.gate_up_proj.copy_(blocks13.reshape(e, 2 * i, h // 2))
        m.down_proj.copy_(blocks2.reshape(e, h, i // 2))
        m.gate_up_proj_bias.copy_(torch.randn(e, 2 * i, generator=g) * 0.1)
        m.down_proj_bias.copy_(torch.randn(e, h, generator=g) * 0.1)
    m.register_buffer("gate_up_proj_scales", scales13)
    m.register_buffer("down_proj_scales", scales2)
    ref = GptOssExperts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.copy_(mx.convert_moe_packed_tensors(blocks13, scales13, dtype=torch.float32))
        ref.down_proj.copy_(mx.convert_moe_packed_tensors(blocks2, scales2, dtype=torch.float32))
        ref.gate_up_proj_bias.copy_(m.gate_up_proj_bias)
        ref.down_proj_bias.copy_(m.down_proj_bias)
    return m, ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mxfp4_gpt_oss_experts_vs_transformers_dequantized(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    m, ref = _mxfp4_pair()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=g)
    idx = torch.randint(0, 4, (6, 2), generator=g)  # expert 4 empty
    w = torch.rand(6, 2, generator=g)
    with torch.no_grad():
        want = ref(x, idx, w)
        got = mkt.mxfp4_experts_forward(m, x, idx, w, backend=backend)
    assert ((got - want).norm() / want.norm()) < 1e-5
    p = mkt.mxfp4_params(m)
    assert p.quant.w13.data.data_ptr() == m.gate_up_proj.data_ptr()  # the packed bytes in place


def test_enable_mxfp4_switches_the_mlp():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    m, ref = _mxfp4_pair(1)
    cfg = GptOssConfig(hidden_size=64, intermediate_size=96, num_local_experts=5, num_experts_per_tok=2,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64)
    cfg._experts_implementation = "eager"
    mlp_ref = GptOssMLP(cfg)
    mlp_ref.experts = ref
    with torch.no_grad():  # a router that separates the experts (no ties in the top-k)
        mlp_ref.router.weight.copy_(torch.randn(mlp_ref.router.weight.shape, generator=torch.Generator().manual_seed(6)))
    mlp = mx.Mxfp4GptOssMLP(mlp_ref.router, m)
    holder = torch.nn.Module()
    holder.mlp = mlp
    specs = mkt.enable(holder, backend="torch")  # finds the MXFP4 experts (enable_mxfp4)
    assert list(specs) == ["mlp.experts"] and specs["mlp.experts"].quant.startswith("fp4")
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, logits = mlp(x)  # Mxfp4GptOssMLP returns the router logits ...
        want, _ = mlp_ref(x)  # ... GptOssMLP its scores
        assert torch.equal(logits, torch.nn.functional.linear(x.reshape(-1, 64), mlp.router.weight, mlp.router.bias))
    assert ((got - want).norm() / want.norm()) < 1e-5


def test_fp8experts_resolve_on_meta_at_load_time():
    # from_pretrained builds FP8Experts on the meta device, and our load-time check
    # resolves them there (no data): the spec must come out without touching values.
    cfg = _cfg(256, 128)
    cfg._experts_implementation = "moe_kernels"
    cls = use_experts_implementation(experts_class=fg.FP8Experts, experts_interface=fg.ALL_FP8_EXPERTS_FUNCTIONS)
    with torch.device("meta"):
        m = cls(cfg, block_size=(128, 128), scale_fmt="ue8m0")
    spec = mkt.resolve(m)
    assert spec.activation.name == "swiglu" and spec.quant.startswith("fp8 (128, 128) e8m0")
    assert "moe_kernels" in fg.ALL_FP8_EXPERTS_FUNCTIONS._global_mapping
