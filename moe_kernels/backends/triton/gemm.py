"""The grouped GEMM of every expert matmul, forward and backward: one kernel
(``_grouped_gemm_kernel``), flags.

``C[r] = epilogue(A[row_of(r)] @ B[e]^T)`` over the plan's padded rows ``r``; row block
``b`` belongs to expert ``e = plan.block_expert[b]`` (``-1``: the program exits), so a
tile never straddles two experts. ``B`` is any strided ``[E, N, K]`` view: the layer's
four GEMMs use W13 ``[E, nI, H]``, W2 ``[E, H, I]`` and their transposed views without
a copy. ``A`` rows are gathered inside the kernel (``A_ROWS``): ``token`` reads
``x[slot_token[padded_slot[r]]]`` (no permuted copy of x), ``slot`` reads
``A[padded_slot[r]]``, ``padded`` reads ``A[r]``. Outputs go to slot order (``[S, .]``,
what the combine and the weight gradients index) or padded order.

Pipeline (experts.py runs it):

====================  ============  =====================================================
GEMM                  A (rows)      epilogue
====================  ============  =====================================================
GEMM1  x W13^T        x (token)     + b13, activation (gated: two accumulators, or one
                                    2*BLOCK_N tile split for interleaved rows) -> h [S, I];
                                    pre-activation h13 [S, nI] saved for backward
GEMM2  h W2^T         h (slot)      + b2, x slot weight -> y [S, H]; fused combine:
                                    out[t] = sum_j y[token_slots[t, j]]
dGEMM2 dOut W2        dOut (token)  g = dOut[t] W2[e]: dw partial = dot(g, h) (+ dOut.b2),
                                    activation backward of (slot weight x g) -> dh13 [S, nI],
                                    h [S, I] for dW2
dGEMM1 dh13 W13       dh13 (slot)   -> dx_slot [S, H], fused combine into dx [T, H];
                                    dw[s] = sum of the partials
====================  ============  =====================================================

Backward saves x, the weights, the plan and h13 (the pre-activation, [S, nI]); with
``recompute_h`` it saves no h13 and reruns GEMM1 without the activation (see experts.py).

Schedules (the config's regime, configs.py; pieces in gemm_parts.py): one program per
(row block, N tile); ``SPLIT_K > 1`` (decode) adds a grid axis of K ranges whose fp32
partials the last-arriving program sums in split order before the epilogue (bitwise
deterministic); ``PERSISTENT`` (prefill, sm_90+) launches ``num_SMs`` programs that loop
over the tiles; ``USE_TMA`` (sm_90+) loads the weight tiles through a tensor descriptor.
The A rows are always gathered through the plan with pointer loads.

Fused combine (combine.py): the program that completes a token's last slot sums the
token's rows in ``token_slots`` order (int32 counters, no float atomics, bitwise
deterministic); the previous kernel's prologue zeroes the counters and the rows of
tokens with no valid slot, so a layer forward is routing + plan + GEMM1 + GEMM2 = 4
launches. That hand-off is a :class:`Prologue` object: the launch that runs it marks it,
the fused launch (``combine_from=``) refuses one that has not run or belongs to another
output and consumes it; without one, the fused launch zeroes its own counters and empty
rows. ``combine="none"`` leaves ``y`` for the separate combine kernel.

Numerics: fp32 accumulation, the activation in fp32, outputs rounded to their buffer's
dtype; row offsets and expert offsets in int64, the prologue's grid-stride loops too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ...activations import Activation, apply_activation
from .act import ACT_CODES
from ...primitives import combine_slots
from . import on_device
from .combine import _zero_prologue, ks_block, top_k_constexpr
from .gemm_parts import _tile, _tile_coords
from .configs import GemmConfig, autotune_configs, capability_of, gemm_config, num_sms_of

__all__ = ["ACT_CODES", "Prologue", "GemmOutputs", "grouped_gemm", "grouped_gemm_torch", "dot_precision",
           "tf32_allowed"]

_A_ROWS = {"token": 0, "slot": 1, "padded": 2}
_C_ROWS = {"slot": 1, "padded": 2}
_EPI = {"none": 0, "act": 1, "act_bwd": 2}
_PRO_BLOCK = 1024


# --------------------------------------------------------------------------- kernel


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,              # [Ra, K] A rows (Ra = T, S or P by A_ROWS)
    b_ptr,              # [E, NB, K] strided weights (NB = 2N for the gated GEMM1, else N)
    c_ptr,              # [Rc, NC] main output, rows by C_ROWS (NC = N; 2N for a gated act_bwd)
    bias_ptr,           # [E, NB] bias of A @ B^T (HAS_BIAS)
    pre_ptr,            # [Rc, NB] (act) or [Rc, NC] (act_bwd): pre-activation written / read
    h_ptr,              # [Rc, N] activation recomputed by act_bwd (STORE_H)
    wpart_ptr,          # [S, NUM_WPART] fp32: per column block dot(g, h) (act_bwd) / read by DW_FINAL
    bias_dot_ptr,       # [E, K] vector whose dot with each A row joins wpart (BIAS_DOT)
    dw_ptr,             # [S] fp32 slot-weight gradient (DW_FINAL)
    padded_slot_ptr,    # [P] int32 padded row -> slot, -1 for padding
    slot_token_ptr,     # [S] int32
    slot_weight_ptr,    # [S] float
    block_expert_ptr,   # [NUM_BLOCKS] int32, -1 past the last used block
    token_slots_ptr,    # [T, KS] int32, -1 padded
    counter_ptr,        # [T, cdiv(N, BLOCK_N)] int32 zeroed by the previous kernel (FUSED_COMBINE)
    out_ptr,            # [T, N] combined output (FUSED_COMBINE)
    pro_counter_ptr,    # [pro_count] int32 (prologue)
    pro_out_ptr,        # [T, pro_n] (prologue)
    pro_f32_ptr,        # [pro_f32_len] fp32 (prologue)
    part_ptr,           # [SPLIT_K, NUM_BLOCKS * cdiv(N, BLOCK_N), BLOCK_M, width] fp32 partials (SPLIT_K > 1)
    split_cnt_ptr,      # [NUM_BLOCKS * cdiv(N, BLOCK_N)] int32 zeroed by the launcher (SPLIT_K > 1)
    T, N, K, KS, NB, NUM_E, NUM_BLOCKS, NUM_WPART, pro_count, pro_n, pro_f32_len, k_split, k_rot,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_bias_e,
    stride_pm, stride_hm, stride_bd_e, stride_om, stride_pro_om,
    alpha, limit,
    A_ROWS: tl.constexpr, C_ROWS: tl.constexpr, EPI: tl.constexpr, ACT: tl.constexpr,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, TWO_DOTS: tl.constexpr, B_TILE_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_C: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr,
    ROW_SCALE: tl.constexpr, BIAS_DOT: tl.constexpr, DW_FINAL: tl.constexpr, FUSED_COMBINE: tl.constexpr,
    PRO_COUNTERS: tl.constexpr, PRO_EMPTY_ROWS: tl.constexpr, PRO_F32: tl.constexpr,
    KS_BLOCK: tl.constexpr, TOP_K: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, PERSISTENT: tl.constexpr,
    PRO_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if SPLIT_K > 1:  # grid (tiles, SPLIT_K): the prologue strides over every program of both axes
        pro_pid = pid * SPLIT_K + tl.program_id(1)
        pro_nprog = tl.num_programs(0) * SPLIT_K
    else:
        pro_pid = pid
        pro_nprog = tl.num_programs(0)
    if PRO_COUNTERS or PRO_EMPTY_ROWS or PRO_F32:
        _zero_prologue(pro_pid, pro_nprog, T, KS, pro_count, pro_n, pro_f32_len, token_slots_ptr,
                       pro_counter_ptr, pro_out_ptr, pro_f32_ptr, stride_pro_om,
                       PRO_COUNTERS, PRO_EMPTY_ROWS, PRO_F32, KS_BLOCK, PRO_BLOCK, 16, 128)

    num_pid_n = tl.cdiv(N, BLOCK_N)
    if USE_TMA:  # built once per program (a persistent one reuses it for all its tiles)
        if B_KMAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[NUM_E * NB, K], strides=[stride_bn, 1],
                                               block_shape=[B_TILE_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[NUM_E * K, NB], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, B_TILE_N])
    else:
        b_desc = b_ptr
    if PERSISTENT:
        num_tiles = NUM_BLOCKS * num_pid_n
        for tile in tl.range(pid, num_tiles, tl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, NUM_BLOCKS, num_pid_n, GROUP_M)
            expert = tl.load(block_expert_ptr + pid_m)
            if expert >= 0:
                _tile(a_ptr, b_ptr, b_desc, c_ptr, bias_ptr, pre_ptr, h_ptr, wpart_ptr, bias_dot_ptr, dw_ptr,
                      padded_slot_ptr, slot_token_ptr, slot_weight_ptr, token_slots_ptr, counter_ptr, out_ptr,
                      part_ptr, split_cnt_ptr, expert, pid_m, pid_n, 0, num_pid_n,
                      N, K, KS, NB, NUM_BLOCKS, NUM_WPART, k_split,
                      stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_bias_e,
                      stride_pm, stride_hm, stride_bd_e, stride_om, alpha, limit,
                      A_ROWS, C_ROWS, EPI, ACT, GATED, INTERLEAVED, TWO_DOTS, B_TILE_N, HAS_BIAS, STORE_C,
                      STORE_PRE, STORE_H, ROW_SCALE, BIAS_DOT, DW_FINAL, FUSED_COMBINE, KS_BLOCK, TOP_K,
                      DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, USE_TMA, B_KMAJOR)
    else:
        pid_m, pid_n = _tile_coords(pid, NUM_BLOCKS, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        if SPLIT_K > 1:
            pid_k = (tl.program_id(1) + k_rot) % SPLIT_K  # k_rot: tests change who arrives last
        else:
            pid_k = 0
        _tile(a_ptr, b_ptr, b_desc, c_ptr, bias_ptr, pre_ptr, h_ptr, wpart_ptr, bias_dot_ptr, dw_ptr,
              padded_slot_ptr, slot_token_ptr, slot_weight_ptr, token_slots_ptr, counter_ptr, out_ptr,
              part_ptr, split_cnt_ptr, expert, pid_m, pid_n, pid_k, num_pid_n,
              N, K, KS, NB, NUM_BLOCKS, NUM_WPART, k_split,
              stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_bias_e,
              stride_pm, stride_hm, stride_bd_e, stride_om, alpha, limit,
              A_ROWS, C_ROWS, EPI, ACT, GATED, INTERLEAVED, TWO_DOTS, B_TILE_N, HAS_BIAS, STORE_C,
              STORE_PRE, STORE_H, ROW_SCALE, BIAS_DOT, DW_FINAL, FUSED_COMBINE, KS_BLOCK, TOP_K,
              DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, USE_TMA, B_KMAJOR)


# --------------------------------------------------------------------------- launcher


@dataclass(eq=False)
class Prologue:
    """Work a GEMM does before its tiles, for the *next* kernel's fused combine:
    zero ``counters`` (int32) and ``zero_f32`` (fp32), and zero the rows of ``out``
    ([T, N]) whose token has no valid slot.

    A one-shot hand-off between two launches of one op: the launch that runs it sets
    ``ran``; the fused-combine launch takes it (``combine_from=``), refuses it unless it
    ran and its ``out`` and counter count are this launch's, and consumes it (the
    counters end non-zero). Without ``combine_from`` a fused launch zeroes its own
    counters and empty rows first (two memsets), so the combine cannot read stale
    counters whatever the caller does."""

    counters: torch.Tensor | None = None
    out: torch.Tensor | None = None
    zero_f32: torch.Tensor | None = None
    ran: bool = field(default=False, repr=False)

    @classmethod
    def for_combine(cls, out: torch.Tensor, block_n: int, zero_f32: torch.Tensor | None = None) -> "Prologue":
        """The prologue that prepares a fused combine into ``out`` [T, N] with ``block_n``-wide tiles."""
        t, n = out.shape
        counters = torch.empty((t * triton.cdiv(n, block_n),), dtype=torch.int32, device=out.device)
        return cls(counters=counters, out=out, zero_f32=zero_f32)

    def _run_here(self, plan) -> None:
        # The same work as the kernel's prologue, for a launch with no program to run it.
        if self.counters is not None:
            self.counters.zero_()
        if self.zero_f32 is not None:
            self.zero_f32.zero_()
        if self.out is not None:
            self.out.masked_fill_((plan.token_slots < 0).all(dim=1, keepdim=True), 0)


@dataclass
class GemmOutputs:
    c: torch.Tensor | None = None       # main output rows (c_rows order)
    pre: torch.Tensor | None = None     # pre-activation written by epilogue="act"
    h: torch.Tensor | None = None       # activation recomputed by epilogue="act_bwd"
    wpart: torch.Tensor | None = None   # [S, num_pid_n] fp32 partials (act_bwd)
    dw: torch.Tensor | None = None      # [S] fp32 (dw_final)
    out: torch.Tensor | None = None     # [T, N] combined (combine="fused")


def _rows(plan, which: str) -> int:
    return {"token": plan.num_tokens, "slot": plan.slot_token.shape[0], "padded": plan.padded_slot.shape[0]}[which]


def _check_args(a, b, plan, a_rows, c_rows, epilogue, activation, combine):
    if a_rows not in _A_ROWS:
        raise ValueError(f"a_rows: expected one of {list(_A_ROWS)}, got {a_rows!r}")
    if c_rows not in _C_ROWS:
        raise ValueError(f"c_rows: expected one of {list(_C_ROWS)}, got {c_rows!r}")
    if epilogue not in _EPI:
        raise ValueError(f"epilogue: expected one of {list(_EPI)}, got {epilogue!r}")
    if epilogue != "none" and activation is None:
        raise ValueError(f"activation: required by epilogue={epilogue!r}")
    if combine not in ("none", "fused"):
        raise ValueError(f"combine: expected 'none' or 'fused', got {combine!r}")
    if combine == "fused" and (c_rows != "slot" or epilogue != "none"):
        raise ValueError("combine: 'fused' needs c_rows='slot' and epilogue='none'")
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"a, b: expected [R, K] and [E, N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != _rows(plan, a_rows):
        raise ValueError(f"a: expected {_rows(plan, a_rows)} rows for a_rows={a_rows!r}, got {a.shape[0]}")
    if a.shape[1] != b.shape[2]:
        raise ValueError(f"a: expected K = {b.shape[2]} columns (from b [E, N, K]), got {a.shape[1]}")
    if b.shape[0] != plan.num_experts:
        raise ValueError(f"b: expected {plan.num_experts} experts (from the plan), got {b.shape[0]}")
    if a.dtype != b.dtype:
        raise ValueError(f"a: expected dtype {b.dtype} like b, got {a.dtype}")


def _buf(given, shape, dtype, device, name):
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(given.shape) != tuple(shape) or given.dtype != dtype or given.device != torch.device(device):
        raise ValueError(f"{name}: expected a {dtype} buffer of shape {tuple(shape)} on {device}, "
                         f"got {given.dtype} {tuple(given.shape)} on {given.device}")
    if given.dim() == 2 and given.shape[1] > 1 and given.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride along its last dimension, got strides {given.stride()}")
    return given


def _tf32_allowed(matmul, backends) -> bool:
    prec = getattr(matmul, "fp32_precision", None)
    if prec is not None:  # torch >= 2.9: "tf32", "ieee", or "none" = the global setting
        if prec == "none":
            prec = getattr(backends, "fp32_precision", "none")
        return prec == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # a mix of the legacy and new APIs: torch refuses to answer
        return False


def tf32_allowed() -> bool:
    """Whether torch's fp32 matmuls may use TF32: ``torch.backends.cuda.matmul.fp32_precision``
    where it exists (torch >= 2.9; reading the legacy ``allow_tf32`` there raises once a
    user set the new API), else ``allow_tf32``."""
    return _tf32_allowed(torch.backends.cuda.matmul, torch.backends)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use TF32 only when torch's own matmuls would (:func:`tf32_allowed`)."""
    if dtype == torch.float32 and tf32_allowed():
        return "tf32"
    return "ieee"


def _prepare(a, b, plan, *, a_rows, c_rows, epilogue, activation, interleaved, bias, row_scale, store_c, store_pre,
             store_h, pre, bias_dot, wpart, dw_final, combine, c, h, dw, out, config):
    """Checks and output buffers shared by the launcher and its twin: (outputs, N, config)."""
    _check_args(a, b, plan, a_rows, c_rows, epilogue, activation, combine)
    act = activation
    gated = bool(act is not None and act.gated)
    e, nb, k = b.shape
    s, t, dev = plan.slot_token.shape[0], plan.num_tokens, a.device
    n = nb // 2 if (epilogue == "act" and gated) else nb
    rc = _rows(plan, c_rows)
    cfg = config or gemm_config(e, n, k, a.dtype, capability_of(dev), plan.block_m,
                                gated_b=epilogue == "act" and gated, heavy_epilogue=epilogue == "act_bwd",
                                num_slots=s, num_sms=num_sms_of(dev))
    if cfg.BLOCK_M != plan.block_m:
        raise ValueError(f"config: BLOCK_M={cfg.BLOCK_M} must equal the plan's block_m={plan.block_m}")
    num_pid_n = triton.cdiv(n, cfg.BLOCK_N)
    res = GemmOutputs()
    nc = 2 * n if (epilogue == "act_bwd" and gated) else n
    if store_c:
        res.c = _buf(c, (rc, nc), a.dtype, dev, "c")
    if epilogue == "act" and store_pre:
        res.pre = _buf(pre, (rc, nb), a.dtype, dev, "pre")
    if epilogue == "act_bwd":
        if pre is None or tuple(pre.shape) != (rc, nc):
            raise ValueError(f"pre: epilogue='act_bwd' reads the saved pre-activation, expected shape {(rc, nc)}")
        res.pre = pre
        res.wpart = _buf(wpart, (s, num_pid_n), torch.float32, dev, "wpart")
        if store_h:
            res.h = _buf(h, (rc, n), a.dtype, dev, "h")
    if dw_final:
        if wpart is None or wpart.dim() != 2 or wpart.shape[0] != s:
            raise ValueError(f"wpart: dw_final needs the [S={s}, blocks] fp32 partials of the act_bwd GEMM")
        res.wpart = wpart
        res.dw = _buf(dw, (s,), torch.float32, dev, "dw")
    if combine == "fused":
        res.out = _buf(out, (t, n), a.dtype, dev, "out")
    if bias is not None and tuple(bias.shape) != (e, nb):
        raise ValueError(f"bias: expected shape {(e, nb)}, got {tuple(bias.shape)}")
    if bias_dot is not None and tuple(bias_dot.shape) != (e, k):
        raise ValueError(f"bias_dot: expected shape {(e, k)}, got {tuple(bias_dot.shape)}")
    return res, n, cfg


_AUTOTUNED = []


def _autotuned():
    """The kernel under ``triton.autotune`` (``autotune=True``): BLOCK_K, warps and
    stages are tuned per (N, K, dtype, mode); BLOCK_M is the plan's and BLOCK_N stays the
    heuristic's, since buffer shapes (partials, counters) depend on it. Benchmark runs
    repeat the kernel, which is idempotent except for the counters: restored."""
    if not _AUTOTUNED:
        cands = [triton.Config(c, num_warps=w, num_stages=st) for c, w, st in autotune_configs()]
        heur = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_grouped_gemm_kernel)
        _AUTOTUNED.append(triton.autotune(cands, key=["N", "K", "A_ROWS", "EPI", "ACT", "GATED", "BLOCK_M", "BLOCK_N",
                                                      "SPLIT_K"],
                                          restore_value=["counter_ptr", "split_cnt_ptr"])(heur))
    return _AUTOTUNED[0]


def _combine_counters(combine_from: Prologue | None, res: GemmOutputs, plan, t: int, num_pid_n: int):
    """The fused combine's counters: a hand-off prepared by an earlier launch's prologue,
    checked and consumed, or zeroed here (see :class:`Prologue`)."""
    if combine_from is None:
        counters = torch.zeros((t * num_pid_n,), dtype=torch.int32, device=res.out.device)
        Prologue(out=res.out)._run_here(plan)
        return counters
    if not isinstance(combine_from, Prologue) or combine_from.counters is None or combine_from.out is None:
        raise ValueError("combine_from: expected the Prologue (with counters and out) that an earlier launch ran")
    if not combine_from.ran:
        raise ValueError("combine_from: this Prologue has not run (or was consumed): launch the GEMM that takes it "
                         "as prologue= first, on the same stream")
    if combine_from.out is not res.out or combine_from.counters.numel() != t * num_pid_n:
        raise ValueError(f"combine_from: its out must be this launch's out and hold {t}x{num_pid_n} counters "
                         f"(got {combine_from.counters.numel()})")
    combine_from.ran = False
    return combine_from.counters


def _tma_layout(cfg: GemmConfig, b: torch.Tensor) -> str | None:
    """Which descriptor the weights allow: ``"kmajor"`` (contiguous [E, NB, K]),
    ``"nmajor"`` (a transposed view of contiguous [E, K, NB] storage, with K a multiple
    of BLOCK_K), or None: the pointer path. A descriptor needs 16-byte aligned rows and
    base and int32 dimensions."""
    if not cfg.USE_TMA or not hasattr(tl, "make_tensor_descriptor"):
        return None
    e, nb, k = b.shape
    es = b.element_size()
    if b.data_ptr() % 16 or e * max(nb, k) >= 2**31:
        return None
    if b.stride(2) == 1 and b.stride(1) == k and b.stride(0) == nb * k and (k * es) % 16 == 0:
        return "kmajor"
    if (b.stride(1) == 1 and b.stride(2) == nb and b.stride(0) == nb * k and (nb * es) % 16 == 0
            and k % cfg.BLOCK_K == 0):
        return "nmajor"
    return None



def _ensure_allocator() -> None:
    """Device-side tensor descriptors need 128 bytes of global scratch per program, from
    Triton's allocator (a context variable: per thread); set one (torch's caching
    allocator, CUDA-graph safe) where none is set, never replacing a caller's."""
    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another layout: set ours once per thread
        if getattr(_THREAD, "allocator_set", False):
            return
        _THREAD.allocator_set = True
    triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


_THREAD = threading.local()


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, plan, *, a_rows: str, c_rows: str = "slot", epilogue: str = "none",
    activation: Activation | None = None, interleaved: bool = False, bias: torch.Tensor | None = None,
    row_scale: bool = False, store_c: bool = True, store_pre: bool = False, store_h: bool = False,
    pre: torch.Tensor | None = None, bias_dot: torch.Tensor | None = None, wpart: torch.Tensor | None = None,
    dw_final: bool = False, combine: str = "none", prologue: Prologue | None = None,
    c: torch.Tensor | None = None, h: torch.Tensor | None = None, dw: torch.Tensor | None = None,
    out: torch.Tensor | None = None, combine_from: Prologue | None = None, config: GemmConfig | None = None,
    autotune: bool = False, _k_rot: int = 0,
) -> GemmOutputs:
    """One launch of the grouped GEMM. ``b`` is logically [E, NB, K]; ``N`` (the output
    columns) is NB, or NB/2 for ``epilogue="act"`` with a gated activation. Output
    buffers are allocated unless given (``c``, ``pre`` for ``store_pre``, ``h``, ``wpart``,
    ``dw``, ``out``). ``combine="fused"`` takes its counters from ``combine_from`` (the
    :class:`Prologue` an earlier launch ran) or zeroes its own. ``plan`` is a
    DispatchPlan (or any object with its fields). See the module docstring for the
    modes. ``_k_rot`` (tests) rotates which K split each program runs."""
    res, n, cfg = _prepare(a, b, plan, a_rows=a_rows, c_rows=c_rows, epilogue=epilogue, activation=activation,
                          interleaved=interleaved, bias=bias, row_scale=row_scale, store_c=store_c,
                          store_pre=store_pre, store_h=store_h, pre=pre, bias_dot=bias_dot, wpart=wpart,
                          dw_final=dw_final, combine=combine, c=c, h=h, dw=dw, out=out, config=config)
    act, e, k = activation, b.shape[0], b.shape[2]
    gated = bool(act is not None and act.gated)
    t, num_pid_n = plan.num_tokens, triton.cdiv(n, cfg.BLOCK_N)
    pro = prologue or Prologue()
    nblocks = plan.block_expert.shape[0]
    num_tiles = nblocks * num_pid_n
    if num_tiles == 0:  # no program would run the prologue or the combine
        if prologue is not None:
            prologue._run_here(plan)
            prologue.ran = True
        if combine == "fused":
            _combine_counters(combine_from, res, plan, t, num_pid_n)
        return res
    counters = _combine_counters(combine_from, res, plan, t, num_pid_n) if combine == "fused" else None
    dummy = plan.padded_slot  # any tensor: pointers of disabled features are never read
    ks = plan.token_slots.shape[1]
    two_dots = epilogue == "act" and gated and not interleaved
    b_tile_n = 2 * cfg.BLOCK_N if (epilogue == "act" and gated and interleaved) else cfg.BLOCK_N
    split = cfg.SPLIT_K
    tuned = a.is_cuda and autotune
    # Each split's K range is whole BLOCK_K steps (of every BLOCK_K autotune may pick: 128).
    step = max(cfg.BLOCK_K, 128) if tuned else cfg.BLOCK_K
    k_split = triton.cdiv(triton.cdiv(k, split), step) * step
    if split > 1:
        part = torch.empty((split, num_tiles, cfg.BLOCK_M, b_tile_n * (2 if two_dots else 1)), dtype=torch.float32,
                           device=a.device)
        split_cnt = torch.zeros((num_tiles,), dtype=torch.int32, device=a.device)
    else:
        part = split_cnt = dummy
    layout = _tma_layout(cfg, b)
    use_tma = layout is not None
    persistent = cfg.PERSISTENT and split == 1
    if persistent:
        grid = (min(num_tiles, num_sms_of(a.device)),)
    else:
        grid = (num_tiles, split) if split > 1 else (num_tiles,)
    pre_t = res.pre if res.pre is not None else dummy
    args = (
        a, b, res.c if res.c is not None else dummy, bias if bias is not None else dummy, pre_t,
        res.h if res.h is not None else dummy, res.wpart if res.wpart is not None else dummy,
        bias_dot if bias_dot is not None else dummy, res.dw if res.dw is not None else dummy,
        plan.padded_slot, plan.slot_token, plan.slot_weight, plan.block_expert, plan.token_slots,
        counters if counters is not None else dummy, res.out if res.out is not None else dummy,
        pro.counters if pro.counters is not None else dummy, pro.out if pro.out is not None else dummy,
        pro.zero_f32 if pro.zero_f32 is not None else dummy, part, split_cnt,
        t, n, k, ks, b.shape[1], e, nblocks, res.wpart.shape[1] if res.wpart is not None else 1,
        pro.counters.numel() if pro.counters is not None else 0,
        pro.out.shape[1] if pro.out is not None else 0,
        pro.zero_f32.numel() if pro.zero_f32 is not None else 0, k_split, _k_rot % split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        res.c.stride(0) if res.c is not None else 0, bias.stride(0) if bias is not None else 0,
        pre_t.stride(0) if res.pre is not None else 0, res.h.stride(0) if res.h is not None else 0,
        bias_dot.stride(0) if bias_dot is not None else 0, res.out.stride(0) if res.out is not None else 0,
        pro.out.stride(0) if pro.out is not None else 0,
        float(act.alpha) if act is not None else 0.0, float(act.limit) if act is not None else 0.0,
    )
    meta = dict(
        A_ROWS=_A_ROWS[a_rows], C_ROWS=_C_ROWS[c_rows], EPI=_EPI[epilogue],
        ACT=ACT_CODES[act.name] if act is not None else 0, GATED=gated, INTERLEAVED=bool(interleaved and gated),
        TWO_DOTS=two_dots, B_TILE_N=b_tile_n, HAS_BIAS=bias is not None, STORE_C=store_c,
        STORE_PRE=res.pre is not None and epilogue == "act", STORE_H=res.h is not None, ROW_SCALE=row_scale,
        BIAS_DOT=bias_dot is not None, DW_FINAL=dw_final, FUSED_COMBINE=combine == "fused",
        PRO_COUNTERS=pro.counters is not None, PRO_EMPTY_ROWS=pro.out is not None, PRO_F32=pro.zero_f32 is not None,
        KS_BLOCK=ks_block(ks), TOP_K=top_k_constexpr(ks), DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, GROUP_M=cfg.GROUP_M, SPLIT_K=split, USE_TMA=use_tma,
        B_KMAJOR=layout != "nmajor",
        PERSISTENT=persistent, PRO_BLOCK=_PRO_BLOCK,
    )
    with on_device(a):
        if use_tma and a.is_cuda:
            _ensure_allocator()
        if tuned:
            _autotuned()[grid](*args, **meta)
        else:
            _grouped_gemm_kernel[grid](*args, **meta, BLOCK_K=cfg.BLOCK_K, EVEN_K=k % cfg.BLOCK_K == 0,
                                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if prologue is not None:
        prologue.ran = True
    return res


# --------------------------------------------------------------------------- twin


def grouped_gemm_torch(
    a: torch.Tensor, b: torch.Tensor, plan, *, a_rows: str, c_rows: str = "slot", epilogue: str = "none",
    activation: Activation | None = None, interleaved: bool = False, bias: torch.Tensor | None = None,
    row_scale: bool = False, store_c: bool = True, store_pre: bool = False, store_h: bool = False,
    pre: torch.Tensor | None = None, bias_dot: torch.Tensor | None = None, wpart: torch.Tensor | None = None,
    dw_final: bool = False, combine: str = "none", prologue: Prologue | None = None,
    c: torch.Tensor | None = None, h: torch.Tensor | None = None, dw: torch.Tensor | None = None,
    out: torch.Tensor | None = None, combine_from: Prologue | None = None, config: GemmConfig | None = None,
    autotune: bool = False, _k_rot: int = 0,
) -> GemmOutputs:
    """Pure-PyTorch twin of :func:`grouped_gemm` (same signature, same buffers written,
    fp32 math): writes only the rows the kernel writes."""
    if prologue is not None:
        prologue._run_here(plan)
        prologue.ran = True
    res, n, cfg = _prepare(a, b, plan, a_rows=a_rows, c_rows=c_rows, epilogue=epilogue, activation=activation,
                          interleaved=interleaved, bias=bias, row_scale=row_scale, store_c=store_c,
                          store_pre=store_pre, store_h=store_h, pre=pre, bias_dot=bias_dot, wpart=wpart,
                          dw_final=dw_final, combine=combine, c=c, h=h, dw=dw, out=out, config=config)
    act, t, dev, dt = activation, plan.num_tokens, a.device, a.dtype
    nb, num_pid_n = b.shape[1], triton.cdiv(n, cfg.BLOCK_N)

    padded = plan.padded_slot.long()
    rows = torch.arange(padded.shape[0], device=dev)
    expert = plan.block_expert.long()[rows // plan.block_m]
    valid = (padded >= 0) & (expert >= 0)
    vr, vs, ve = rows[valid], padded[valid], expert[valid]
    tok = plan.slot_token.long()[vs]
    a_idx = {"token": tok, "slot": vs, "padded": vr}[a_rows]
    c_idx = vs if c_rows == "slot" else vr
    av = a[a_idx].float()
    acc = torch.zeros(vr.shape[0], nb, dtype=torch.float32, device=dev)
    for x in ve.unique().tolist():
        sel = ve == x
        acc[sel] = av[sel] @ b[x].float().t()
    w = plan.slot_weight[vs].float().unsqueeze(1)
    if epilogue == "act":
        if bias is not None:
            acc = acc + bias[ve].float()
        if res.pre is not None:
            res.pre[c_idx] = acc.to(dt)
        if store_c:
            res.c[c_idx] = apply_activation(acc, act, interleaved).to(dt)
    elif epilogue == "act_bwd":
        pv = pre[c_idx].float().requires_grad_(True)
        with torch.enable_grad():
            hv = apply_activation(pv, act, interleaved)
            (dpre,) = torch.autograd.grad(hv, pv, acc * w)
        hv = hv.detach().to(dt).float()
        prod = torch.nn.functional.pad(acc * hv, (0, num_pid_n * cfg.BLOCK_N - n))
        part = prod.view(-1, num_pid_n, cfg.BLOCK_N).sum(-1)
        if bias_dot is not None:
            part[:, 0] += (av * bias_dot[ve].float()).sum(1)
        res.wpart[vs] = part
        if store_h:
            res.h[c_idx] = hv.to(dt)
        if store_c:
            res.c[c_idx] = dpre.to(dt)
    else:
        v = acc
        if bias is not None:
            v = v + bias[ve].float()
        if row_scale:
            v = v * w
        if store_c:
            res.c[c_idx] = v.to(dt)
        if dw_final:
            res.dw[vs] = wpart[vs].sum(1)
        if combine == "fused":
            _combine_counters(combine_from, res, plan, t, num_pid_n)
            has = (plan.token_slots >= 0).any(dim=1)
            res.out[has] = combine_slots(res.c.float(), plan.token_slots)[has].to(dt)
    return res
