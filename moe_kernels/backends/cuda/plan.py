"""The dispatch plan in CUDA (csrc/plan.cu) as the custom op ``moe_kernels_cuda::build_plan``
(fake implementation; CPU kernel = the twin :func:`.twins.build_plan`), validated before
the launch.
"""


import torch

from ..._checks import check_int
from ...limits import CUDA
from ...plan import max_padded_rows
from . import twins
from .extension import _Tensors8, _check_index, _check_same_device, _ext, _launch_args, _ptr

__all__ = ["build_plan"]


@torch.library.custom_op("moe_kernels_cuda::build_plan", mutates_args=(), device_types="cuda")
def _build_plan_op(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
                   max_slots_per_token: int, top_k: int, block_m: int) -> _Tensors8:
    ext = _ext("build_plan")
    s, e, t, k = slot_expert.shape[0], num_experts, num_tokens, max_slots_per_token
    p = max_padded_rows(s, e, block_m)
    new = lambda *shape: torch.empty(shape, dtype=torch.int32, device=slot_expert.device)  # noqa: E731
    out = (new(e), new(e + 1), new(s), new(s), new(e + 1), new(p), new(p // block_m), new(t, k))
    fill = new(max(t, 1)) if top_k == 0 else None
    ext.build_plan(slot_expert.data_ptr(), slot_token.data_ptr(), *[o.data_ptr() for o in out], _ptr(fill),
                   s, e, t, k, top_k, block_m, p, *_launch_args(slot_expert))
    return out


_build_plan_op.register_kernel("cpu", twins.build_plan)


@_build_plan_op.register_fake
def _(slot_expert, slot_token, num_tokens, num_experts, max_slots_per_token, top_k, block_m):
    s, e = slot_expert.shape[0], num_experts
    p = max_padded_rows(s, e, block_m)
    new = lambda *shape: slot_expert.new_empty(shape, dtype=torch.int32)  # noqa: E731
    return (new(e), new(e + 1), new(s), new(s), new(e + 1), new(p), new(p // block_m),
            new(num_tokens, max_slots_per_token))


def build_plan(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
               max_slots_per_token: int, top_k: int, block_m: int) -> _Tensors8:
    """The DispatchPlan index tensors in one launch (see
    :func:`moe_kernels.backends.cuda.twins.build_plan`); E <= 4000; ``top_k`` 0 for slots that are
    not token-major."""
    _check_index("slot_expert", slot_expert)
    _check_index("slot_token", slot_token)
    s = slot_expert.shape[0]
    if slot_token.shape[0] != s:
        raise ValueError(f"slot_token: expected {s} slots like slot_expert, got {slot_token.shape[0]}")
    _check_same_device("slot_expert", slot_expert, slot_token=slot_token)
    check_int("num_experts", num_experts, low=1, high=CUDA.plan_max_experts)
    check_int("num_tokens", num_tokens, low=0, high=2**31 - 1)
    check_int("max_slots_per_token", max_slots_per_token, low=1)
    check_int("top_k", top_k, low=0, high=max_slots_per_token)
    check_int("block_m", block_m, low=1, high=2**16)
    if top_k and s != num_tokens * top_k:
        raise ValueError(f"top_k: token-major slots need S = num_tokens * top_k = {num_tokens * top_k}, got S = {s}")
    if max_padded_rows(s, num_experts, block_m) >= 2**31:
        raise ValueError(f"slot_expert: {s} slots pad to more than 2^31 rows; use fewer slots per call")
    return _build_plan_op(slot_expert, slot_token, num_tokens, num_experts, max_slots_per_token, top_k, block_m)

