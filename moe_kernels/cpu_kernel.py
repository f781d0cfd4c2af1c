"""The compiled CPU kernel: one expert linear layer over routed slots, at the speed of
reading the weights.

``out[s] = x[slot_row[s]] @ w[slot_expert[s]]^T + b[slot_expert[s]]``, and a zero row for
a dropped slot (expert outside ``[0, E)``), in one call: the kernel (csrc/cpu/expert_linear.c)
groups the slots by expert itself (a counting sort), loads each weight element once per
block of up to 4 slots and streams it from memory into multiply-adds. At 1-8 rows per
expert the BLAS libraries pack the weight first and stream it at ~15 GB/s on one core;
this reads it at 25-60 GB/s (measured on the development machine; docs/PERFORMANCE.md).
No sort, gather or host read is left to the caller: the torch backend's ``"kernel"``
path (:mod:`moe_kernels.backends.torch.planless`) is two calls and the activation.

Three layers, as for every op: :func:`expert_linear_into` writes into a given buffer,
:func:`expert_linear` allocates (an opaque custom op under ``torch.compile``),
:func:`expert_linear_reference` is the pure-PyTorch twin with the same signature. Forward
only: nothing here records autograd (the torch backend takes it at inference, eager or
compiled; training keeps the differentiable paths).

Scope: CPU, contiguous float32 or bfloat16 weights in either layout the package stores
(``[E, N, K]``, or ``[E, K, N]`` viewed transposed, as GPT-OSS keeps w13); float32 input
rows with unit stride, float32 bias and output (bfloat16 weights are widened as they
load: half the bytes of float32 to stream, float32 arithmetic).
:func:`kernel_layout` says whether a weight qualifies. The library is plain C loaded with
ctypes (no Python or torch ABI); when it was not built (no C compiler at install time)
:func:`available` is False and :func:`unavailable_reason` says why.

Determinism: each output element is reduced in an order fixed by ``K`` alone, whatever
the thread count or slot order, so the same input gives bitwise the same output on one
machine; a slot's result does not depend on which other slots share its expert.
Threads: the output columns are split over ``threads`` threads of torch's OpenMP pool
(:func:`threading_model`), used from :data:`THREAD_MIN_BYTES` of weights on.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ._checks import _compiling

__all__ = ["THREAD_MIN_BYTES", "available", "unavailable_reason", "threading_model", "kernel_layout",
           "expert_linear_into", "expert_linear", "expert_linear_reference"]

_ABI = 2  # csrc/cpu/expert_linear.c: moe_cpu_kernels_abi()
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_LIBRARY = "_cpu_kernels.abi3.so"
# Below this many weight bytes (the most the call can read: min(S, E) experts' weights)
# one thread is done before a second would have started.
THREAD_MIN_BYTES = 1 << 20


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = Path(__file__).with_name(_LIBRARY)
    if not path.is_file():
        return None, (f"{path.name} was not built (no working C compiler at install time; reinstall with one, "
                      f"e.g. `pip install -e .` with gcc or clang on PATH)")
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.moe_cpu_kernels_abi()
    except (OSError, AttributeError) as err:
        return None, f"{path.name} could not be loaded: {err}"
    if abi != _ABI:
        return None, f"{path.name} has ABI {abi}, this package expects {_ABI}: rebuild it (`pip install -e .`)"
    fn = lib.moe_expert_linear
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64]
    fn.restype = ctypes.c_int
    return lib, None


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the compiled CPU kernel is present and loads (a constant under
    ``torch.compile``, which then sees no ctypes)."""
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()[1]


def threading_model() -> str | None:
    """``"openmp"`` when calls with threads run on the OpenMP pool the process already has
    (torch's libgomp, found at run time, not linked), ``"pthreads"`` when there is none
    (threads started per call), None when the kernel is unavailable."""
    lib = _load()[0]
    return None if lib is None else ("openmp" if lib.moe_cpu_kernels_openmp() else "pthreads")


def kernel_layout(w: torch.Tensor) -> str | None:
    """``"nk"`` for an expert weight ``w`` [E, N, K] stored contiguously, ``"kn"`` for one
    stored transposed (a ``[E, K, N]`` contiguous tensor viewed ``[E, N, K]``), float32 or
    bfloat16; None for anything the kernel does not take (another dtype, device or layout)."""
    if w.dtype not in _WEIGHT_DTYPES or w.device.type != "cpu" or w.dim() != 3:
        return None
    e, n, k = w.shape
    if w.stride() == (n * k, k, 1):
        return "nk"
    if w.stride() == (n * k, 1, n):
        return "kn"
    return None


def _check(out, x, slot_row, slot_expert, w, b) -> str:
    """Every argument of :func:`expert_linear_into`, or a ValueError naming it; returns
    the layout of ``w``."""
    layout = kernel_layout(w)
    if layout is None:
        raise ValueError(f"w: expected a float32 or bfloat16 CPU [E, N, K] tensor stored contiguously as "
                         f"[E, N, K] or [E, K, N], got {w.dtype} on {w.device}, shape {tuple(w.shape)}, "
                         f"strides {w.stride()}")
    e, n, k = w.shape
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x: expected a float32 CPU [rows, {k}] tensor with unit column stride, got {x.dtype} "
                         f"on {x.device}, shape {tuple(x.shape)}, strides {x.stride()}")
    if slot_expert.dtype != torch.int32 or slot_expert.dim() != 1 or not slot_expert.is_contiguous():
        raise ValueError(f"slot_expert: expected a contiguous int32 [S] tensor, got {slot_expert.dtype} "
                         f"shape {tuple(slot_expert.shape)}")
    s = slot_expert.shape[0]
    if slot_row is None:
        if x.shape[0] < s:
            raise ValueError(f"x: expected at least S={s} rows when slot_row is None, got {x.shape[0]}")
    elif (slot_row.dtype != torch.int32 or tuple(slot_row.shape) != (s,) or not slot_row.is_contiguous()):
        raise ValueError(f"slot_row: expected a contiguous int32 [{s}] tensor, got {slot_row.dtype} "
                         f"shape {tuple(slot_row.shape)}")
    if b is not None and (b.dtype != torch.float32 or tuple(b.shape) != (e, n) or not b.is_contiguous()):
        raise ValueError(f"b: expected a contiguous float32 [{e}, {n}] tensor, got {b.dtype} shape {tuple(b.shape)}")
    if out.dtype != torch.float32 or tuple(out.shape) != (s, n) or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous float32 [{s}, {n}] tensor, got {out.dtype} "
                         f"shape {tuple(out.shape)}")
    return layout


def expert_linear_into(out: torch.Tensor, x: torch.Tensor, slot_row: torch.Tensor | None,
                       slot_expert: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                       threads: int | None = None) -> torch.Tensor:
    """Write ``x[slot_row[s]] @ w[slot_expert[s]]^T + b[slot_expert[s]]`` into ``out[s]``
    for every slot (a zero row where ``slot_expert[s]`` is outside ``[0, E)``).

    ``out`` [S, N] float32 contiguous; ``x`` [rows, K] float32, unit column stride;
    ``slot_row`` [S] int32 (rows of ``x``; None: slot ``s`` reads row ``s``);
    ``slot_expert`` [S] int32; ``w`` [E, N, K] float32 or bfloat16 (see
    :func:`kernel_layout`); ``b`` [E, N] float32 or None; ``threads``: at most this many
    (default ``torch.get_num_threads()``), used from :data:`THREAD_MIN_BYTES` of weights
    on. Row indices are not range-checked here (the :class:`~moe_kernels.routing.Routing`
    checks them). Returns ``out``."""
    if not available():
        raise RuntimeError(f"moe_kernels CPU kernel unavailable: {unavailable_reason()}")
    return _launch(out, x, slot_row, slot_expert, w, b, _check(out, x, slot_row, slot_expert, w, b), threads)


def _launch(out, x, slot_row, slot_expert, w, b, layout: str, threads: int | None) -> torch.Tensor:
    """The call itself, on arguments already checked (``layout``: :func:`kernel_layout` of ``w``)."""
    s, (e, n, k) = slot_expert.shape[0], w.shape
    if threads is None:
        threads = torch.get_num_threads()
    if min(s, e) * n * k * w.element_size() < THREAD_MIN_BYTES:
        threads = 1
    rc = _load()[0].moe_expert_linear(
        x.data_ptr(), x.stride(0), None if slot_row is None else slot_row.data_ptr(), slot_expert.data_ptr(), s,
        w.data_ptr(), int(w.dtype == torch.bfloat16), e, k, n, int(layout == "kn"),
        None if b is None else b.data_ptr(), out.data_ptr(), max(1, int(threads)))
    if rc != 0:
        raise MemoryError(f"moe_kernels CPU kernel: could not allocate its scratch for S={s}, E={e}")
    return out


def expert_linear(x: torch.Tensor, slot_row: torch.Tensor | None, slot_expert: torch.Tensor, w: torch.Tensor,
                  b: torch.Tensor | None = None, threads: int | None = None, *,
                  layout: str | None = None) -> torch.Tensor:
    """:func:`expert_linear_into` into a new ``[S, N]`` float32 tensor. ``layout`` (the
    :func:`kernel_layout` of ``w``) is for callers that have validated every argument
    already, as the torch backend has (its weights, the routing, buffers it made): the
    per-call checks are then skipped, a few microseconds of Python per call at decode.
    Under ``torch.compile`` it runs as the opaque custom op ``moe_kernels::cpu_expert_linear``
    (eager calls skip the op's dispatch, which at decode would cost as much as a layer's
    glue)."""
    if _compiling():
        return _expert_linear_op(x, slot_row, slot_expert, w, b)
    out = torch.empty(slot_expert.shape[0], w.shape[1], dtype=torch.float32)
    if layout is None:
        return expert_linear_into(out, x, slot_row, slot_expert, w, b, threads)
    return _launch(out, x, slot_row, slot_expert, w, b, layout, threads)


@torch.library.custom_op("moe_kernels::cpu_expert_linear", mutates_args=())
def _expert_linear_op(x: torch.Tensor, slot_row: torch.Tensor | None, slot_expert: torch.Tensor, w: torch.Tensor,
                      b: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty(slot_expert.shape[0], w.shape[1], dtype=torch.float32)
    return expert_linear_into(out, x, slot_row, slot_expert, w, b)


@_expert_linear_op.register_fake
def _(x, slot_row, slot_expert, w, b):
    return x.new_empty(slot_expert.shape[0], w.shape[1], dtype=torch.float32)


def expert_linear_reference(x: torch.Tensor, slot_row: torch.Tensor | None, slot_expert: torch.Tensor,
                            w: torch.Tensor, b: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`expert_linear` (``threads`` is ignored): a gather of
    each slot's expert weight (widened to float32) and a batched matmul, differentiable."""
    e = w.shape[0]
    w = w.float()
    rows = x if slot_row is None else x.index_select(0, slot_row.long())
    rows = rows[: slot_expert.shape[0]]
    valid = (slot_expert >= 0) & (slot_expert < e)
    ids = torch.where(valid, slot_expert, 0).long()
    out = torch.bmm(rows.unsqueeze(1), w.index_select(0, ids).transpose(1, 2)).squeeze(1)
    if b is not None:
        out = out + b.index_select(0, ids)
    return torch.where(valid.unsqueeze(1), out, 0.0)
