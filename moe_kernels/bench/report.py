"""Benchmark output: run metadata, CSV rows, terminal/markdown tables, the PNG plot and
a progress bar. matplotlib and tqdm are optional (the ``bench`` extra): without them the
plot is skipped with a message and the progress bar is a plain stderr counter.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence

import torch

__all__ = ["COLUMNS", "run_metadata", "CsvWriter", "read_csv", "format_table", "write_plot", "write_load_plot",
           "Progress", "format_seconds", "speedups", "fastest_summary", "LEGEND", "load_summary", "plot_title"]

COLUMNS = [
    "date", "commit", "device", "device_name", "torch", "triton", "transformers", "moe_kernels",
    "shape", "size", "E", "k", "H", "I", "T", "mode", "routing", "dtype", "provider", "status", "note",
    "median_ms", "min_ms", "samples", "flops", "min_bytes", "active_experts", "tflops", "gbps",
    "peak_tflops", "peak_gbps", "floor_ms", "bound", "frac_roofline",
]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--"], capture_output=True,
                               timeout=10).returncode
        return sha + ("-dirty" if dirty == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(device: torch.device) -> dict[str, str]:
    """What every CSV row is tagged with: date, commit, device and versions."""
    from .. import __version__

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "moe_kernels": __version__,
    }


class CsvWriter:
    """Writes the header then one row per cell, flushed at once (a run cut short by a
    timeout keeps every finished cell)."""

    def __init__(self, path: str, metadata: dict[str, str]):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.metadata = metadata
        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS, extrasaction="raise")
        self._w.writeheader()
        self._f.flush()

    def write(self, row: dict) -> None:
        full = {c: "" for c in COLUMNS}
        full.update(self.metadata)
        full.update({k: _fmt(v) for k, v in row.items()})
        self._w.writerow(full)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_seconds(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# The moe_kernels backends (their experts-only providers carry the plain name); every
# other provider without a ':' suffix is a peer computing the same experts step.
_OURS = ("torch", "triton", "cuda")
_OVER_ROOF = {"memory": "m", "compute": "c"}

LEGEND = ["floor = max(FLOPs / peak matmul rate, fewest bytes / copy bandwidth), peaks measured in this run; "
          "bound = the term that sets it",
          "N% = fraction of the roofline, floor / time (higher is better); x ref, x peer = our fastest backend's "
          "speed-up over the reference loop and over the fastest peer in this run (> 1: ours is faster)"]
OVER_NOTE = {"m": "above 100%, memory-bound: the weights stayed in cache between calls, so fewer bytes came "
                  "from memory than the floor assumes",
             "c": "above 100%, compute-bound: the matmul peak measured in this run is low for this size "
                  "(a busy machine, or a kernel faster than the probe's)"}


def _cell_text(row: dict) -> str:
    status = row.get("status", "")
    if status != "ok":
        return "skip" if status == "skipped" else "ERROR"
    t = format_seconds(_num(row.get("median_ms")) / 1e3)
    frac = _num(row.get("frac_roofline"))
    if math.isnan(frac):
        return t
    flag = _OVER_ROOF.get(str(row.get("bound")), "m") if frac > 1.0 else ""
    return f"{t} {frac * 100:.0f}%" + (f"({flag})" if flag else "")


def _is_peer(name: str) -> bool:
    return ":" not in name and name not in _OURS


def _comparable(name: str) -> bool:
    """Providers that time the experts step alone (not routing, not the whole layer)."""
    return ":" not in name


def _best(rows: Iterable[dict], keep) -> tuple[str, float] | None:
    times = [(r["provider"], _num(r.get("median_ms"))) for r in rows
             if r.get("status") == "ok" and keep(r["provider"])]
    times = [(p, v) for p, v in times if not math.isnan(v)]
    return min(times, key=lambda pv: pv[1]) if times else None


def speedups(at_t: Sequence[dict]) -> tuple[str, str]:
    """(``x ref``, ``x peer``) texts for one cell: our fastest backend against the
    reference and against the fastest peer; ``-`` where a side is missing."""
    ours = _best(at_t, lambda p: p in _OURS)
    if ours is None:
        return "-", "-"
    ref = _best(at_t, lambda p: p == "reference")
    peer = _best(at_t, lambda p: _is_peer(p) and p != "reference")
    several = len({r["provider"] for r in at_t if r["provider"] in _OURS}) > 1
    tag = f" {ours[0]}" if several else ""
    return tuple("-" if side is None else f"{side[1] / ours[1]:.2f}x{tag}" for side in (ref, peer))


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """One block per (mode, routing, dtype, shape): a row per T with the time floor,
    per provider ``median time  fraction-of-roofline``, and our speed-up over the
    reference and over the best peer; a legend under each block and, at the end, which
    provider was fastest how often. Works on CSV rows (strings) and on the runner's rows
    (numbers) alike."""
    blocks: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["mode"], r["routing"], r["dtype"], r["shape"], r["E"], r["k"], r["H"], r["I"])
        blocks.setdefault(key, []).append(r)
    out = []
    flags_seen: set[str] = set()
    for (mode, routing, dtype, shape, e, k, h, i), rs in blocks.items():
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        tokens = sorted({int(r["T"]) for r in rs})
        title = f"{shape} (E={e} k={k} H={h} I={i}) {mode} {dtype} {routing} routing"
        compare = any(p in _OURS for p in providers) and any(_is_peer(p) for p in providers)
        header = ["T", "floor", "bound", *providers, *(["x ref", "x peer"] if compare else [])]
        body = []
        for t in tokens:
            at_t = [r for r in rs if int(r["T"]) == t]
            floor = next((_num(r["floor_ms"]) for r in at_t if not math.isnan(_num(r.get("floor_ms")))), float("nan"))
            bound = next((r["bound"] for r in at_t if r.get("bound")), "")
            by_p = {r["provider"]: r for r in at_t}
            cells = [_cell_text(by_p[p]) if p in by_p else "" for p in providers]
            flags_seen.update(f for c in cells for f in _OVER_ROOF.values() if c.endswith(f"({f})"))
            body.append([str(t), format_seconds(floor / 1e3), str(bound), *cells,
                         *(speedups(at_t) if compare else [])])
        legend = LEGEND + [f"({f}) {OVER_NOTE[f]}" for f in sorted(flags_seen)]
        flags_seen.clear()
        out.append(_render(title, header, body, markdown) + "\n" + ("\n" if markdown else "")
                   + "\n".join(("_" + line + "_") if markdown else "  " + line for line in legend))
    # Notes that differ only in their numbers ("estimated 0.3 s", "1.1 s") collapse into one.
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r.get("status") != "ok" and r.get("note"):
            text = f"{r['provider']}: {r['note']}"
            groups.setdefault(re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text), []).append(text)
    notes = sorted(v[0] + (f" (and {len(set(v)) - 1} more like it)" if len(set(v)) > 1 else "")
                   for v in groups.values())
    if notes:
        out.append(("Skipped or failed cells:\n" if not markdown else "Skipped or failed cells:\n\n")
                   + "\n".join(("- " if markdown else "  ") + n for n in notes))
    verdict = fastest_summary(rows)
    if verdict:
        out.append(verdict)
    return "\n\n".join(out)


def fastest_summary(rows: Sequence[dict]) -> str:
    """One sentence: over the cells where two or more providers timed the experts step,
    which provider was fastest how often (``:layer`` and ``:routing`` rows excluded)."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if _comparable(r["provider"]):
            key = (r["mode"], r["routing"], r["dtype"], r["shape"], str(r["T"]))
            cells.setdefault(key, []).append(r)
    wins: dict[str, int] = {}
    n = 0
    for rs in cells.values():
        if sum(r.get("status") == "ok" for r in rs) < 2:
            continue
        best = _best(rs, lambda p: True)
        if best:
            wins[best[0]] = wins.get(best[0], 0) + 1
            n += 1
    if not n:
        return ""
    order = sorted(wins.items(), key=lambda kv: -kv[1])
    parts = [f"{p} in {c} of {n}" for p, c in order]
    lead = order[0][0]
    head = (f"Fastest provider: {lead} in every one of the {n} cells compared" if len(order) == 1 else
            "Fastest provider per cell: " + ", ".join(parts))
    return head + " (experts step only; routing and whole-layer rows not counted)."


def _render(title: str, header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(header[c]), *(len(row[c]) for row in body)) if body else len(header[c]) for c in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([title, fmt.format(*header), *(fmt.format(*row) for row in body)])


def plot_title(good: Sequence[dict]) -> str:
    """The roofline plot's title; it explains the line styles only for what was measured
    (a forward-only run gets no word about dashed forward+backward lines)."""
    meta = good[0]
    modes = {r["mode"] for r in good}
    style = ("; solid = forward, dashed = forward+backward" if modes == {"fwd", "fwdbwd"} else
             "; forward only" if modes == {"fwd"} else "; forward+backward only")
    return (f"MoE layer vs roofline on {meta.get('device_name', '')} ({meta.get('dtype', '')}, "
            f"{meta.get('routing', '')} routing{style})")


def write_plot(rows: Sequence[dict], path: str) -> str | None:
    """Fraction of the roofline against T, one panel per shape, a line per provider
    (dashed: forward+backward, said in the title only when both were measured). Returns the path, or ``None`` (with a message on
    stderr) when matplotlib is missing or nothing has a roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib, or the 'bench' extra)",
              file=sys.stderr)
        return None
    good = [r for r in rows if r.get("status") == "ok" and not math.isnan(_num(r.get("frac_roofline")))]
    if not good:
        print("no cell has a roofline fraction: skipping the plot", file=sys.stderr)
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in good))
    ncol = min(3, len(shapes))
    nrow = math.ceil(len(shapes) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    providers = list(dict.fromkeys(r["provider"] for r in good))
    colors = {p: f"C{j % 10}" for j, p in enumerate(providers)}
    for ax, shape in zip(axes.flat, shapes, strict=False):
        for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
            for p in providers:
                pts = sorted((int(r["T"]), _num(r["frac_roofline"])) for r in good
                             if r["shape"] == shape and r["provider"] == p and r["mode"] == mode)
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], style, marker="o", color=colors[p],
                            label=p if mode == "fwd" or not any(r["mode"] == "fwd" for r in good) else None)
        ax.set_xscale("log", base=2)
        ts = sorted({int(r["T"]) for r in good if r["shape"] == shape})
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.minorticks_off()
        ax.set_title(shape, fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("fraction of roofline")
        ax.set_ylim(bottom=0)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(plot_title(good), fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_summary(loads: dict[str, tuple[int, str, list[int]]]) -> str:
    """A line per shape: how the routing spread the slots over the experts, from the
    dispatch plan's ``expert_counts`` (``loads``: shape -> (T, routing, counts))."""
    lines = []
    for shape, (t, routing, counts) in loads.items():
        e, total = len(counts), sum(counts)
        mean = total / e if e else 0.0
        idle = sum(c == 0 for c in counts)
        lines.append(f"{shape}: {routing} routing at T={t}: {total} slots on {e} experts, busiest "
                     f"{max(counts, default=0)} (x{max(counts, default=0) / mean if mean else 0:.1f} the mean "
                     f"{mean:.1f}), {idle} idle")
    return "Expert load (the plan's expert_counts):\n" + "\n".join("  " + ln for ln in lines) if lines else ""


def write_load_plot(loads: dict[str, tuple[int, str, list[int]]], path: str) -> str | None:
    """Slots per expert (busiest first), one panel per shape, from the dispatch plan's
    ``expert_counts``. Returns the path, or ``None`` without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not loads:
        return None
    ncol = min(3, len(loads))
    nrow = math.ceil(len(loads) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, (shape, (t, routing, counts)) in zip(axes.flat, loads.items(), strict=False):
        ordered = sorted(counts, reverse=True)
        ax.bar(range(len(ordered)), ordered, width=1.0, color="C0")
        mean = sum(counts) / max(len(counts), 1)
        ax.axhline(mean, color="C3", lw=1, label=f"mean {mean:.1f}")
        ax.set_title(f"{shape}, T={t}, {routing}", fontsize=10)
        ax.set_xlabel("experts, busiest first")
        ax.set_ylabel("slots")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(loads):]:
        ax.axis("off")
    fig.suptitle("Expert load: slots per expert from the dispatch plan's expert_counts", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Progress:
    """tqdm on stderr when installed (and ``bar``), else ``[i/n] label`` lines."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.i, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, label: str) -> None:
        self.i += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.i}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def rows_where(rows: Iterable[dict], **kv) -> list[dict]:
    return [r for r in rows if all(str(r.get(k)) == str(v) for k, v in kv.items())]
