"""Quantized expert weights: formats, :func:`quantize_experts`, and the dequantizing twins.

Two weight formats, both *logically* ``[E, N, K]`` (``N`` output rows, ``K`` the reduced
dimension, the layout of :class:`~moe_kernels.ExpertParams`' ``w13``/``w2``), both with
*dequantization multipliers* as scales (``w = q * scale``, what HF calls ``*_scale_inv``):

=========  ===============================  =========================================  ==============
format     ``data``                         ``scale``                                  checkpoints
=========  ===============================  =========================================  ==============
fp8        float8_e4m3fn [E, N, K]          [E, cdiv(N, bn), cdiv(K, bk)] per (bn, bk)  DeepSeek-V3/R1
                                            block: float32, or ue8m0 (powers of two)    (128 x 128),
                                                                                        HF FP8Experts
fp4        uint8/int8 [E, N, K/2]: two      [E, N, K/32], one per 32 along K: ue8m0     GPT-OSS MXFP4,
           e2m1 per byte, element 2j in the  (MXFP4) or float32                          HF expert_dtype
           LOW nibble, 2j+1 in the high one                                              ="fp4" (DSv4)
=========  ===============================  =========================================  ==============

ue8m0 scales are a biased exponent byte, ``2^(byte - 127)``, stored as ``float8_e8m0fnu``
or as raw ``uint8`` (GPT-OSS); e2m1 nibbles index ``(0, .5, 1, 1.5, 2, 3, 4, 6)`` with
bit 3 the sign. Both layouts are the ones HF transformers 5.24 stores, so an HF module's
tensors are used in place.

Activations (``ExpertQuant.act``): FP8 experts run W8A8 with ``"dynamic"`` per-token-group
quantization (one float32 scale ``max(amax, 1e-4) / 448`` per 128 consecutive K values of a
row, ``q = clamp(x / scale, +-448)`` in e4m3, round to nearest even) of GEMM1's input and of
GEMM2's input (the activation output, quantized from float32 without rounding to the
compute dtype first), or ``"static"`` (one float32 scale per expert for each GEMM's
input, HF's ``*_activation_scale``), or ``"none"`` (W8A16: weights dequantized, the GEMMs
in the compute dtype). FP4 experts run with ``"none"`` only (bf16/fp16/fp32 activations).

Error bounds (relative Frobenius error of a whole expert layer's output against the same
layer with the unquantized float32 weights; weights N(0, 1/fan_in), inputs N(0, 1),
measured in tests/test_quant.py): fp8 weights only ~4.7%, fp8 W8A8 (dynamic 1x128) ~6.4%
(float or ue8m0 scales alike), fp4 with ue8m0 scales (MXFP4) ~20%, fp4 with float32
scales ~18%; the tests assert 0.08, 0.10 and 0.30. Against the dequantizing twin
(:func:`experts_quant_torch`: the same quantized values, the same activation
quantization) the Triton kernels agree to float32 accumulation order (measured ~4e-7
relative in float32; the compute dtype's rounding otherwise); on a GPU an activation
value whose ``x / scale`` sits on an e4m3 rounding tie may land on the other neighbour,
an error of one e4m3 step in that element.

Inference only: a forward that would need gradients raises ``ValueError`` instead of
silently dequantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import FLOAT_DTYPES, check_tensor
from .activations import Activation, PostNorm, apply_activation, apply_post_norm
from .params import ExpertParams, expert_params
from .plan import DispatchPlan
from .primitives import combine_slots, grouped_linear

__all__ = [
    "E4M3_MAX", "FP4_VALUES", "QuantizedWeight", "ExpertQuant", "quantize_experts", "quantized_params",
    "quantize_fp8_block", "quantize_fp4", "dequantize", "quantize_act_fp8", "experts_quant_torch",
    "check_inference",
]

E4M3_MAX = 448.0
ACT_SCALE_FLOOR = 1e-4  # a zero row quantizes to zeros with a finite scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = 32
_E8M0 = tuple(d for d in (getattr(torch, "float8_e8m0fnu", None), torch.uint8) if d is not None)
_FP4_DATA = (torch.uint8, torch.int8)
_ACT_SCHEMES = ("dynamic", "static", "none")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One quantized expert weight, logically ``[E, N, K]`` (see the module docstring)."""

    data: torch.Tensor
    scale: torch.Tensor
    format: str          # "fp8" | "fp4"
    block: tuple[int, int]  # (rows, columns) per scale: (bn, bk) for fp8, (1, 32) for fp4

    def __post_init__(self) -> None:
        if self.format not in ("fp8", "fp4"):
            raise ValueError(f"format: expected 'fp8' or 'fp4', got {self.format!r}")
        d, s = self.data, self.scale
        name = "data"
        if self.format == "fp8":
            check_tensor(name, d, ndim=3, dtypes=(torch.float8_e4m3fn,))
        else:
            check_tensor(name, d, ndim=3, dtypes=_FP4_DATA)
        check_tensor("scale", s, ndim=3, dtypes=(torch.float32, *_E8M0))
        bn, bk = self.block
        if bn < 1 or bk < 1:
            raise ValueError(f"block: expected positive sizes, got {self.block}")
        e, n, k = self.shape
        want = (e, _cdiv(n, bn), _cdiv(k, bk))
        if tuple(s.shape) != want:
            raise ValueError(f"scale: expected shape {want} for {self.format} weights [{e}, {n}, {k}] with "
                             f"block {self.block}, got {tuple(s.shape)}")
        if self.format == "fp4" and self.block != (1, FP4_GROUP):
            raise ValueError(f"block: fp4 weights have one scale per (1, {FP4_GROUP}), got {self.block}")
        if d.device != s.device:
            raise ValueError(f"scale: expected the device of data ({d.device}), got {s.device}")
        if not d.is_contiguous() or not s.is_contiguous():
            raise ValueError("data, scale: expected contiguous tensors (used in place, never copied per call)")

    @property
    def shape(self) -> tuple[int, int, int]:
        e, n, kk = self.data.shape
        return (e, n, kk * 2 if self.format == "fp4" else kk)

    @property
    def e8m0(self) -> bool:
        return self.scale.dtype in _E8M0

    def scale_f32(self) -> torch.Tensor:
        """The scales as float32 multipliers."""
        if not self.e8m0:
            return self.scale
        return torch.exp2(self.scale.view(torch.uint8).float() - 127.0)

    def scale_bits(self) -> torch.Tensor:
        """The scale tensor as a kernel reads it: float32, or the raw uint8 exponent bytes."""
        return self.scale.view(torch.uint8) if self.e8m0 else self.scale

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


@dataclass(frozen=True, eq=False)
class ExpertQuant:
    """What :class:`~moe_kernels.ExpertParams` carries for quantized experts: both
    weights, the compute dtype, and how activations are quantized (``act``: dynamic,
    static or none; ``act_group`` values per dynamic scale; ``act_scale13`` / ``act_scale2``
    [E] float32 for static)."""

    w13: QuantizedWeight
    w2: QuantizedWeight
    dtype: torch.dtype
    act: str = "dynamic"
    act_group: int = 128
    act_scale13: torch.Tensor | None = None
    act_scale2: torch.Tensor | None = None

    @property
    def format(self) -> str:
        return self.w13.format


# --------------------------------------------------------------------------- quantizers


def _tiles(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, int, int]:
    e, n, k = w.shape
    pn, pk = _cdiv(n, bn) * bn, _cdiv(k, bk) * bk
    wp = torch.zeros(e, pn, pk, dtype=torch.float32, device=w.device)
    wp[:, :n, :k] = w.float()
    return wp.reshape(e, pn // bn, bn, pk // bk, bk), n, k


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str = "float") -> QuantizedWeight:
    """Quantize ``w`` [E, N, K] to e4m3 with one scale per ``block`` tile (ragged last
    tiles allowed), as HF's ``Fp8Quantize``: ``q = clamp(w * 448 / amax, +-448)``, scale
    ``amax / 448`` (an all-zero tile: 1), with ``scale_fmt="ue8m0"`` rounded up to a
    power of two first and stored as float8_e8m0fnu."""
    check_tensor("w", w, ndim=3, dtypes=FLOAT_DTYPES)
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt: expected 'float' or 'ue8m0', got {scale_fmt!r}")
    bn, bk = block
    tiles, n, k = _tiles(w, bn, bk)
    amax = tiles.abs().amax(dim=(2, 4))
    fwd = torch.where(amax > 0, E4M3_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    inv = (1.0 / fwd).float()
    if scale_fmt == "ue8m0":
        inv = torch.exp2(torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        fwd = 1.0 / inv
    q = (tiles * fwd[:, :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    e = w.shape[0]
    q = q.reshape(e, tiles.shape[1] * bn, tiles.shape[3] * bk)[:, :n, :k].contiguous()
    scale = inv.to(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" and len(_E8M0) == 2 else inv
    if scale_fmt == "ue8m0" and scale.dtype == torch.float32:  # torch without float8_e8m0fnu: raw bytes
        scale = (torch.log2(inv) + 127).round().to(torch.uint8)
    return QuantizedWeight(q, scale.contiguous(), "fp8", (bn, bk))


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    # Nearest e2m1 value, ties to the even mantissa; returns the 4-bit code (bit 3 = sign).
    mags = v.abs()
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=v.device)
    idx = torch.bucketize(mags, mids)  # ties go to the lower magnitude ...
    up = (mags == 0.75) | (mags == 1.75) | (mags == 3.5)  # ... except where the upper one has the even mantissa
    idx = (idx + up.long()).clamp(max=7)
    sign = (v < 0) & (idx > 0)
    return (idx | (sign.long() << 3)).to(torch.uint8)


def quantize_fp4(w: torch.Tensor, scale_fmt: str = "ue8m0") -> QuantizedWeight:
    """Quantize ``w`` [E, N, K] (K a multiple of 32) to e2m1 packed two per byte (even k
    in the low nibble) with one scale per 32 along K: ``amax / 6``, rounded up to a power
    of two for ``"ue8m0"`` (MXFP4; stored as uint8 exponent bytes, GPT-OSS's dtype) or
    kept in float32 (``"float"``). An all-zero group gets scale 1."""
    check_tensor("w", w, ndim=3, dtypes=FLOAT_DTYPES)
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt: expected 'float' or 'ue8m0', got {scale_fmt!r}")
    e, n, k = w.shape
    if k % FP4_GROUP:
        raise ValueError(f"w: fp4 needs the reduced dimension K to be a multiple of {FP4_GROUP}, got K={k}")
    g = w.float().reshape(e, n, k // FP4_GROUP, FP4_GROUP)
    amax = g.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 6.0, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        expo = torch.ceil(torch.log2(scale)).clamp(-127, 127)
        scale = torch.exp2(expo)
        stored = (expo + 127).to(torch.uint8)
    else:
        stored = scale
    codes = _e2m1_codes(g / scale[..., None]).reshape(e, n, k)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return QuantizedWeight(packed, stored.contiguous(), "fp4", (1, FP4_GROUP))


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float ``[E, N, K]`` weight ``q * scale`` (exact in float32: each product is a
    representable value)."""
    e, n, k = qw.shape
    s = qw.scale_f32()
    if qw.format == "fp8":
        bn, bk = qw.block
        s = s.repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]
        return (qw.data.float() * s).to(dtype)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=qw.data.device)
    b = qw.data.view(torch.uint8).long()
    vals = torch.stack([lut[b & 15], lut[b >> 4]], dim=-1).reshape(e, n, k)
    return (vals * s.repeat_interleave(FP4_GROUP, 2)).to(dtype)


def quantize_act_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group dynamic quantization of ``x`` [R, K]: ``(q [R, K] e4m3, scale
    [R, cdiv(K, group)] float32)`` with ``scale = max(amax, 1e-4) / 448`` and ``q =
    clamp(x / scale, +-448)`` (the pure-PyTorch twin of the kernels' fused quantization)."""
    r, k = x.shape
    gk = _cdiv(k, group)
    xp = torch.zeros(r, gk * group, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.float()
    xg = xp.reshape(r, gk, group)
    scale = xg.abs().amax(-1).clamp(min=ACT_SCALE_FLOOR) / E4M3_MAX
    q = (xg / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(r, gk * group)[:, :k].contiguous(), scale


def _fake_quant_act(x: torch.Tensor, quant: ExpertQuant, which: int, expert_of_row: torch.Tensor | None) -> torch.Tensor:
    # float32 rows as the kernel's MMA sees them: q * scale.
    if quant.act == "dynamic":
        q, s = quantize_act_fp8(x, quant.act_group)
        k = x.shape[1]
        return q.float() * s.repeat_interleave(quant.act_group, 1)[:, :k]
    if quant.act == "static":
        sc = (quant.act_scale13 if which == 1 else quant.act_scale2).float()[expert_of_row][:, None]
        return (x.float() / sc).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * sc
    return x


# --------------------------------------------------------------------------- building params


def quantized_params(w13: QuantizedWeight, w2: QuantizedWeight, b13: torch.Tensor | None = None,
                     b2: torch.Tensor | None = None, *, activation: str | Activation = "swiglu",
                     interleaved: bool = False, dtype: torch.dtype = torch.bfloat16, act_scheme: str | None = None,
                     act_group: int = 128, act_scale13: torch.Tensor | None = None,
                     act_scale2: torch.Tensor | None = None, post_norm: PostNorm | None = None) -> ExpertParams:
    """:class:`~moe_kernels.ExpertParams` over weights that are already quantized (an HF
    module's tensors, used in place). ``dtype``: the activations' dtype. ``act_scheme``
    defaults to ``"dynamic"`` for fp8 and ``"none"`` for fp4."""
    act = Activation.of(activation)
    if w13.format != w2.format:
        raise ValueError(f"w2: expected the format of w13 ({w13.format}), got {w2.format}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype: expected float16, bfloat16 or float32 activations, got {dtype}")
    scheme = act_scheme or ("dynamic" if w13.format == "fp8" else "none")
    if scheme not in _ACT_SCHEMES:
        raise ValueError(f"act_scheme: expected one of {list(_ACT_SCHEMES)}, got {scheme!r}")
    if w13.format == "fp4" and scheme != "none":
        raise ValueError(f"act_scheme: fp4 weights run with bf16/fp16/fp32 activations ('none'), got {scheme!r}")
    if scheme == "dynamic" and (act_group < 16 or act_group & (act_group - 1)):
        raise ValueError(f"act_group: expected a power of two >= 16, got {act_group}")
    e = w13.shape[0]
    if scheme == "static":
        for name, s in (("act_scale13", act_scale13), ("act_scale2", act_scale2)):
            if s is None:
                raise ValueError(f"{name}: act_scheme='static' needs a float32 [E] activation scale per expert")
            check_tensor(name, s, ndim=1, dtypes=(torch.float32,))
            if s.shape[0] != e:
                raise ValueError(f"{name}: expected shape ({e},), got {tuple(s.shape)}")
    # Shapes, biases and the activation are checked by expert_params on meta stand-ins.
    meta = expert_params(torch.empty(w13.shape, device="meta"), torch.empty(w2.shape, device="meta"),
                         None if b13 is None else b13.to("meta", torch.float32),
                         None if b2 is None else b2.to("meta", torch.float32), activation=act,
                         interleaved=interleaved)
    for name, b in (("b13", b13), ("b2", b2)):
        if b is not None and b.device != w13.data.device:
            raise ValueError(f"{name}: expected the weights' device {w13.data.device}, got {b.device}")
    if w2.data.device != w13.data.device:
        raise ValueError(f"w2: expected the device of w13 ({w13.data.device}), got {w2.data.device}")
    quant = ExpertQuant(w13, w2, dtype, scheme, act_group, act_scale13, act_scale2)
    params = ExpertParams(w13.data, w2.data, b13, b2, meta.activation, interleaved, quant=quant)
    return params if post_norm is None else params.with_post_norm(post_norm)


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None = None,
                     b2: torch.Tensor | None = None, *, format: str = "fp8_block",
                     activation: str | Activation = "swiglu", transposed: bool = False, interleaved: bool = False,
                     block_size: tuple[int, int] = (128, 128), scale_fmt: str | None = None,
                     act_scheme: str | None = None, act_group: int = 128, dtype: torch.dtype | None = None,
                     post_norm: PostNorm | None = None) -> ExpertParams:
    """Quantize float expert weights (layouts as :func:`~moe_kernels.expert_params`) into
    an inference-only :class:`~moe_kernels.ExpertParams` that :func:`~moe_kernels.fused_experts`,
    :func:`~moe_kernels.moe` and :class:`~moe_kernels.MoE` accept.

    ``format``: ``"fp8_block"`` (e4m3, one scale per ``block_size`` tile, ``scale_fmt``
    ``"float"`` (default) or ``"ue8m0"``), ``"mxfp4"`` (e2m1 with ue8m0 scales per 32 along
    K) or ``"fp4"`` (e2m1 with float32 scales per 32). ``act_scheme``: see the module
    docstring (fp8: ``"dynamic"`` default or ``"none"``; static scales come with
    :func:`quantized_params`). ``dtype``: the activations' dtype (default: the weights').
    Biases stay in float (``dtype``)."""
    check_tensor("w13", w13, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("w2", w2, ndim=3, dtypes=FLOAT_DTYPES)
    dtype = dtype or (w13.dtype if w13.dtype != torch.float64 else torch.float32)
    if transposed:  # one copy at quantization time; the quantized storage is [E, N, K]
        w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    if format == "fp8_block":
        fmt = scale_fmt or "float"
        q13, q2 = quantize_fp8_block(w13, block_size, fmt), quantize_fp8_block(w2, block_size, fmt)
    elif format in ("mxfp4", "fp4"):
        fmt = scale_fmt or ("ue8m0" if format == "mxfp4" else "float")
        q13, q2 = quantize_fp4(w13, fmt), quantize_fp4(w2, fmt)
    else:
        raise ValueError(f"format: expected 'fp8_block', 'mxfp4' or 'fp4', got {format!r}")
    if act_scheme == "static":
        raise ValueError("act_scheme: static activation scales come from a checkpoint; pass them to quantized_params")
    cast = (lambda b: None if b is None else b.detach().to(dtype).contiguous())
    return quantized_params(q13, q2, cast(b13), cast(b2), activation=activation, interleaved=interleaved, dtype=dtype,
                            act_scheme=act_scheme, act_group=act_group, post_norm=post_norm)


# --------------------------------------------------------------------------- the twin


def check_inference(x: torch.Tensor, slot_weight: torch.Tensor, params: ExpertParams) -> None:
    """Quantized experts are inference-only: refuse a forward that would need gradients."""
    if torch.is_grad_enabled() and (x.requires_grad or slot_weight.requires_grad
                                    or any(b is not None and b.requires_grad for b in (params.b13, params.b2))):
        raise ValueError("quantized experts are inference-only: no gradient flows through quantized weights; "
                         "run under torch.no_grad() / torch.inference_mode(), or train on float weights")


def experts_quant_torch(x: torch.Tensor, plan: DispatchPlan, params: ExpertParams) -> torch.Tensor:
    """The dequantizing twin of the quantized experts: the torch backend's pipeline on
    float32 weights ``q * scale``, with the kernels' activation quantization (GEMM1's
    input rows; GEMM2's input from the float32 activation when dynamic, from h rounded to
    the compute dtype when static) and their rounding of h to the compute dtype otherwise.
    Returns [T, H] in ``x``'s dtype.

    Float params (``quant`` None, e.g. with a post-expert norm) run the same pipeline in
    their own dtype, differentiable (autograd through the torch ops)."""
    quant = params.quant
    t, h = x.shape
    if quant is not None:
        check_inference(x, plan.slot_weight, params)
    if plan.num_slots == 0:
        return x.new_zeros(t, h)
    sorted_slot = plan.sorted_slot.long()
    src = plan.slot_token.index_select(0, sorted_slot).long()
    rows = x.index_select(0, src)
    if quant is None:
        h13 = grouped_linear(rows, params.w13, params.b13, plan)
        y = grouped_linear(apply_activation(h13, params.activation, params.interleaved), params.w2, params.b2, plan)
        y = apply_post_norm(y, params.post_norm).float()
    else:
        w13, w2 = dequantize(quant.w13), dequantize(quant.w2)
        expert = plan.slot_expert.index_select(0, sorted_slot).long().clamp(max=params.num_experts - 1)
        rows = _fake_quant_act(rows, quant, 1, expert).float()
        b13 = None if params.b13 is None else params.b13.float()
        b2 = None if params.b2 is None else params.b2.float()
        h13 = grouped_linear(rows, w13, b13, plan)
        hidden = apply_activation(h13, params.activation, params.interleaved)
        if quant.act != "dynamic":  # GEMM1 writes h in the compute dtype; static quantization reads it back
            hidden = hidden.to(x.dtype).float()
        if quant.act != "none":
            hidden = _fake_quant_act(hidden, quant, 2, expert)
        y = grouped_linear(hidden, w2, b2, plan)
        if params.post_norm is not None:
            y = apply_post_norm(y.to(x.dtype), params.post_norm).float()
    y_slot = y.index_select(0, plan.slot_position.long()) * plan.slot_weight.float().unsqueeze(1)
    return combine_slots(y_slot, plan.token_slots).to(x.dtype)


# --------------------------------------------------------------------------- nn.Module weights


def quantize_module_(module: torch.nn.Module, format: str = "fp8_block", **kwargs) -> torch.nn.Module:
    """Quantize a module's ``w13``/``w2`` parameters in place (inference): they become
    buffers holding the quantized storage, with ``w13_scale``/``w2_scale`` next to them, so
    ``.to()`` and ``state_dict()`` carry them; the float weights are dropped.
    :meth:`moe_kernels.MoE.quantize_` calls it. ``kwargs`` as :func:`quantize_experts`."""
    act = getattr(module, "activation", "swiglu")
    with torch.no_grad():
        p = quantize_experts(module.w13.detach(), module.w2.detach(), module.b13, module.b2, format=format,
                             activation=act, **kwargs)
    q = p.quant
    for name in ("w13", "w2"):
        delattr(module, name)
    module.register_buffer("w13", q.w13.data)
    module.register_buffer("w2", q.w2.data)
    module.register_buffer("w13_scale", q.w13.scale)
    module.register_buffer("w2_scale", q.w2.scale)
    for name in ("b13", "b2"):
        b = getattr(module, name, None)
        if b is not None:
            b.requires_grad_(False)
    module._moe_kernels_quant = {"format": q.w13.format, "block13": q.w13.block, "block2": q.w2.block,
                                 "dtype": q.dtype, "act": q.act, "act_group": q.act_group}
    return module


def module_quantized_params(module: torch.nn.Module) -> ExpertParams | None:
    """The :class:`~moe_kernels.ExpertParams` of a module quantized by
    :func:`quantize_module_` (from its current buffers), or None."""
    meta = getattr(module, "_moe_kernels_quant", None)
    if meta is None:
        return None
    q13 = QuantizedWeight(module.w13, module.w13_scale, meta["format"], meta["block13"])
    q2 = QuantizedWeight(module.w2, module.w2_scale, meta["format"], meta["block2"])
    return quantized_params(q13, q2, module.b13, module.b2, activation=module.activation, dtype=meta["dtype"],
                            act_scheme=meta["act"], act_group=meta["act_group"])
