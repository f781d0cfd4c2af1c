"""Benchmark shapes and the roofline arithmetic (no timing, no devices).

Model shapes are the routed experts of one MoE layer of real models. ``--size small``
and ``tiny`` divide H and I so the CPU can run the same grid in about a minute; they
round to a multiple of 8 so grouped-GEMM alignment rules still hold.

Conventions (see docs/PERFORMANCE.md):

* FLOPs of a forward: ``2·S·H·I·(3 gated | 2 plain)`` with ``S`` the valid slots
  (``T·k`` for top-k routing): ``6·T·k·H·I`` for a gated expert. Forward+backward
  counts ``3×`` the forward (each GEMM has a dX and a dW GEMM of the same size).
* Fewest bytes of a forward: the *active* experts' weights (and biases) read once, ``x``
  read once, ``out`` written once. Forward+backward: weights read twice and their
  gradients written once (``3×``), plus ``x``, ``out``, ``dout``, ``x`` again (for dW13)
  and ``dx`` (``5·T·H`` elements). Routing tensors are ignored (under 1%).
* Quantized providers (``<backend>:fp8``, ``<backend>:mxfp4``) count their weights at the
  format's size, scales included (1.0002 and 0.53 bytes per element), so the memory floor
  of a decode step halves or quarters; FLOPs are the same (the matmul peak is the
  compute dtype's, so a W8A8 provider can pass 1.0 on compute-bound cells).
* Time floor: ``max(FLOPs / peak matmul rate, bytes / copy bandwidth)`` with both peaks
  measured in the same run; the fraction of the roofline is ``floor / measured time``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = [
    "ModelShape", "SHAPES", "SIZES", "DEFAULT_TOKENS", "scaled_shape", "parse_shapes",
    "expected_active_experts", "expected_active_experts_with_replacement", "layer_flops", "QUANT_WEIGHT_BYTES",
    "expert_weight_bytes", "layer_min_bytes", "Roofline",
]


@dataclass(frozen=True)
class ModelShape:
    """The routed experts of one MoE layer: ``E`` experts, top-``k``, hidden ``H``,
    expert intermediate ``I``, and how the model stores them (``hf_family`` names the
    transformers experts class that stores them the same way)."""

    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    activation: str = "swiglu"
    bias: bool = False
    transposed: bool = False
    interleaved: bool = False
    hf_family: str = "mixtral"

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu", "geglu_tanh", "swiglu_oai")

    def describe(self) -> str:
        return f"E={self.num_experts} k={self.top_k} H={self.hidden} I={self.intermediate}"


SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("mixtral-8x7b", 8, 2, 4096, 14336, hf_family="mixtral"),
    ModelShape("deepseek-v3", 256, 8, 7168, 2048, hf_family="deepseek_v3"),
    ModelShape("qwen3-30b-a3b", 128, 8, 2048, 768, hf_family="qwen3_moe"),
    ModelShape("olmoe", 64, 8, 2048, 1024, hf_family="olmoe"),
    # GPT-OSS stores W13 as [E, H, 2I] with gate/up columns interleaved, has biases and
    # the clamped swiglu: benchmarked in that layout so the numbers are the model's.
    ModelShape("gpt-oss-20b", 32, 4, 2880, 2880, activation="swiglu_oai", bias=True, transposed=True,
               interleaved=True, hf_family="gpt_oss"),
)}

# size -> (divisor of H and I, default token counts)
SIZES: dict[str, tuple[int, tuple[int, ...]]] = {
    "full": (1, (1, 16, 128, 1024, 8192)),
    "small": (16, (1, 16, 128)),
    "tiny": (64, (1, 16)),
}
DEFAULT_TOKENS = SIZES["full"][1]


def _scale(v: int, div: int) -> int:
    if div == 1:
        return v
    return max(8, int(round(v / div / 8)) * 8)


def scaled_shape(shape: ModelShape, size: str) -> ModelShape:
    """``shape`` with H and I divided for ``size`` (``full``, ``small``, ``tiny``);
    E and k stay the model's, so routing sparsity and glue costs stay realistic."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {list(SIZES)}, got {size!r}")
    div = SIZES[size][0]
    return replace(shape, hidden=_scale(shape.hidden, div), intermediate=_scale(shape.intermediate, div))


def parse_shapes(spec: str) -> list[ModelShape]:
    """``"all"`` or a comma list of names from :data:`SHAPES` (a unique prefix will do)."""
    if spec.strip() in ("", "all"):
        return list(SHAPES.values())
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        hits = [s for n, s in SHAPES.items() if n == part] or [s for n, s in SHAPES.items() if n.startswith(part)]
        if len(hits) != 1:
            raise ValueError(f"shapes: expected 'all' or names from {list(SHAPES)} (or a unique prefix), got {part!r}")
        out.append(hits[0])
    return out


def expected_active_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected number of distinct experts hit when each of ``T`` tokens picks ``k``
    distinct experts uniformly: an expert is missed by one token with probability
    ``1 - k/E``, so ``E·(1 - (1 - k/E)^T)``."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {num_experts}, got {top_k}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def expected_active_experts_with_replacement(num_experts: int, draws: int) -> float:
    """The same for ``draws`` independent uniform draws (``T·k`` draws with
    replacement): ``E·(1 - (1 - 1/E)^draws)``. Slightly below the top-k count."""
    return num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** draws)


def layer_flops(num_slots: int, hidden: int, intermediate: int, *, gated: bool = True, mode: str = "fwd") -> float:
    """FLOPs of the expert GEMMs for ``num_slots`` valid slots: ``2·S·H·I`` per GEMM
    (W13 counts twice when gated); ``fwdbwd`` is 3× the forward."""
    fwd = 2.0 * num_slots * hidden * intermediate * (3 if gated else 2)
    return fwd * _mode_factor(mode)


def _mode_factor(mode: str) -> int:
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwdbwd', got {mode!r}")
    return 1 if mode == "fwd" else 3


# Bytes per weight element of the quantized formats, scales included: fp8 e4m3 with one
# fp32 scale per 128x128 block; MXFP4 e2m1 (half a byte) with one e8m0 byte per 32.
QUANT_WEIGHT_BYTES = {"fp8_block": 1.0 + 4.0 / (128 * 128), "mxfp4": 0.5 + 1.0 / 32}


def expert_weight_bytes(shape: ModelShape, dtype_bytes: int, quant: str | None = None) -> float:
    """Bytes of one expert: W13 (``n·I×H``), W2 (``H×I``) and the biases if any (in the
    activations' dtype); ``quant`` (a key of :data:`QUANT_WEIGHT_BYTES`) counts the
    matrices at that format's size."""
    n = 2 if shape.gated else 1
    elems = n * shape.intermediate * shape.hidden + shape.hidden * shape.intermediate
    per = QUANT_WEIGHT_BYTES[quant] if quant else dtype_bytes
    bias = (n * shape.intermediate + shape.hidden) * dtype_bytes if shape.bias else 0
    total = elems * per + bias
    return int(total) if quant is None else total


def layer_min_bytes(shape: ModelShape, num_tokens: int, active_experts: float, dtype_bytes: int,
                    mode: str = "fwd", quant: str | None = None) -> float:
    """The fewest bytes one layer call must move (module docstring); ``quant``: weights
    stored in that format (:func:`expert_weight_bytes`)."""
    w = active_experts * expert_weight_bytes(shape, dtype_bytes, quant)
    act = float(num_tokens) * shape.hidden * dtype_bytes
    return w + 2 * act if _mode_factor(mode) == 1 else 3 * w + 5 * act


@dataclass(frozen=True)
class Roofline:
    """Peaks measured in this run: matmul FLOP/s and copy bytes/s."""

    peak_flops: float
    peak_bytes: float

    def floor(self, flops: float, nbytes: float) -> tuple[float, str]:
        """(time floor in seconds, ``"compute"`` or ``"memory"``)."""
        tc = flops / self.peak_flops if self.peak_flops > 0 else 0.0
        tm = nbytes / self.peak_bytes if self.peak_bytes > 0 else 0.0
        return (tc, "compute") if tc >= tm else (tm, "memory")

    def fraction(self, flops: float, nbytes: float, seconds: float) -> float:
        """Fraction of the roofline reached: floor / measured (1.0 = at the floor)."""
        if not seconds > 0 or not math.isfinite(seconds):
            return float("nan")
        return self.floor(flops, nbytes)[0] / seconds
