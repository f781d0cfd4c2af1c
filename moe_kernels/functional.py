"""The functional API: :func:`fused_experts` (slots in, output out) and :func:`moe`
(router logits in, output out).

Both validate every argument up front (``ValueError`` naming the argument), pick the
backend, build the dispatch plan and run the experts. ``T = 0`` returns an empty
``[0, H]`` output.
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .activations import Activation
from .backends import get_backend
from .options import KernelOptions
from .params import ExpertParams, check_inputs, expert_params
from .primitives import zero_link
from .routing import Routing

__all__ = ["fused_experts", "moe", "check_inputs", "kernel_options", "empty_output"]


def empty_output(x: torch.Tensor, params: ExpertParams, routing: Routing | None = None) -> torch.Tensor:
    """The ``[0, H]`` output of ``T = 0`` tokens, connected to autograd like a non-empty
    one: it requires grad when ``x``, a weight or the slot weights do, and backward gives
    them zero gradients (not ``None``, and no "does not require grad" error)."""
    out = x.new_zeros(0, x.shape[1])
    link = zero_link(x, params.w13, params.w2, params.b13, params.b2,
                     None if routing is None else routing.slot_weight)
    return out if link is None else out + link.to(out.dtype)


def fused_experts(
    x: torch.Tensor,
    routing: Routing,
    w13: torch.Tensor | ExpertParams,
    w2: torch.Tensor | None = None,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    activation: str | Activation = "swiglu",
    transposed: bool = False,
    interleaved: bool = False,
    backend: str = "auto",
    combine: str | None = None,
    recompute_h: bool | None = None,
    gemm_config: dict | None = None,
    autotune: bool | None = None,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """``out[t] = sum over slots s of t of  w[s] * Expert_{e[s]}(x[t])``.

    Args:
        x: [T, H] activations.
        routing: slots from any router (:mod:`moe_kernels.routing`).
        w13, w2, b13, b2: expert weights, layouts as in :func:`expert_params`; or pass an
            :class:`ExpertParams` as ``w13`` and leave the rest unset.
        activation: name or :class:`Activation` (``"swiglu"``, ``"swiglu_oai"``, ...).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        combine, recompute_h, gemm_config, autotune: kernel options (see
            :mod:`moe_kernels.options`; ``None`` = the process default); ``options`` a
            :class:`~moe_kernels.options.KernelOptions` they override field by field.

    Returns:
        [T, H] in ``x``'s dtype, differentiable in ``x``, the weights and
        ``routing.slot_weight``.
    """
    params = w13 if isinstance(w13, ExpertParams) else expert_params(
        w13, w2, b13, b2, activation=activation, transposed=transposed, interleaved=interleaved)
    check_inputs(x, params, routing)
    impl = get_backend(backend, x.device)
    opts = kernel_options(options, combine=combine, recompute_h=recompute_h, gemm_config=gemm_config,
                          autotune=autotune)
    if x.shape[0] == 0:
        return empty_output(x, params, routing)
    return impl.run(x, routing, params, opts)


def kernel_options(options: KernelOptions | None = None, **fields) -> KernelOptions | None:
    """``options`` with the keywords that are set (not ``None``) written over it; ``None``
    when nothing is set (the backends then take the process defaults)."""
    set_fields = {k: v for k, v in fields.items() if v is not None}
    if not set_fields:
        return options
    return KernelOptions(**set_fields).merged_over(options or KernelOptions())


def moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor | ExpertParams,
    w2: torch.Tensor | None = None,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    router: str = "softmax_topk",
    activation: str | Activation = "swiglu",
    transposed: bool = False,
    interleaved: bool = False,
    backend: str = "auto",
    return_routing: bool = False,
    combine: str | None = None,
    recompute_h: bool | None = None,
    gemm_config: dict | None = None,
    autotune: bool | None = None,
    options: KernelOptions | None = None,
    **router_options,
):
    """One MoE layer from router logits: route, then :func:`fused_experts`. ``w13`` may be
    an :class:`ExpertParams` (e.g. from :func:`moe_kernels.quantize_experts`).

    ``router`` names a router of :mod:`moe_kernels.routing` and ``router_options`` are
    its keyword arguments (``top_k=2``, ``renormalize=False``, ``capacity_factor=1.25``,
    ``bias=...``, ``n_group=8``, ...). With ``return_routing=True`` returns
    ``(out, routing)`` so the caller can read the aux losses in ``routing.losses``. Kernel
    options as for :func:`fused_experts`."""
    params = w13 if isinstance(w13, ExpertParams) else expert_params(
        w13, w2, b13, b2, activation=activation, transposed=transposed, interleaved=interleaved)
    check_tensor("router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_inputs(x, params)
    check_same_device([("x", x), ("router_logits", router_logits)])
    if router_logits.shape != (x.shape[0], params.num_experts):
        raise ValueError(f"router_logits: expected shape ({x.shape[0]}, {params.num_experts}) "
                         f"(tokens of x, experts of w13), got {tuple(router_logits.shape)}")
    impl = get_backend(backend, x.device)
    opts = kernel_options(options, combine=combine, recompute_h=recompute_h, gemm_config=gemm_config,
                          autotune=autotune)
    routing = impl.route(router_logits, router, router_options)
    out = empty_output(x, params, routing) if x.shape[0] == 0 else impl.run(x, routing, params, opts)
    return (out, routing) if return_routing else out
