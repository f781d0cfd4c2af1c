"""Expert weight and bias gradients: a grouped GEMM that reduces over each expert's rows.

For expert ``e`` with rows ``r`` of its padded segment (``padded_slot[r] >= 0``)::

    dW[e] = sum_r  outer(scale(r) * b[b_row(r)], a[a_row(r)])      [N, K]
    db[e] = sum_r  scale(r) * b[b_row(r)]                          [N]

which gives ``dW13[e] = dH13_e^T @ X_e`` (``b`` = dH13, ``a`` = x gathered by token) and
``dW2[e] = dY_e^T @ H_e`` (``b`` = dY gathered by token with the slot weight as
``scale``, ``a`` = h). ``a_rows``/``b_rows`` say where a padded row's data lives:

* ``"slot"``: row ``padded_slot[r]`` of a tensor in slot order ``[S, *]``;
* ``"token"``: row ``slot_token[padded_slot[r]]`` of a tensor in token order ``[T, *]``;
* ``"padded"``: row ``r`` of a tensor in padded order ``[P, *]``.

Pipeline (ONE launch, ``_expert_wgrad_bwd_kernel``): grid ``(N-tiles x K-tiles, E)``;
each program walks its expert's valid rows (``expert_counts[e]`` of them, from
``padded_offsets[e]``) in order, ``BLOCK_R`` at a time, gathers the rows of ``a`` and
``b`` through the plan, and accumulates ``b_tile^T @ a_tile`` in float32 with
``tl.dot``; a fixed reduction order and no atomics make it deterministic. The result
is stored once in the output dtype; an expert without rows gets zeros. The bias
gradient rides along in the programs of the first K-tile (``bias_out=``) or runs alone
(:func:`expert_bias_grad`, same kernel with ``HAS_W=False``). It is itself a backward
kernel: nothing is saved.

fp32 inputs follow the same precision rule as the grouped GEMMs and torch's own
matmuls (:func:`moe_kernels.backends.triton.gemm.dot_precision`): TF32 products when torch
allows TF32 for fp32 matmuls, IEEE fp32 otherwise (the default). Consistent on
purpose: the torch backend's autograd computes its weight gradients in TF32 under the
same setting, and once the forward and input-gradient GEMMs round to TF32 an IEEE
weight gradient (on FMA units, several times slower) buys no accuracy the layer keeps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._checks import check_tensor
from ...plan import DispatchPlan
from . import check_device, on_device
from .gemm import dot_precision

__all__ = ["expert_weight_grad", "expert_bias_grad", "expert_weight_grad_torch", "expert_bias_grad_torch",
           "ROW_MODES"]

ROW_MODES = {"slot": 0, "token": 1, "padded": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Allocation hook: tests replace it to pre-fill outputs with poison.
_empty = torch.empty


@triton.jit
def _row_index(mode: tl.constexpr, r, slot, slot_token_ptr, rmask):
    if mode == 0:
        idx = slot
    elif mode == 1:
        idx = tl.load(slot_token_ptr + slot, mask=rmask, other=0)
    else:
        idx = r
    return idx.to(tl.int64)


@triton.jit
def _expert_wgrad_bwd_kernel(
    a_ptr,  # [rows_a, K] right factor rows (slot [S, K] / token [T, K] / padded [P, K] order)
    b_ptr,  # [rows_b, N] left factor rows (same three orders), a's dtype
    scale_ptr,  # [S] per-slot scale of b's rows (HAS_SCALE), any float dtype
    padded_slot_ptr,  # [P] int32 padded row -> slot, -1 padding
    slot_token_ptr,  # [S] int32 slot -> token
    padded_offsets_ptr,  # [E+1] int32 first padded row of each expert
    counts_ptr,  # [E] int32 valid rows of each expert
    dw_ptr,  # [E, N, K] out (HAS_W), strides (stride_we, stride_wn, stride_wk)
    db_ptr,  # [E, N] out (HAS_BIAS), strides (stride_de, stride_dn)
    N, K,
    stride_am, stride_ak, stride_bm, stride_bn,
    stride_we, stride_wn, stride_wk, stride_de, stride_dn,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid - pid_n * num_k
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = rn < N
    kmask = rk < K
    start = tl.load(padded_offsets_ptr + e)
    count = tl.load(counts_ptr + e)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, count, BLOCK_R):
        j = r0 + tl.arange(0, BLOCK_R)
        rmask = j < count
        r = start + j
        slot = tl.load(padded_slot_ptr + r, mask=rmask, other=0)
        b_row = _row_index(B_MODE, r, slot, slot_token_ptr, rmask)
        bt = tl.load(b_ptr + b_row[:, None] * stride_bm + rn[None, :] * stride_bn,
                     mask=rmask[:, None] & nmask[None, :], other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
            bt = (bt.to(tl.float32) * sc[:, None]).to(b_ptr.dtype.element_ty)
        if HAS_BIAS:
            acc_b += tl.sum(bt.to(tl.float32), 0)
        if HAS_W:
            a_row = _row_index(A_MODE, r, slot, slot_token_ptr, rmask)
            at = tl.load(a_ptr + a_row[:, None] * stride_am + rk[None, :] * stride_ak,
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(tl.trans(bt), at, acc, input_precision=PRECISION)
    e64 = e.to(tl.int64)
    if HAS_W:
        tl.store(dw_ptr + e64 * stride_we + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk,
                 acc.to(dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + e64 * stride_de + rn * stride_dn, acc_b.to(db_ptr.dtype.element_ty), mask=nmask)


def _config(n: int, k: int, dtype: torch.dtype) -> dict:
    """Tiles keyed on (N, K, dtype): up to 64x64 fp32 accumulators over 64-row steps (16 for fp32 inputs:
    their IEEE products run on FMA units and a deeper step spills registers; TF32 takes the
    same tiles, so the choice does not depend on a global flag)."""
    bn = max(16, min(64, triton.next_power_of_2(n)))
    bk = max(16, min(64, triton.next_power_of_2(k)))
    br = 16 if dtype == torch.float32 else 64
    return dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=4, num_stages=3 if dtype != torch.float32 else 2)


def _rows(mode: str, plan: DispatchPlan) -> int:
    return {"slot": plan.num_slots, "token": plan.num_tokens, "padded": plan.num_padded_rows}[mode]


def _check(name: str, x: torch.Tensor, mode: str, plan: DispatchPlan, mode_name: str) -> None:
    if mode not in ROW_MODES:
        raise ValueError(f"{mode_name}: expected one of {sorted(ROW_MODES)}, got {mode!r}")
    check_tensor(name, x, ndim=2, dtypes=_DTYPES, contiguous=False)
    want = _rows(mode, plan)
    if x.shape[0] != want:
        raise ValueError(f"{name}: {mode_name}={mode!r} needs {want} rows, got shape {tuple(x.shape)}")
    if x.device != plan.slot_token.device:
        raise ValueError(f"{name}: expected device {plan.slot_token.device} (the plan's), got {x.device}")


def _check_scale(scale, plan):
    if scale is not None:
        check_tensor("scale", scale, ndim=1, contiguous=True)
        if scale.shape[0] != plan.num_slots or scale.device != plan.slot_token.device:
            raise ValueError(f"scale: expected shape ({plan.num_slots},) (one per slot) on {plan.slot_token.device}, "
                             f"got {tuple(scale.shape)} on {scale.device}")


def _check_out(name, out, shape, device):
    check_tensor(name, out, ndim=len(shape), dtypes=_DTYPES, contiguous=False)
    if tuple(out.shape) != shape or out.device != device:
        raise ValueError(f"{name}: expected shape {shape} on {device}, got {tuple(out.shape)} on {out.device}")


def _launch(a, a_rows, b, b_rows, plan, out, scale, bias_out):
    e, n = plan.num_experts, b.shape[1]
    k = a.shape[1] if a is not None else 1
    cfg = _config(n, k, b.dtype)
    has_w = out is not None
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * (triton.cdiv(k, cfg["BLOCK_K"]) if has_w else 1), e)
    dummy = b
    with on_device(b):
        _expert_wgrad_bwd_kernel[grid](
            a if has_w else dummy, b, scale if scale is not None else dummy, plan.padded_slot, plan.slot_token,
            plan.padded_offsets, plan.expert_counts, out if has_w else dummy,
            bias_out if bias_out is not None else dummy, n, k,
            a.stride(0) if has_w else 0, a.stride(1) if has_w else 0, b.stride(0), b.stride(1),
            *(out.stride() if has_w else (0, 0, 0)), *(bias_out.stride() if bias_out is not None else (0, 0)),
            A_MODE=ROW_MODES[a_rows], B_MODE=ROW_MODES[b_rows], HAS_SCALE=scale is not None, HAS_W=has_w,
            HAS_BIAS=bias_out is not None, PRECISION=dot_precision(b.dtype) if b.dtype == torch.float32 else None,
            BLOCK_K=cfg["BLOCK_K"] if has_w else 16, **{k_: v for k_, v in cfg.items() if k_ != "BLOCK_K"},
        )


def expert_weight_grad(a: torch.Tensor, a_rows: str, b: torch.Tensor, b_rows: str, plan: DispatchPlan,
                       out: torch.Tensor | None = None, *, scale: torch.Tensor | None = None,
                       bias_out: torch.Tensor | None = None) -> torch.Tensor:
    """``dW[e] = sum over e's rows r of outer(scale[slot(r)] * b[b_row(r)], a[a_row(r)])``.

    ``a`` [rows_a, K] and ``b`` [rows_b, N] (same dtype, fp32/fp16/bf16, any strides)
    with ``rows`` S, T or P as ``a_rows``/``b_rows`` say (``"slot"``, ``"token"``,
    ``"padded"``); ``scale`` [S] optional per-slot factor of ``b``'s rows (the slot
    weight). Returns ``dW`` [E, N, K] in ``a``'s dtype, or written into ``out`` (any
    strides, e.g. a transposed view; fp32/fp16/bf16). ``bias_out`` [E, N], when given,
    also receives the bias gradient ``sum_r scale * b`` of the same launch."""
    _check("a", a, a_rows, plan, "a_rows")
    _check("b", b, b_rows, plan, "b_rows")
    if a.dtype != b.dtype:
        raise ValueError(f"b: expected dtype {a.dtype} (the dtype of a), got {b.dtype}")
    _check_scale(scale, plan)
    check_device("a", a)
    shape = (plan.num_experts, b.shape[1], a.shape[1])
    if out is None:
        out = _empty(shape, dtype=a.dtype, device=a.device)
    _check_out("out", out, shape, a.device)
    if bias_out is not None:
        _check_out("bias_out", bias_out, shape[:2], a.device)
    _launch(a, a_rows, b, b_rows, plan, out, scale, bias_out)
    return out


def expert_bias_grad(b: torch.Tensor, b_rows: str, plan: DispatchPlan, out: torch.Tensor | None = None, *,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """``db[e] = sum over e's rows r of scale[slot(r)] * b[b_row(r)]``: ``b`` [rows_b, N]
    → ``db`` [E, N] in ``b``'s dtype (or into ``out``). One launch, deterministic."""
    _check("b", b, b_rows, plan, "b_rows")
    _check_scale(scale, plan)
    check_device("b", b)
    shape = (plan.num_experts, b.shape[1])
    if out is None:
        out = _empty(shape, dtype=b.dtype, device=b.device)
    _check_out("out", out, shape, b.device)
    _launch(None, "slot", b, b_rows, plan, None, scale, out)
    return out


# --------------------------------------------------------------------------- pure-PyTorch twins


def _gather_rows(x: torch.Tensor, mode: str, plan: DispatchPlan, rows: torch.Tensor, slots: torch.Tensor):
    if mode == "slot":
        return x[slots]
    if mode == "token":
        return x[plan.slot_token.long()[slots]]
    return x[rows]


def _twin(a, a_rows, b, b_rows, plan, scale):
    """Per expert: the valid padded rows, gathered, in fp32 (host-synchronising loop)."""
    ps = plan.padded_slot.long()
    for x in range(plan.num_experts):
        lo = int(plan.padded_offsets[x])
        rows = torch.arange(lo, lo + int(plan.expert_counts[x]), device=ps.device)
        slots = ps[rows]
        bb = _gather_rows(b, b_rows, plan, rows, slots).float()
        if scale is not None:
            bb = (bb * scale[slots].float()[:, None]).to(b.dtype).float()
        aa = _gather_rows(a, a_rows, plan, rows, slots).float() if a is not None else None
        yield x, aa, bb


def expert_weight_grad_torch(a: torch.Tensor, a_rows: str, b: torch.Tensor, b_rows: str, plan: DispatchPlan,
                             out: torch.Tensor | None = None, *, scale: torch.Tensor | None = None,
                             bias_out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`expert_weight_grad` (same signature and results)."""
    _check("a", a, a_rows, plan, "a_rows")
    _check("b", b, b_rows, plan, "b_rows")
    _check_scale(scale, plan)
    dw = torch.zeros(plan.num_experts, b.shape[1], a.shape[1], dtype=torch.float32, device=a.device)
    db = torch.zeros(plan.num_experts, b.shape[1], dtype=torch.float32, device=a.device)
    for x, aa, bb in _twin(a, a_rows, b, b_rows, plan, scale):
        dw[x] = bb.t() @ aa
        db[x] = bb.sum(0)
    if bias_out is not None:
        bias_out.copy_(db)
    if out is None:
        return dw.to(a.dtype)
    return out.copy_(dw)


def expert_bias_grad_torch(b: torch.Tensor, b_rows: str, plan: DispatchPlan, out: torch.Tensor | None = None, *,
                           scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`expert_bias_grad`."""
    _check("b", b, b_rows, plan, "b_rows")
    _check_scale(scale, plan)
    db = torch.zeros(plan.num_experts, b.shape[1], dtype=torch.float32, device=b.device)
    for x, _, bb in _twin(None, "slot", b, b_rows, plan, scale):
        db[x] = bb.sum(0)
    if out is None:
        return db.to(b.dtype)
    return out.copy_(db)
