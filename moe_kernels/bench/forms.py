"""``python -m moe_kernels.bench.forms``: the CPU matmul forms of one expert segment, timed.

What :mod:`moe_kernels.segment_matmul`'s thresholds rest on, rerunnable on any CPU: for
each expert matrix of the benchmark's shapes (w13 and w2 at ``--size small``, stored
row-major and, as GPT-OSS does, transposed) and each row count ``m``, the median time of
``out[:m] = a[:m] @ w[e]^T`` by every form, each call on the next of enough weight copies
that it reads its weight cold, the forms interleaved. The ``kernel`` column is the
compiled CPU kernel (:mod:`moe_kernels.cpu_kernel`) on the same rows, which the torch
backend's ``"kernel"`` path runs in float32 inference instead of any form (``-`` when it
was not built). The last column is the library form
:func:`~moe_kernels.segment_matmul.segment_form` picks, where the kernel does not run;
a star marks it when it is not within 10% of the fastest library form.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .. import cpu_kernel
from ..segment_matmul import SEGMENT_FORMS, dnn_available, segment_form, segment_linear
from .roofline import parse_shapes, scaled_shape
from .timing import cache_bytes

__all__ = ["time_forms", "main"]


def time_forms(n: int, k: int, m: int, *, transposed: bool = False, reps: int = 60,
               cache: int | None = None) -> dict[str, float]:
    """Median seconds of each available form (and ``"kernel"``, when built) for ``m`` rows
    times an ``[n, k]`` float32 weight, cold (the weight copies together exceed 3x
    ``cache`` bytes)."""
    cache = cache or cache_bytes(torch.device("cpu"))
    copies = max(2, min(256, 3 * cache // (n * k * 4) + 1))
    store = torch.randn(copies, k, n) if transposed else torch.randn(copies, n, k)
    w = store.transpose(-2, -1) if transposed else store
    a = torch.randn(m, k)
    out = torch.empty(m, n)
    scratch = torch.empty(n, m)
    forms = [f for f in SEGMENT_FORMS if not (f == "dnn" and not dnn_available())
             and not (f == "fm" and transposed)] + (["kernel"] if cpu_kernel.available() else [])
    one_expert = torch.zeros(m, dtype=torch.int32)
    times: dict[str, list[float]] = {f: [] for f in forms}
    e = 0
    for r in range(reps):
        for f in forms[r % len(forms):] + forms[:r % len(forms)]:
            e = (e + 1) % copies
            t0 = time.perf_counter()
            if f == "kernel":
                cpu_kernel.expert_linear_into(out, a, None, one_expert, w[e:e + 1])
            else:
                segment_linear(out, a, w[e], None, 0, m, f, scratch)
            times[f].append(time.perf_counter() - t0)
    return {f: statistics.median(v) for f, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_kernels.bench.forms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="all", help="'all' or a comma list of bench shapes")
    parser.add_argument("--size", default="small", help="full, small or tiny (as moe-kernels bench)")
    parser.add_argument("--rows", default="1,2,4,8,16,64", help="comma list of row counts m")
    parser.add_argument("--reps", type=int, default=60, help="timed calls per form and cell")
    args = parser.parse_args(argv)
    rows = [int(v) for v in args.rows.split(",") if v.strip()]
    print(f"CPU matmul forms, float32, {torch.get_num_threads()} threads, median us per call, weights cold "
          f"(oneDNN {'available' if dnn_available() else 'unavailable'})")
    columns = [*SEGMENT_FORMS, "kernel"]
    print("| matrix | N x K | storage | m | " + " | ".join(columns) + " | picked |")
    print("|---|---|---|---|" + "---|" * (len(columns) + 1))
    for shape in (scaled_shape(s, args.size) for s in parse_shapes(args.shapes)):
        n13 = (2 if shape.gated else 1) * shape.intermediate
        for name, (n, k) in (("w13", (n13, shape.hidden)), ("w2", (shape.hidden, shape.intermediate))):
            for transposed in ((False, True) if shape.transposed else (False,)):
                for m in rows:
                    t = time_forms(n, k, m, transposed=transposed, reps=args.reps)
                    probe = torch.empty(k, n).t() if transposed else torch.empty(n, k)
                    pick = segment_form(m, probe)
                    slow = t.get(pick, 0.0) > 1.1 * min(v for f, v in t.items() if f != "kernel")
                    cells = [f"{t[f] * 1e6:.0f}" if f in t else "-" for f in columns]
                    print(f"| {shape.name} {name} | {n} x {k} | {'transposed' if transposed else 'row-major'} | {m} | "
                          + " | ".join(cells) + f" | {pick}{' *' if slow else ''} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
