"""Every experts class of transformers 5.24 resolves onto moe_kernels (the survey table of
docs/HF.md), and the families added by issue 14 match transformers' eager forward.

The survey builds each ``@use_experts_implementation`` class found in transformers'
modeling sources on the meta device from its default text config (small MoE sizes filled
in where the default leaves them unset) and resolves it; the family tests build the
experts standalone from a tiny config with random weights, inputs large enough that the
clamps and softcaps are active, and compare ``"moe_kernels"`` (torch backend; Triton in
the interpreter for a few) with the module's own eager loop, forward and gradients.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import moe_kernels.integrations.transformers as mkt  # noqa: E402

_FILL = {"num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 32,
         "expert_intermediate_size": 32, "top_k_experts": 2, "num_experts_per_tok": 2}


def _experts_classes():
    root = pathlib.Path(transformers.__file__).parent / "models"
    for f in sorted(root.glob("*/modeling_*.py")):
        for name in re.findall(r"@use_experts_implementation(?:\([^)]*\))?\s*\nclass (\w+)", f.read_text()):
            yield f.parent.name, f.stem, name


def _config_classes(family):
    try:
        cmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    except ImportError:
        return []
    out = []
    for n in sorted(dir(cmod)):
        c = getattr(cmod, n)
        if isinstance(c, type) and issubclass(c, transformers.PretrainedConfig) and c.__module__ == cmod.__name__:
            out.append(c)
    return out


def _build(cls, family):
    """The experts module on the meta device from the first config class that builds it."""
    errors = []
    for ccls in _config_classes(family):
        for fill in (False, True):
            try:
                cfg = ccls()
            except Exception as exc:  # noqa: BLE001 - some configs need arguments
                errors.append(f"{ccls.__name__}: {exc}")
                break
            cfg._experts_implementation = "eager"
            kwargs = {}
            if fill:
                for k, v in _FILL.items():
                    if getattr(cfg, k, 0) is None:
                        setattr(cfg, k, v)
                    elif isinstance(getattr(cfg, k, None), (list, tuple)):
                        kwargs["intermediate_size"] = getattr(cfg, k)[0]
            try:
                with torch.device("meta"):
                    return cls(cfg, **kwargs) if kwargs else cls(cfg)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{ccls.__name__}{' (filled)' if fill else ''}: {type(exc).__name__}: {exc}")
    raise AssertionError(f"{cls.__name__}: could not build from any config: {errors[:4]}")


def test_every_experts_class_of_transformers_resolves():
    """68 classes in 5.24 (67 families); every one maps onto an activation we run."""
    found = {}
    for family, stem, name in _experts_classes():
        mod = importlib.import_module(f"transformers.models.{family}.{stem}")
        spec = mkt.resolve(_build(getattr(mod, name), family))  # raises UnsupportedExpertsError otherwise
        found[name] = spec
    if transformers.__version__.startswith("5.24"):
        assert len(found) == 68, sorted(found)
    acts = {n: s.activation.name for n, s in found.items()}
    # the families issue 14 added (docs/HF.md's table)
    for name, act in {"DeepseekV4Experts": "swiglu_clamp", "Glm5NextTextExperts": "swiglu_clamp",
                      "HYV4Experts": "swiglu_clamp", "HYV4VLExperts": "swiglu_clamp",
                      "Inkling2Experts": "swiglu_softcap", "Inkling2LoopExperts": "swiglu_softcap",
                      "MuseSparkExperts": "swiglu", "NemotronHExperts": "relu2"}.items():
        if name in acts:
            assert acts[name] == act, (name, acts[name])
    if "MuseSparkExperts" in found:
        assert found["MuseSparkExperts"].post_norm == "input_scaled_rms"
    assert {a for a in acts.values()} <= {"swiglu", "geglu_tanh", "swiglu_oai", "swiglu_clamp", "swiglu_softcap",
                                          "relu2"}


# --------------------------------------------------------------------------- new families vs eager

_NEW = {
    "deepseek_v4": ("modeling_deepseek_v4", "DeepseekV4Experts"),
    "glm5_next": ("modeling_glm5_next", "Glm5NextTextExperts"),
    "hy_v4": ("modeling_hy_v4", "HYV4Experts"),
    "hy_v4_vl": ("modeling_hy_v4_vl", "HYV4VLExperts"),
    "inkling2": ("modeling_inkling2", "Inkling2Experts"),
    "inkling2_loop": ("modeling_inkling2_loop", "Inkling2LoopExperts"),
    "muse_spark": ("modeling_muse_spark", "MuseSparkExperts"),
    "nemotron_h": ("modeling_nemotron_h", "NemotronHExperts"),
}


def _tiny(family, impl, seed=0):
    stem, name = _NEW[family]
    cls = getattr(importlib.import_module(f"transformers.models.{family}.{stem}"), name)
    cfg = transformers.AutoConfig.for_model(family).get_text_config()
    for k, v in dict(hidden_size=48, intermediate_size=40, moe_intermediate_size=40, moe_hidden_size=48,
                     num_local_experts=5, n_routed_experts=5, num_experts=5, moe_latent_size=None).items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    m = cls(cfg)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in m.parameters():  # prime E=5, H=48, I=40: not multiples of 32
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m


def _inputs(m, t=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = m.down_proj.shape[1]
    e = m.down_proj.shape[0]
    x = torch.randn(t, h, generator=g) * 3  # clamps (limit 10) and softcaps (4, 25) active
    idx = torch.randint(0, e - 1, (t, 2), generator=g)  # the last expert gets no token
    idx[0] = torch.tensor([0, 0 if e < 2 else 1])
    return x, idx, torch.rand(t, 2, generator=g)


@pytest.mark.parametrize("family", list(_NEW))
def test_new_family_matches_eager_forward_and_grad(family):
    mkt.register("moe_kernels_torch_t14", backend="torch")
    eager = _tiny(family, "eager")
    ours = _tiny(family, "moe_kernels_torch_t14")
    x, idx, w = _inputs(eager)
    if family == "muse_spark":  # a non-trivial norm weight
        with torch.no_grad():
            for m in (eager, ours):
                m.post_expert_norm.weight.copy_(torch.linspace(-0.5, 0.5, m.post_expert_norm.weight.shape[0]))
    xe, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    we, wo = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ye, yo = eager(xe, idx, we), ours(xo, idx, wo)
    spec = mkt.resolve(ours)
    # fp32 rounding relative to the output's scale: the CPU matmul forms sum in another
    # order than HF's mm (x * 3 and clamps at 10 make values of tens).
    scale = max(1.0, ye.abs().max().item())
    assert torch.allclose(yo, ye, rtol=1e-5, atol=1e-5 * scale), (spec.describe(), (yo - ye).abs().max())
    up = torch.randn_like(ye)
    (ye * up).sum().backward()
    (yo * up).sum().backward()
    for name, a, b in (("x", xo.grad, xe.grad), ("weights", wo.grad, we.grad)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (family, name, (a - b).abs().max())
    for (n, pa), (_, pb) in zip(ours.named_parameters(), eager.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-4), (family, n, (pa.grad - pb.grad).abs().max())


@pytest.mark.parametrize("family", ["deepseek_v4", "inkling2", "muse_spark", "nemotron_h"])
def test_new_family_triton_interpreter(family, monkeypatch):
    pytest.importorskip("triton")
    from moe_kernels.backends import unavailable_reason
    if unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("triton backend unavailable on the CPU")
    mkt.register("moe_kernels_triton_t14", backend="triton")
    eager = _tiny(family, "eager")
    ours = _tiny(family, "moe_kernels_triton_t14")
    x, idx, w = _inputs(eager, t=5)
    with torch.no_grad():
        ye, yo = eager(x, idx, w), ours(x, idx, w)
    assert torch.allclose(yo, ye, rtol=1e-4, atol=1e-4), (family, (yo - ye).abs().max())
