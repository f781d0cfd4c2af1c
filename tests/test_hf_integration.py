"""experts_implementation="moe_kernels" against transformers' own "eager" experts.

Tiny random configs, no downloads. For each family: logits in fp32 within 1e-5
relative, the gradient of every parameter after a backward, and greedy generation of 8
tokens (batch 1: every decode step is T = 1). The weights are re-drawn at unit scale so
the experts dominate the residual stream (HF's 0.02 init would hide a wrong expert), and
each family first checks that zeroing the experts moves the logits far past the
tolerance, so the comparison can fail.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation  # noqa: E402

import moe_kernels.integrations.transformers as mkt  # noqa: E402
from moe_kernels.backends import get_backend, unavailable_reason  # noqa: E402

transformers.utils.logging.set_verbosity_error()

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class name, overrides, edge covered)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=5, num_experts_per_tok=2),
                "softmax top-k renormalised; 5 experts (prime)"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24, num_experts=7,
                                         num_experts_per_tok=3, norm_topk_prob=True, head_dim=8),
                  "k=3 of 7 experts, renormalised"),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
              "not renormalised"),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8,
                                             num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                                             first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=16,
                                             q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                             num_key_value_heads=4, num_hidden_layers=3),
                    "grouped sigmoid router with selection bias, scaled weights, shared experts, a dense layer"),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=5, num_experts_per_tok=2, head_dim=8,
                                     sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
                "biases, transposed, interleaved gate/up, clamped SwiGLU (clamps active)"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=32, num_experts=7, num_experts_per_tok=2,
                                         norm_topk_prob=False),
                  "sigmoid-gated shared expert"),
}


def _zero_experts(self, hidden_states, top_k_index, top_k_weights):
    return hidden_states * 0


ExpertsInterface.register("mk_test_zero", _zero_experts)


def _config(family, **extra):
    name, overrides, _ = FAMILIES[family]
    return getattr(transformers, name)(**{**COMMON, **overrides, **extra})


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in n else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            if "experts.gate_up_proj" in n and p.shape[-1] != p.shape[-2] and "GptOss" in type(model).__name__:
                p.mul_(8.0)  # GPT-OSS: push gate/up past limit=7 so both clamps act
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def _model(family, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, **extra), experts_implementation="eager",
                                             dtype=torch.float32)
    return _randomize(model)


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _generate(model, ids):
    return model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


def _assert_family_matches(model, impl, ids):
    model.set_experts_implementation("eager")
    ref_logits, ref_grads = _run(model, ids)
    ref_gen = _generate(model, ids[:1])
    model.set_experts_implementation("mk_test_zero")
    with torch.no_grad():
        zero_logits = model(ids).logits
    scale = ref_logits.abs().max().item()
    assert (zero_logits - ref_logits).abs().max().item() > 1e-2 * scale, "the experts barely matter: test is blind"

    model.set_experts_implementation(impl)
    logits, grads = _run(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5 * scale)
    assert set(grads) == set(ref_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item() + 1e-12,
                                   msg=lambda m, n=n: f"grad of {n}: {m}")
    gen = _generate(model, ids[:1])
    assert gen.shape == (1, ids.shape[1] + 8)
    assert torch.equal(gen, ref_gen), (gen, ref_gen)


@pytest.mark.parametrize("family", list(FAMILIES), ids=[f"{f}-{FAMILIES[f][2][:40]}" for f in FAMILIES])
def test_family_matches_eager(family):
    model = _model(family)
    specs = mkt.check(model)
    assert specs, "no experts module found"
    if family == "gpt_oss":
        spec = next(iter(specs.values()))
        assert spec.activation.name == "swiglu_oai" and spec.interleaved and spec.transposed and spec.has_bias
        assert spec.activation.alpha == model.config.swiglu_alpha and spec.activation.limit == model.config.swiglu_limit
        experts = model.model.layers[0].mlp.experts
        params = mkt.params_of(experts)  # transposed storage used as views: no copy per call
        assert params.w13.data_ptr() == experts.gate_up_proj.data_ptr() and params.w13.shape == (5, 48, 32)
        assert params.w2.data_ptr() == experts.down_proj.data_ptr() and params.w2.shape == (5, 32, 24)
        seen = []
        hook = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (2, 9), generator=g)
    mkt.register("moe_kernels", backend="torch")
    try:
        _assert_family_matches(model, "moe_kernels", ids)
    finally:
        mkt.register("moe_kernels")
    if family == "gpt_oss":
        hook.remove()
        experts = model.model.layers[0].mlp.experts
        h13 = seen[0] @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
        assert (h13[..., 0::2] > experts.limit).any() and (h13[..., 1::2].abs() > experts.limit).any()


def test_from_config_selects_moe_kernels(monkeypatch):
    # the one-line switch: experts_implementation="moe_kernels" at construction
    monkeypatch.delenv(mkt.ENV_BACKEND, raising=False)
    model = AutoModelForCausalLM.from_config(_config("qwen3_moe"), experts_implementation="moe_kernels")
    assert model.config._experts_implementation == "moe_kernels"
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "moe_kernels"
    calls = []
    real = mkt.fused_experts
    monkeypatch.setattr(mkt, "fused_experts", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    model(torch.tensor([[3, 4, 5]]))
    assert calls == ["auto", "auto"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_triton_backend_under_interpreter(family, monkeypatch):
    # the Triton kernels (TRITON_INTERPRET=1 on the CPU, set by conftest): plain SwiGLU, and
    # GPT-OSS's biases + interleaved rows + clamped SwiGLU in the kernels' epilogues
    reason = unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"triton backend unavailable on the CPU: {reason}")
    mkt.register("moe_kernels_triton", backend="triton")
    model = _model(family, num_hidden_layers=1, layer_types=["full_attention"]) if family == "gpt_oss" else \
        _model(family, num_hidden_layers=1)
    impl, calls = get_backend("triton", "cpu"), []
    real = impl.experts
    monkeypatch.setattr(impl, "experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    _assert_family_matches(model, "moe_kernels_triton", ids)
    assert calls, "the triton backend never ran"


def test_expert_parallel_sentinels_contribute_nothing():
    # ids >= num_experts (EP: experts on other ranks) must give no output and no gradient;
    # transformers' own batched_mm masks them the same way and is the reference.
    model = _model("mixtral", num_hidden_layers=1)
    experts = model.model.layers[0].mlp.experts
    experts._is_expert_parallel = True
    e = experts.num_experts
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=g)
    idx = torch.randint(0, e, (6, 2), generator=g)
    idx[0, 1], idx[3, 0], idx[5] = e, e + 3, e  # one sentinel, another id, a token with only sentinels
    w = torch.rand(6, 2, generator=g)
    outs = {}
    for impl in ("batched_mm", "moe_kernels"):
        experts.config._experts_implementation = impl
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = experts(xi, idx, wi)
        y.square().sum().backward()
        outs[impl] = (y, xi.grad, wi.grad, experts.gate_up_proj.grad.clone())
        experts.gate_up_proj.grad = None
    for a, b in zip(outs["moe_kernels"], outs["batched_mm"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not outs["moe_kernels"][0][5].any() and not outs["moe_kernels"][2][idx >= e].any()


def test_autocast_style_dtype_mismatch():
    # edge: float32 activations reaching bf16 experts are cast to the weights' dtype and
    # the output comes back in the activations' dtype (what HF's grouped_mm does)
    model = _model("olmoe", num_hidden_layers=1).to(torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(4, 32)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    w = torch.rand(4, 2)
    y = mkt.experts_forward(experts, x, idx, w, backend="torch")
    experts.config._experts_implementation = "eager"
    ref = experts(x.to(torch.bfloat16), idx, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


# --------------------------------------------------------------------------- what raises


def _standalone_experts(apply_gate=None, **flags):
    cfg = _config("mixtral")

    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.alpha, self.limit = 4, 1.702, 7.0
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 16, 32) / 6)
            self.down_proj = torch.nn.Parameter(torch.randn(4, 32, 8) / 3)
            self.act_fn = transformers.activations.ACT2FN["silu"]

    if apply_gate is not None:
        Experts._apply_gate = apply_gate
    cls = use_experts_implementation(Experts, **flags)
    return cls(cfg)


def test_post_expert_norm_without_a_norm_module_raises():
    # has_post_expert_norm is supported (tests/test_hf_families.py); a module declaring it
    # without a recognisable post_expert_norm is refused, naming it.
    with pytest.raises(mkt.UnsupportedExpertsError, match="post_expert_norm"):
        mkt.resolve(_standalone_experts(has_post_expert_norm=True))


def test_unknown_apply_gate_raises_and_known_variants_resolve():
    def clamped_silu(self, gate_up):  # HY-V4 / GLM-5-Next style: swiglu_clamp with the module's limit
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate.clamp(max=self.limit)) * up.clamp(-self.limit, self.limit)

    def squared_gate(self, gate_up):  # not an activation we have
        gate, up = gate_up.chunk(2, dim=-1)
        return gate * gate * up

    def oai_concatenated(self, gate_up):  # OpenAI privacy filter / MiniMax-M3: concatenated rows
        gate, up = gate_up.chunk(2, dim=-1)
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    with pytest.raises(mkt.UnsupportedExpertsError, match="does not implement"):
        mkt.resolve(_standalone_experts(squared_gate))
    spec = mkt.resolve(_standalone_experts(clamped_silu))
    assert spec.activation.name == "swiglu_clamp" and spec.activation.limit == 7.0
    spec = mkt.resolve(_standalone_experts(oai_concatenated))
    assert spec.activation.name == "swiglu_oai" and not spec.interleaved
    assert mkt.resolve(_standalone_experts()).activation.name == "swiglu"


def test_custom_apply_gate_raises_at_load_and_on_switch(monkeypatch):
    from transformers.models.mixtral import modeling_mixtral

    def clamped_silu(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate.clamp(max=7.0)) * up

    monkeypatch.setattr(modeling_mixtral.MixtralExperts, "_apply_gate", clamped_silu)
    with pytest.raises(mkt.UnsupportedExpertsError, match="MixtralExperts._apply_gate"):
        AutoModelForCausalLM.from_config(_config("mixtral"), experts_implementation="moe_kernels")
    model = AutoModelForCausalLM.from_config(_config("mixtral"), experts_implementation="eager")
    with pytest.raises(mkt.UnsupportedExpertsError, match="layers.0.mlp.experts"):
        model.set_experts_implementation("moe_kernels")
    assert model.config._experts_implementation == "eager"  # refused before switching
    with pytest.raises(mkt.UnsupportedExpertsError):
        mkt.enable(model)
    assert model.config._experts_implementation == "eager"


def test_plain_experts_has_gate_false():
    # has_gate=False: up_proj [E, I, H] then act_fn; compared with transformers' batched_mm
    class Plain(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 3
            self.up_proj = torch.nn.Parameter(torch.randn(3, 8, 32) / 6)
            self.down_proj = torch.nn.Parameter(torch.randn(3, 32, 8) / 3)
            self.act_fn = transformers.activations.ACT2FN["gelu_pytorch_tanh"]

    experts = use_experts_implementation(Plain, has_gate=False)(_config("mixtral"))
    assert mkt.resolve(experts).activation.name == "gelu_tanh"
    x, idx, w = torch.randn(5, 32), torch.randint(0, 3, (5, 2)), torch.rand(5, 2)
    experts.config._experts_implementation = "batched_mm"
    ref = experts(x, idx, w)
    torch.testing.assert_close(mkt.experts_forward(experts, x, idx, w), ref, rtol=1e-5, atol=1e-6)


def test_register_is_idempotent_and_validates():
    fn = ExpertsInterface._global_mapping["moe_kernels"]
    assert mkt.register() == "moe_kernels" and mkt.register() == "moe_kernels"
    assert ExpertsInterface._global_mapping["moe_kernels"] is fn
    assert list(ExpertsInterface._global_mapping).count("moe_kernels") == 1
    with pytest.raises(ValueError, match="backend"):
        mkt.register(backend="fastest")
    with pytest.raises(ValueError, match="name"):
        mkt.register("eager")
    assert mkt.registered()["moe_kernels"] is None


def test_backend_from_environment(monkeypatch):
    model = _model("olmoe", num_hidden_layers=1)
    model.set_experts_implementation("moe_kernels")
    ids = torch.tensor([[3, 4, 5, 6]])
    monkeypatch.setenv(mkt.ENV_BACKEND, "torch")
    model(ids)
    monkeypatch.setenv(mkt.ENV_BACKEND, "no-such-backend")
    with pytest.raises(ValueError, match="backend"):
        model(ids)


def test_importing_moe_kernels_does_not_import_transformers():
    code = ("import sys, moe_kernels, moe_kernels.integrations, moe_kernels.integrations.replace; "
            "assert 'transformers' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_from_pretrained_local_checkpoint(tmp_path):
    # from_pretrained on a saved tiny checkpoint (no network): same logits as eager
    model = _model("qwen2_moe", num_hidden_layers=1)
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[3, 9, 27, 81, 50]])
    loaded = {impl: AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=impl, dtype=torch.float32)
              for impl in ("eager", "moe_kernels")}
    with torch.no_grad():
        ref, got = (loaded[i](ids).logits for i in ("eager", "moe_kernels"))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
