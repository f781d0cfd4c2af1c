"""Activation epilogues of the grouped GEMM, forward and backward, as Triton functions.

The same math as :func:`moe_kernels.activations.apply_activation` (float32): gated
activations take the gate and up tiles ``g``, ``u``; ``_act_bwd`` returns their
gradients given ``dh``. GPT-OSS's clamps pass the gradient where the clamp is inactive
(inclusive bounds), as ``torch.clamp``'s backward does. Codes: ``gemm.ACT_CODES``.
"""

import triton
import triton.language as tl


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
    if ACT == 1 or ACT == 8:  # silu
        s = tl.sigmoid(v)
        return v * s, s + v * s * (1.0 - s)
    elif ACT == 2 or ACT == 5:
        return _gelu_parts(v, False)
    elif ACT == 3 or ACT == 6:
        return _gelu_parts(v, True)
    elif ACT == 7:
        return tl.maximum(v, 0.0), (v > 0.0).to(tl.float32)
    else:  # swiglu_oai gate: v * sigmoid(alpha v)
        s = tl.sigmoid(alpha * v)
        return v * s, s + alpha * v * s * (1.0 - s)


@triton.jit
def _act_fwd(g, u, ACT: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    if ACT == 4:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a, _ = _act_parts(gc, ACT, alpha)
        return (uc + 1.0) * a
    a, _ = _act_parts(g, ACT, alpha)
    if GATED:
        return a * u
    return a


@triton.jit
def _act_bwd(g, u, dh, ACT: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    # Returns (h, dg, du) for h = act(g, u) and upstream gradient dh (fp32).
    if ACT == 4:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a, da = _act_parts(gc, ACT, alpha)
        dg = tl.where(g <= limit, dh * (uc + 1.0) * da, 0.0)  # clamp passes the gradient at the bound, like torch
        du = tl.where((u >= -limit) & (u <= limit), dh * a, 0.0)
        return (uc + 1.0) * a, dg, du
    a, da = _act_parts(g, ACT, alpha)
    if GATED:
        return a * u, dh * u * da, dh * a
    return a, dh * da, dh
