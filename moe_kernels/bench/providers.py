"""Benchmark workloads and providers (what gets timed).

A *workload* is one (shape, T, dtype, device): rotating sets of expert weights and of
inputs (``x``, router logits, the routing computed from them, ``dout``). Routing is
drawn with the Gumbel top-k trick: logits = ``log p + Gumbel noise`` makes
``softmax_topk`` pick ``k`` distinct experts per token with probabilities ``p``
(uniform, or Zipf ``p_e ∝ (e+1)^-s`` for ``skewed``), so the precomputed routing and
the full-layer path see the same distribution.

A *provider* turns one weight set and one input set into a forward closure and the
tensors a backward differentiates; :func:`build_calls` wraps them for ``fwd``
(under ``no_grad``) or ``fwdbwd`` (``torch.autograd.grad``, nothing accumulates).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..activations import Activation, apply_activation
from ..backends import BACKEND_NAMES, available_backends, get_backend
from .roofline import ModelShape, expert_weight_bytes
from ..functional import fused_experts, moe
from ..params import ExpertParams, expert_params
from ..plan import build_plan_torch
from ..reference import moe_reference
from ..routing import Routing, softmax_topk

__all__ = ["Weights", "Inputs", "Provider", "PROVIDERS", "make_weights", "make_inputs", "build_calls", "expert_load",
           "default_providers", "parse_providers", "rotation_copies"]


@dataclass
class Weights:
    """One weight set: ``storage`` in the model's layout (leaves, ``requires_grad``)
    and ``params`` the validated view of it."""

    storage: dict[str, torch.Tensor | None]
    params: ExpertParams

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [t for t in self.storage.values() if t is not None]


@dataclass
class Inputs:
    x: torch.Tensor            # [T, H], requires_grad
    logits: torch.Tensor       # [T, E] float32, requires_grad
    routing: Routing           # slot_weight a leaf that requires grad
    grad_out: torch.Tensor     # [T, H]
    active_experts: int        # distinct experts hit by this routing

    @property
    def topk_ids(self) -> torch.Tensor:
        return self.routing.slot_expert.view(self.routing.num_tokens, -1).long()


def rotation_copies(shape: ModelShape, dtype_bytes: int, cache: int, budget: int, max_copies: int = 8) -> int:
    """Weight copies needed so that cycling through them overflows the cache 3× over,
    within the memory budget (at least one)."""
    total = expert_weight_bytes(shape, dtype_bytes) * shape.num_experts
    want = math.ceil(3 * cache / max(total, 1))
    return max(1, min(max_copies, want, budget // max(total, 1)))


def _randn(shape: tuple[int, ...], std: float, dtype: torch.dtype, device: torch.device,
           gen: torch.Generator) -> torch.Tensor:
    # in place: a second full-size temporary would double the peak for DeepSeek-V3 (22 GB)
    return torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(std).requires_grad_(True)


def make_weights(shape: ModelShape, dtype: torch.dtype, device: torch.device, copies: int = 1,
                 seed: int = 0) -> list[Weights]:
    """``copies`` independent weight sets of ``shape`` in its storage layout, scaled so
    activations stay O(1)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden, shape.intermediate
    n = 2 if shape.gated else 1
    out = []
    for _ in range(copies):
        if shape.transposed:
            w13, w2 = _randn((e, h, n * i), h ** -0.5, dtype, device, gen), _randn((e, i, h), i ** -0.5, dtype, device, gen)
        else:
            w13, w2 = _randn((e, n * i, h), h ** -0.5, dtype, device, gen), _randn((e, h, i), i ** -0.5, dtype, device, gen)
        b13 = _randn((e, n * i), 0.1, dtype, device, gen) if shape.bias else None
        b2 = _randn((e, h), 0.1, dtype, device, gen) if shape.bias else None
        params = expert_params(w13, w2, b13, b2, activation=shape.activation, transposed=shape.transposed,
                               interleaved=shape.interleaved)
        out.append(Weights({"w13": w13, "w2": w2, "b13": b13, "b2": b2}, params))
    return out


def make_inputs(shape: ModelShape, num_tokens: int, dtype: torch.dtype, device: torch.device, *,
                routing: str = "uniform", zipf: float = 1.2, copies: int = 4, seed: int = 1) -> list[Inputs]:
    """``copies`` input sets for ``num_tokens`` tokens (module docstring)."""
    if routing not in ("uniform", "skewed"):
        raise ValueError(f"routing: expected 'uniform' or 'skewed', got {routing!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    e, k = shape.num_experts, shape.top_k
    log_p = torch.zeros(e, device=device)
    if routing == "skewed":
        log_p = -zipf * torch.log(torch.arange(1, e + 1, device=device, dtype=torch.float32))
    out = []
    for _ in range(copies):
        u = torch.rand((num_tokens, e), device=device, generator=gen).clamp_(1e-9, 1 - 1e-7)
        logits = (log_p - torch.log(-torch.log(u))).requires_grad_(True)
        with torch.no_grad():
            r = softmax_topk(logits, top_k=k)
        routing_leaf = Routing(r.slot_token, r.slot_expert, r.slot_weight.detach().requires_grad_(True),
                               r.num_tokens, r.num_experts, r.max_slots_per_token, top_k=r.top_k)
        x = torch.randn((num_tokens, shape.hidden), device=device, dtype=dtype, generator=gen).requires_grad_(True)
        dout = torch.randn((num_tokens, shape.hidden), device=device, dtype=dtype, generator=gen)
        active = int(torch.unique(r.slot_expert[r.slot_expert < e]).numel())
        out.append(Inputs(x, logits, routing_leaf, dout, active))
    return out


def expert_load(inputs: list[Inputs]) -> list[int]:
    """Slots per expert of one call (the first input set), read from the dispatch plan's
    ``expert_counts`` (what the kernels see; dropped slots not counted)."""
    return build_plan_torch(inputs[0].routing, 1).expert_counts.tolist() if inputs else []


# --------------------------------------------------------------------------- providers

Forward = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]


@dataclass
class Provider:
    """``forward(shape, weights, inputs)`` returns (closure, tensors to differentiate)."""

    name: str
    forward: Callable[[ModelShape, Weights, Inputs], Forward]
    check: Callable[[torch.device, torch.dtype, ModelShape], str | None] = field(default=lambda d, t, s: None)
    roofline: bool = True          # False: routing + plan only, no FLOPs to speak of
    fwd_only: bool = False
    loop_per_expert: bool = False  # a host-synchronising loop over experts (slow-cell estimate)
    quant: str | None = None       # weights quantized to this format (roofline bytes count it)
    # Providers with per-call setup (the HF module) cache it per weight set here.
    cache: dict = field(default_factory=dict)

    def unavailable(self, device: torch.device, dtype: torch.dtype, shape: ModelShape, mode: str) -> str | None:
        if mode == "fwdbwd" and self.fwd_only:
            return ("forward only (quantized experts are inference-only)" if self.quant else
                    "forward only (routing and plan have no backward to time)")
        return self.check(device, dtype, shape)


def _backend_check(name: str):
    def check(device, dtype, shape):
        return available_backends(device)[name]
    return check


def _experts_provider(name: str) -> Provider:
    def fwd(shape, w, inp):
        return (lambda: fused_experts(inp.x, inp.routing, w.params, backend=name),
                [inp.x, *w.leaves, inp.routing.slot_weight])
    return Provider(name, fwd, _backend_check(name))


def _quant_check(name: str, fmt: str):
    def check(device, dtype, shape):
        if dtype == torch.float64:
            return "quantized experts compute in float16, bfloat16 or float32"
        if fmt == "mxfp4" and (shape.hidden % 32 or shape.intermediate % 32):
            return f"mxfp4 needs H and I multiples of 32 (H={shape.hidden}, I={shape.intermediate})"
        return available_backends(device)[name]
    return check


def _quant_provider(name: str, fmt: str) -> Provider:
    """Forward of ``fused_experts`` on weights quantized once per weight set
    (:func:`moe_kernels.quantize_experts`; fp8: W8A8 with dynamic 1x128 activations)."""
    from ..quant import quantize_experts

    prov: Provider

    def fwd(shape, w, inp):
        key = id(w)
        if key not in prov.cache:
            s = w.storage
            with torch.no_grad():
                prov.cache[key] = quantize_experts(s["w13"].detach(), s["w2"].detach(), s["b13"], s["b2"],
                                                   format=fmt, activation=shape.activation,
                                                   transposed=shape.transposed, interleaved=shape.interleaved)
        params = prov.cache[key]
        return (lambda: fused_experts(inp.x, inp.routing, params, backend=name), [])

    prov = Provider(f"{name}:{fmt.replace('_block', '')}", fwd, _quant_check(name, fmt), fwd_only=True, quant=fmt)
    return prov


def _layer_provider(name: str) -> Provider:
    def fwd(shape, w, inp):
        s = w.storage
        return (lambda: moe(inp.x, inp.logits, s["w13"], s["w2"], s["b13"], s["b2"], router="softmax_topk",
                            top_k=shape.top_k, activation=shape.activation, transposed=shape.transposed,
                            interleaved=shape.interleaved, backend=name),
                [inp.x, *w.leaves, inp.logits])
    return Provider(f"{name}:layer", fwd, _backend_check(name))


def _routing_provider(name: str, plan_only: bool = False) -> Provider:
    """``<backend>:routing``: routing + dispatch plan from the logits; ``<backend>:plan``:
    the plan alone on the precomputed routing (one launch at decode sizes, the
    many-program pipeline at prefill sizes: time it at T = 1, 128, 8192, 65536 with
    ``--tokens``)."""
    def fwd(shape, w, inp):
        impl = get_backend(name, inp.x.device)
        if plan_only:
            return (lambda: impl.plan(inp.routing, w.params).sorted_slot, [])
        opts = {"top_k": shape.top_k}
        return (lambda: impl.plan(impl.route(inp.logits, "softmax_topk", opts), w.params).sorted_slot, [])
    return Provider(f"{name}:{'plan' if plan_only else 'routing'}", fwd, _backend_check(name), roofline=False,
                    fwd_only=True)


def _reference_forward(shape, w, inp):
    return lambda: moe_reference(inp.x, inp.routing, w.params), [inp.x, *w.leaves, inp.routing.slot_weight]


# HF transformers experts classes storing the weights the way each model does.
_HF_CLASSES = {
    "mixtral": ("mixtral", "MixtralConfig", "MixtralExperts"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3Experts"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeExperts"),
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeExperts"),
    "gpt_oss": ("gpt_oss", "GptOssConfig", "GptOssExperts"),
}


def _hf_check(device, dtype, shape):
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install 'transformers>=5')"
    return None


def hf_experts_module(shape: ModelShape, w: Weights, implementation: str) -> torch.nn.Module:
    """The transformers experts module of ``shape``'s model family, holding ``w``'s
    tensors (no copy), with ``config._experts_implementation = implementation``."""
    family, cfg_name, cls_name = _HF_CLASSES[shape.hf_family]
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cfg = getattr(mod, cfg_name)()
    for attr, value in (("num_local_experts", shape.num_experts), ("num_experts", shape.num_experts),
                        ("n_routed_experts", shape.num_experts), ("hidden_size", shape.hidden),
                        ("intermediate_size", shape.intermediate), ("moe_intermediate_size", shape.intermediate),
                        ("num_experts_per_tok", shape.top_k), ("hidden_act", "silu")):
        if hasattr(cfg, attr):
            setattr(cfg, attr, value)
    if shape.activation == "swiglu_oai":
        act = Activation.of(shape.activation)
        cfg.swiglu_alpha, cfg.swiglu_limit = act.alpha, act.limit
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        module = getattr(mod, cls_name)(cfg)
    names = {"gate_up_proj": "w13", "down_proj": "w2", "gate_up_proj_bias": "b13", "down_proj_bias": "b2"}
    for hf_name, ours in names.items():
        if hasattr(module, hf_name):
            t = w.storage[ours]
            if t is None or tuple(getattr(module, hf_name).shape) != tuple(t.shape):
                raise RuntimeError(f"{cls_name}.{hf_name}: layout differs from the benchmark's {ours}")
            setattr(module, hf_name, torch.nn.Parameter(t.detach(), requires_grad=True))
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"{cls_name}: parameters not mapped to the benchmark weights: {leftover}")
    return module


def _hf_provider(implementation: str) -> Provider:
    prov: Provider

    def fwd(shape, w, inp):
        if prov.cache.get("shape") != shape:  # keep one shape's modules, not every shape's
            prov.cache.clear()
            prov.cache.update(shape=shape, modules={})
        modules = prov.cache["modules"]
        if id(w) not in modules:
            modules[id(w)] = hf_experts_module(shape, w, implementation)
        module = modules[id(w)]
        t = inp.routing.num_tokens
        ids = inp.topk_ids
        topw = inp.routing.slot_weight.detach().view(t, -1).to(inp.x.dtype).requires_grad_(True)
        return lambda: module(inp.x, ids, topw), [inp.x, *module.parameters(), topw]

    prov = Provider(f"hf_{implementation}", fwd, _hf_check, loop_per_expert=implementation == "eager")
    return prov


def _grouped_mm_check(device, dtype, shape):
    if device.type != "cuda":
        return "torch._grouped_mm pipeline: CUDA only"
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if dtype != torch.bfloat16:
        return "torch._grouped_mm needs bfloat16"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "torch._grouped_mm needs sm_80 or newer"
    n = 2 if shape.gated else 1
    if shape.hidden % 8 or (n * shape.intermediate) % 8:
        return "torch._grouped_mm needs H and I multiples of 8"
    return None


def grouped_mm_pipeline(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, params: ExpertParams) -> torch.Tensor:
    """The plain PyTorch pipeline a user would write: sort, two ``torch._grouped_mm``,
    activation, weight, ``index_add`` (atomics: not deterministic)."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=params.num_experts).cumsum(0).to(torch.int32)
    token = order // k
    expert = flat[order]
    h13 = torch._grouped_mm(x[token], params.w13.transpose(1, 2), offs=offs)
    if params.b13 is not None:
        h13 = h13 + params.b13[expert]
    hidden = apply_activation(h13, params.activation, params.interleaved).to(x.dtype)
    y = torch._grouped_mm(hidden, params.w2.transpose(1, 2), offs=offs)
    if params.b2 is not None:
        y = y + params.b2[expert]
    y = y * topk_w.reshape(-1)[order].to(y.dtype).unsqueeze(1)
    return x.new_zeros(t, x.shape[1]).index_add(0, token, y)


def _grouped_mm_forward(shape, w, inp):
    ids = inp.topk_ids
    return (lambda: grouped_mm_pipeline(inp.x, ids, inp.routing.slot_weight.view(inp.routing.num_tokens, -1), w.params),
            [inp.x, *w.leaves, inp.routing.slot_weight])


def _all_providers() -> dict[str, Provider]:
    provs = []
    for b in BACKEND_NAMES:
        provs += [_experts_provider(b), _layer_provider(b), _routing_provider(b), _routing_provider(b, plan_only=True)]
    for b in ("torch", "triton"):
        provs += [_quant_provider(b, "fp8_block"), _quant_provider(b, "mxfp4")]
    provs += [Provider("reference", _reference_forward, loop_per_expert=True),
              _hf_provider("eager"), _hf_provider("grouped_mm"),
              Provider("grouped_mm", _grouped_mm_forward, _grouped_mm_check)]
    return {p.name: p for p in provs}


PROVIDERS: dict[str, Provider] = _all_providers()


def default_providers(device: torch.device) -> list[str]:
    """On the CPU: the torch backend (experts, full layer, routing+plan), the reference
    and HF's paths. On a GPU: every available backend in its three modes too, and the
    plain grouped_mm pipeline."""
    if device.type != "cuda":
        return ["torch", "torch:layer", "torch:routing", "reference", "hf_eager", "hf_grouped_mm"]
    names = []
    for b, reason in available_backends(device).items():
        if reason is None:
            names += [b, f"{b}:layer", f"{b}:routing", f"{b}:plan"]
            if b == "triton":
                names += ["triton:fp8", "triton:mxfp4"]
    return names + ["reference", "hf_eager", "hf_grouped_mm", "grouped_mm"]


def parse_providers(spec: str, device: torch.device) -> list[str]:
    """``default``, ``all`` or a comma list of names from :data:`PROVIDERS`."""
    spec = spec.strip()
    if spec in ("", "default"):
        return default_providers(device)
    if spec == "all":
        return list(PROVIDERS)
    names = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [n for n in names if n not in PROVIDERS]
    if bad:
        raise ValueError(f"providers: expected 'default', 'all' or names from {list(PROVIDERS)}, got {bad}")
    return names


def build_calls(provider: Provider, shape: ModelShape, weights: list[Weights], inputs: list[Inputs],
                mode: str) -> list[Callable[[], None]]:
    """One call per rotation step, pairing weight set ``i % W`` with input set ``i % X``."""
    n = max(len(weights), len(inputs))
    calls = []
    for i in range(n):
        fwd, diff = provider.forward(shape, weights[i % len(weights)], inputs[i % len(inputs)])
        calls.append(_step(fwd, diff, inputs[i % len(inputs)].grad_out, mode))
    return calls


def _step(fwd: Callable[[], torch.Tensor], diff: list[torch.Tensor], dout: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                fwd()
        return run

    def run_bwd() -> None:
        out = fwd()
        torch.autograd.grad(out, diff, dout, allow_unused=True)
    return run_bwd
