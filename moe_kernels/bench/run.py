"""``moe-kernels bench``: the MoE layer at real model shapes against the roofline and
the peers.

Grid: shapes × T × mode (``fwd``, ``fwdbwd``) × providers (each moe_kernels backend on
a precomputed routing, the same with routing + plan (``:layer``), routing + plan alone
(``:routing``), the reference loop, HF transformers' ``eager`` and ``grouped_mm``
experts, a plain ``torch._grouped_mm`` pipeline). Every cell reports the median time,
TFLOP/s, GB/s and the fraction of the roofline with peaks measured in the same run
(:mod:`moe_kernels.bench.roofline`, docs/PERFORMANCE.md). Output: a table on the
terminal, ``results.csv`` (one row per cell, tagged with device, versions, commit and
date), ``results.md`` and ``roofline.png`` in ``--out``.

On the CPU the default is ``--size small`` (H and I divided by 16, T in 1, 16, 128):
about a minute on two cores. Interfaces for the CLI: :func:`add_bench_arguments`,
:func:`run_bench`, :func:`add_gpu_check_arguments`, :func:`run_gpu_check`;
``python -m moe_kernels.bench.run`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from .roofline import (
    SIZES,
    Roofline,
    expert_weight_bytes,
    layer_flops,
    layer_min_bytes,
    parse_shapes,
    scaled_shape,
)
from .timing import Timing, available_memory_bytes, cache_bytes, measure_peaks, memory_budget_bytes, time_calls

__all__ = ["add_bench_arguments", "run_bench", "add_gpu_check_arguments", "run_gpu_check", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` flags; every default depends on the device and is resolved in
    :func:`run_bench`."""
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu", help="cpu or cuda[:N] (default: cuda if present)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="activation and weight dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="full model shapes, or H and I divided by 16 (small) or 64 (tiny) "
                             "(default: full on a GPU, small on the CPU)")
    parser.add_argument("--shapes", default="all", help="'all' or a comma list: mixtral-8x7b, deepseek-v3, "
                                                        "qwen3-30b-a3b, olmoe, gpt-oss-20b (prefixes work)")
    parser.add_argument("--tokens", default=None, help="comma list of T (default: 1,16,128,1024,8192 full; "
                                                       "1,16,128 small; 1,16 tiny)")
    parser.add_argument("--mode", default="fwd", help="fwd, fwdbwd or both as 'fwd,fwdbwd'")
    parser.add_argument("--routing", choices=["uniform", "skewed"], default="uniform",
                        help="uniform random top-k, or Zipf-skewed over experts")
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of --routing skewed (p_e ~ (e+1)^-s)")
    parser.add_argument("--providers", default="default",
                        help="'default', 'all' or a comma list, e.g. torch,torch:layer,torch:routing,reference,"
                             "hf_eager,hf_grouped_mm,grouped_mm,triton,cuda")
    parser.add_argument("--out", default="bench_out", help="output folder for results.csv/.md and roofline.png")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per cell (default: 20 GPU, 16 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 GPU, 2 CPU)")
    parser.add_argument("--cell-budget", type=float, default=None,
                        help="seconds of sampling per cell, and cells estimated at over a quarter of it per "
                             "call are skipped (default: 3 GPU, 1 CPU)")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="stop starting cells after this many seconds; the rest are marked skipped (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="do not write roofline.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--explain", action="store_true",
                        help="also print and write (launch_shapes.md) the launch-shape model of the triton GEMMs "
                             "for these shapes and T: CTAs vs SMs, waves, tiles, bytes and FLOPs per CTA")
    parser.add_argument("--explain-only", action="store_true", help="--explain without timing anything")
    parser.add_argument("--explain-gpu", default=None,
                        help="GPU of the model: h200, h100, a100, b200 (default: this GPU, else h200)")


def _int_list(name: str, spec: str) -> list[int]:
    try:
        vals = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected a comma list of positive integers, got {spec!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{name}: expected a comma list of positive integers, got {spec!r}")
    return vals


def _resolve(args: argparse.Namespace) -> dict:
    from .providers import parse_providers

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch sees no CUDA GPU")
    gpu = device.type == "cuda"
    size = args.size or ("full" if gpu else "small")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or any(m not in ("fwd", "fwdbwd") for m in modes):
        raise ValueError(f"mode: expected 'fwd', 'fwdbwd' or 'fwd,fwdbwd', got {args.mode!r}")
    repeats = args.repeats if args.repeats is not None else (20 if gpu else 16)
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    return {
        "device": device,
        "dtype": _DTYPES[args.dtype or ("bfloat16" if gpu else "float32")],
        "size": size,
        "shapes": [scaled_shape(s, size) for s in parse_shapes(args.shapes)],
        "tokens": _int_list("tokens", args.tokens) if args.tokens else list(SIZES[size][1]),
        "modes": modes,
        "providers": parse_providers(args.providers, device),
        "repeats": repeats,
        "warmup": args.warmup if args.warmup is not None else (3 if gpu else 2),
        "cell_budget": args.cell_budget if args.cell_budget is not None else (3.0 if gpu else 1.0),
    }


def _cell_setup(prov, shape, t, mode, weights, inputs, roof: Roofline, cfg: dict, base: dict):
    """One cell's row before timing, and its calls (``None`` when the row is already
    final: skipped, or an error while building the calls)."""
    from .providers import build_calls

    device, dtype = cfg["device"], cfg["dtype"]
    row = dict(base, provider=prov.name)
    reason = prov.unavailable(device, dtype, shape, mode)
    if reason:
        return dict(row, status="skipped", note=reason), None
    dbytes = torch.empty((), dtype=dtype).element_size()
    active = sum(i.active_experts for i in inputs) / len(inputs)
    valid = sum(int((i.routing.slot_expert < shape.num_experts).sum()) for i in inputs) / len(inputs)
    flops = layer_flops(valid, shape.hidden, shape.intermediate, gated=shape.gated, mode=mode)
    nbytes = layer_min_bytes(shape, t, active, dbytes, mode, quant=prov.quant)
    floor, bound = roof.floor(flops, nbytes)
    row.update(active_experts=round(active, 2))
    if prov.roofline:
        row.update(flops=flops, min_bytes=nbytes, floor_ms=floor * 1e3, bound=bound)
    # A loop over experts costs a host sync per expert on a GPU and is far off the floor.
    est = floor * (3.0 if prov.loop_per_expert else 1.0)
    if prov.loop_per_expert:
        est += shape.num_experts * (100e-6 if device.type == "cuda" else 20e-6) * (3 if mode == "fwdbwd" else 1)
    if est > cfg["cell_budget"] / 4:
        return dict(row, status="skipped", note=f"estimated {est:.2g} s per call, over a quarter of "
                                                f"--cell-budget {cfg['cell_budget']:g} s"), None
    try:
        return row, build_calls(prov, shape, weights, inputs, mode)
    except Exception as exc:  # a failing provider must not stop the grid; the row says why
        return _error_row(row, exc, device), None


def _error_row(row: dict, exc: Exception, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return dict(row, status="error", note=msg[:300])


def _timed_row(row: dict, timing: Timing, roof: Roofline) -> dict:
    row = dict(row, status="ok", median_ms=timing.median * 1e3, min_ms=timing.minimum * 1e3, samples=timing.samples)
    if "flops" in row:
        flops, nbytes = row["flops"], row["min_bytes"]
        row.update(tflops=flops / timing.median / 1e12, gbps=nbytes / timing.median / 1e9,
                   frac_roofline=roof.fraction(flops, nbytes, timing.median))
    return row


def balanced_order(n: int, r: int) -> list[int]:
    """Round ``r``'s order of ``n`` providers: row ``r`` of a balanced Latin square
    (Williams design; ``2n`` rows for odd ``n``): over a full cycle every provider runs in
    every position and right after every other provider equally often. What a call
    leaves in the caches (or evicts) changes the next call's time, so a fixed or merely
    rotated order would favour whoever follows the lightest provider."""
    if n <= 1:
        return list(range(n))
    first = [0]
    lo, hi = 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = n if n % 2 == 0 else 2 * n
    k = r % rows
    row = [(v + k) % n for v in first]
    return row if k < n else row[::-1]


def time_side_by_side(calls: dict[str, list], *, warmup: int, repeats: int, budget_s: float) -> dict:
    """CPU timing of several providers of one cell, round-robin: each round takes one
    sample of every provider in turn, so a burst of load from other processes lands on
    all of them alike instead of on whichever cell was running (a shared machine's noise
    then cancels in the ratios), and the order changes each round so that no provider
    always runs first or after the same one (:func:`balanced_order`). Every sample takes
    the next rotation set of one sequence shared by all providers, so no provider reads
    weights another one just left in the caches
    (each sample pays for its weights cold, as a layer of a real model does: the rest of
    the model evicts them between calls). Returns name -> :class:`Timing` or the
    exception it raised."""
    out: dict = {}
    step = 0  # the shared rotation sequence
    warm: dict[str, float] = {}
    for name, cs in calls.items():
        try:
            t0 = time.perf_counter()
            for j in range(max(warmup, 1)):
                cs[j % len(cs)]()
            warm[name] = (time.perf_counter() - t0) / max(warmup, 1)
        except Exception as exc:  # noqa: BLE001 - reported in the provider's row
            out[name] = exc
    live = [n for n in calls if n not in out]
    samples: dict[str, list[float]] = {n: [] for n in live}
    budget = budget_s * max(len(live), 1)
    need = min(3, repeats) if 3 * sum(warm.values()) <= budget else 1
    t_start = time.perf_counter()
    # Whole cycles of the balanced order: a partial one would favour its first rows.
    cycle = len(live) if len(live) % 2 == 0 else 2 * len(live)
    rounds = -(-repeats // max(cycle, 1)) * max(cycle, 1)
    for r in range(rounds):
        turn = [live[j] for j in balanced_order(len(live), r)]
        for name in [n for n in turn if n not in out]:
            fn = calls[name][step % len(calls[name])]
            step += 1
            try:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
        done = [samples[n] for n in live if n not in out]
        if done and min(len(v) for v in done) >= need and time.perf_counter() - t_start > budget:
            break
    for name in live:
        if name not in out:
            v = samples[name]
            out[name] = Timing(statistics.median(v), min(v), len(v))
    return out


def _cells(providers, shape, t, mode, weights, inputs, roof: Roofline, cfg: dict, base: dict) -> list[dict]:
    """The rows of every provider at one (shape, T, mode): timed one provider after the
    other on a GPU (CUDA events are immune to other processes), side by side on the CPU."""
    device = cfg["device"]
    setups = [_cell_setup(p, shape, t, mode, weights, inputs, roof, cfg, base) for p in providers]
    if device.type == "cuda":
        rows = []
        for row, calls in setups:
            if calls is None:
                rows.append(row)
                continue
            try:
                rows.append(_timed_row(row, time_calls(calls, device, warmup=cfg["warmup"], repeats=cfg["repeats"],
                                                       budget_s=cfg["cell_budget"]), roof))
            except Exception as exc:
                rows.append(_error_row(row, exc, device))
        return rows
    timed = time_side_by_side({row["provider"]: calls for row, calls in setups if calls is not None},
                              warmup=cfg["warmup"], repeats=cfg["repeats"], budget_s=cfg["cell_budget"])
    rows = []
    for row, calls in setups:
        if calls is None:
            rows.append(row)
        elif isinstance(timed[row["provider"]], Exception):
            rows.append(_error_row(row, timed[row["provider"]], device))
        else:
            rows.append(_timed_row(row, timed[row["provider"]], roof))
    return rows


def _command_line(args: argparse.Namespace, cfg: dict) -> str:
    """The run as one command with every default spelled out (for results.md)."""
    parts = ["moe-kernels bench", f"--device {cfg['device']}", f"--dtype {str(cfg['dtype']).replace('torch.', '')}",
             f"--size {cfg['size']}", f"--shapes {args.shapes}", f"--tokens {','.join(map(str, cfg['tokens']))}",
             f"--mode {','.join(cfg['modes'])}", f"--routing {args.routing}", f"--providers {args.providers}"]
    if args.routing == "skewed":
        parts.append(f"--zipf {args.zipf:g}")
    return " ".join(parts)


def run_bench(args: argparse.Namespace) -> int:
    """Run the grid; prints the table, writes CSV, markdown and PNG. Exit code 0, or 1
    if a cell failed with an error (skipped cells are not errors), 2 on bad flags."""
    from .providers import PROVIDERS, expert_load, make_inputs, make_weights, rotation_copies
    from .report import (CsvWriter, Progress, format_seconds, format_table, load_summary, run_metadata, write_load_plot,
                         write_plot)

    if getattr(args, "_bench_error", None):
        print(f"moe-kernels bench: {args._bench_error}", file=sys.stderr)
        return 2
    try:
        cfg = _resolve(args)
    except ValueError as exc:
        print(f"moe-kernels bench: {exc}", file=sys.stderr)
        return 2
    device, dtype = cfg["device"], cfg["dtype"]
    if args.explain or args.explain_only:
        from .launch_shape import explain
        try:
            explain(cfg["shapes"], cfg["tokens"], dtype, device, args.explain_gpu, args.out)
        except ValueError as exc:
            print(f"moe-kernels bench: {exc}", file=sys.stderr)
            return 2
        if args.explain_only:
            return 0
    dtype_name = str(dtype).replace("torch.", "")
    dbytes = torch.empty((), dtype=dtype).element_size()
    torch.manual_seed(args.seed)
    meta = run_metadata(device)
    t0 = time.perf_counter()
    roof = measure_peaks(device, dtype)
    head = [f"moe_kernels bench on {meta['device_name']} [{device}], {dtype_name}, size {cfg['size']}, "
            f"{args.routing} routing; torch {meta['torch']}, triton {meta['triton'] or '-'}, "
            f"transformers {meta['transformers'] or '-'}, commit {meta['commit'] or '-'}, {meta['date']}",
            f"measured peaks: matmul {roof.peak_flops / 1e12:.3g} TFLOP/s ({dtype_name}), copy "
            f"{roof.peak_bytes / 1e9:.3g} GB/s (took {time.perf_counter() - t0:.1f} s)"]
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores + 0.5:
            head.append(f"warning: load average {load:.1f} on {cores} cores: other processes share the CPU, "
                        "times are noisy (and with several threads, much slower)")
    print("\n".join(head), flush=True)
    for name in cfg["providers"]:
        reason = PROVIDERS[name].check(device, dtype, cfg["shapes"][0]) if cfg["shapes"] else None
        if reason and args.providers.strip() in ("", "default"):
            print(f"  {name}: not run: {reason}")
    providers = [PROVIDERS[n] for n in cfg["providers"]
                 if not (args.providers.strip() in ("", "default") and PROVIDERS[n].check(device, dtype, cfg["shapes"][0]))]
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    writer = CsvWriter(csv_path, meta)
    cache, budget = cache_bytes(device), memory_budget_bytes(device)
    weights: dict = {}
    loads: dict = {}
    rows: list[dict] = []
    grid = [(m, t, s) for m in cfg["modes"] for t in cfg["tokens"] for s in cfg["shapes"]]
    progress = Progress(len(grid) * len(providers), enabled=not args.no_progress)
    start = time.perf_counter()
    try:
        for mode, t, shape in grid:
            base = {"shape": shape.name, "size": cfg["size"], "E": shape.num_experts, "k": shape.top_k,
                    "H": shape.hidden, "I": shape.intermediate, "T": t, "mode": mode, "routing": args.routing,
                    "dtype": dtype_name, "peak_tflops": roof.peak_flops / 1e12, "peak_gbps": roof.peak_bytes / 1e9}
            over = args.budget and time.perf_counter() - start > args.budget
            need = shape.num_experts * expert_weight_bytes(shape, dbytes) * (3 if "fwdbwd" in cfg["modes"] else 1)
            too_big = shape not in weights and need > 0.6 * available_memory_bytes(device)
            if over or too_big:
                inputs = None
                note = (f"--budget {args.budget:g} s spent" if over else
                        f"weights (and grads) need {need / 2**30:.1f} GiB, more than 60% of the free memory")
            else:
                if shape not in weights:
                    copies = rotation_copies(shape, dbytes, cache, budget)
                    weights[shape] = make_weights(shape, dtype, device, copies, seed=args.seed)
                # A multiple of the weight sets, so call i pairs weight set i % W without repeats.
                w_sets = len(weights[shape])
                inputs = make_inputs(shape, t, dtype, device, routing=args.routing, zipf=args.zipf,
                                     copies=w_sets * -(-4 // w_sets), seed=args.seed + t)
                if t == max(cfg["tokens"]) and shape.name not in loads:
                    loads[shape.name] = (t, args.routing, expert_load(inputs))
            if inputs is None:
                cell_rows = [dict(base, provider=prov.name, status="skipped", note=note) for prov in providers]
            else:
                cell_rows = _cells(providers, shape, t, mode, weights[shape], inputs, roof, cfg, base)
            for row in cell_rows:
                row = {**meta, **row}
                writer.write(row)
                rows.append(row)
                progress.update(f"{shape.name} T={t} {mode} {row['provider']}")
            del inputs
    finally:
        progress.close()
        writer.close()
    table = format_table(rows)
    load_text = load_summary(loads)
    print(table + ("\n\n" + load_text if load_text else ""))
    md_path = os.path.join(args.out, "results.md")
    with open(md_path, "w") as f:
        f.write("\n\n".join([f"Command: `{_command_line(args, cfg)}`", *head,
                             format_table(rows, markdown=True), *([f"```\n{load_text}\n```"] if load_text else [])])
                + "\n")
    png = None if args.no_plot else write_plot(rows, os.path.join(args.out, "roofline.png"))
    if png and loads:
        load_png = write_load_plot(loads, os.path.join(args.out, "load.png"))
        png = png + (f", {load_png}" if load_png else "")
    errors = sum(r["status"] == "error" for r in rows)
    print(f"\n{len(rows)} cells ({sum(r['status'] == 'ok' for r in rows)} ok, "
          f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {errors} errors) in "
          f"{format_seconds(time.perf_counter() - t0)}; wrote {csv_path}, {md_path}" + (f", {png}" if png else ""))
    return 1 if errors else 0


# --------------------------------------------------------------------------- gpu-check

def _gpu_check_script() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_check.sh")


def add_gpu_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", help="folder for the logs, CSV, plots and summary")
    parser.add_argument("--dry-run", action="store_true",
                        help="exercise the script on the CPU: no CUDA build, a tiny grid, a few tests")


def run_gpu_check(args: argparse.Namespace) -> int:
    """Runs bench/gpu_check.sh from the source tree (an editable install or a checkout;
    a wheel does not ship it)."""
    script = _gpu_check_script()
    if not os.path.exists(script):
        print(f"moe-kernels gpu-check: {script} not found; run it from a checkout of the repository "
              "(pip install -e .)", file=sys.stderr)
        return 2
    return subprocess.call(["bash", script, args.outdir, *(["--dry-run"] if args.dry_run else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_kernels.bench.run", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
