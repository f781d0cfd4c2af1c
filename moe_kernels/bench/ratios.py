"""Our time over the fastest peer's, per cell, across several ``moe-kernels bench`` runs.

One CPU run on a shared machine moves by 10-20% per cell; the claim "ours is at least as
fast as every peer" is checked over several runs, each compared side by side within
itself (the ratio is taken inside a run, never across runs)::

    for i in 1 2 3 4 5; do OMP_NUM_THREADS=1 moe-kernels bench --out runs/t1_$i; done
    python -m moe_kernels.bench.ratios runs/t1_*

prints, per (shape, T, mode, threads), the median ratio over the runs with its min and
max, and how many runs had ours ahead (ratio < 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence

from .report import read_csv

__all__ = ["PEERS", "run_ratios", "ratio_table", "main"]

PEERS = ("reference", "hf_eager", "hf_grouped_mm")


def run_ratios(rows: Sequence[dict], ours: str = "torch", peers: Sequence[str] = PEERS) -> dict[tuple, float]:
    """``{(shape, T, mode, device_name): ours / fastest peer}`` of one run's rows (the
    cells where ours and at least one peer were timed)."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("provider") not in (ours, *peers):
            continue
        key = (r["shape"], int(r["T"]), r["mode"], r.get("device_name", ""))
        times.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
    out = {}
    for key, t in times.items():
        best = min((t[p] for p in peers if p in t), default=None)
        if ours in t and best:
            out[key] = t[ours] / best
    return out


def ratio_table(runs: Sequence[Sequence[dict]], ours: str = "torch", peers: Sequence[str] = PEERS) -> str:
    """A markdown table of :func:`run_ratios` over ``runs``: median (min-max) and the
    count of runs below 1, in the order the cells first appear."""
    per_run = [run_ratios(rows, ours, peers) for rows in runs]
    keys: list[tuple] = []
    for rr in per_run:
        keys += [k for k in rr if k not in keys]
    lines = [f"| shape | T | mode | device | {ours} / fastest of {', '.join(peers)}: median (min-max) | "
             f"runs with {ours} ahead |", "|---|---|---|---|---|---|"]
    for key in keys:
        vals = [rr[key] for rr in per_run if key in rr]
        shape, t, mode, dev = key
        lines.append(f"| {shape} | {t} | {mode} | {dev} | {statistics.median(vals):.2f} ({min(vals):.2f}-"
                     f"{max(vals):.2f}) | {sum(v < 1 for v in vals)} of {len(vals)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_kernels.bench.ratios", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="bench output folders (or their results.csv files)")
    parser.add_argument("--ours", default="torch", help="the provider to compare (default: torch)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma list of peer providers")
    args = parser.parse_args(argv)
    paths = [os.path.join(p, "results.csv") if os.path.isdir(p) else p for p in args.runs]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"ratios: no such results file: {missing}", file=sys.stderr)
        return 2
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    print(ratio_table([read_csv(p) for p in paths], args.ours, peers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
