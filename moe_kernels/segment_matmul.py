"""One expert segment's matmul on the CPU, by the fastest library form for its size.

``out[lo:hi] = a[lo:hi] @ w[e]^T`` (plus ``b[e]``) is the whole cost of the torch
backend on the CPU, and the same product runs up to twice as fast or slow depending on
how it is handed to the libraries. Three forms, each writing ``out[lo:hi]`` (token-major):

* ``"mm"``: ``torch.mm(a_seg, w_e^T)``, what every peer runs (MKL).
* ``"fm"``: feature-major, ``torch.mm(w_e, a_seg^T)`` into an ``[N, m]`` scratch, then
  one transposing copy of its ``m * N`` values. MKL streams the weight through its
  small-``m`` kernel in this orientation: 1.4-2.2x faster than ``"mm"`` for 2-4 rows
  (to about 8 on mid-sized weights); under 32K weight elements the copy and the call
  cost more than it saves. Weights stored transposed (``[E, K, N]``, GPT-OSS) make it
  slower instead, so they never take it.
* ``"dnn"``: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op inductor
  uses for frozen linears; here on the plain weight, nothing prepacked or cached). Its
  ~15-20 µs fixed cost loses on small weights, but from about 64K weight elements and
  ``m >= 5`` it runs 1.2-1.8x faster than MKL (from 32K at 32+ rows), and with two
  threads it parallelises a single row that MKL runs on one core.

:func:`segment_form` picks from the segment's row count, the weight's size and layout,
and the dtype (float32 only: bf16 ``mm`` already runs oneDNN). The thresholds come from
cold-cache timings on the default bench shapes, one and two threads
(``python -m moe_kernels.bench.forms`` reruns them; docs/PERFORMANCE.md). A torch built without oneDNN, or whose op
has changed, drops ``"dnn"`` for ``"mm"`` (probed once).

Determinism: each form is a fixed library call for a given ``m``, so one input gives
bitwise one output at a fixed thread count. The forms round differently from each
other, so a token's result may change in the last bits with how many other tokens
share its expert (as with any batched matmul library).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["SEGMENT_FORMS", "segment_form", "segment_linear", "dnn_available"]

SEGMENT_FORMS = ("mm", "fm", "dnn")
# Weight elements (N * K) from which each form pays for its fixed cost: the feature-major
# copy from 32K; oneDNN from 64K at 5+ rows, from 128K for a single row (a
# matrix-vector product is memory-bound in both libraries), from 32K at 32+ rows.
FM_MIN_ELEMENTS = 1 << 15
DNN_MIN_ELEMENTS = 1 << 16
DNN_MIN_ELEMENTS_ONE_ROW = 1 << 17
DNN_MIN_ELEMENTS_MANY_ROWS = 1 << 15
DNN_MANY_ROWS = 32
# Row counts the feature-major form takes: 2..FM_MAX_ROWS always (from FM_MIN_ELEMENTS),
# up to FM_MAX_ROWS_MID where oneDNN does not pay off.
FM_MAX_ROWS = 4
FM_MAX_ROWS_MID = 8
# Tests pin a form here to cover each one on every shape.
_forced_form: str | None = None


@functools.lru_cache(maxsize=None)
def dnn_available() -> bool:
    """Whether oneDNN's linear runs here (probed once, on a 2x3 product)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)
        return bool(torch.equal(op(x, w, b, "none", [], ""), torch.full((2, 4), 4.0)))
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


def segment_form(m: int, w_e: torch.Tensor) -> str:
    """The form for ``m`` rows times one expert's weight ``w_e`` [N, K] (a view of
    ``w[e]``; row-major, or transposed storage with ``stride(-2) == 1``)."""
    if _forced_form is not None:
        forced = _forced_form
        if forced == "dnn" and not (w_e.dtype is torch.float32 and dnn_available()):
            return "mm"
        if forced == "fm" and w_e.stride(-1) != 1:
            return "mm"
        return forced
    if w_e.dtype is not torch.float32:
        return "mm"
    size = w_e.shape[0] * w_e.shape[1]
    dnn = dnn_available()
    dnn_pays = dnn and (size >= DNN_MIN_ELEMENTS or (m >= DNN_MANY_ROWS and size >= DNN_MIN_ELEMENTS_MANY_ROWS))
    if w_e.stride(-1) != 1:  # stored transposed: MKL's row-major-B kernel is fine for few rows
        return "dnn" if dnn_pays and m >= 4 else "mm"
    if m == 1:
        return "dnn" if dnn and size >= DNN_MIN_ELEMENTS_ONE_ROW else "mm"
    if m <= FM_MAX_ROWS and size >= FM_MIN_ELEMENTS:
        return "fm"
    if dnn_pays and m > FM_MAX_ROWS:
        return "dnn"
    return "fm" if FM_MIN_ELEMENTS <= size and m <= FM_MAX_ROWS_MID else "mm"


def segment_linear(out: torch.Tensor, a: torch.Tensor, w_e: torch.Tensor, b_e: torch.Tensor | None,
                   lo: int, hi: int, form: str, scratch: torch.Tensor | None = None) -> None:
    """``out[lo:hi] = a[lo:hi] @ w_e^T (+ b_e)`` by ``form``. ``a`` [S, K] row-major,
    ``out`` [S, N] row-major; ``scratch`` (``"fm"`` only) [N, >= hi - lo], reused between
    segments so the form allocates nothing."""
    x = a[lo:hi]
    dst = out[lo:hi]
    if form == "dnn":
        dst.copy_(torch.ops.mkldnn._linear_pointwise(x, w_e, b_e, "none", [], ""))
        return
    if form == "fm":
        tmp = (scratch if scratch is not None else a.new_empty(w_e.shape[0], hi - lo))[:, :hi - lo]
        torch.mm(w_e, x.t(), out=tmp)
        dst.copy_(tmp.t())
    else:
        torch.mm(x, w_e.t(), out=dst)
    if b_e is not None:  # after the product: addmm's beta=1 path measured slower than mm + add
        dst.add_(b_e)
