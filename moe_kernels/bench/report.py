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

__all__ = ["COLUMNS", "run_metadata", "CsvWriter", "read_csv", "format_table", "write_plot", "Progress",
           "format_seconds"]

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


def _cell_text(row: dict) -> str:
    status = row.get("status", "")
    if status != "ok":
        return "skip" if status == "skipped" else "ERROR"
    t = format_seconds(_num(row.get("median_ms")) / 1e3)
    frac = _num(row.get("frac_roofline"))
    return t if math.isnan(frac) else f"{t} {frac * 100:.0f}%"


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """One block per (mode, routing, dtype, shape): a row per T with the time floor and,
    per provider, ``median time  fraction-of-roofline``. Works on CSV rows (strings)
    and on the runner's rows (numbers) alike."""
    blocks: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["mode"], r["routing"], r["dtype"], r["shape"], r["E"], r["k"], r["H"], r["I"])
        blocks.setdefault(key, []).append(r)
    out = []
    for (mode, routing, dtype, shape, e, k, h, i), rs in blocks.items():
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        tokens = sorted({int(r["T"]) for r in rs})
        title = f"{shape} (E={e} k={k} H={h} I={i}) {mode} {dtype} {routing} routing"
        header = ["T", "floor", "bound", *providers]
        body = []
        for t in tokens:
            at_t = [r for r in rs if int(r["T"]) == t]
            floor = next((_num(r["floor_ms"]) for r in at_t if not math.isnan(_num(r.get("floor_ms")))), float("nan"))
            bound = next((r["bound"] for r in at_t if r.get("bound")), "")
            by_p = {r["provider"]: r for r in at_t}
            body.append([str(t), format_seconds(floor / 1e3), str(bound),
                         *(_cell_text(by_p[p]) if p in by_p else "" for p in providers)])
        out.append(_render(title, header, body, markdown))
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
    return "\n\n".join(out)


def _render(title: str, header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(header[c]), *(len(row[c]) for row in body)) if body else len(header[c]) for c in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([title, fmt.format(*header), *(fmt.format(*row) for row in body)])


def write_plot(rows: Sequence[dict], path: str) -> str | None:
    """Fraction of the roofline against T, one panel per shape, a line per provider
    (dashed: forward+backward). Returns the path, or ``None`` (with a message on
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
    meta = good[0]
    fig.suptitle(f"MoE layer vs roofline on {meta.get('device_name', '')} ({meta.get('dtype', '')}, "
                 f"{meta.get('routing', '')} routing; dashed = fwd+bwd)", fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
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
