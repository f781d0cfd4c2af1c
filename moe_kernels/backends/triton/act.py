"""Activation epilogues of the grouped GEMM, forward and backward, as Triton functions.

The same math as :func:`moe_kernels.activations.apply_activation` (float32): gated
activations take the gate and up tiles ``g``, ``u``; ``_act_bwd`` returns their
gradients given ``dh``. GPT-OSS's clamps pass the gradient where the clamp is inactive
(inclusive bounds), as ``torch.clamp``'s backward does; so do DeepSeek-V4's
(``swiglu_clamp``). Codes 9-11 (``swiglu_clamp``, ``swiglu_softcap``, ``relu2``) came later;
``swiglu_softcap`` reads ``alpha``/``limit`` as the gate/up softcaps. The kernel's ``ACT`` argument is one
of the named constexpr choices below (:data:`ACT_CODES` maps activation names to them).
"""

import triton
import triton.language as tl

ACT_NONE = tl.constexpr(0)
ACT_SWIGLU = tl.constexpr(1)
ACT_GEGLU = tl.constexpr(2)
ACT_GEGLU_TANH = tl.constexpr(3)
ACT_SWIGLU_OAI = tl.constexpr(4)
ACT_GELU = tl.constexpr(5)
ACT_GELU_TANH = tl.constexpr(6)
ACT_RELU = tl.constexpr(7)
ACT_SILU = tl.constexpr(8)
ACT_SWIGLU_CLAMP = tl.constexpr(9)
ACT_SWIGLU_SOFTCAP = tl.constexpr(10)
ACT_RELU2 = tl.constexpr(11)
ACT_CODES = {"none": ACT_NONE.value, "swiglu": ACT_SWIGLU.value, "geglu": ACT_GEGLU.value,
             "geglu_tanh": ACT_GEGLU_TANH.value, "swiglu_oai": ACT_SWIGLU_OAI.value, "gelu": ACT_GELU.value,
             "gelu_tanh": ACT_GELU_TANH.value, "relu": ACT_RELU.value, "silu": ACT_SILU.value,
             "swiglu_clamp": ACT_SWIGLU_CLAMP.value, "swiglu_softcap": ACT_SWIGLU_SOFTCAP.value,
             "relu2": ACT_RELU2.value}


@triton.jit
def _gelu_parts(v, TANH: tl.constexpr):
    # gelu(v) and gelu'(v), erf or tanh form.
    if TANH:
        c: tl.constexpr = 0.7978845608028654  # sqrt(2/pi)
        inner = c * (v + 0.044715 * v * v * v)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh without libdevice (the interpreter has no tanh)
        f = 0.5 * v * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * v * v)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        f = v * cdf
        d = cdf + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    return f, d


@triton.jit
def _act_parts(v, ACT: tl.constexpr, alpha):
    # (a(v), a'(v)) of the gate nonlinearity of ACT (fp32); swiglu_oai is handled by the caller.
    if ACT == ACT_SWIGLU or ACT == ACT_SILU or ACT == ACT_SWIGLU_CLAMP:
        s = tl.sigmoid(v)
        return v * s, s + v * s * (1.0 - s)
    elif ACT == ACT_GEGLU or ACT == ACT_GELU:
        return _gelu_parts(v, False)
    elif ACT == ACT_GEGLU_TANH or ACT == ACT_GELU_TANH:
        return _gelu_parts(v, True)
    elif ACT == ACT_RELU:
        return tl.maximum(v, 0.0), (v > 0.0).to(tl.float32)
    elif ACT == ACT_RELU2:
        r = tl.maximum(v, 0.0)
        return r * r, 2.0 * r
    else:  # swiglu_oai gate: v * sigmoid(alpha v)
        s = tl.sigmoid(alpha * v)
        return v * s, s + alpha * v * s * (1.0 - s)


@triton.jit
def _tanh(v):
    # tanh as 2 sigmoid(2v) - 1: no libdevice (the interpreter has no tanh); absolute error ~1e-7
    return 2.0 * tl.sigmoid(2.0 * v) - 1.0


@triton.jit
def _softcap_parts(g, u, cg, cu):
    # h = cg tanh(g/cg) sigmoid(g) cu tanh(u/cu) (Inkling2: the sigmoid sees the raw gate) and
    # its partials dh/dg, dh/du.
    tg = _tanh(g / cg)
    tu = _tanh(u / cu)
    s = tl.sigmoid(g)
    sg = cg * tg
    su = cu * tu
    return sg * s * su, su * s * ((1.0 - tg * tg) + sg * (1.0 - s)), sg * s * (1.0 - tu * tu)


@triton.jit
def _act_fwd(g, u, ACT: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    if ACT == ACT_SWIGLU_OAI:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a, _ = _act_parts(gc, ACT, alpha)
        return (uc + 1.0) * a
    if ACT == ACT_SWIGLU_CLAMP:
        a, _ = _act_parts(tl.minimum(g, limit), ACT, alpha)
        return a * tl.minimum(tl.maximum(u, -limit), limit)
    if ACT == ACT_SWIGLU_SOFTCAP:
        h, _, _ = _softcap_parts(g, u, alpha, limit)
        return h
    a, _ = _act_parts(g, ACT, alpha)
    if GATED:
        return a * u
    return a


@triton.jit
def _act_bwd(g, u, dh, ACT: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    # Returns (h, dg, du) for h = act(g, u) and upstream gradient dh (fp32).
    if ACT == ACT_SWIGLU_OAI:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a, da = _act_parts(gc, ACT, alpha)
        dg = tl.where(g <= limit, dh * (uc + 1.0) * da, 0.0)  # clamp passes the gradient at the bound, like torch
        du = tl.where((u >= -limit) & (u <= limit), dh * a, 0.0)
        return (uc + 1.0) * a, dg, du
    if ACT == ACT_SWIGLU_CLAMP:
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a, da = _act_parts(tl.minimum(g, limit), ACT, alpha)
        dg = tl.where(g <= limit, dh * uc * da, 0.0)
        du = tl.where((u >= -limit) & (u <= limit), dh * a, 0.0)
        return a * uc, dg, du
    if ACT == ACT_SWIGLU_SOFTCAP:
        h, pg, pu = _softcap_parts(g, u, alpha, limit)
        return h, dh * pg, dh * pu
    a, da = _act_parts(g, ACT, alpha)
    if GATED:
        return a * u, dh * u * da, dh * a
    return a, dh * da, dh
