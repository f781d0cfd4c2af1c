"""Fused top-k routing in CUDA (csrc/routing.cu): softmax top-k and DeepSeek-V3's grouped
sigmoid, one warp per token, as ``torch.library`` custom ops (namespace
``moe_kernels_cuda``) with fake implementations, autograd, and validation before each
launch; the CPU kernel of each op is its twin (:mod:`.twins`).

Backward (in torch, from the saved ids and weights; the bias gets none): renormalised
softmax ``w * (g - <g, w>)`` on the chosen logits; plain softmax recomputes
``p = softmax(logits)``; grouped sigmoid recomputes ``s = sigmoid(logits)`` at the chosen
ids. Deterministic: gathers and fixed-order reductions.
"""

from typing import Optional

import torch

from ..._checks import check_finite, check_int, check_tensor
from ...limits import CUDA
from ...primitives import TopkArgs, routing_from_topk
from ...routing import Routing, check_grouped_options
from . import twins
from .extension import _DTYPE_CODE, _ACT_DTYPES, _Tensors3, _ext, _launch_args, _ptr

__all__ = ["route_softmax_topk", "route_grouped_sigmoid_topk", "route_fused"]


@torch.library.custom_op("moe_kernels_cuda::route_softmax_topk", mutates_args=(), device_types="cuda")
def _route_softmax_topk_op(logits: torch.Tensor, top_k: int, renormalize: bool) -> _Tensors3:
    ext = _ext("route_softmax_topk")
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    counts = torch.empty(e, dtype=torch.int32, device=logits.device)
    ext.route_softmax_topk(logits.data_ptr(), ids.data_ptr(), w.data_ptr(), counts.data_ptr(), t, e, top_k,
                           renormalize, _DTYPE_CODE[logits.dtype], *_launch_args(logits))
    return ids, w, counts


_route_softmax_topk_op.register_kernel("cpu", twins.route_softmax_topk)


@_route_softmax_topk_op.register_fake
def _(logits, top_k, renormalize):
    t, e = logits.shape
    return (logits.new_empty(t, top_k, dtype=torch.int32), logits.new_empty(t, top_k, dtype=torch.float32),
            logits.new_empty(e, dtype=torch.int32))


def _route_softmax_setup(ctx, inputs, output):
    logits, _, renormalize = inputs
    ids, w, _ = output
    ctx.renormalize = renormalize
    ctx.save_for_backward(logits, ids, w)


def _route_softmax_backward(ctx, grad_ids, grad_w, grad_counts):
    logits, ids, w = ctx.saved_tensors
    if grad_w is None:
        return None, None, None
    t, e = logits.shape
    g = grad_w.float()
    dot = (g * w).sum(-1, keepdim=True)
    # Dropped slots (id E, weight 0: rows with non-finite logits) scatter their zeros
    # into a spare column E; such a row, dropped whole, gets a zero gradient.
    if ctx.renormalize:  # w = softmax over the chosen logits only
        grad = torch.zeros(t, e + 1, dtype=torch.float32, device=logits.device)
        grad.scatter_(1, ids.long(), w * (g - dot))
    else:  # w = p[ids]: d/dx_m = p_m (g_m [m chosen] - <g, w>)
        p = torch.softmax(logits.float(), dim=-1)
        base = torch.where((ids < e).any(-1, keepdim=True), -p * dot, 0.0)
        grad = torch.cat([base, base.new_zeros(t, 1)], 1).scatter_add_(1, ids.long(), w * g)
    return grad[:, :e].to(logits.dtype), None, None


_route_softmax_topk_op.register_autograd(_route_softmax_backward, setup_context=_route_softmax_setup)


@torch.library.custom_op("moe_kernels_cuda::route_grouped_sigmoid_topk", mutates_args=(), device_types="cuda")
def _route_grouped_op(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int,
                      routed_scaling_factor: float, renormalize: bool) -> _Tensors3:
    ext = _ext("route_grouped_sigmoid_topk")
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    counts = torch.empty(e, dtype=torch.int32, device=logits.device)
    ext.route_grouped_sigmoid_topk(logits.data_ptr(), _ptr(bias), ids.data_ptr(), w.data_ptr(), counts.data_ptr(),
                                   t, e, top_k, n_group, topk_group, routed_scaling_factor, renormalize,
                                   _DTYPE_CODE[logits.dtype], *_launch_args(logits))
    return ids, w, counts


_route_grouped_op.register_kernel("cpu", twins.route_grouped_sigmoid_topk)


@_route_grouped_op.register_fake
def _(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, renormalize):
    t, e = logits.shape
    return (logits.new_empty(t, top_k, dtype=torch.int32), logits.new_empty(t, top_k, dtype=torch.float32),
            logits.new_empty(e, dtype=torch.int32))


def _route_grouped_setup(ctx, inputs, output):
    logits, _, _, _, _, scale, renormalize = inputs
    ids, _, _ = output
    ctx.scale, ctx.renormalize = scale, renormalize
    ctx.save_for_backward(logits, ids)


def _route_grouped_backward(ctx, grad_ids, grad_w, grad_counts):
    logits, ids = ctx.saved_tensors
    if grad_w is None:
        return None, None, None, None, None, None, None
    t, e = logits.shape
    g = grad_w.float()
    chosen = ids < e  # dropped slots (id E) have s = 0: no share of D, no gradient
    s = torch.where(chosen, torch.sigmoid(logits.float().gather(1, ids.long().clamp(max=e - 1))), 0.0)
    if ctx.renormalize:  # w_j = scale * s_j / D, D = sum(s) + 1e-20
        d = s.sum(-1, keepdim=True) + 1e-20
        ds = ctx.scale * (g / d - (g * s).sum(-1, keepdim=True) / (d * d))
    else:
        ds = ctx.scale * g
    grad = torch.zeros(t, e + 1, dtype=torch.float32, device=logits.device)
    grad.scatter_(1, ids.long(), ds * s * (1 - s))
    return grad[:, :e].to(logits.dtype), None, None, None, None, None, None


_route_grouped_op.register_autograd(_route_grouped_backward, setup_context=_route_grouped_setup)


def _check_logits(logits: torch.Tensor, top_k: int) -> None:
    check_tensor("logits", logits, ndim=2, dtypes=_ACT_DTYPES)
    check_finite("logits", logits)
    e = logits.shape[1]
    if not 1 <= e <= CUDA.route_max_experts:
        raise ValueError(f"logits: expected 1..{CUDA.route_max_experts} experts (shape [T, E]), got {tuple(logits.shape)}")
    check_int("top_k", top_k, low=1, high=min(e, CUDA.route_max_top_k))


def route_softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> _Tensors3:
    """Softmax top-k routing (see :func:`moe_kernels.backends.cuda.twins.route_softmax_topk`):
    logits [T, E] fp32/fp16/bf16, E <= 512, k <= 32 -> ids int32 [T, k], weights fp32
    [T, k] (differentiable), counts int32 [E]."""
    _check_logits(logits, top_k)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize: expected a bool, got {renormalize!r}")
    return _route_softmax_topk_op(logits, top_k, renormalize)


def route_grouped_sigmoid_topk(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int,
                               topk_group: int, routed_scaling_factor: float, renormalize: bool) -> _Tensors3:
    """DeepSeek-V3 routing (see :func:`moe_kernels.backends.cuda.twins.route_grouped_sigmoid_topk`);
    ``bias`` [E] (any float dtype, used as fp32) or None."""
    _check_logits(logits, top_k)
    check_grouped_options(logits, top_k, bias, n_group, topk_group, routed_scaling_factor)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize: expected a bool, got {renormalize!r}")
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    return _route_grouped_op(logits, bias, top_k, n_group, topk_group, float(routed_scaling_factor), renormalize)



def route_fused(logits: torch.Tensor, args: TopkArgs) -> Routing:
    """The backend's fused top-k entry (the same in every backend): ``args.router``'s
    routing of ``logits`` [T, E] through the fused ops, for logits of any layout, with the
    pure-PyTorch router's losses. Runs on any device (the ops' CPU kernels are the twins)."""
    logits = logits.contiguous()  # internal calls take any layout; the public op wrappers insist on it
    if args.sigmoid:
        ids, w, _ = route_grouped_sigmoid_topk(logits, args.bias, args.top_k, args.n_group, args.topk_group,
                                               args.routed_scaling_factor, args.renormalize)
    else:
        ids, w, _ = route_softmax_topk(logits, args.top_k, args.renormalize)
    return routing_from_topk(logits, args, ids, w)
