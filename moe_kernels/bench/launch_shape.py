"""Launch-shape model of the triton backend's two forward GEMMs (``moe-kernels bench
--explain``): for each cell, the config the heuristic picks, CTAs launched and useful
against the SMs, waves, tile, weight bytes and FLOPs per CTA, and an *estimated*
fraction of the roofline. Pure arithmetic on the configs (no GPU, no timing), so a GPU
run can be read against it and docs/PERFORMANCE.md's estimate table is re-derived from
the code (:func:`estimate_table`).

Counting (uniform routing, the expectation over routings):

* active experts ``A = E·(1 - (1 - k/E)^T)``; rows per active expert ``r = T·k / A``;
  useful row blocks ``A·ceil(r / BLOCK_M)``; padded rows = those blocks x BLOCK_M.
* GEMM1: N = I (gate and up tiles per CTA when gated), K = H; GEMM2: N = H, K = I.
* useful CTAs = blocks x N tiles x SPLIT_K; launched CTAs = the plan's worst-case block
  bound x N tiles x SPLIT_K (the extra programs exit at once), or ``num_SMs`` for a
  persistent launch. Waves = useful CTAs / (SMs x CTAs per SM); CTAs per SM from the
  pipeline's shared memory (``configs.pipeline_shared_bytes``) and 2048 threads.
* bytes: the active experts' weights once + x read + out written + split-K partials
  (fp32, written and read once); FLOPs: ``2·rows·N·K`` (x2 gated GEMM1) over valid rows
  (the roofline) and over padded rows (the estimate).
* combine: the mode ``combine="auto"`` runs for the layer (``configs.combine_mode`` of
  ``T·k``, k, H, E); the estimate does not price the combine itself.

Estimate (assumptions, to be replaced by the first GPU run's measured column):
``time = max(bytes / (BW · m), padded FLOPs / (peak · c · tail)) + fixed`` with the
memory fill ``m = 0.92 · min(1, useful CTAs / (2·SMs))`` (a weight stream needs about
two CTAs per SM in flight and reaches about 92% of the HBM peak), the wave tail
``tail = waves / ceil(waves)`` for waves >= 1, a fixed ``3 µs`` per launch (launch
latency, pipeline fill of the first wave, epilogue of the last) plus ``1 µs`` for the
split-K reduction's second round trip, and the
MMA efficiency ``c`` per tile kind: wgmma/tcgen05 with 128-row tiles and TMA 0.80,
wgmma with 64-row tiles 0.50 (fed from shared memory at half rate), mma.sync (16/32
rows on sm_90+, or any tile on sm_8x) 0.35 on sm_90+ and 0.70 on sm_8x for 128-row
tiles, 0.55 for smaller ones. The roofline is ``max(min bytes / BW, valid FLOPs /
peak)``; the estimated fraction is roofline / time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .roofline import SHAPES, ModelShape, expected_active_experts

__all__ = ["GPUS", "GpuSpec", "ISSUE_SHAPES", "GemmLaunch", "layer_launches", "layer_estimate", "estimate_table",
           "format_launches", "gpu_spec", "explain"]


@dataclass(frozen=True)
class GpuSpec:
    name: str
    capability: tuple[int, int]
    num_sms: int
    peak_tflops: float  # dense 16-bit tensor-core peak
    hbm_tbps: float


GPUS = {
    "h200": GpuSpec("H200 SXM", (9, 0), 132, 989.0, 4.8),
    "h100": GpuSpec("H100 SXM", (9, 0), 132, 989.0, 3.35),
    "a100": GpuSpec("A100 SXM 80GB", (8, 0), 108, 312.0, 2.04),
    "b200": GpuSpec("B200", (10, 0), 148, 2250.0, 8.0),
}

# The issue's four shapes (GPT-OSS-120B: 128 experts, top-4).
ISSUE_SHAPES = {
    "mixtral-8x7b": SHAPES["mixtral-8x7b"],
    "qwen3-30b-a3b": SHAPES["qwen3-30b-a3b"],
    "deepseek-v3": SHAPES["deepseek-v3"],
    "gpt-oss-120b": ModelShape("gpt-oss-120b", 128, 4, 2880, 2880, activation="swiglu_oai", bias=True,
                               transposed=True, interleaved=True, hf_family="gpt_oss"),
}


@dataclass(frozen=True)
class GemmLaunch:
    model: str
    T: int
    gemm: str
    regime: str
    tile: str            # BLOCK_M x BLOCK_N(xB tiles) x BLOCK_K, warps, stages
    split_k: int
    tma: bool
    persistent: bool
    ctas_launched: int
    ctas_useful: int
    num_sms: int
    ctas_per_sm: int
    waves: float
    weight_kb_per_cta: float
    mflop_per_cta: float
    bytes: float
    flops_valid: float
    flops_padded: float
    roofline_s: float
    estimate_s: float
    combine: str = "-"  # gemm2: what combine="auto" runs for the layer (configs.combine_mode)

    @property
    def fraction(self) -> float:
        return self.roofline_s / self.estimate_s if self.estimate_s > 0 else float("nan")


_STREAM_EFF = 0.92
_LAUNCH_S = 3e-6
_SPLIT_S = 1e-6


def _mma_eff(cap, cfg) -> float:
    if cap[0] in (9, 10):
        if cfg.BLOCK_M >= 128 and cfg.USE_TMA:
            return 0.80
        if cfg.BLOCK_M >= 64:
            return 0.50
        return 0.35
    return 0.70 if cfg.BLOCK_M >= 128 else 0.55


def layer_launches(shape: ModelShape, t: int, gpu: GpuSpec = GPUS["h200"], dtype: torch.dtype = torch.bfloat16,
                   pin: dict | None = None) -> list[GemmLaunch]:
    """The forward's GEMM1 and GEMM2 launches of ``shape`` at ``T = t`` on ``gpu``."""
    from ..backends.triton.configs import combine_mode, gemm_config, layer_block_m, pipeline_shared_bytes, regime_of
    from ..plan import max_padded_rows

    e, k, h, i = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    s = t * k
    cap, sms = gpu.capability, gpu.num_sms
    esize = torch.empty((), dtype=dtype).element_size()
    bm = layer_block_m(cap, pin, s, e)
    active = expected_active_experts(e, k, t)
    rows = s / active
    blocks_useful = active * math.ceil(rows / bm)
    blocks_launched = max_padded_rows(s, e, bm) // bm
    comb = combine_mode(s, k, h, e, dtype, cap)
    out = []
    for gemm, n, kk, gated_b in (("gemm1", i, h, shape.gated), ("gemm2", h, i, False)):
        cfg = gemm_config(e, n, kk, dtype, cap, bm, gated_b=gated_b, pin=pin, num_slots=s, num_sms=sms, kind=gemm)
        b_tiles = 2 if gated_b else 1
        tiles_n = math.ceil(n / cfg.BLOCK_N)
        split = cfg.SPLIT_K
        useful = blocks_useful * tiles_n * split
        launched = sms if cfg.PERSISTENT else blocks_launched * tiles_n * split
        smem = pipeline_shared_bytes(cap, bm, cfg.BLOCK_N, cfg.BLOCK_K, esize, b_tiles, cfg.num_stages) + 1024
        limit = 233472 if cap[0] in (9, 10) else (167936 if cap == (8, 0) else 102400)
        per_sm = max(1, min(limit // smem, 2048 // (32 * cfg.num_warps)))
        waves = useful / (sms * per_sm)
        w_bytes = active * b_tiles * n * kk * esize
        part = 2 * split * s * n * b_tiles * 4 if split > 1 else 0
        nbytes = w_bytes + t * (kk if gemm == "gemm1" else 0) * esize + s * kk * esize * (gemm == "gemm2") \
            + (s * n * esize if gemm == "gemm1" else t * n * esize) + part
        min_bytes = w_bytes + (t * h * esize if gemm == "gemm1" else t * h * esize)
        flops_valid = 2.0 * s * n * kk * b_tiles
        flops_padded = 2.0 * blocks_useful * bm * n * kk * b_tiles
        peak, bw = gpu.peak_tflops * 1e12, gpu.hbm_tbps * 1e12
        mem_fill = _STREAM_EFF * min(1.0, useful / (2 * sms))
        tail = waves / math.ceil(waves) if waves >= 1 else 1.0
        fixed = _LAUNCH_S + (_SPLIT_S if split > 1 else 0.0)
        est = max(nbytes / (bw * mem_fill), flops_padded / (peak * _mma_eff(cap, cfg) * tail)) + fixed
        roof = max(min_bytes / bw, flops_valid / peak)
        out.append(GemmLaunch(
            model=shape.name, T=t, gemm=gemm, regime=regime_of(s, e),
            tile=f"{bm}x{cfg.BLOCK_N}{'(x2)' if gated_b else ''}x{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages}",
            split_k=split, tma=cfg.USE_TMA, persistent=cfg.PERSISTENT, ctas_launched=int(launched),
            ctas_useful=int(round(useful)), num_sms=sms, ctas_per_sm=per_sm, waves=waves,
            weight_kb_per_cta=b_tiles * cfg.BLOCK_N * (kk / split) * esize / 1024,
            mflop_per_cta=2.0 * bm * cfg.BLOCK_N * b_tiles * (kk / split) / 1e6,
            bytes=nbytes, flops_valid=flops_valid, flops_padded=flops_padded, roofline_s=roof, estimate_s=est,
            combine=comb if gemm == "gemm2" else "-"))
    return out


def layer_estimate(shape: ModelShape, t: int, gpu: GpuSpec = GPUS["h200"]) -> float:
    """Estimated fraction of the roofline of the forward's two GEMMs together."""
    ls = layer_launches(shape, t, gpu)
    return sum(x.roofline_s for x in ls) / sum(x.estimate_s for x in ls)


def estimate_table(tokens=(1, 16, 128, 2048, 16384), gpu: GpuSpec = GPUS["h200"], shapes=None) -> str:
    """Markdown: estimated fraction of the roofline per model and T, with an empty
    'measured' column per T for the first GPU run."""
    shapes = shapes or ISSUE_SHAPES
    head = "| shape | " + " | ".join(f"T={t} est. | T={t} measured" for t in tokens) + " |"
    sep = "|---|" + "---|---|" * len(tokens)
    rows = [f"| {name} | " + " | ".join(f"{100 * layer_estimate(sh, t, gpu):.0f}% | " for t in tokens) + " |"
            for name, sh in shapes.items()]
    return "\n".join([head, sep, *rows])


_COLS = [("model", "model"), ("T", "T"), ("gemm", "gemm"), ("regime", "regime"), ("tile", "tile"),
         ("split_k", "split"), ("tma", "TMA"), ("persistent", "pers."), ("ctas_launched", "CTAs launched"),
         ("ctas_useful", "CTAs useful"), ("num_sms", "SMs"), ("ctas_per_sm", "CTA/SM"), ("waves", "waves"),
         ("weight_kb_per_cta", "W KB/CTA"), ("mflop_per_cta", "MFLOP/CTA"), ("fraction", "est. roofline"),
         ("combine", "combine")]


def format_launches(launches: list[GemmLaunch], markdown: bool = False) -> str:
    """A table of launches (terminal or markdown)."""
    def cell(x, key):
        v = getattr(x, key)
        if key == "fraction":
            return f"{100 * v:.0f}%"
        if isinstance(v, bool):
            return "yes" if v else "-"
        if isinstance(v, float):
            return f"{v:.2f}" if v < 100 else f"{v:.0f}"
        return str(v)
    rows = [[h for _, h in _COLS]] + [[cell(x, k) for k, _ in _COLS] for x in launches]
    if markdown:
        return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(_COLS)]
                         + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[c]) for r in rows) for c in range(len(_COLS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def launches_as_dicts(launches: list[GemmLaunch]) -> list[dict]:
    return [dict(asdict(x), fraction=x.fraction) for x in launches]


def gpu_spec(name: str | None, device: torch.device | None = None) -> GpuSpec:
    """A named GPU of :data:`GPUS`, or this CUDA device (its capability and SM count; the
    peaks of the named GPU of the same capability), or the H200."""
    if name is not None:
        if name not in GPUS:
            raise ValueError(f"explain-gpu: expected one of {list(GPUS)}, got {name!r}")
        return GPUS[name]
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        cap = (props.major, props.minor)
        like = next((g for g in GPUS.values() if g.capability == cap), GPUS["h200"])
        return GpuSpec(props.name, cap, props.multi_processor_count, like.peak_tflops, like.hbm_tbps)
    return GPUS["h200"]


def explain(shapes, tokens, dtype, device, gpu_name, out_dir) -> str:
    """Print the launch-shape table and write it to ``out_dir/launch_shapes.md``."""
    import os

    gpu = gpu_spec(gpu_name, torch.device(device))
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    launches = [x for sh in shapes for t in tokens for x in layer_launches(sh, t, gpu, dtype)]
    head = (f"launch-shape model of the triton forward GEMMs on {gpu.name} (sm_{gpu.capability[0]}"
            f"{gpu.capability[1]}, {gpu.num_sms} SMs, {gpu.peak_tflops:g} TFLOP/s, {gpu.hbm_tbps:g} TB/s), "
            f"{str(dtype).replace('torch.', '')}; an estimate (bench/launch_shape.py), not a measurement")
    print(head)
    print(format_launches(launches))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "launch_shapes.md")
    with open(path, "w") as f:
        f.write(head + "\n\n" + format_launches(launches, markdown=True) + "\n")
    return path
