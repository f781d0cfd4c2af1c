"""The ground truth: a readable loop over experts.

Slow on purpose: one boolean mask, one gather and two matmuls per expert, the way the
papers write the layer. Every backend is tested against it in value and gradient.

Numerics: matmuls in the weights' dtype (as a user's own loop would run them), the
activation in float32, the weighted sum over a token's slots accumulated in float32.
"""

from __future__ import annotations

import torch

from .activations import apply_activation, apply_post_norm
from .params import ExpertParams, check_inputs
from .routing import Routing

__all__ = ["moe_reference"]


def moe_reference(x: torch.Tensor, routing: Routing, params: ExpertParams) -> torch.Tensor:
    """``out[t] = sum over slots s of t of  w[s] * Expert_{e[s]}(x[t])``; dropped slots
    (expert id ``E``) contribute nothing. Differentiable in ``x``, the weights and
    ``routing.slot_weight``. Validates its arguments like :func:`moe_kernels.fused_experts`
    (a routing for other experts or another batch is a ``ValueError``)."""
    if not isinstance(params, ExpertParams):
        raise ValueError(f"params: expected an ExpertParams (moe_kernels.expert_params(...)), "
                         f"got {type(params).__name__}")
    check_inputs(x, params, routing)
    t, h = x.shape
    out = torch.zeros(t, h, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    token = routing.slot_token.long()
    for e in range(params.num_experts):
        sel = torch.nonzero(routing.slot_expert == e).flatten()
        if sel.numel() == 0:
            continue
        rows = x[token[sel]]
        h13 = rows @ params.w13[e].t()
        if params.b13 is not None:
            h13 = h13 + params.b13[e]
        hidden = apply_activation(h13, params.activation, params.interleaved)
        y = hidden @ params.w2[e].t()
        if params.b2 is not None:
            y = y + params.b2[e]
        y = apply_post_norm(y, params.post_norm)
        w = routing.slot_weight[sel].to(out.dtype).unsqueeze(1)
        out = out.index_add(0, token[sel], y.to(out.dtype) * w)
    return out.to(x.dtype)
