"""Swap MoE blocks that keep their experts as an ``nn.ModuleList`` for fused ones.

transformers 4.x (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, ...) and much user
code hold one ``nn.Module`` per expert; every forward then loops over the experts.
:func:`replace_moe_layers` finds such blocks, stacks their expert weights *once* into
``w13`` [E, n*I, H] and ``w2`` [E, H, I] parameters, and puts a :class:`FusedMoEBlock`
in the block's place with the same router, the same shared expert(s) (the same module
objects) and the same output contract.

The protocol a block must follow (the 4.x families above follow it):

* ``experts``: an ``nn.ModuleList`` of E identical MLPs whose ``nn.Linear`` layers are
  named ``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w3``/``w2`` (gated:
  ``down(act(gate(x)) * up(x))``), or ``up_proj``/``down_proj`` or ``fc1``/``fc2``
  (plain: ``down(act(up(x)))``), with the activation in ``act_fn`` (or ``activation_fn``,
  ``act``): SiLU, GELU or GELU-tanh (ReLU for plain experts). Experts that call it inline
  (``F.silu(self.w1(x)) * self.w3(x)``, no attribute) work too: each of those is tried
  against every expert's forward; when none matches, the report says what to add.
* ``gate``: the router. Either an ``nn.Linear`` [H -> E] followed by softmax top-k with
  ``top_k`` (or ``num_experts_per_tok``) and, optionally, ``norm_topk_prob`` (whether the
  k weights are renormalised; when absent both are tried), the routing computed in float32
  and the weights cast to the input dtype (Mixtral, Qwen-MoE, OLMoE); or a module with
  ``weight``, ``e_score_correction_bias``, ``top_k``, ``n_group``, ``topk_group``,
  ``norm_topk_prob``, ``routed_scaling_factor`` (DeepSeek-V3's sigmoid grouped top-k on
  float32 logits). A block may instead name any router of :mod:`moe_kernels.routing` over
  ``gate(x)`` with an attribute ``moe_kernels_router = {"router": "switch",
  "capacity_factor": 1.25}``.
* Optional: ``shared_expert`` (with ``shared_expert_gate``, an ``nn.Linear`` [H -> 1]
  whose sigmoid scales it, as Qwen2-MoE) or ``shared_experts`` (added as is, as
  DeepSeek-V3); ``jitter_noise`` (Mixtral's multiplicative input jitter while training).
* ``forward(hidden_states [..., H])`` returns the output, or ``(output, router_logits)``.

Every replacement is checked before it is made: each expert MLP against its stacked
weights, and the whole block against the original on a probe batch (eval mode, a
private random generator); a block that does not match, or that we do not recognise, is
left alone and listed in the report with the reason. The state dict keeps the original
per-expert keys (``experts.3.w1.weight``; copies made when saving) and a load accepts
both layouts, so checkpoints stay loadable by the original model code.

Replace before building the optimizer: the stacked weights are new parameters.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import Activation, apply_activation
from ..backends import BACKEND_NAMES, get_backend
from ..functional import fused_experts
from ..params import expert_params
from ..routing import ROUTERS, Routing, router_jitter

__all__ = ["FusedMoEBlock", "ReplaceReport", "replace_moe_layers"]

_GATED_LAYOUTS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_PLAIN_LAYOUTS = (("up_proj", "down_proj"), ("fc1", "fc2"))
_ACT_ATTRS = ("act_fn", "activation_fn", "act")
_GATED_OF = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}
# 4.x blocks whose contract is known, for when no probe can run (weights on the meta device):
# class name -> returns (output, router_logits); Mixtral always renormalises its top-k weights.
_KNOWN = {"MixtralSparseMoeBlock": True, "Qwen2MoeSparseMoeBlock": True, "Qwen3MoeSparseMoeBlock": True,
          "OlmoeSparseMoeBlock": True, "DeepseekV3MoE": False}
_ALWAYS_RENORMALISES = ("MixtralSparseMoeBlock",)


class _Skip(Exception):
    """Why a block is left alone."""


@dataclass
class ReplaceReport:
    """What :func:`replace_moe_layers` did: ``replaced`` and ``skipped`` are lists of
    dicts with ``path``, ``block`` (class name) and ``router``/``experts``/``max_error`` or
    ``reason``."""

    replaced: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} MoE block(s), left {len(self.skipped)} alone"]
        for r in self.replaced:
            err = "not verified" if r["max_error"] is None else f"max rel. error {r['max_error']:.1e}"
            lines.append(f"  + {r['path']} ({r['block']}): {r['experts']}, router {r['router']}, {err}")
        for s in self.skipped:
            lines.append(f"  - {s['path']} ({s['block']}): {s['reason']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- experts


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    m = getattr(module, name, None)
    return m if isinstance(m, nn.Linear) else None


def _layout(expert: nn.Module) -> tuple[str, ...]:
    for names in _GATED_LAYOUTS:
        if all(_linear(expert, n) is not None for n in names):
            return names
    for names in _PLAIN_LAYOUTS:
        if all(_linear(expert, n) is not None for n in names) and _linear(expert, "gate_proj") is None:
            return names
    raise _Skip(f"expert {type(expert).__name__} has none of the layouts gate_proj/up_proj/down_proj, "
                f"w1/w3/w2, up_proj/down_proj, fc1/fc2 as nn.Linear")


def _plain_activation(fn) -> str:
    """Name the elementwise function ``fn`` by evaluating it on a float64 probe."""
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64, device="cpu") * 4
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception as exc:  # noqa: BLE001 - anything we cannot evaluate we cannot match
        raise _Skip(f"could not evaluate the expert activation {type(fn).__name__} ({exc})") from exc
    for name in ("silu", "gelu", "gelu_tanh", "relu"):
        if torch.allclose(y, apply_activation(x, Activation(name)), rtol=1e-5, atol=1e-6):
            return name
    raise _Skip(f"expert activation {type(fn).__name__} is none of silu, gelu, gelu_tanh, relu")


def _stack_experts(experts: nn.ModuleList) -> dict:
    if len(experts) == 0:
        raise _Skip("experts is an empty ModuleList")
    first = experts[0]
    names = _layout(first)
    if any(type(e) is not type(first) for e in experts):
        raise _Skip("experts are not all of one class")
    fn = next((getattr(first, a) for a in _ACT_ATTRS if callable(getattr(first, a, None))), None)
    gated = len(names) == 3
    plain = None if fn is None else _plain_activation(fn)
    if gated and plain is not None and plain not in _GATED_OF:
        raise _Skip(f"gated experts with activation {plain!r} are not implemented")
    act = None if plain is None else Activation(_GATED_OF[plain] if gated else plain)
    layers = [[_linear(e, n) for n in names] for e in experts]
    if any(None in row for row in layers) or any(_layout(e) != names for e in experts):
        raise _Skip("experts do not all have the same layers")
    ref = layers[0]
    for row in layers:
        for a, b in zip(row, ref):
            if a.weight.shape != b.weight.shape or a.weight.dtype != b.weight.dtype or \
                    a.weight.device != b.weight.device or (a.bias is None) != (b.bias is None):
                raise _Skip("experts differ in shape, dtype, device or bias")
    in_layers, down = [row[:-1] for row in layers], [row[-1] for row in layers]
    h, i = ref[0].in_features, ref[0].out_features
    if any(lin.in_features != h or lin.out_features != i for lin in ref[:-1]) or \
            (ref[-1].in_features, ref[-1].out_features) != (i, h):
        raise _Skip(f"expert layer shapes do not chain H={h} -> I={i} -> H")
    has_bias = ref[0].bias is not None
    if any((lin.bias is not None) != has_bias for lin in ref):
        raise _Skip("some expert layers have a bias and others not")
    with torch.no_grad():
        w13 = torch.stack([torch.cat([lin.weight for lin in row]) for row in in_layers])
        w2 = torch.stack([lin.weight for lin in down])
        b13 = torch.stack([torch.cat([lin.bias for lin in row]) for row in in_layers]) if has_bias else None
        b2 = torch.stack([lin.bias for lin in down]) if has_bias else None
    grad = ref[0].weight.requires_grad
    stacked = {"w13": w13, "w2": w2, "b13": b13, "b2": b2, "activation": act, "names": names,
               "requires_grad": grad}
    if act is None:
        stacked["activation"] = _inline_activation(experts, stacked)
    return stacked


def _inline_activation(experts: nn.ModuleList, stacked: dict) -> Activation:
    """The activation of experts that call it inline (``F.silu(self.w1(x)) * self.w3(x)``,
    no ``act_fn`` attribute): each common one is tried against every expert's forward."""
    gated = len(stacked["names"]) == 3
    cls = type(experts[0]).__name__
    hint = (f"give {cls} an attribute `self.act_fn = nn.SiLU()` (or nn.GELU(), nn.GELU(approximate='tanh')"
            f"{'' if gated else ', nn.ReLU()'}) and call it in forward")
    if stacked["w13"].device.type == "meta":
        raise _Skip(f"expert {cls} has no act_fn attribute and its weights are on the meta device, so the "
                    f"activation it calls inline cannot be probed: {hint}")
    for plain in ("silu", "gelu", "gelu_tanh") + (() if gated else ("relu",)):
        try:
            _check_experts(experts, dict(stacked, activation=Activation(_GATED_OF[plain] if gated else plain)))
        except _Skip:
            continue
        return Activation(_GATED_OF[plain] if gated else plain)
    raise _Skip(f"expert {cls} has no act_fn attribute and its forward matches none of silu, gelu, gelu_tanh"
                f"{'' if gated else ', relu'} called inline: {hint}")


# --------------------------------------------------------------------------- routers


def _top_k(block: nn.Module) -> int:
    for a in ("top_k", "num_experts_per_tok"):
        v = getattr(block, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise _Skip("no integer top_k or num_experts_per_tok on the block")


def _router_candidates(block: nn.Module, num_experts: int) -> list[dict]:
    gate = getattr(block, "gate", None)
    custom = getattr(block, "moe_kernels_router", None)
    if custom is not None:
        if not isinstance(gate, nn.Module) or not isinstance(custom, dict) or custom.get("router") not in ROUTERS:
            raise _Skip(f"moe_kernels_router must be a dict with 'router' in {sorted(ROUTERS)} and the block "
                        f"needs a gate module for the logits")
        opts = {k: v for k, v in custom.items() if k != "router"}
        return [{"kind": "custom", "router": custom["router"], "options": opts}]
    if isinstance(gate, nn.Linear):
        if gate.out_features != num_experts:
            raise _Skip(f"gate has {gate.out_features} outputs for {num_experts} experts")
        k = _top_k(block)
        norm = getattr(block, "norm_topk_prob", None)
        if norm is None and type(block).__name__ in _ALWAYS_RENORMALISES:
            norm = True
        renorms = [bool(norm)] if norm is not None else [True, False]
        return [{"kind": "softmax", "router": "softmax_topk", "options": {"top_k": k, "renormalize": r}}
                for r in renorms]
    needed = ("weight", "e_score_correction_bias", "top_k", "n_group", "topk_group", "norm_topk_prob",
              "routed_scaling_factor")
    if isinstance(gate, nn.Module) and all(hasattr(gate, a) for a in needed):
        return [{"kind": "grouped", "router": "grouped_sigmoid_topk", "options": {
            "top_k": int(gate.top_k), "n_group": int(gate.n_group), "topk_group": int(gate.topk_group),
            "routed_scaling_factor": float(gate.routed_scaling_factor), "renormalize": bool(gate.norm_topk_prob)}}]
    raise _Skip(f"router `gate` of type {type(gate).__name__} is not recognised (nn.Linear, a DeepSeek-V3 "
                f"grouped router, or set moe_kernels_router)")


# --------------------------------------------------------------------------- the fused block


class FusedMoEBlock(nn.Module):
    """A MoE block with stacked expert weights and the fused experts.

    Keeps the original router (``gate``) and shared expert modules; ``w13`` [E, n*I, H],
    ``w2`` [E, H, I], optional ``b13``/``b2`` hold the experts. Returns what the
    original block returned: the output, or ``(output, router_logits)``."""

    def __init__(self, *, gate: nn.Module, stacked: dict, router: dict, returns_logits: bool,
                 source: str, backend: str = "auto", shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, shared_experts: nn.Module | None = None,
                 jitter_noise: float = 0.0) -> None:
        super().__init__()
        self.gate = gate
        grad = stacked["requires_grad"]
        self.w13 = nn.Parameter(stacked["w13"], requires_grad=grad)
        self.w2 = nn.Parameter(stacked["w2"], requires_grad=grad)
        self.b13 = None if stacked["b13"] is None else nn.Parameter(stacked["b13"], requires_grad=grad)
        self.b2 = None if stacked["b2"] is None else nn.Parameter(stacked["b2"], requires_grad=grad)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.shared_experts = shared_experts
        self.activation: Activation = stacked["activation"]
        self.expert_names: tuple[str, ...] = stacked["names"]
        self.router = dict(router)
        self.returns_logits = returns_logits
        self.source = source
        self.backend = backend
        self.jitter_noise = float(jitter_noise or 0.0)
        # public names from torch 2.5 on; the private ones before
        if hasattr(self, "register_state_dict_post_hook"):
            self.register_state_dict_post_hook(_save_per_expert)
        else:
            self._register_state_dict_hook(_save_per_expert)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_load_per_expert)
        else:
            self._register_load_state_dict_pre_hook(_load_per_expert, with_module=True)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def extra_repr(self) -> str:
        return (f"source={self.source}, num_experts={self.num_experts}, router={self.router['router']}"
                f"{self.router['options']}, activation={self.activation.name!r}, backend={self.backend!r}")

    def route(self, x2d: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        kind, opts = self.router["kind"], dict(self.router["options"])
        impl = get_backend(self.backend, x2d.device)
        if kind == "grouped":
            logits = F.linear(x2d.float(), self.gate.weight.float())
            opts["bias"] = self.gate.e_score_correction_bias
        else:
            logits = self.gate(x2d)
        routing = impl.route(logits, self.router["router"], opts)
        if kind == "softmax" and routing.slot_weight.dtype != x2d.dtype:
            # the 4.x blocks cast the routing weights to the activations' dtype
            routing = Routing(routing.slot_token, routing.slot_expert, routing.slot_weight.to(x2d.dtype),
                              routing.num_tokens, routing.num_experts, routing.max_slots_per_token,
                              routing.top_k, routing.losses)
        return logits, routing

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states
        x = router_jitter(x, self.jitter_noise, self.training)
        x2d = x.reshape(-1, shape[-1]).contiguous()
        logits, routing = self.route(x2d)
        params = expert_params(self.w13, self.w2, self.b13, self.b2, activation=self.activation)
        out = fused_experts(x2d, routing, params, backend=self.backend)
        if self.shared_expert is not None:
            shared = self.shared_expert(x2d)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x2d)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(x2d)
        out = out.reshape(shape)
        return (out, logits) if self.returns_logits else out


def _per_expert_keys(block: FusedMoEBlock, prefix: str) -> list[tuple[str, ...]]:
    names = block.expert_names
    return [tuple(f"{prefix}experts.{e}.{n}" for n in names) for e in range(block.num_experts)]


def _save_per_expert(block: FusedMoEBlock, state_dict: dict, prefix: str, local_metadata) -> None:
    """Write the original ``experts.{e}.{layer}.weight`` keys (copies, so no two saved
    tensors share memory) in place of the stacked ones."""
    w13, w2 = state_dict.pop(prefix + "w13"), state_dict.pop(prefix + "w2")
    b13, b2 = state_dict.pop(prefix + "b13", None), state_dict.pop(prefix + "b2", None)
    i = w2.shape[2]
    for e, keys in enumerate(_per_expert_keys(block, prefix)):
        ins = keys[:-1]
        for j, key in enumerate(ins):
            state_dict[key + ".weight"] = w13[e, j * i:(j + 1) * i].clone()
            if b13 is not None:
                state_dict[key + ".bias"] = b13[e, j * i:(j + 1) * i].clone()
        state_dict[keys[-1] + ".weight"] = w2[e].clone()
        if b2 is not None:
            state_dict[keys[-1] + ".bias"] = b2[e].clone()


def _load_per_expert(block: FusedMoEBlock, state_dict: dict, prefix: str, *args) -> None:
    """Accept the original per-expert keys by stacking them (the stacked keys load as is)."""
    keys = _per_expert_keys(block, prefix)
    if keys[0][0] + ".weight" not in state_dict:
        return
    flat = [k + suffix for row in keys for k in row for suffix in (".weight", ".bias")]
    if not all(k in state_dict for k in flat if k.endswith(".weight")):
        return  # incomplete: let load_state_dict report the missing keys
    w = [[state_dict.pop(k + ".weight") for k in row] for row in keys]
    state_dict[prefix + "w13"] = torch.stack([torch.cat(row[:-1]) for row in w])
    state_dict[prefix + "w2"] = torch.stack([row[-1] for row in w])
    if block.b13 is not None and all(k + ".bias" in state_dict for row in keys for k in row):
        b = [[state_dict.pop(k + ".bias") for k in row] for row in keys]
        state_dict[prefix + "b13"] = torch.stack([torch.cat(row[:-1]) for row in b])
        state_dict[prefix + "b2"] = torch.stack([row[-1] for row in b])


# --------------------------------------------------------------------------- verification


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return float(((a.float() - b.float()).abs().max() / scale.float()) if b.numel() else 0.0)


def _check_experts(experts: nn.ModuleList, stacked: dict) -> None:
    """Each expert module against its slice of the stacked weights, so a forward that is
    not ``down(act(gate(x)) * up(x))`` is caught (every expert, not only routed ones)."""
    w13 = stacked["w13"]
    g = torch.Generator(device="cpu").manual_seed(11)
    x = torch.randn(3, w13.shape[2], generator=g, device="cpu").to(device=w13.device, dtype=w13.dtype)
    tol = _tolerance(w13.dtype)
    with torch.no_grad():
        for e, expert in enumerate(experts):
            h13 = x @ w13[e].t() + (stacked["b13"][e] if stacked["b13"] is not None else 0)
            y = apply_activation(h13, stacked["activation"]) @ stacked["w2"][e].t()
            y = y + (stacked["b2"][e] if stacked["b2"] is not None else 0)
            ref = expert(x)
            if not isinstance(ref, torch.Tensor) or ref.shape != y.shape or _rel_err(y, ref) > tol:
                formula = "down(act(gate(x)) * up(x))" if len(stacked["names"]) == 3 else "down(act(up(x)))"
                raise _Skip(f"expert {e} does not compute {formula} with its layers")


def _output_contract(ref, num_experts: int) -> bool:
    if isinstance(ref, torch.Tensor):
        return False
    if isinstance(ref, (tuple, list)) and len(ref) == 2 and isinstance(ref[1], torch.Tensor) \
            and ref[1].shape[-1] == num_experts:
        return True
    raise _Skip(f"block returns {type(ref).__name__}; expected a tensor or (output, router_logits)")


# --------------------------------------------------------------------------- the walk


def _is_hf5_experts(m: nn.Module) -> bool:
    return hasattr(m, "gate_up_proj") or (hasattr(m, "down_proj") and hasattr(m, "has_gate"))


def _build(block: nn.Module, backend: str, verify: bool) -> tuple[FusedMoEBlock, float | None, str]:
    if block._forward_hooks or block._forward_pre_hooks or hasattr(block, "_hf_hook"):
        raise _Skip("the block has forward hooks (accelerate offloading?); replace before dispatching the model")
    known = {"gate", "experts", "shared_expert", "shared_expert_gate", "shared_experts"}
    extra = [n for n, _ in block.named_children() if n not in known]
    if extra:
        raise _Skip(f"unknown submodule(s) {', '.join(extra)}: the fused block would drop them")
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in block.experts.modules()):
        raise _Skip("the experts use dropout, which the fused experts do not apply")
    stacked = _stack_experts(block.experts)
    on_meta = stacked["w13"].device.type == "meta"
    candidates = _router_candidates(block, stacked["w13"].shape[0])
    shared = {a: getattr(block, a, None) for a in ("shared_expert", "shared_expert_gate", "shared_experts")}
    for a, m in shared.items():
        if m is not None and not isinstance(m, nn.Module):
            raise _Skip(f"{a} is not a module")
    if shared["shared_expert_gate"] is not None and shared["shared_expert"] is None:
        raise _Skip("shared_expert_gate without shared_expert")

    def make(router: dict, returns_logits: bool) -> FusedMoEBlock:
        fused = FusedMoEBlock(gate=block.gate, stacked=stacked, router=router, returns_logits=returns_logits,
                              source=type(block).__name__, backend=backend,
                              jitter_noise=getattr(block, "jitter_noise", 0.0), **shared)
        return fused.train(block.training)

    name = type(block).__name__
    if on_meta or not verify:
        if len(candidates) != 1 or name not in _KNOWN:
            why = "its weights are on the meta device" if on_meta else "verify=False"
            raise _Skip(f"{why} and {name} is not a block whose router and outputs are known without a probe")
        return make(candidates[0], _KNOWN[name]), None, candidates[0]["router"] + str(candidates[0]["options"])
    w13 = stacked["w13"]
    g = torch.Generator(device="cpu").manual_seed(5)
    x = torch.randn(2, 5, w13.shape[2], generator=g, device="cpu").to(device=w13.device, dtype=w13.dtype)
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            _check_experts(block.experts, stacked)
            ref = block(x.clone())
            returns_logits = _output_contract(ref, w13.shape[0])
            ref_out = ref[0] if returns_logits else ref
            errors = []
            for router in candidates:
                fused = make(router, returns_logits).eval()
                out = fused(x.clone())
                err = _rel_err(out[0] if returns_logits else out, ref_out)
                if err <= _tolerance(w13.dtype):
                    return fused.train(was_training), err, router["router"] + str(router["options"])
                errors.append(f"{router['router']}{router['options']}: {err:.1e}")
    except _Skip:
        raise
    except Exception as exc:  # noqa: BLE001 - the probe found something we do not handle
        raise _Skip(f"probe failed ({type(exc).__name__}: {exc})") from exc
    finally:
        block.train(was_training)
    raise _Skip("the fused block differs from the original on a probe batch (max relative error "
                + "; ".join(errors) + ")" + _tie_hint(block, x, candidates[0]))


def _tie_hint(block: nn.Module, x: torch.Tensor, router: dict) -> str:
    """Explain the usual cause of a mismatch on a fresh model: tied router logits."""
    k = router["options"].get("top_k")
    if router["kind"] != "softmax" or not isinstance(k, int):
        return ""
    with torch.no_grad():
        logits = block.gate(x.reshape(-1, x.shape[-1])).float()
    if k >= logits.shape[-1]:
        return ""
    top = logits.topk(k + 1, dim=-1).values
    if not bool((top[:, k - 1] == top[:, k]).any()):
        return ""
    return ("; the router's logits tie on the probe (a zero-initialised router?) and moe_kernels breaks ties "
            "toward the lowest expert index where torch.topk does not: pass verify=False to replace a known "
            "block anyway")


def replace_moe_layers(model: nn.Module, backend: str = "auto", *, verify: bool = True) -> ReplaceReport:
    """Replace, in place, every MoE block of ``model`` that keeps its experts in an
    ``nn.ModuleList`` (see the module docstring for the protocol) by a
    :class:`FusedMoEBlock`; returns a :class:`ReplaceReport` of what was replaced and
    what was left alone, and why.

    ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` for the fused
    blocks. ``verify``: compare each block with the original on a probe batch before
    swapping (on by default; without it only the known 4.x blocks are replaced).

    A block that looks like a MoE block (an ``experts`` ModuleList) but is left alone is
    never silent: it is listed in ``report.skipped`` with the reason, and when nothing at
    all was replaced a ``UserWarning`` carries the report."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backend not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"backend: expected one of {['auto', *BACKEND_NAMES]}, got {backend!r}")
    report = ReplaceReport()
    done: list[str] = []
    for path, block in list(model.named_modules()):
        experts = getattr(block, "experts", None)
        if experts is None or not isinstance(experts, nn.Module):
            continue
        if any(path == p or path.startswith(p + ".") for p in done):
            continue
        entry = {"path": path or "<model>", "block": type(block).__name__}
        if not isinstance(experts, nn.ModuleList):
            reason = ("transformers 5 experts module: use experts_implementation='moe_kernels' "
                      "(moe_kernels.integrations.transformers)") if _is_hf5_experts(experts) else \
                f"experts is a {type(experts).__name__}, not an nn.ModuleList"
            report.skipped.append({**entry, "reason": reason})
            continue
        if not path:
            report.skipped.append({**entry, "reason": "the model itself is the MoE block; wrap it in a parent module"})
            continue
        try:
            fused, err, router = _build(block, backend, verify)
        except _Skip as why:
            report.skipped.append({**entry, "reason": str(why)})
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, fused)
        done.append(path)
        e, n_i, h = fused.w13.shape
        report.replaced.append({**entry, "router": router, "max_error": err,
                                "experts": f"{e} x {fused.activation.name} (H={h}, I={fused.w2.shape[2]})"})
    if report.skipped and not report.replaced:
        # Point at the user's call, through the package-level wrapper when it was used.
        wrapped = sys._getframe(1).f_globals.get("__name__") == "moe_kernels"
        warnings.warn(f"moe_kernels.replace_moe_layers: {report}", UserWarning, stacklevel=3 if wrapped else 2)
    return report
