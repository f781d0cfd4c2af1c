"""GPT-OSS's MXFP4 experts (transformers' ``Mxfp4GptOssExperts``) on moe_kernels.

``Mxfp4GptOssExperts`` is not built by ``@use_experts_implementation``: its MLP
(``Mxfp4GptOssMLP``) calls hub kernels directly and never consults the
ExpertsInterface, so ``experts_implementation="moe_kernels"`` cannot reach it.
:func:`switch_mxfp4` (called by the transformers integration's ``enable_mxfp4``)
switches each such MLP instance to GPT-OSS's router followed by
:func:`mxfp4_experts_forward`, which runs :func:`moe_kernels.fused_experts` on the MXFP4
bytes and scales in place (quantized :class:`~moe_kernels.ExpertParams`, W4A16,
interleaved gate/up rows, biases, the clamped SwiGLU). Re-exported by
:mod:`moe_kernels.integrations.transformers`.
"""

from __future__ import annotations

import functools
import types

import torch

from ..activations import Activation
from ..functional import fused_experts
from ..params import ExpertParams
from ..quant import QuantizedWeight, quantized_params
from ..routing import Routing
from .hf_common import UnsupportedExpertsError, backend_for

__all__ = ["switch_mxfp4", "mxfp4_experts_forward", "mxfp4_params"]


def _is_mxfp4_experts(module: torch.nn.Module) -> bool:
    """transformers' ``Mxfp4GptOssExperts`` (not built by ``@use_experts_implementation``:
    its forward never consults the ExpertsInterface)."""
    return type(module).__name__ == "Mxfp4GptOssExperts" and hasattr(module, "down_proj")


def _mxfp4_weight(module: torch.nn.Module, proj: str) -> QuantizedWeight:
    """``gate_up_proj`` / ``down_proj`` of a ``Mxfp4GptOssExperts`` as fp4 [E, N, K/2] bytes
    with [E, N, K/32] ue8m0 scales.

    Scales come from ``<proj>_scales`` (a [E, N, K/32] uint8 buffer set by hand) or,
    after a GPU load through transformers' hub kernels, from the swizzled
    ``triton_kernels`` tensors, unswizzled once (as transformers' ``Mxfp4ReverseDeserialize``
    does) and kept as plain packed tensors in place of the hub ones."""
    w = getattr(module, proj)
    scales = getattr(module, proj + "_scales", None)
    if not isinstance(w, torch.Tensor):  # hub Tensor in the swizzled layout (GPU load): unswizzle once
        cfg = getattr(module, proj + "_precision_config")
        sc = cfg.weight_scale
        scales = sc.storage.layout.unswizzle_data(sc.storage.data).transpose(-1, -2).contiguous()
        w = w.storage.layout.unswizzle_data(w.storage.data).transpose(-1, -2).reshape(
            scales.shape[0], scales.shape[1], -1).contiguous()
        setattr(module, proj, torch.nn.Parameter(w, requires_grad=False))
        module.register_buffer(proj + "_scales", scales)
    if not isinstance(scales, torch.Tensor):
        raise UnsupportedExpertsError(
            f"{type(module).__qualname__}.{proj}: no MXFP4 scales found ({proj}_scales or a hub precision config)")
    if w.dim() == 4:  # checkpoint layout [E, N, K/32, 16]
        w = w.reshape(w.shape[0], w.shape[1], -1)
    return QuantizedWeight(w, scales, "fp4", (1, 32))


def mxfp4_params(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> ExpertParams:
    """A ``Mxfp4GptOssExperts``' weights as quantized :class:`~moe_kernels.ExpertParams`:
    MXFP4 [E, 2I, H/2] / [E, H, I/2] bytes used in place, interleaved gate/up rows, float32
    biases, GPT-OSS's clamped SwiGLU (``alpha``, ``limit`` of the module)."""
    act = Activation("swiglu_oai", float(module.alpha), float(module.limit))
    b13 = module.gate_up_proj_bias.to(dtype) if module.gate_up_proj_bias.dtype != dtype else module.gate_up_proj_bias
    b2 = module.down_proj_bias.to(dtype) if module.down_proj_bias.dtype != dtype else module.down_proj_bias
    return quantized_params(_mxfp4_weight(module, "gate_up_proj"), _mxfp4_weight(module, "down_proj"), b13, b2,
                            activation=act, interleaved=True, dtype=dtype, act_scheme="none")


def mxfp4_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``Mxfp4GptOssExperts.forward`` on moe_kernels: [T, H] hidden states, [T, k] expert
    ids (expert-parallel sentinels dropped) and weights; returns [T, H]."""
    dtype = hidden_states.dtype if hidden_states.dtype in (torch.float16, torch.bfloat16, torch.float32) \
        else torch.bfloat16
    params = mxfp4_params(module, dtype)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1]).to(dtype).contiguous()
    k = top_k_index.shape[-1]
    routing = Routing.from_topk(top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k), params.num_experts)
    out = fused_experts(x, routing, params, backend=backend_for("moe_kernels", backend))
    return out.to(hidden_states.dtype).reshape(shape)


def _mxfp4_mlp_forward(self, hidden_states):
    # Mxfp4GptOssMLP.forward with the hub routing + matmul_ogs replaced: GPT-OSS's router
    # (top-k of the logits, softmax over the k), then our experts.
    batch_size = hidden_states.shape[0]
    x = hidden_states.reshape(-1, self.router.hidden_dim)
    router_logits, router_scores, router_indices = self.router(x)
    if router_scores.shape != router_indices.shape:  # routers returning dense [T, E] scores
        router_scores = router_scores.gather(1, router_indices)
    out = mxfp4_experts_forward(self.experts, x, router_indices, router_scores)
    return out.reshape(batch_size, -1, self.router.hidden_dim), router_logits


def switch_mxfp4(model: torch.nn.Module) -> list[str]:
    """Route every ``Mxfp4GptOssExperts`` of ``model`` (GPT-OSS loaded in MXFP4) through
    moe_kernels: each experts module's forward and its parent ``Mxfp4GptOssMLP``'s forward
    are replaced on the instances. Returns the paths of the experts modules switched.
    :func:`moe_kernels.integrations.transformers.enable_mxfp4` registers the name, then
    calls this."""
    done = []
    for path, m in model.named_modules():
        experts = getattr(m, "experts", None)
        if experts is not None and _is_mxfp4_experts(experts) and hasattr(m, "router"):
            mxfp4_params(experts)  # scales present, shapes valid: raise before switching anything
            m.forward = types.MethodType(_mxfp4_mlp_forward, m)
            experts.forward = functools.partial(mxfp4_experts_forward, experts)
            done.append(f"{path}.experts" if path else "experts")
    return done
