"""Expert activations: what sits between an expert's two matmuls.

Gated experts compute ``h = act(gate) * up`` from ``h13 = x @ W13[e]^T`` of width
``2I``; plain experts compute ``h = act(h1)`` from width ``I``. W13's rows are
*concatenated* (all gate rows, then all up rows, HF transformers 5's ``gate_up_proj``)
or *interleaved* (gate, up, gate, up, ..., as GPT-OSS stores them).

=============  =====  =====================================================
name           gated  h
=============  =====  =====================================================
swiglu         yes    silu(g) * u                     (Mixtral, Qwen, DeepSeek)
geglu          yes    gelu(g) * u                     (erf form)
geglu_tanh     yes    gelu_tanh(g) * u
swiglu_oai     yes    (clamp(u, -L, L) + 1) * g' * sigmoid(alpha * g'),
                      g' = clamp(g, max=L)            (GPT-OSS; alpha, limit=L)
swiglu_clamp   yes    silu(clamp(g, max=L)) * clamp(u, -L, L)
                                                      (DeepSeek-V4, GLM-5-next, HY-V4; limit=L)
swiglu_softcap yes    cg*tanh(g/cg) * sigmoid(g) * cu*tanh(u/cu)
                                                      (Inkling2; alpha=cg, limit=cu)
gelu           no     gelu(h1)
gelu_tanh      no     gelu_tanh(h1)
relu           no     relu(h1)
silu           no     silu(h1)
relu2          no     relu(h1)^2                      (Nemotron-H)
=============  =====  =====================================================

An activation carries two scalars, ``alpha`` and ``limit``, whose meaning depends on
the name (the kernels take the same two): ``swiglu_oai`` uses both, ``swiglu_clamp``
uses ``limit``, ``swiglu_softcap`` reads ``alpha`` as the gate softcap ``cg`` and
``limit`` as the up softcap ``cu`` (:meth:`Activation.softcapped` names them).

After the second matmul an expert may apply a per-row norm before its routing weight
(:class:`PostNorm`, HF's ``has_post_expert_norm``, MuseSpark).

The math runs in float32 and the result is cast back to the input dtype, the same in
the reference, the torch backend and the kernels' epilogues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "PostNorm", "apply_activation", "apply_post_norm", "split_gate_up"]

GATED = ("swiglu", "geglu", "geglu_tanh", "swiglu_oai", "swiglu_clamp", "swiglu_softcap")
PLAIN = ("gelu", "gelu_tanh", "relu", "silu", "relu2")
ACTIVATIONS = GATED + PLAIN


@dataclass(frozen=True)
class Activation:
    """An expert activation; ``alpha`` and ``limit`` as in the module docstring's table
    (ignored by the activations without parameters)."""

    name: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {list(ACTIVATIONS)}, got {self.name!r}")
        # alpha and limit reach the kernels as constants: a NaN or a string must fail here.
        for field in ("alpha", "limit"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{field}: expected a finite number, got {v!r}")
        if self.name in ("swiglu_oai", "swiglu_clamp", "swiglu_softcap") and not (self.limit > 0):
            raise ValueError(f"limit: expected > 0 for {self.name}, got {self.limit}")
        if self.name == "swiglu_softcap" and not (self.alpha > 0):
            raise ValueError(f"alpha: expected a gate softcap > 0 for swiglu_softcap, got {self.alpha}")

    @classmethod
    def softcapped(cls, gate_softcap: float, up_softcap: float) -> "Activation":
        """``swiglu_softcap`` (Inkling2): ``cg*tanh(g/cg) * sigmoid(g) * cu*tanh(u/cu)``."""
        return cls("swiglu_softcap", float(gate_softcap), float(up_softcap))

    @classmethod
    def clamped(cls, limit: float) -> "Activation":
        """``swiglu_clamp`` (DeepSeek-V4): ``silu(clamp(g, max=L)) * clamp(u, -L, L)``."""
        return cls("swiglu_clamp", limit=float(limit))

    @property
    def gated(self) -> bool:
        return self.name in GATED

    @property
    def width_factor(self) -> int:
        """Rows of W13 per intermediate unit: 2 for gated, 1 for plain."""
        return 2 if self.gated else 1

    @classmethod
    def of(cls, spec: "str | Activation") -> "Activation":
        return spec if isinstance(spec, Activation) else cls(spec)


def split_gate_up(h13: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[..., 2I]`` into gate and up ``[..., I]`` for either W13 row layout."""
    if interleaved:
        return h13[..., 0::2], h13[..., 1::2]
    i = h13.shape[-1] // 2
    return h13[..., :i], h13[..., i:]


def _plain(name: str, v: torch.Tensor) -> torch.Tensor:
    if name in ("gelu", "geglu"):
        return F.gelu(v)
    if name in ("gelu_tanh", "geglu_tanh"):
        return F.gelu(v, approximate="tanh")
    if name == "relu":
        return F.relu(v)
    if name == "relu2":
        return torch.square(F.relu(v))
    return F.silu(v)  # silu, swiglu


def apply_activation(h13: torch.Tensor, act: Activation, interleaved: bool = False) -> torch.Tensor:
    """``h = act(h13)`` in float32, returned in ``h13``'s dtype (the pure-PyTorch twin
    of the kernels' fused epilogue)."""
    dtype = h13.dtype
    v = h13.float() if dtype in (torch.float16, torch.bfloat16) else h13
    if not act.gated:
        return _plain(act.name, v).to(dtype)
    g, u = split_gate_up(v, interleaved)
    if act.name == "swiglu_oai":
        g = g.clamp(max=act.limit)
        u = u.clamp(min=-act.limit, max=act.limit)
        return ((u + 1) * (g * torch.sigmoid(g * act.alpha))).to(dtype)
    if act.name == "swiglu_clamp":
        return (F.silu(g.clamp(max=act.limit)) * u.clamp(min=-act.limit, max=act.limit)).to(dtype)
    if act.name == "swiglu_softcap":
        cg, cu = act.alpha, act.limit
        return (torch.tanh(g / cg) * cg * torch.sigmoid(g) * (torch.tanh(u / cu) * cu)).to(dtype)
    return (_plain(act.name, g) * u).to(dtype)


_NORM_KINDS = ("input_scaled_rms", "rms")


@dataclass(frozen=True, eq=False)
class PostNorm:
    """A per-row norm of each slot's expert output, applied before its routing weight.

    ``input_scaled_rms`` (MuseSpark's ``InputScaledRMSNorm``): ``z = y * (1 + weight)``
    rounded to ``y``'s dtype, then ``z * rsqrt(mean(z^2) + eps)``; ``rms``: ``y *
    rsqrt(mean(y^2) + eps) * weight``. ``weight`` [H]; math in float32, the result in
    ``y``'s dtype."""

    weight: torch.Tensor
    eps: float = 1e-6
    kind: str = "input_scaled_rms"

    def __post_init__(self) -> None:
        if self.kind not in _NORM_KINDS:
            raise ValueError(f"kind: expected one of {list(_NORM_KINDS)}, got {self.kind!r}")
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 1:
            raise ValueError(f"weight: expected a 1-D [H] tensor, got "
                             f"{tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else self.weight!r}")
        if not (self.eps > 0):  # eps = 0 would turn an all-zero row (a dropped slot) into NaN
            raise ValueError(f"eps: expected > 0, got {self.eps}")


def apply_post_norm(y: torch.Tensor, norm: PostNorm | None) -> torch.Tensor:
    """The pure-PyTorch twin of the post-expert norm on rows of ``y`` [S, H]."""
    if norm is None:
        return y
    w = norm.weight.float()
    if norm.kind == "input_scaled_rms":
        z = (y.float() * (1.0 + w)).to(y.dtype).float()
        return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + norm.eps)).to(y.dtype)
    v = y.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps) * w).to(y.dtype)
