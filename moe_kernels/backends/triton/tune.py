"""``moe-kernels tune``: measure the grouped GEMMs' tiles on this GPU and write a table
(tables.py) for its compute capability.

For each model shape and token count, the plan is built as the layer builds it (the
regime's BLOCK_M), and each forward GEMM (``gemm1``: x W13^T with the activation,
``gemm2``: h W2^T with the fused combine) is timed with every candidate config of its
regime (:func:`candidates`: BLOCK_N, BLOCK_K, warps, stages, and SPLIT_K at decode /
TMA and the persistent loop at prefill on sm_90+) that fits the shared memory; the
fastest is written, keyed on static shapes (:func:`.tables.entry_key`). Timing is
``triton.testing.do_bench`` (median); the sweep never changes BLOCK_M (the plan's).

``python -m moe_kernels.backends.triton.tune --snapshot`` rewrites the shipped tables'
heuristic snapshots (``"measured": false``) after a heuristic change.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace

import torch

from .configs import (GemmConfig, capability_of, gemm_config, layer_block_m, num_sms_of,
                      pipeline_shared_bytes, regime_of, shared_limit_of)
from .tables import TABLE_DIR, TILE_FIELDS, entry_key, write_table

__all__ = ["candidates", "tune", "snapshot_entries", "SNAPSHOT_GPUS", "add_tune_arguments", "run_tune"]

# The shipped tables: (file, GPU names, capability, SM count).
SNAPSHOT_GPUS = (("h100_h200.json", "H100/H200", (9, 0), 132), ("a100.json", "A100", (8, 0), 108),
                 ("b200.json", "B200", (10, 0), 148))
SNAPSHOT_TOKENS = (1, 16, 128, 512, 1024, 8192)


def candidates(base: GemmConfig, capability: tuple[int, int], esize: int, b_tiles: int) -> list[GemmConfig]:
    """The sweep around ``base`` (the heuristic's pick) for its regime, every one fitting
    the shared memory of ``capability``."""
    bm = base.BLOCK_M
    decode = bm <= 32
    hopper = capability[0] in (9, 10)
    out = []
    for bn, bk, warps, stages in itertools.product((64, 128) if bm <= 64 else (64, 128, 256), (64, 128),
                                                   (4, 8), (3, 4, 5)):
        splits = (1, 2, 4, 8) if decode else (1,)
        for split in splits:
            for tma, pers in (((False, False),) if (decode or not hopper) else
                              ((False, False), (True, False), (True, True))):
                if pers and bm < 128:
                    continue
                need = pipeline_shared_bytes(capability, bm, bn, bk, esize, b_tiles, stages)
                if need > shared_limit_of(capability) - 1024:
                    continue
                out.append(replace(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, SPLIT_K=split,
                                   USE_TMA=tma, PERSISTENT=pers))
    return out


def _fields(cfg: GemmConfig) -> dict:
    return {f: getattr(cfg, f) for f in TILE_FIELDS}


def snapshot_entries(capability, num_sms, shapes=None, tokens=SNAPSHOT_TOKENS, dtype=torch.bfloat16) -> dict:
    """The heuristic's picks for the benchmark's model shapes (the shipped snapshots)."""
    from ...bench.launch_shape import ISSUE_SHAPES
    from ...bench.roofline import SHAPES
    shapes = shapes or {**SHAPES, **ISSUE_SHAPES}
    entries = {}
    for shape in shapes.values():
        e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
        nb = 2 * i if shape.gated else i
        for t in tokens:
            s = t * k
            bm = layer_block_m(capability, None, s, e)
            for gemm, n, kk, kw in (("gemm1", i, h, {"gated_b": shape.gated}), ("gemm2", h, i, {}),
                                    ("dgemm2", i, h, {"heavy_epilogue": True}), ("dgemm1", h, nb, {})):
                cfg = gemm_config(e, n, kk, dtype, capability, bm, num_slots=s, num_sms=num_sms, **kw)
                entries[entry_key(e, n, kk, dtype, bm, gemm)] = _fields(cfg)
    return entries


def write_snapshots(directory=TABLE_DIR) -> None:
    directory.mkdir(exist_ok=True)
    for fname, gpu, cap, sms in SNAPSHOT_GPUS:
        write_table(directory / fname, gpu=gpu, capability=cap, num_sms=sms, measured=False,
                    source="heuristic snapshot (configs.py); no GPU run yet: overrides nothing until "
                           "`moe-kernels tune` replaces it", entries=snapshot_entries(cap, sms))


def tune(shapes, tokens, device, dtype=torch.bfloat16, *, timer=None, max_candidates: int | None = None,
         log=print) -> dict:
    """Entries ``{key: tile fields}`` of the fastest candidate per (shape, T bucket, GEMM).
    ``timer(fn) -> seconds`` (default: ``triton.testing.do_bench``'s median)."""
    from ...activations import Activation
    from ...routing import route
    from ...testing import random_params
    from .gemm import grouped_gemm
    from .plan import build_plan_triton

    if timer is None:
        import triton.testing

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e-3
    device = torch.device(device)
    cap, sms = capability_of(device), num_sms_of(device)
    esize = torch.empty((), dtype=dtype).element_size()
    entries = {}
    for shape in shapes:
        e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
        params = random_params(e, h, i, dtype=dtype, device=device, activation=shape.activation)
        act = Activation(shape.activation)
        done = set()
        for t in tokens:
            s = t * k
            bm = layer_block_m(cap, None, s, e)
            if (bm, regime_of(s, e), s.bit_length()) in done:
                continue
            done.add((bm, regime_of(s, e), s.bit_length()))
            x = torch.randn(t, h, device=device, dtype=dtype)
            routing = route(torch.randn(t, e, device=device), "softmax_topk", top_k=k)
            plan = build_plan_triton(routing, bm)
            hbuf = torch.empty(s, i, device=device, dtype=dtype)
            for gemm, n, kk, gated_b in (("gemm1", i, h, act.gated), ("gemm2", h, i, False)):
                base = gemm_config(e, n, kk, dtype, cap, bm, gated_b=gated_b, num_slots=s, num_sms=sms)
                cands = candidates(base, cap, esize, 2 if gated_b else 1)[:max_candidates]
                best = (float("inf"), base)
                for cfg in [base] + cands:
                    if gemm == "gemm1":
                        fn = (lambda c=cfg: grouped_gemm(x, params.w13, plan, a_rows="token", epilogue="act",
                                                         activation=act, c=hbuf, config=c))
                    else:
                        out = torch.empty(t, h, device=device, dtype=dtype)
                        fn = (lambda c=cfg, o=out: grouped_gemm(hbuf, params.w2, plan, a_rows="slot",
                                                                row_scale=True, combine="fused", out=o, config=c))
                    try:
                        sec = timer(fn)
                    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or launch
                        log(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                        continue
                    if sec < best[0]:
                        best = (sec, cfg)
                key = entry_key(e, n, kk, dtype, bm, gemm)
                entries[key] = _fields(best[1])
                log(f"{shape.name} T={t} {gemm}: {best[0] * 1e6:.1f} us with {entries[key]}")
    return entries


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="all", help="'all' or a comma list of model shapes (bench names)")
    parser.add_argument("--tokens", default="1,16,128,1024,8192", help="comma list of T (one entry per bucket)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True, help="the table to write (JSON)")
    parser.add_argument("--max-candidates", type=int, default=None, help="cap the sweep per GEMM (quick runs)")


def run_tune(args: argparse.Namespace) -> int:
    from ...bench.launch_shape import ISSUE_SHAPES
    from ...bench.roofline import SHAPES

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("moe-kernels tune: needs a CUDA GPU (it times kernels); --device must be cuda[:N]", file=sys.stderr)
        return 2
    every = {**SHAPES, **ISSUE_SHAPES}
    names = list(every) if args.shapes.strip() in ("", "all") else [p.strip() for p in args.shapes.split(",")]
    unknown = [n for n in names if n not in every]
    if unknown:
        print(f"moe-kernels tune: shapes: unknown {unknown}; expected names from {list(every)}", file=sys.stderr)
        return 2
    tokens = [int(v) for v in args.tokens.split(",") if v.strip()]
    dtype = getattr(torch, args.dtype)
    entries = tune([every[n] for n in names], tokens, device, dtype, max_candidates=args.max_candidates)
    cap = capability_of(device)
    write_table(args.out, gpu=torch.cuda.get_device_name(device), capability=cap, num_sms=num_sms_of(device),
                source=f"moe-kernels tune --shapes {args.shapes} --tokens {args.tokens} --dtype {args.dtype}",
                entries=entries)
    print(f"wrote {len(entries)} entries to {args.out}; copy it to {TABLE_DIR}/ to ship it")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--snapshot"]:
        write_snapshots()
        sys.exit(0)
    sys.exit(f"usage: python -m {__spec__.name} --snapshot (moe-kernels tune measures on a GPU)")
