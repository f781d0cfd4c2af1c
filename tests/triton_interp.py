"""Shared helpers for the Triton kernel tests (interpreter on CPU, or a CUDA GPU).

* ``DEVICE``: ``"cuda"`` when a GPU is present, else ``"cpu"`` (the kernels then run in
  Triton's interpreter: ``TRITON_INTERPRET=1``, set here too in case this module is
  imported before ``tests/conftest.py`` set it).
* ``requires_triton``: skip marker when Triton is not importable; ``import_or_skip()``
  for module level.
* ``poison_empty(monkeypatch, module)``: make a kernel module's ``_empty`` allocation
  hook return buffers pre-filled with poison (NaN / -777), so a test can check that the
  kernel wrote every element of what it returns.
* ``bf16_interpreter()`` / the ``bf16_interp`` fixture: a test-only shim that teaches the
  interpreter bfloat16 (it stores bf16 as raw uint16 bits and would do integer math on
  them, and it truncates float32 -> bf16 casts). Inside the shim every bf16 operand is widened to float32, the op runs in float32
  and a floating result is rounded to bf16 (round to nearest even), which is what the
  GPU does per op; casts to bf16 round to nearest even; ``tl.dot`` widens its bf16 inputs and accumulates in float32. Loads,
  stores, bitcasts and selects are bit moves and stay untouched. On a GPU it does nothing.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from moe_kernels.testing import POISON, assert_written, poison

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def import_or_skip():
    """``pytest.importorskip('triton')`` for the top of a test module."""
    return pytest.importorskip("triton", reason="triton is not installed")


def interpreting() -> bool:
    """The package's own reading of ``TRITON_INTERPRET`` (one parser everywhere)."""
    from moe_kernels.backends.triton import interpreting as pkg_interpreting

    return pkg_interpreting()


POISON_INT = POISON[torch.int32]


def poison_empty(monkeypatch, module) -> None:
    """Replace ``module._empty`` by an allocator whose buffers hold poison
    (:func:`moe_kernels.testing.poison`: NaN, or -777 for integers)."""
    real = torch.empty

    def empty(*shape, dtype=None, device=None, **kw):
        return poison(real(*shape, dtype=dtype, device=device, **kw))

    monkeypatch.setattr(module, "_empty", empty)


def assert_no_poison(t: torch.Tensor, name: str) -> None:
    """:func:`moe_kernels.testing.assert_written`: no poison value survives in ``t``."""
    assert_written(t, name)


# --------------------------------------------------------------------------- bf16 shim


def _widen(data):
    import numpy as np

    return (data.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _narrow(x):
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


@contextlib.contextmanager
def bf16_interpreter():
    """Patch Triton's interpreter so bf16 arithmetic, reductions and ``tl.dot`` are
    computed in float32 and rounded to bf16 (see the module docstring)."""
    if not interpreting():
        yield
        return
    import warnings

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ip

    from moe_kernels.backends.triton import InterpreterBf16Warning

    TH, bf16, f32 = ip.TensorHandle, tl.bfloat16, tl.float32

    def is_bf16(h):
        return isinstance(h, TH) and h.dtype.scalar == bf16 and h.data.dtype == np.uint16

    def wide(h):
        return TH(_widen(h.data), f32) if is_bf16(h) else h

    def elementwise(orig):
        def run(self, *args, **kw):
            if not any(is_bf16(a) for a in args):
                return orig(self, *args, **kw)
            out = orig(self, *(wide(a) for a in args), **kw)
            if out.data.dtype == np.float32:
                return TH(_narrow(out.data), bf16)
            return out  # comparisons: bool
        return run

    def dot(orig):
        def run(self, a, b, d, *rest):
            if not (is_bf16(a) or is_bf16(b) or is_bf16(d)):
                return orig(self, a, b, d, *rest)
            out = orig(self, wide(a), wide(b), wide(d), *rest)
            return TH(_narrow(out.data), bf16) if is_bf16(d) else out
        return run

    def cast(orig):
        # The interpreter truncates float32 -> bf16; the GPU rounds to nearest even.
        def run(self, src, dst_type):
            s, d = src.dtype.scalar, dst_type.scalar
            if is_bf16(src) and d not in (f32, bf16):
                return orig(self, wide(src), dst_type)
            if d == bf16 and s == f32:
                return TH(_narrow(src.data), bf16)
            if d == bf16 and s != bf16:
                return run(self, orig(self, src, f32), dst_type)
            return orig(self, src, dst_type)
        return run

    def fp_to_fp(orig):
        def run(self, src, dst_type, rounding_mode):
            if dst_type.scalar == bf16 and src.dtype.scalar == f32 and rounding_mode != ip._ir.ROUNDING_MODE.RTZ:
                return TH(_narrow(src.data), bf16)
            return orig(self, src, dst_type, rounding_mode)
        return run

    def retype(t, handle, ty):
        new_ty = t.type.with_element_ty(ty) if isinstance(t.type, tl.block_type) else ty
        return tl.core.tensor(handle, new_ty)

    def reduce_scan(orig):
        def run(self, input, *args, **kw):
            if not (input.dtype.scalar == bf16 and input.handle.data.dtype == np.uint16):
                return orig(self, input, *args, **kw)
            out = orig(self, retype(input, TH(_widen(input.handle.data), f32), f32), *args, **kw)
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            outs = [retype(o, TH(_narrow(o.handle.data), bf16), bf16) if o.dtype.scalar == f32 else o for o in outs]
            return type(out)(outs) if isinstance(out, (list, tuple)) else outs[0]
        return run

    B = ip.InterpreterBuilder
    patches = [(B, n, elementwise(getattr(B, n))) for n in
               ("binary_op", "unary_op", "ternary_op", "create_fma", "create_erf", "create_rsqrt")]
    patches += [(B, "create_dot", dot(B.create_dot)), (B, "cast_impl", cast(B.cast_impl)),
                (B, "create_fp_to_fp", fp_to_fp(B.create_fp_to_fp)),
                (ip.ReduceOps, "sum", reduce_scan(ip.ReduceOps.sum)),
                (ip.ReduceOps, "min_max", reduce_scan(ip.ReduceOps.min_max)),
                (ip.ScanOps, "cumsum", reduce_scan(ip.ScanOps.cumsum))]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    for cls, name, fn in patches:
        setattr(cls, name, fn)
    try:
        with warnings.catch_warnings():  # the package's warning is about exactly what this shim fixes
            warnings.simplefilter("ignore", InterpreterBf16Warning)
            yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


@pytest.fixture
def bf16_interp():
    """Run the test with the interpreter's bf16 shim (a no-op on a GPU)."""
    with bf16_interpreter():
        yield
