"""The torch backend's CPU paths that need no dispatch plan.

With the caches cold between layers (the rest of the model evicts them), the fixed
cost around the matmuls, the dispatch plan, the gathers into expert order and back,
each torch call and each line of Python, weighs as much as the matmuls at decode and
several percent past it. For token-major routings at inference (and, for ``"gather"``,
in training too) four paths run straight from the routing:

* ``"kernel"``: inference in float32 or bfloat16 with the compiled CPU kernel built
  (:mod:`moe_kernels.cpu_kernel`), at most ``KERNEL_MAX_ROWS_PER_EXPERT`` slots per
  expert on average (or any number on small experts, ``KERNEL_SMALL_WEIGHT``): two
  kernel calls (each groups the slots by expert itself, reads each active expert's
  weight once per 4 slots at memory speed and writes slot order) and the activation
  between them. No plan, sort, gather or host read; 1.5-3x faster than the library
  matmuls at 1-16 rows per expert. Past that the libraries' blocked matmuls win and
  the paths below run.

* ``"slot_order"``: at most ``SLOT_ORDER_MAX_SLOTS`` slots whose weights are over
  ``GATHER_SMALL_BYTES``, inference only (no autograd node is built): each slot a
  one-row segment in slot order, by the fastest form of :mod:`moe_kernels.segment_matmul`;
  one host read of the slots' experts.
* ``"gather"``: at most one slot per expert on average (``S <= E``) and at most
  ``GATHER_MAX_BYTES`` of the slots' weights (w13 + w2) in all (``GATHER_SMALL_BYTES``
  when autograd records: the copies' gradients are dense): each slot's expert
  weights gathered with one ``index_select`` per weight, two ``bmm`` over the slots. The
  gather is a plain copy that streams the cold weights at memory speed, and the ``bmm``
  then reads them from the cache, in one call instead of one per expert: faster than
  the grouped matmul on cold weights even though it moves each byte twice. No host read
  at all; differentiable (autograd through ``index_select`` and ``bmm``; the weights'
  gradient an ``index_add`` in a fixed order on the CPU).
* ``"grouped"``: the grouped matmul's regime (many experts active,
  :func:`~moe_kernels.primitives.grouped_method` past ``"loop"``), inference only: sort
  the slots by expert, count them, ``torch._grouped_mm`` twice
  (:func:`~moe_kernels.primitives.grouped_mm_rows`), then back to slot order through the
  inverse permutation: the plan's pipeline in the fewest calls, one host read (the
  number of valid slots).

Every path sums a token's slots in slot order (a ``[T, k, H]`` sum), as the plan's path
does. :func:`experts_planless` picks the path from static shapes and whether autograd is
recording; :class:`TorchBackend.run` calls it on the routing before any plan is built,
:func:`experts_torch` on a plan it was given (where ``"grouped"`` is not taken: the plan
is already paid for). Measured cold on the default bench shapes: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import torch

from ..._checks import _compiling
from ...activations import apply_activation, apply_post_norm
from ...params import ExpertParams
from ...primitives import combine_slots, grouped_method, grouped_mm_rows
from ... import cpu_kernel
from ...segment_matmul import segment_form, segment_linear

__all__ = ["GATHER_MAX_BYTES", "GATHER_SMALL_BYTES", "KERNEL_MAX_ROWS_PER_EXPERT", "KERNEL_SMALL_WEIGHT",
           "SLOT_ORDER_MAX_SLOTS", "planless_path", "kernel_layouts", "experts_planless"]

# The gathered copy has to stay in the last-level cache for the bmm to read it warm (and
# is moved twice): up to 16 MiB it beat the grouped matmul's one call per expert (Qwen3
# T = 16: 9 MiB, OLMoE T = 8), and past one slot per expert it lost (OLMoE T = 16:
# duplicates). Against the slot-order loop, which has no per-expert cost to save, it
# wins only while the copy is small: measured in the bench, faster at 1.5 MiB (GPT-OSS
# T = 1), slower at 5.5 MiB (Mixtral and DeepSeek T = 1).
GATHER_MAX_BYTES = 16 << 20
GATHER_SMALL_BYTES = 2 << 20
SLOT_ORDER_MAX_SLOTS = 8
# Where the compiled kernel beats the libraries' blocked matmuls (cold weights, 1 and 2
# threads): up to this many slots per expert on average (float32: 32 measured 0.8x the
# library path at Mixtral T = 128, 64 rows measured 1.3x; bfloat16, where oneDNN's bf16
# dot products double the libraries' compute rate: 16), and at any count for experts of
# at most KERNEL_SMALL_WEIGHT elements (w13), whose matmuls are too small for the
# libraries' packing to pay (OLMoE at 256 rows per expert: 0.65x).
KERNEL_MAX_ROWS_PER_EXPERT = {torch.float32: 32, torch.bfloat16: 16}
KERNEL_SMALL_WEIGHT = 32 * 1024
# Tests pin "kernel", "gather", "slot_order", "grouped" or "segments" (the plan's path) here.
_forced_path: str | None = None


def _records_grad(x: torch.Tensor, params: ExpertParams, slot_weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (
        x, params.w13, params.w2, params.b13, params.b2, slot_weight))


def planless_path(x: torch.Tensor, slots, params: ExpertParams, grouped: bool = True) -> str | None:
    """``"kernel"``, ``"slot_order"``, ``"gather"``, ``"grouped"`` (only with ``grouped``) or ``None``
    (the plan's path) for ``slots`` (a :class:`~moe_kernels.routing.Routing` or a plan)
    of ``x``, from static shapes and whether autograd records."""
    return _choose(x, slots, params, grouped)[0]


def _choose(x: torch.Tensor, slots, params: ExpertParams, grouped: bool) -> tuple[str | None, tuple[str, str] | None]:
    """:func:`planless_path`, and for ``"grouped"`` the grouped matmul's two methods
    (found while choosing, so the path does not look for them again), for ``"kernel"``
    the two weights' kernel layouts."""
    s = slots.slot_token.shape[0]
    if params.quant is not None or s == 0:
        return None, None
    if _forced_path is not None:
        if _forced_path == "grouped":  # pinned: few experts may choose the loop, run their grouped call
            return "grouped", tuple(m if m != "loop" else "grouped_mm" for m in _grouped_methods(x, params, s))
        return (None if _forced_path == "segments" else _forced_path), None
    if x.device.type != "cpu":
        return None, None
    w13, w2 = params.w13, params.w2
    total = s * (w13.shape[1] * w13.shape[2] + w2.shape[1] * w2.shape[2]) * w13.element_size()
    no_grad = not _records_grad(x, params, slots.slot_weight)
    # The kernel traces as an opaque custom op: compiled inference takes it as eager does.
    layouts = kernel_layouts(x, params) if no_grad else None
    if layouts is not None and (s <= KERNEL_MAX_ROWS_PER_EXPERT[x.dtype] * params.num_experts
                                or w13.shape[1] * w13.shape[2] <= KERNEL_SMALL_WEIGHT):
        return "kernel", layouts
    inference = no_grad and not _compiling()
    if inference and s <= SLOT_ORDER_MAX_SLOTS and total > GATHER_SMALL_BYTES:
        return "slot_order", None
    # Training: the gathered copies' gradient is one dense [S, N, K] per weight, then an
    # index_add into [E, N, K]: only small copies pay (measured 2x slower at 5.5-9 MiB).
    if s <= params.num_experts and total <= (GATHER_MAX_BYTES if inference else GATHER_SMALL_BYTES):
        return "gather", None
    if inference and grouped:
        methods = _grouped_methods(x, params, s)
        if "loop" not in methods:
            return "grouped", methods
    return None, None


def kernel_layouts(x: torch.Tensor, params: ExpertParams) -> tuple[str, str] | None:
    """The :func:`~moe_kernels.cpu_kernel.kernel_layout` of w13 and w2 when the compiled
    CPU kernel takes these inputs (float32 or bfloat16 on the CPU, weights of ``x``'s
    dtype in a layout it reads, biases as the params check them, and it was built), else
    None. Found once per call and handed to the kernel, which then checks nothing again."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or params.w13.dtype != x.dtype:
        return None
    layouts = (cpu_kernel.kernel_layout(params.w13), cpu_kernel.kernel_layout(params.w2))
    return layouts if None not in layouts and params.w2.dtype == x.dtype and cpu_kernel.available() else None


def _grouped_methods(x: torch.Tensor, params: ExpertParams, s: int) -> tuple[str, str]:
    """The grouped matmul's methods for w13 and w2 (static shapes, as the plan path)."""
    hidden = x.new_empty(0, params.intermediate_size)
    return (grouped_method(x, params.w13, s, params.num_experts),
            grouped_method(hidden, params.w2, s, params.num_experts))


def experts_planless(x: torch.Tensor, slots, params: ExpertParams,
                     token_slots: torch.Tensor | None = None) -> torch.Tensor | None:
    """The experts on a planless path, or ``None`` when none applies: no path, or a
    routing that is not token-major and no ``token_slots`` table to combine with."""
    path, methods = _choose(x, slots, params, grouped=token_slots is None)
    token_major = slots.top_k is not None and slots.max_slots_per_token == slots.top_k
    if path is None or (token_slots is None and not token_major):
        return None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if path == "grouped":
        y_slot = _grouped(x, slots, params, acc, methods)
    elif path == "kernel":
        y_slot = _kernel(x, slots, params, methods or kernel_layouts(x, params))
    else:
        y_slot = (_gathered if path == "gather" else _slot_order)(x, slots, params, acc)
    t, h = x.shape
    if token_major:
        return y_slot.view(t, slots.top_k, h).sum(dim=1).to(x.dtype)
    return combine_slots(y_slot, token_slots).to(x.dtype)


# --------------------------------------------------------------------------- kernel

def _kernel(x: torch.Tensor, slots, params: ExpertParams, layouts: tuple[str, str]) -> torch.Tensor:
    """Weighted slot outputs [S, H] (float32) by two calls of the compiled kernel, on
    arguments validated once (``layouts``: :func:`kernel_layouts`; the routing's and the
    params' own checks; tensors made here). A dropped slot's rows come out zero from both
    (every activation and post-expert norm maps a zero row to zero), times its zero
    weight. bfloat16 weights: the rows and biases in float32 (small), the weights widened
    inside the kernel."""
    expert = slots.slot_expert.contiguous()
    b13, b2 = (None if b is None else b.float().contiguous() for b in (params.b13, params.b2))
    h13 = cpu_kernel.expert_linear(x.float().contiguous(), slots.slot_token.contiguous(), expert, params.w13, b13,
                                   layout=layouts[0])
    hidden = apply_activation(h13, params.activation, params.interleaved).contiguous()
    y = apply_post_norm(cpu_kernel.expert_linear(hidden, None, expert, params.w2, b2, layout=layouts[1]),
                        params.post_norm)
    return y * slots.slot_weight.to(torch.float32).unsqueeze(1)


# --------------------------------------------------------------------------- gather

def _stored(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``w`` [E, N, K] in its storage's layout: itself, or ``[E, K, N]`` (and True) when
    stored transposed, so the gather copies contiguous rows."""
    if w.stride(-1) != 1 and w.stride(-2) == 1:
        return w.transpose(-2, -1), True
    return w, False


def _gathered_linear(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """``rows[s] @ w[ids[s]]^T + b[ids[s]]`` for every slot: [S, K] -> [S, N]."""
    ws, transposed = _stored(w)
    g = ws.index_select(0, ids)
    out = torch.bmm(rows.unsqueeze(1), g if transposed else g.transpose(1, 2)).squeeze(1)
    return out if b is None else out + b.index_select(0, ids)


def _gathered(x: torch.Tensor, slots, params: ExpertParams, acc: torch.dtype) -> torch.Tensor:
    """Weighted slot outputs [S, H] (in ``acc``). A dropped slot (expert ``E``) computes a
    zero row with expert ``E - 1`` and is selected away: selects, not multiplies, so inf
    in ``x`` or in that expert never becomes NaN, and its every gradient is exactly 0."""
    e = params.num_experts
    valid = (slots.slot_expert < e).unsqueeze(1)
    ids = slots.slot_expert.clamp(max=e - 1)
    rows = torch.where(valid, x.index_select(0, slots.slot_token), 0.0)
    hidden = apply_activation(_gathered_linear(rows, params.w13, params.b13, ids), params.activation,
                              params.interleaved)
    y = apply_post_norm(_gathered_linear(hidden, params.w2, params.b2, ids), params.post_norm)
    return torch.where(valid, y.to(acc), 0.0) * slots.slot_weight.to(acc).unsqueeze(1)


# --------------------------------------------------------------------------- slot order

def _slot_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """``a[s] @ w[ids[s]]^T + b[ids[s]]`` per slot as one-row segments; the rows of
    dropped slots (``ids[s] >= E``) are zero."""
    e = w.shape[0]
    out = a.new_empty(a.shape[0], w.shape[1]) if max(ids) < e else a.new_zeros(a.shape[0], w.shape[1])
    for s, ex in enumerate(ids):
        if ex < e:
            w_e = w[ex]
            segment_linear(out, a, w_e, None if b is None else b[ex], s, s + 1, segment_form(1, w_e))
    return out


def _slot_order(x: torch.Tensor, slots, params: ExpertParams, acc: torch.dtype) -> torch.Tensor:
    """Weighted slot outputs [S, H]: a dropped slot's rows stay zero (every activation
    maps a zero row to zero, and the post-expert norms do too), times its zero weight."""
    ids = slots.slot_expert.tolist()
    rows = x.index_select(0, slots.slot_token)
    hidden = apply_activation(_slot_linear(rows, params.w13, params.b13, ids), params.activation, params.interleaved)
    y = apply_post_norm(_slot_linear(hidden, params.w2, params.b2, ids), params.post_norm)
    return y.to(acc) * slots.slot_weight.to(acc).unsqueeze(1)


# --------------------------------------------------------------------------- grouped

def _grouped(x: torch.Tensor, slots, params: ExpertParams, acc: torch.dtype, methods: tuple[str, str]) -> torch.Tensor:
    """Weighted slot outputs [S, H] in slot order, through the grouped matmul on the
    slots sorted by expert (dropped slots, expert ``E``, sort last and stay zero)."""
    e, s = params.num_experts, slots.slot_token.shape[0]
    expert, perm = torch.sort(slots.slot_expert, stable=True)
    offs_t = torch.zeros(e + 1, dtype=torch.int32)
    torch.cumsum(torch.bincount(expert, minlength=e + 1)[:e], 0, out=offs_t[1:])
    v = int(offs_t[e])
    rows = x.index_select(0, slots.slot_token.index_select(0, perm))
    m13, m2 = methods
    h13 = grouped_mm_rows(rows, params.w13, params.b13, offs_t, v, m13, expert)
    hidden = apply_activation(h13, params.activation, params.interleaved)
    y = apply_post_norm(grouped_mm_rows(hidden.contiguous(), params.w2, params.b2, offs_t, v, m2, expert),
                        params.post_norm)
    position = torch.empty_like(perm).scatter_(0, perm, torch.arange(s))
    return y.index_select(0, position).to(acc) * slots.slot_weight.to(acc).unsqueeze(1)
