"""Expert weights, validated once and normalised to one logical layout.

Users hand weights in the layout their model stores (see :func:`expert_params`);
every backend sees :class:`ExpertParams`, whose ``w13`` is *logically*
``[E, n*I, H]`` and ``w2`` logically ``[E, H, I]`` (``n = 2`` gated, 1 plain). A
transposed storage becomes a transposed *view*, never a copy: the torch backend's
matmuls and the Triton kernels take strides.

Quantized experts (:func:`moe_kernels.quant.quantize_experts`) are ExpertParams whose
``quant`` holds the quantized weights and scales (``w13``/``w2`` are then the raw
quantized storage, used in place; the shape properties read the logical shape). An
optional ``post_norm`` (:class:`~moe_kernels.activations.PostNorm`) normalises each
slot's expert output before its routing weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from .activations import Activation, PostNorm
from .routing import Routing

__all__ = ["ExpertParams", "expert_params", "check_inputs"]


@dataclass(frozen=True, eq=False)
class ExpertParams:
    """Validated expert weights.

    ``w13`` [E, n*I, H] and ``w2`` [E, H, I] (possibly strided views), ``b13`` [E, n*I]
    and ``b2`` [E, H] or None, one dtype and device. ``interleaved`` says W13's gate and
    up rows alternate (GPT-OSS) instead of being concatenated (gate rows, then up)."""

    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None
    b2: torch.Tensor | None
    activation: Activation
    interleaved: bool = False
    post_norm: PostNorm | None = None
    quant: object | None = None  # moe_kernels.quant.ExpertQuant (params stays below quant.py)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.quant.w13.shape[2] if self.quant is not None else self.w13.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.quant.w2.shape[2] if self.quant is not None else self.w2.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: activations in and out (the weights' dtype unless quantized)."""
        return self.quant.dtype if self.quant is not None else self.w13.dtype

    def with_post_norm(self, norm: PostNorm | None) -> "ExpertParams":
        """These params with a post-expert norm (weight [H] on the params' device)."""
        if norm is not None:
            if norm.weight.shape[0] != self.hidden_size:
                raise ValueError(f"post_norm: expected a weight of shape ({self.hidden_size},), got "
                                 f"{tuple(norm.weight.shape)}")
            check_same_device([("w13", self.w13), ("post_norm.weight", norm.weight)])
        return replace(self, post_norm=norm)

    @property
    def device(self) -> torch.device:
        return self.w13.device


def expert_params(
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    activation: str | Activation = "swiglu",
    transposed: bool = False,
    interleaved: bool = False,
    post_norm: PostNorm | None = None,
) -> ExpertParams:
    """Validate expert weights and build :class:`ExpertParams`.

    Storage layouts accepted (``n = 2`` for gated activations, 1 for plain):

    * ``transposed=False`` (HF transformers 5): ``w13`` [E, n*I, H] (``gate_up_proj``),
      ``w2`` [E, H, I] (``down_proj``).
    * ``transposed=True`` (GPT-OSS, some 4.x ports): ``w13`` [E, H, n*I], ``w2`` [E, I, H].
    * ``interleaved=True``: W13's gate and up rows alternate (gate 0, up 0, gate 1, ...).

    Every tensor must be contiguous in its storage layout; a non-contiguous tensor is an
    error rather than a silent copy per call. ``post_norm``: see :class:`ExpertParams`."""
    act = Activation.of(activation)
    check_tensor("w13", w13, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("w2", w2, ndim=3, dtypes=FLOAT_DTYPES)
    for name, b in (("b13", b13), ("b2", b2)):
        if b is not None:
            check_tensor(name, b, ndim=2)  # before the dtype and device checks read its attributes
    check_same_dtype([("w13", w13), ("w2", w2), ("b13", b13), ("b2", b2)])
    check_same_device([("w13", w13), ("w2", w2), ("b13", b13), ("b2", b2)])
    if transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    e, n_i, h = w13.shape
    n = act.width_factor
    if w2.shape[0] == e and w2.shape[1] != h:
        _name_transposition(w13 if not transposed else w13.transpose(1, 2),
                            w2 if not transposed else w2.transpose(1, 2), n, transposed)
    if w2.shape[0] != e or w2.shape[1] != h:
        want = f"[{e}, {h}, I]" if not transposed else f"[{e}, I, {h}]"
        got = tuple(w2.shape) if not transposed else tuple(w2.transpose(1, 2).shape)
        raise ValueError(f"w2: expected shape {want} to match w13 (E={e}, H={h}), got {got}")
    i = w2.shape[2]
    if n_i != n * i:
        what = f"2*I = {2 * i} rows (gate and up) for gated activation {act.name!r}" if n == 2 else \
            f"I = {i} rows for plain activation {act.name!r}"
        raise ValueError(f"w13: expected {what}, got {n_i}")
    if interleaved and not act.gated:
        raise ValueError(f"interleaved: only meaningful for gated activations, got activation {act.name!r}")
    if b13 is not None:
        check_tensor("b13", b13, ndim=2)
        if tuple(b13.shape) != (e, n_i):
            raise ValueError(f"b13: expected shape ({e}, {n_i}), got {tuple(b13.shape)}")
    if b2 is not None:
        check_tensor("b2", b2, ndim=2)
        if tuple(b2.shape) != (e, h):
            raise ValueError(f"b2: expected shape ({e}, {h}), got {tuple(b2.shape)}")
    params = ExpertParams(w13, w2, b13, b2, act, interleaved)
    return params if post_norm is None else params.with_post_norm(post_norm)


def check_inputs(x: torch.Tensor, params: ExpertParams, routing: Routing | None = None) -> None:
    """Check ``x`` [T, H] against the expert weights and (optionally) the routing."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if routing is not None and not isinstance(routing, Routing):
        raise ValueError(f"routing: expected a Routing (from a router of moe_kernels.routing, or Routing.from_topk "
                         f"for [T, k] ids and weights), got {type(routing).__name__}")
    if params.quant is None:
        check_same_dtype([("x", x), ("w13", params.w13)])
    elif x.dtype != params.dtype:  # quantized experts: x in their compute dtype
        raise ValueError(f"x: expected dtype {params.dtype} (the quantized experts' compute dtype), got {x.dtype}")
    check_same_device([("x", x), ("w13", params.w13)])
    if x.shape[1] != params.hidden_size:
        raise ValueError(f"x: expected hidden size {params.hidden_size} (from w13), got shape {tuple(x.shape)}")
    if routing is not None:
        if routing.num_tokens != x.shape[0]:
            raise ValueError(f"routing: expected num_tokens = {x.shape[0]} (rows of x), got {routing.num_tokens}")
        if routing.num_experts != params.num_experts:
            raise ValueError(f"routing: expected num_experts = {params.num_experts} (from w13), got {routing.num_experts}")
        check_same_device([("x", x), ("routing.slot_token", routing.slot_token)])


def _name_transposition(w13: torch.Tensor, w2: torch.Tensor, n: int, transposed: bool) -> None:
    """Raise a ValueError naming the likely transposition when ``w13``/``w2`` (as stored)
    fit the other layout; return quietly otherwise (the generic check reports)."""
    e = w13.shape[0]
    flag = "transposed=True" if not transposed else "transposed=False"
    if not transposed:
        # HF 5 layout expected: w13 [E, n*I, H], w2 [E, H, I].
        if w13.shape[1] == w2.shape[1] and w13.shape[2] == n * w2.shape[2]:
            raise ValueError(f"w13: got shape {tuple(w13.shape)}, which looks transposed: [E, H, n*I] with H = "
                             f"{w13.shape[1]} (the rows of w2) and n*I = {w13.shape[2]}; expected [E, n*I, H] = "
                             f"[{e}, {w13.shape[2]}, {w13.shape[1]}]. Pass w13.transpose(1, 2).contiguous(), or "
                             f"{flag} with w2 stored as [E, I, H] too")
        if w13.shape[1] == n * w2.shape[1] and w2.shape[2] == w13.shape[2]:
            raise ValueError(f"w2: got shape {tuple(w2.shape)}, which looks transposed: [E, I, H] with H = "
                             f"{w2.shape[2]} (from w13); expected [E, H, I] = [{e}, {w2.shape[2]}, {w2.shape[1]}]. "
                             f"Pass w2.transpose(1, 2).contiguous()")
    else:
        # GPT-OSS layout expected: w13 [E, H, n*I], w2 [E, I, H].
        if w13.shape[2] == w2.shape[1] and w13.shape[1] == n * w2.shape[2]:
            raise ValueError(f"w13, w2: got shapes {tuple(w13.shape)} and {tuple(w2.shape)}, the HF 5 layout "
                             f"([E, n*I, H], [E, H, I]), with transposed=True; pass {flag}")
