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
gelu           no     gelu(h1)
gelu_tanh      no     gelu_tanh(h1)
relu           no     relu(h1)
silu           no     silu(h1)
=============  =====  =====================================================

The math runs in float32 and the result is cast back to the input dtype, the same in
the reference, the torch backend and the kernels' epilogues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "apply_activation", "split_gate_up"]

GATED = ("swiglu", "geglu", "geglu_tanh", "swiglu_oai")
PLAIN = ("gelu", "gelu_tanh", "relu", "silu")
ACTIVATIONS = GATED + PLAIN


@dataclass(frozen=True)
class Activation:
    """An expert activation; ``alpha`` and ``limit`` are used by ``swiglu_oai`` only."""

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
        if self.name == "swiglu_oai" and not (self.limit > 0):
            raise ValueError(f"limit: expected > 0 for swiglu_oai, got {self.limit}")

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
    return (_plain(act.name, g) * u).to(dtype)
