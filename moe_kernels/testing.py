"""Comparison helpers shared by the test suite and ``moe-kernels check``.

One place decides how close is close enough for each dtype, how inputs are drawn and
how outputs are poisoned, so every kernel is held to the same standard.
"""

from __future__ import annotations

import torch

from .activations import Activation
from .params import ExpertParams, expert_params

__all__ = ["TOLERANCES", "assert_close", "max_error", "poison", "assert_written", "random_weights", "random_params", "POISON"]

# (atol, rtol) per dtype for an MoE output of unit-scale inputs; fp16/bf16 cover two
# matmuls with fp32 accumulation plus one rounding of the intermediate h.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}

POISON = {torch.float16: float("nan"), torch.bfloat16: float("nan"), torch.float32: float("nan"),
          torch.float64: float("nan"), torch.int32: -777, torch.int64: -777, torch.int8: -77, torch.uint8: 0xEE}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max absolute error, max error relative to the largest |expected|)."""
    a, e = actual.double(), expected.double()
    abs_err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    return abs_err, abs_err / scale if scale else abs_err


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, name: str = "output") -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype`` (default:
    ``actual``'s), scaled by ``scale``; NaN anywhere fails."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale,
                               equal_nan=False, msg=lambda m: f"{name}: {m}")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with a value no kernel computes (NaN, or -777 for integers)."""
    return t.fill_(POISON[t.dtype])


def assert_written(t: torch.Tensor, name: str = "output") -> None:
    """Assert no poison value survives in ``t``."""
    if t.dtype.is_floating_point:
        bad = torch.isnan(t)
    else:
        bad = t == POISON[t.dtype]
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} of {t.numel()} elements never written"


def random_weights(e: int, h: int, i: int, *, width: int = 2, bias: bool = False, dtype=torch.float32,
                   device="cpu", transposed: bool = False, generator=None, requires_grad: bool = False):
    """Random ``(w13, w2, b13, b2)`` in their storage layout (``[E, width*I, H]`` and
    ``[E, H, I]``, or ``[E, H, width*I]`` and ``[E, I, H]`` when ``transposed``), scaled so
    outputs are O(1); the biases ``None`` without ``bias``. With ``requires_grad`` they are
    leaves to differentiate."""

    def rnd(*shape, std):
        v = (torch.randn(*shape, generator=generator, dtype=torch.float32) * std).to(dtype).to(device)
        return v.requires_grad_(requires_grad)

    if transposed:
        w13, w2 = rnd(e, h, width * i, std=h ** -0.5), rnd(e, i, h, std=i ** -0.5)
    else:
        w13, w2 = rnd(e, width * i, h, std=h ** -0.5), rnd(e, h, i, std=i ** -0.5)
    b13 = rnd(e, width * i, std=0.1) if bias else None
    b2 = rnd(e, h, std=0.1) if bias else None
    return w13, w2, b13, b2


def random_params(e: int, h: int, i: int, *, activation: str = "swiglu", bias: bool = False,
                  dtype=torch.float32, device="cpu", transposed: bool = False, interleaved: bool = False,
                  generator=None, requires_grad: bool = False) -> ExpertParams:
    """Random expert weights scaled so outputs are O(1), in the requested storage layout."""
    act = Activation.of(activation)
    weights = random_weights(e, h, i, width=act.width_factor, bias=bias, dtype=dtype, device=device,
                             transposed=transposed, generator=generator, requires_grad=requires_grad)
    return expert_params(*weights, activation=act, transposed=transposed, interleaved=interleaved)
