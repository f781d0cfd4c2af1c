"""The dispatch plan in CUDA (csrc/plan.cu) as the custom op ``moe_kernels_cuda::build_plan``
(fake implementation; CPU kernel = the twin :func:`.twins.build_plan`), validated before
the launch.

Up to ``SINGLE_MAX_SLOTS`` slots (decode) the plan is one CTA (``_plan_build_fwd_kernel``);
past it, the many-CTA pipeline of csrc/plan.cu (histogram per chunk, level scans,
offsets, placement, block map, token table), whose decomposition
:func:`.twins.build_plan_blocked` reproduces on the CPU. :func:`launch_shape` mirrors the
launcher's grids and trip counts (csrc/plan_shape.h; checked against the module).
"""


import torch

from ..._checks import check_int
from ...limits import CUDA
from ...plan import max_padded_rows
from . import twins
from .extension import _C, _Tensors8, _check_index, _check_same_device, _ext, _launch_args, _ptr

__all__ = ["build_plan", "launch_shape"]

# csrc/plan_shape.h
SINGLE_MAX_SLOTS = 4096
CHUNK = 256
SCAN_ROWS = 128
ROW_THREADS = 256
PLACE_THREADS = 128
MAX_LEVELS = 4
if _C is not None and hasattr(_C, "PLAN_CHUNK"):
    assert (_C.PLAN_SINGLE_MAX_SLOTS, _C.PLAN_CHUNK, _C.PLAN_SCAN_ROWS) == (SINGLE_MAX_SLOTS, CHUNK, SCAN_ROWS), \
        "moe_kernels._C is from another version; rebuild it"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scan_levels(num_slots: int) -> list[int]:
    """Rows of each scan level of the many-CTA plan: chunks, then groups of SCAN_ROWS,
    down to the one-row totals."""
    rows = [_cdiv(num_slots, CHUNK)]
    while rows[-1] > 1:
        rows.append(_cdiv(rows[-1], SCAN_ROWS))
    return rows


def scratch_words(num_slots: int, num_experts: int) -> int:
    """int32 scratch the launcher needs (the scan levels); 0 for the one-CTA plan."""
    return 0 if num_slots <= SINGLE_MAX_SLOTS else sum(scan_levels(num_slots)) * (num_experts + 1)


def launch_shape(num_slots: int, num_experts: int, num_tokens: int, max_slots_per_token: int, top_k: int,
                 block_m: int) -> list[tuple[str, int, int]]:
    """``(kernel, CTAs, trips)`` of each launch, trips being the most iterations of any
    loop of one thread (csrc/ops.cpp build_plan). The one CTA walks ``S / warps`` slots per
    warp; the many-CTA kernels loop over experts, tokens' slots or levels, never over S."""
    s, e, t, k, w = num_slots, num_experts, num_tokens, max_slots_per_token, num_experts + 1
    p = max_padded_rows(s, e, block_m)
    if s <= SINGLE_MAX_SLOTS:
        words = 48 * 1024 // 4 - 64 - 2 * w
        warps = min(32, words // w)
        return [("_plan_build_fwd_kernel", 1, max(_cdiv(_cdiv(s, warps), 32), _cdiv(p, 32 * warps)))]
    rows = scan_levels(s)
    out = [("_plan_hist_fwd_kernel", rows[0], _cdiv(w, CHUNK))]
    out += [("_plan_scan_fwd_kernel", _cdiv(r, SCAN_ROWS) * _cdiv(w, ROW_THREADS), SCAN_ROWS) for r in rows[:-1]]
    out.append(("_plan_offsets_fwd_kernel", 1, _cdiv(w, 1024)))
    out.append(("_plan_place_fwd_kernel", rows[0], max(CHUNK // 32, _cdiv(w, PLACE_THREADS) * MAX_LEVELS)))
    out.append(("_plan_blocks_fwd_kernel", _cdiv(p, ROW_THREADS), max(1, e.bit_length())))
    if t:
        tg = _cdiv(t, ROW_THREADS)
        if top_k:
            out.append(("_plan_token_major_fwd_kernel", tg, k))
        else:
            out += [("_plan_token_fill_fwd_kernel", tg, k), ("_plan_token_append_fwd_kernel", _cdiv(s, ROW_THREADS), 1),
                    ("_plan_token_sort_fwd_kernel", tg, k * k)]
    return out


@torch.library.custom_op("moe_kernels_cuda::build_plan", mutates_args=(), device_types="cuda")
def _build_plan_op(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
                   max_slots_per_token: int, top_k: int, block_m: int) -> _Tensors8:
    ext = _ext("build_plan")
    s, e, t, k = slot_expert.shape[0], num_experts, num_tokens, max_slots_per_token
    p = max_padded_rows(s, e, block_m)
    new = lambda *shape: torch.empty(shape, dtype=torch.int32, device=slot_expert.device)  # noqa: E731
    out = (new(e), new(e + 1), new(s), new(s), new(e + 1), new(p), new(p // block_m), new(t, k))
    fill = new(max(t, 1)) if top_k == 0 else None
    words = scratch_words(s, e)
    scratch = new(words) if words else None
    ext.build_plan(slot_expert.data_ptr(), slot_token.data_ptr(), *[o.data_ptr() for o in out], _ptr(fill),
                   _ptr(scratch), words, s, e, t, k, top_k, block_m, p, *_launch_args(slot_expert))
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
    """The DispatchPlan index tensors: one launch at decode sizes, many CTAs past them (see
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

