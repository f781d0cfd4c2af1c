"""The ``"moe_kernels"`` experts implementation for HF transformers >= 5.

transformers 5 keeps the experts of 67 MoE families (68 classes) in classes decorated with
``@use_experts_implementation`` (``transformers/integrations/moe.py``): the weights are
3-D parameters (``gate_up_proj`` [E, 2I, H] or ``up_proj`` [E, I, H], ``down_proj``
[E, H, I], transposed when ``is_transposed``, optional ``*_bias``), and the forward is
looked up by name in the ``ExpertsInterface`` and called as
``fn(experts_module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.
This module registers our fused experts under a name (``"moe_kernels"``)::

    import moe_kernels.integrations.transformers   # registers "moe_kernels"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_kernels")
    # or, on a loaded model:  model.set_experts_implementation("moe_kernels")

How the module's declaration is honoured:

* ``has_gate``, ``has_bias``, ``is_transposed``: become :func:`~moe_kernels.expert_params`
  arguments; the weights are used in place (a transposed layout is a strided *view*,
  never a copy per call).
* The activation is what the class really computes: its ``_apply_gate`` (gated) or
  ``act_fn`` (plain) is evaluated once on a float64 probe and matched against our
  activations (``swiglu``, ``geglu``, ``geglu_tanh``, ``swiglu_oai`` with the module's
  own ``alpha``/``limit``, ``swiglu_clamp`` with its ``limit``, ``swiglu_softcap`` with its
  softcaps; plain ``silu``, ``gelu``, ``gelu_tanh``, ``relu``, ``relu2``; gate and up rows
  concatenated or interleaved). So the default ``_apply_gate`` with ``hidden_act="silu"``
  becomes ``swiglu``, GPT-OSS's clamped SwiGLU over interleaved rows becomes
  ``swiglu_oai`` with ``interleaved=True``, and a custom ``_apply_gate`` we do not
  implement raises :class:`UnsupportedExpertsError` instead of giving a wrong result.
* ``has_post_expert_norm``: the module's ``post_expert_norm`` is identified on a probe
  (input-scaled RMSNorm or RMSNorm) and applied per slot before the routing weight.
* Quantized ``FP8Experts`` (fp8 e4m3 + ``*_scale_inv`` block scales, or int8-packed fp4):
  the weights and scales are used in place (:func:`moe_kernels.quant.quantized_params`);
  ``"moe_kernels"`` is registered in ``FP8ExpertsInterface`` as well. GPT-OSS's
  ``Mxfp4GptOssExperts`` bypasses both interfaces: :func:`enable_mxfp4`.
* Expert-parallel sentinel ids (``>= num_experts``, or negative) become dropped slots
  (:meth:`~moe_kernels.Routing.from_topk`): no compute, no output, zero gradient.

When the checks run: :func:`register` wraps ``PreTrainedModel.post_init`` and
``set_experts_implementation`` so that every experts module selecting one of our names
is checked when the model is built (``from_pretrained`` / ``from_config``) or switched;
the first forward checks again (cached per module) for modules built any other way.

The backend is the one given to :func:`register`, else the environment variable
``MOE_KERNELS_HF_BACKEND`` (read at each call), else ``"auto"``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch

try:
    import transformers as _transformers
    from transformers.integrations.moe import ExpertsInterface as _ExpertsInterface
except ImportError as _exc:  # transformers missing, or 4.x without the ExpertsInterface
    raise ImportError(
        "moe_kernels.integrations.transformers needs transformers >= 5 with its ExpertsInterface "
        "(pip install 'transformers>=5'); for transformers 4.x models use moe_kernels.replace_moe_layers(model). "
        f"Import failed with: {_exc}"
    ) from _exc

try:  # FP8Experts (transformers >= 5.x) dispatch through their own interface
    from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface as _FP8ExpertsInterface
except ImportError:  # pragma: no cover - depends on the transformers version
    _FP8ExpertsInterface = None

from .._checks import FLOAT_DTYPES
from ..activations import Activation, PostNorm, apply_activation, apply_post_norm
from ..backends import BACKEND_NAMES
from ..functional import fused_experts
from ..options import ENV_HF_BACKEND as ENV_BACKEND
from .hf_common import UnsupportedExpertsError, backend_for, registered_backends
from .hf_mxfp4 import mxfp4_experts_forward, mxfp4_params, switch_mxfp4
from ..params import ExpertParams, expert_params
from ..quant import QuantizedWeight, quantized_params
from ..routing import Routing

__all__ = [
    "ENV_BACKEND", "ExpertsSpec", "UnsupportedExpertsError", "check", "enable", "enable_mxfp4", "experts_forward",
    "mxfp4_experts_forward", "mxfp4_params", "params_of", "register", "registered", "resolve",
]

_BACKEND_CHOICES = ("auto", *BACKEND_NAMES)
_QUANT_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_registered = registered_backends  # name -> backend given to register() (hf_common.py)
_forwards: dict[str, object] = {}
_backend_for = backend_for


@dataclass(frozen=True)
class ExpertsSpec:
    """How one HF experts module maps onto :func:`moe_kernels.fused_experts`."""

    activation: Activation
    interleaved: bool
    transposed: bool
    gated: bool
    has_bias: bool
    post_norm: str | None = None   # PostNorm kind of has_post_expert_norm
    quant: str | None = None       # "fp8 (bn, bk) <act scheme>" / "fp4 ..." for quantized weights

    def describe(self) -> str:
        act = self.activation.name
        if act in ("swiglu_oai", "swiglu_clamp", "swiglu_softcap"):
            a = self.activation
            act += {"swiglu_oai": f"(alpha={a.alpha}, limit={a.limit})", "swiglu_clamp": f"(limit={a.limit})",
                    "swiglu_softcap": f"(gate_softcap={a.alpha}, up_softcap={a.limit})"}[act]
        flags = [f for f, on in (("interleaved", self.interleaved), ("transposed", self.transposed),
                                 ("bias", self.has_bias)) if on]
        if self.post_norm:
            flags.append(f"post-norm {self.post_norm}")
        if self.quant:
            flags.append(self.quant)
        return act + (" [" + ", ".join(flags) + "]" if flags else "")


# --------------------------------------------------------------------------- resolving a module


def _is_hf_experts(module: torch.nn.Module) -> bool:
    """A module built by a ``@use_experts_implementation`` class."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "down_proj"))


def _class_name(module: torch.nn.Module) -> str:
    return type(module).__qualname__


def _number(module: torch.nn.Module, *names: str) -> float | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type != "meta":
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _softcaps(module: torch.nn.Module) -> tuple[float, float] | None:
    # Inkling2 keeps its softcaps in act_fn.{gate,up}_softcap.softcap; FP8Experts in gate_softcap/up_softcap.
    act_fn = getattr(module, "act_fn", None)
    cg = _number(module, "gate_softcap")
    if cg is None and act_fn is not None:
        cg = _number(getattr(act_fn, "gate_softcap", None), "softcap")
    cu = _number(module, "up_softcap")
    if cu is None and act_fn is not None:
        cu = _number(getattr(act_fn, "up_softcap", None), "softcap")
    return (cg, cu) if cg is not None and cu is not None and cg > 0 and cu > 0 else None


def _spec_key(module: torch.nn.Module) -> tuple:
    # Everything the spec depends on, cheaply (no tensor reads: this runs every call); a
    # change, e.g. limit edited after loading, re-resolves.
    raw = tuple(getattr(module, a, None) for a in ("alpha", "swiglu_alpha", "limit", "swiglu_limit",
                                                   "gate_softcap", "up_softcap", "activation_scheme", "block_size"))
    raw = tuple(id(v) if isinstance(v, torch.Tensor) else v for v in raw)
    return (type(module), module.has_gate, module.has_bias, module.is_transposed,
            getattr(module, "has_post_expert_norm", False), id(getattr(module, "act_fn", None)), raw)


def _weights(module: torch.nn.Module, gated: bool, has_bias: bool):
    w13_name = "gate_up_proj" if gated else "up_proj"
    w13, w2 = getattr(module, w13_name, None), getattr(module, "down_proj", None)
    for n, w in ((w13_name, w13), ("down_proj", w2)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise UnsupportedExpertsError(
                f"{_class_name(module)}.{n}: expected a 3-D expert weight tensor, got "
                f"{type(w).__name__ if not isinstance(w, torch.Tensor) else tuple(w.shape)}")
    b13 = getattr(module, w13_name + "_bias", None) if has_bias else None
    b2 = getattr(module, "down_proj_bias", None) if has_bias else None
    return w13, w2, b13, b2


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float64 probe: exact formulas agree to ~1e-15; 1e-5 admits an act_fn that computes in
    # float32 and rejects every other activation we know (they differ by >= 1e-3).
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def _probe(rows: int, width: int, scale: float) -> torch.Tensor:
    # explicitly on the CPU: from_pretrained builds models under a meta default device
    g = torch.Generator(device="cpu").manual_seed(20240229)
    return torch.randn(rows, width, generator=g, dtype=torch.float64, device="cpu") * scale


def _match_activation(module: torch.nn.Module, gated: bool, width: int) -> tuple[Activation, bool]:
    """Evaluate what the module computes between its two matmuls and name it."""
    alpha, limit = _number(module, "alpha", "swiglu_alpha"), _number(module, "limit", "swiglu_limit")
    caps = _softcaps(module)
    scale = max(4.0, 2.5 * limit) if limit else 4.0  # past the clamps, so they show
    what = f"{_class_name(module)}._apply_gate" if gated else f"{_class_name(module)}.act_fn"
    fn = module._apply_gate if gated else getattr(module, "act_fn", None)
    if fn is None:
        raise UnsupportedExpertsError(f"{_class_name(module)}: has_gate=False but no act_fn to apply")
    x = _probe(4, width, scale)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot verify it
        raise UnsupportedExpertsError(f"{what}: could not evaluate it on a probe to identify the activation "
                                      f"({type(exc).__name__}: {exc})") from exc
    candidates: list[tuple[Activation, bool]] = []
    if gated:
        layouts = (False, True) if getattr(module, "is_concatenated", True) else (True, False)
        for interleaved in layouts:
            if alpha is not None and limit is not None and limit > 0:
                candidates.append((Activation("swiglu_oai", alpha, limit), interleaved))
            if limit is not None and limit > 0:
                candidates.append((Activation.clamped(limit), interleaved))
            if caps is not None:
                candidates.append((Activation.softcapped(*caps), interleaved))
            candidates += [(Activation(n), interleaved) for n in ("swiglu", "geglu", "geglu_tanh")]
    else:
        candidates = [(Activation(n), False) for n in ("silu", "gelu", "gelu_tanh", "relu", "relu2")]
    for act, interleaved in candidates:
        if _close(y, apply_activation(x, act, interleaved)):
            return act, interleaved
    tried = sorted({a.name for a, _ in candidates})
    act_name = getattr(getattr(module, "config", None), "hidden_act", None)
    raise UnsupportedExpertsError(
        f"{what} (hidden_act={act_name!r}) computes an activation moe_kernels does not implement "
        f"(tried {', '.join(tried)}{'; gate/up rows concatenated and interleaved' if gated else ''}). "
        f"Use experts_implementation='grouped_mm' (or 'eager') for this model.")


def _quantized(module: torch.nn.Module, gated: bool) -> tuple[QuantizedWeight, QuantizedWeight] | None:
    """HF ``FP8Experts`` weights (fp8 e4m3 with ``*_scale_inv`` block scales, or int8 packed
    e2m1 for ``expert_dtype="fp4"``) as :class:`~moe_kernels.quant.QuantizedWeight` views;
    None for float weights."""
    name = _class_name(module)
    w13_name = "gate_up_proj" if gated else "up_proj"
    out = []
    for n in (w13_name, "down_proj"):
        w = getattr(module, n)
        if w.dtype in FLOAT_DTYPES:
            return None
        s = getattr(module, n + "_scale_inv", None)
        if w.dtype not in (torch.float8_e4m3fn, torch.int8, torch.uint8) or not isinstance(s, torch.Tensor):
            raise UnsupportedExpertsError(
                f"{name}: expert weights of dtype {w.dtype} are supported as FP8Experts' float8_e4m3fn (block scales "
                f"in {n}_scale_inv) or packed fp4 (int8/uint8 with per-32 scales); found "
                f"{'no ' + n + '_scale_inv' if not isinstance(s, torch.Tensor) else 'scales ' + str(s.dtype)}")
        try:
            if w.dtype == torch.float8_e4m3fn:
                bs = getattr(module, "block_size", None)
                e, rows, k = w.shape
                bn, bk = (tuple(bs) if bs is not None else (-(-rows // s.shape[1]), -(-k // s.shape[2])))
                out.append(QuantizedWeight(w, s, "fp8", (int(bn), int(bk))))
            else:
                out.append(QuantizedWeight(w, s, "fp4", (1, 32)))
        except ValueError as exc:
            raise UnsupportedExpertsError(f"{name}.{n}: {exc}") from exc
    return out[0], out[1]


def _act_scheme(module: torch.nn.Module, q13: QuantizedWeight) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    if q13.format == "fp4":
        return "none", None, None  # W4A16: activations stay in the model's dtype
    if getattr(module, "activation_scheme", "dynamic") == "static":
        gated = bool(module.has_gate)
        s13 = getattr(module, ("gate_up_proj" if gated else "up_proj") + "_activation_scale", None)
        return "static", s13, getattr(module, "down_proj_activation_scale", None)
    return "dynamic", None, None


def _post_norm_of(module: torch.nn.Module, kind: str) -> PostNorm:
    norm = module.post_expert_norm
    eps = _number(norm, "eps", "variance_epsilon", "epsilon")
    return PostNorm(norm.weight, eps, kind)


def _match_post_norm(module: torch.nn.Module, hidden: int) -> str:
    """Identify ``module.post_expert_norm`` by evaluating a copy on a float64 probe."""
    name = f"{_class_name(module)}.post_expert_norm"
    norm = getattr(module, "post_expert_norm", None)
    w = getattr(norm, "weight", None)
    eps = _number(norm, "eps", "variance_epsilon", "epsilon") if norm is not None else None
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != hidden or eps is None or not eps > 0:
        raise UnsupportedExpertsError(f"{name}: expected a norm module with a [{hidden}] weight and eps > 0, got "
                                      f"{type(norm).__name__}")
    probe_w = _probe(1, hidden, 0.3)[0]
    x = _probe(4, hidden, 3.0)
    try:
        clone = copy.deepcopy(norm).to_empty(device="cpu")  # meta at load time: no data to copy
        with torch.no_grad():
            clone.weight = torch.nn.Parameter(probe_w.to(torch.float64), requires_grad=False)
            y = clone(x)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot verify it
        raise UnsupportedExpertsError(f"{name}: could not evaluate it on a probe ({type(exc).__name__}: {exc})") from exc
    for kind in ("input_scaled_rms", "rms"):
        if _close(y, apply_post_norm(x, PostNorm(probe_w, eps, kind))):
            return kind
    raise UnsupportedExpertsError(f"{name} ({type(norm).__name__}) computes a norm moe_kernels does not implement "
                                  f"(tried input_scaled_rms, rms); use experts_implementation='grouped_mm'")


def resolve(module: torch.nn.Module) -> ExpertsSpec:
    """The :class:`ExpertsSpec` of an HF experts module, or :class:`UnsupportedExpertsError`
    saying what cannot be honoured. Cached on the module."""
    key = _spec_key(module)
    cached = module.__dict__.get("_moe_kernels_spec")
    if cached is not None and cached[0] == key:
        return cached[1]
    name = _class_name(module)
    gated, has_bias, transposed = bool(module.has_gate), bool(module.has_bias), bool(module.is_transposed)
    w13, w2, b13, b2 = _weights(module, gated, has_bias)
    quant = _quantized(module, gated)
    if quant is None and (w13.dtype not in FLOAT_DTYPES or w2.dtype not in FLOAT_DTYPES):
        raise UnsupportedExpertsError(
            f"{name}: expert weights of dtype {w13.dtype} (quantized?) are not supported; moe_kernels runs "
            f"float16, bfloat16, float32 and float64 experts and FP8Experts' fp8/fp4 weights")
    if quant is not None and transposed:
        raise UnsupportedExpertsError(f"{name}: quantized experts are supported in the [E, N, K] layout only")
    if has_bias and (b13 is None or b2 is None):
        raise UnsupportedExpertsError(f"{name}: has_bias=True but the bias parameters are missing")
    if quant is not None:
        hid, inter = quant[1].shape[1], quant[1].shape[2]
    else:
        hid = w2.shape[2] if transposed else w2.shape[1]
        inter = w2.shape[1] if transposed else w2.shape[2]
    norm_kind = _match_post_norm(module, hid) if getattr(module, "has_post_expert_norm", False) else None
    act, interleaved = _match_activation(module, gated, 2 * inter if gated else inter)
    desc = None
    if quant is not None:
        scheme, s13, s2 = _act_scheme(module, quant[0])
        desc = f"{quant[0].format} {quant[0].block} {'e8m0' if quant[0].e8m0 else 'float'} scales, act {scheme}"
    spec = ExpertsSpec(act, interleaved, transposed, gated, has_bias, norm_kind, desc)
    # Shapes and the layout are checked once here (on meta tensors too); per call the same
    # check runs on the live weights.
    try:
        if quant is not None:
            quantized_params(quant[0], quant[1], b13, b2, activation=act, interleaved=interleaved,
                             act_scheme=scheme, act_scale13=s13, act_scale2=s2)
        else:
            expert_params(_meta(w13), _meta(w2), _meta(b13), _meta(b2), activation=act, transposed=transposed,
                          interleaved=interleaved)
    except ValueError as exc:
        raise UnsupportedExpertsError(f"{name}: {exc}") from exc
    module.__dict__["_moe_kernels_spec"] = (key, spec)
    return spec


def _meta(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def params_of(module: torch.nn.Module, dtype: torch.dtype | None = None) -> ExpertParams:
    """The module's weights as :class:`~moe_kernels.ExpertParams` (views, no copies);
    ``dtype``: the activations' dtype of quantized experts (default bfloat16)."""
    spec = resolve(module)
    w13, w2, b13, b2 = _weights(module, spec.gated, spec.has_bias)
    norm = _post_norm_of(module, spec.post_norm) if spec.post_norm else None
    quant = _quantized(module, spec.gated) if spec.quant else None
    if quant is not None:
        scheme, s13, s2 = _act_scheme(module, quant[0])
        return quantized_params(quant[0], quant[1], b13, b2, activation=spec.activation, interleaved=spec.interleaved,
                                dtype=dtype or torch.bfloat16, act_scheme=scheme, act_scale13=s13, act_scale2=s2,
                                post_norm=norm)
    return expert_params(w13, w2, b13, b2, activation=spec.activation, transposed=spec.transposed,
                         interleaved=spec.interleaved, post_norm=norm)


# --------------------------------------------------------------------------- the forward


def experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                    top_k_weights: torch.Tensor | None = None, *, backend: str | None = None,
                    _name: str | None = None, **kwargs) -> torch.Tensor:
    """The ``ExpertsInterface`` function: ``hidden_states`` [T, H], ``top_k_index`` [T, k]
    (int; ids ``>= num_experts`` are expert-parallel sentinels), ``top_k_weights`` [T, k];
    returns [T, H] in ``hidden_states``' dtype."""
    # Keyword spellings used by some model code (GPT-OSS names them router_indices/routing_weights).
    if top_k_index is None:
        top_k_index = kwargs.pop("router_indices", None)
        top_k_index = kwargs.pop("topk_indices", top_k_index)
    if top_k_weights is None:
        top_k_weights = kwargs.pop("routing_weights", None)
        top_k_weights = kwargs.pop("topk_weights", top_k_weights)
    if kwargs:
        raise ValueError(f"experts_forward: unexpected arguments {sorted(kwargs)}")
    if top_k_index is None or top_k_weights is None:
        raise ValueError("experts_forward: expected top_k_index [T, k] and top_k_weights [T, k]")
    act_dtype = hidden_states.dtype if hidden_states.dtype in _QUANT_ACT_DTYPES else torch.bfloat16
    params = params_of(module, act_dtype)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    if x.dtype != params.dtype:  # autocast regions hand float32 activations to bf16 experts
        x = x.to(params.dtype)
    k = top_k_index.shape[-1]
    routing = Routing.from_topk(top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k), params.num_experts)
    out = fused_experts(x.contiguous(), routing, params, backend=_backend_for(_name, backend))
    return out.to(hidden_states.dtype).reshape(shape)


def _make_forward(name: str):
    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, **kwargs):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, _name=name, **kwargs)

    forward.__name__ = forward.__qualname__ = f"moe_kernels_experts_forward[{name}]"
    return forward


# --------------------------------------------------------------------------- model-level checks


def check(model: torch.nn.Module, only: str | None = None) -> dict[str, ExpertsSpec]:
    """Resolve every HF experts module in ``model`` (those selecting implementation
    ``only`` if given); returns ``{module path: spec}``. Raises
    :class:`UnsupportedExpertsError` naming the first module we cannot honour."""
    found = {}
    for path, m in model.named_modules():
        if not _is_hf_experts(m):
            continue
        if only is not None and getattr(getattr(m, "config", None), "_experts_implementation", None) != only:
            continue
        try:
            found[path] = resolve(m)
        except UnsupportedExpertsError as exc:
            raise UnsupportedExpertsError(f"{path or type(model).__name__}: {exc}") from exc
    return found


def _check_ours(model: torch.nn.Module) -> None:
    for name in list(_registered):
        check(model, only=name)


def _install_load_hooks() -> None:
    """Check models selecting one of our names when they are built or switched."""
    cls = _transformers.PreTrainedModel
    if getattr(cls, "_moe_kernels_hooked", False):
        return
    original_post_init = cls.post_init
    original_set = getattr(cls, "set_experts_implementation", None)  # absent in early 5.x

    @functools.wraps(original_post_init)
    def post_init(self, *args, **kwargs):
        out = original_post_init(self, *args, **kwargs)
        _check_ours(self)
        return out

    cls.post_init = post_init
    if original_set is not None:
        @functools.wraps(original_set)
        def set_experts_implementation(self, experts_implementation, *args, **kwargs):
            if isinstance(experts_implementation, str) and experts_implementation in _registered:
                check(self)  # before switching, so a refusal leaves the model as it was
            out = original_set(self, experts_implementation, *args, **kwargs)
            _check_ours(self)
            return out

        cls.set_experts_implementation = set_experts_implementation
    cls._moe_kernels_hooked = True


def register(name: str = "moe_kernels", backend: str | None = None, *, check_on_load: bool = True) -> str:
    """Register the fused experts in transformers' ``ExpertsInterface`` as ``name``.

    Idempotent: calling it again with the same name keeps one entry (a different
    ``backend`` replaces the previous choice). ``backend``: ``"auto"``, ``"torch"``,
    ``"triton"``, ``"cuda"``, or None for the ``MOE_KERNELS_HF_BACKEND`` environment
    variable (read at each call, default ``"auto"``). ``check_on_load`` checks models
    when they are built or switched to ``name`` (see the module docstring).
    Returns ``name``."""
    if not isinstance(name, str) or not name or name in ("eager", "grouped_mm", "batched_mm"):
        raise ValueError(f"name: expected a new implementation name (not eager/grouped_mm/batched_mm), got {name!r}")
    if backend is not None and backend not in _BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {list(_BACKEND_CHOICES)} or None, got {backend!r}")
    if name not in _forwards:
        _forwards[name] = _make_forward(name)
    _registered[name] = backend
    _ExpertsInterface.register(name, _forwards[name])
    if _FP8ExpertsInterface is not None:  # its own registry: FP8Experts look the name up there
        _FP8ExpertsInterface.register(name, _forwards[name])
    if check_on_load:
        _install_load_hooks()
    return name


def registered() -> dict[str, str | None]:
    """Our registered names and the backend each was given (None: environment/auto)."""
    return dict(_registered)


def enable(model: torch.nn.Module, backend: str | None = None, name: str = "moe_kernels") -> dict[str, ExpertsSpec]:
    """Switch a loaded model to the fused experts: register ``name``, check every experts
    module (raising before anything changes if one cannot be honoured), then
    ``model.set_experts_implementation(name)``; GPT-OSS MXFP4 experts, which that setting
    does not reach, are switched by :func:`enable_mxfp4`. Returns ``{module path: spec}``
    (MXFP4 modules under their path with a ``swiglu_oai`` fp4 spec)."""
    register(name, backend if backend is not None else _registered.get(name))
    specs = check(model)
    if specs or hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    for path in enable_mxfp4(model, backend):
        m = model.get_submodule(path)
        specs[path] = ExpertsSpec(Activation("swiglu_oai", float(m.alpha), float(m.limit)), True, False, True, True,
                                  quant="fp4 (1, 32) e8m0 scales, act none")
    return specs


def enable_mxfp4(model: torch.nn.Module, backend: str | None = None) -> list[str]:
    """Route every ``Mxfp4GptOssExperts`` of ``model`` (GPT-OSS loaded in MXFP4) through
    moe_kernels (:func:`moe_kernels.integrations.hf_mxfp4.switch_mxfp4`), registering
    ``"moe_kernels"`` first. Returns the paths of the experts modules switched."""
    register("moe_kernels", backend if backend is not None else _registered.get("moe_kernels"))
    return switch_mxfp4(model)


register()
