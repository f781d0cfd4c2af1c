"""Tile configurations of the grouped GEMMs by regime: a heuristic, shipped tables, a
pin, an optional autotune.

Keyed on static shapes only: (E, N, K, dtype, compute capability, SM count) and the
*regime*, a coarse bucket of the expected rows per expert ``r = T*k/E``. ``T*k`` (the
number of slots, ``routing.num_slots``) is a static shape of the call, like ``x.shape[0]``;
it is rounded up to a power of two first (:func:`slots_bucket`), so every batch size
of a bucket gets the same plan padding and the same kernels: a CUDA graph or a
``torch.compile`` graph captured at one batch size stays valid within its bucket, and
a server sees at most a handful of compiled variants (never one per batch size).
Nothing reads runtime values (expert counts, token ids).

=========  =============  ========  ====================================================
regime     r = T*k/E      BLOCK_M   tiles (sm_90, 16-bit)
=========  =============  ========  ====================================================
decode     r <= 16        16        BN 64, BK 128, 4 warps, 4 stages; split-K when the
                                    grid is under 2 waves (:func:`split_k_for`)
small      16 < r <= 32   32        BN 64 (fine-grained) / 128, BK 64, 4 warps; split-K
                                    rule as decode (rarely triggers)
medium     32 < r <= 128  64        BN 64 / 128, BK 64, 4 / 8 warps; TMA weights on sm_90+
prefill    r > 128        128       128 x 128 (gated GEMM1: two 128 x 64 B tiles, an
                                    effective 128 x 128 per gate/up pair), BK 64, 8
                                    warps; TMA weights + persistent tile loop on sm_90+
=========  =============  ========  ====================================================

Why (launch shapes on an H200, 132 SMs; docs/PERFORMANCE.md re-derives them):

* decode is a weight stream: it reaches HBM bandwidth only with >= 2 CTAs per SM in
  flight. At T=1 a layer has 1-8 active experts, one 16-row block each, so the grid is
  (active blocks x N tiles): Mixtral GEMM2 has 2 x 64 = 128 CTAs for 132 SMs, Qwen3
  GEMM1 8 x 12 = 96. Split-K (:func:`split_k_for`) multiplies the grid by the smallest
  power of two reaching ``2 * num_SMs`` useful CTAs while each split keeps >= 256 of K;
  the partial sums are reduced in split order by the last-arriving CTA (bitwise
  deterministic, see gemm.py). BLOCK_M = 16 tiles run on ``mma.sync`` (wgmma needs
  m64): at decode MMA issue hides under the weight stream; 16-row tiles keep registers
  at about 64-110 a thread so two or three CTAs fit an SM.
* prefill is compute bound: 128-row tiles halve the shared-memory traffic per MMA of
  the 64-row wgmma tiles, TMA (tensor descriptors, ``cp.async.bulk.tensor``) loads the
  weight tiles without address registers, and a persistent loop over (row block,
  N tile) on ``num_SMs`` programs overlaps one tile's epilogue with the next tile's
  loads. The rows of x are still gathered through the plan (pointer loads); sm_8x /
  sm_12x and the interpreter keep the pointer path for the weights too (``USE_TMA``
  off), and TMA needs K-major weights with 16-byte aligned rows (else the launcher
  falls back: the backward's transposed weight views use the pointer path).
* medium keeps the 64-row wgmma tiles (Hopper's smallest), the old default.
* ``BLOCK_N``: fine-grained experts (N <= 2048 or E >= 32) take 64 so the grid covers
  the SMs; ``BLOCK_K = 64`` for 16-bit types (one 128-byte swizzled line), 128 at decode
  (fewer, longer loads per CTA), 32 for fp32 (same bytes).
* ``num_stages``: the deepest of (4 on sm_90 and newer for 16-bit types, else 3) that
  fits the GPU's opt-in shared memory per block (:data:`SHARED_LIMITS`) by
  :func:`pipeline_shared_bytes`'s estimate (sm_120's 99 KB drops some to 3).
* ``num_warps``: 4 for one warpgroup; 8 for 128-wide tiles and for the
  activation-backward GEMM, whose epilogue holds five fp32 tiles at once (with 4 warps
  ptxas spills it on sm_90). Its BLOCK_N is capped (64; 32 at 128-row tiles).
* ``GROUP_M = 8``: program ids are swizzled so that 8 consecutive row blocks (mostly
  one expert's) sweep the N tiles together: each weight tile comes from HBM once.

Tables (:mod:`.tables`): a JSON file per GPU (``tables/*.json``, keyed on capability
and SM count) may replace the heuristic's tile for a (E, N, K, dtype, regime, GEMM)
key; ``moe-kernels tune`` measures and writes one on a GPU. An unknown GPU uses the
heuristic above.

Overrides (:class:`moe_kernels.options.KernelOptions`, passed down by the launchers):

* ``gemm_config={"BLOCK_N": 128, "num_warps": 8}`` (``MOE_KERNELS_TRITON_CONFIG`` supplies
  the default) pins any subset of the fields for every GEMM of the call; a pinned
  ``BLOCK_M`` also pads the plan (and replaces the regime's).
* ``autotune=True`` (``MOE_KERNELS_AUTOTUNE=1``) lets ``triton.autotune`` pick ``BLOCK_K``, warps and
  stages among :func:`autotune_configs` on a GPU, keyed on (N, K, dtype, GEMM mode) like
  the heuristic (``BLOCK_M`` stays the plan's and ``BLOCK_N`` the heuristic's).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ...options import GEMM_FIELDS
from .gemm_config import GemmConfig

__all__ = ["GemmConfig", "gemm_config", "layer_block_m", "autotune_configs", "capability_of", "SHARED_LIMITS",
           "shared_limit_of", "pipeline_shared_bytes", "REGIMES", "REGIME_BLOCK_M", "slots_bucket", "regime_of",
           "split_k_for", "expected_blocks", "num_sms_of", "combine_mode", "COMBINE_SEPARATE_MIN_K",
           "COMBINE_SEPARATE_MAX_H"]

_FIELDS = GEMM_FIELDS

REGIMES = ("decode", "small", "medium", "prefill")
REGIME_BLOCK_M = {"decode": 16, "small": 32, "medium": 64, "prefill": 128}
_BLOCK_M_REGIME = {v: k for k, v in REGIME_BLOCK_M.items()}
_MAX_SPLIT = 16
_MIN_K_PER_SPLIT = 256
DEFAULT_NUM_SMS = 132  # an H100 / H200 SXM: the launch-shape model's default


# Opt-in shared memory per block in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin) by
# arch = 10 * major + minor: 227 KB on sm_90/sm_10x, 163 KB on sm_80/sm_87, 99 KB on the
# consumer parts (sm_86, sm_89, sm_120, sm_121).
SHARED_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
                 120: 101376, 121: 101376}
_SHARED_FLOOR = 101376  # an arch missing from the table: the smallest of them
_SHARED_SLACK = 1024  # barriers and the odd scratch buffer next to the pipeline's tiles


def shared_limit_of(capability: tuple[int, int]) -> int:
    """Opt-in shared memory per block of a compute capability (:data:`SHARED_LIMITS`)."""
    return SHARED_LIMITS.get(10 * capability[0] + capability[1], _SHARED_FLOOR)


def pipeline_shared_bytes(capability: tuple[int, int], block_m: int, block_n: int, block_k: int, esize: int,
                          b_tiles: int, stages: int) -> int:
    """Shared memory of the GEMM's software pipeline: one A tile and ``b_tiles`` B tiles
    per buffer. Triton's pipeliner keeps ``stages`` buffers with wgmma / tcgen05
    (sm_90, sm_10x, 64 rows and more) and ``stages - 1`` with mma.sync + cp.async (sm_8x,
    sm_12x, and 16/32-row tiles everywhere); checked against the compiled kernels by
    tests/test_triton_aot_gemm.py and tests/test_triton_aot_regimes.py."""
    buffers = stages if (capability[0] in (9, 10) and block_m >= 64) else stages - 1
    return buffers * (block_m * block_k + b_tiles * block_n * block_k) * esize


def capability_of(device: torch.device | str | None) -> tuple[int, int]:
    """Compute capability of a CUDA device; ``(0, 0)`` for the CPU (the interpreter)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms_of(device: torch.device | str | None) -> int:
    """Streaming multiprocessors of a CUDA device (a static property, like the
    capability); 4 for the CPU, so the interpreter's persistent loops do loop."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def slots_bucket(num_slots: int) -> int:
    """``T*k`` rounded up to a power of two: the static quantity the regime (and the
    split-K count) is a function of."""
    return 1 << max(int(num_slots) - 1, 0).bit_length()


def regime_of(num_slots: int, num_experts: int) -> str:
    """``decode`` / ``small`` / ``medium`` / ``prefill`` from the expected rows per
    expert of the bucketed slot count (see the module docstring)."""
    r = slots_bucket(num_slots) / max(int(num_experts), 1)
    if r <= 16:
        return "decode"
    if r <= 32:
        return "small"
    if r <= 128:
        return "medium"
    return "prefill"


def layer_block_m(capability: tuple[int, int], pin: dict[str, int] | None = None, num_slots: int | None = None,
                  num_experts: int | None = None) -> int:
    """The row-block size shared by a layer's GEMMs (the plan is padded to it): the
    regime's (:data:`REGIME_BLOCK_M`) of ``(num_slots, num_experts)``, 64 (the medium
    regime) when they are not given; a pinned ``BLOCK_M`` (``KernelOptions.gemm_config``)
    wins."""
    if pin and "BLOCK_M" in pin:
        return GemmConfig(BLOCK_M=pin["BLOCK_M"]).BLOCK_M
    if capability == (0, 0):
        return 16  # the interpreter: numpy is fastest with few, small programs of work
    if num_slots is None or num_experts is None:
        return REGIME_BLOCK_M["medium"]
    return REGIME_BLOCK_M[regime_of(num_slots, num_experts)]


COMBINE_SEPARATE_MIN_K = 8      # slots per token from which the fused combine's tail loses
COMBINE_SEPARATE_MAX_H = 4096   # widest H that still prefers the separate kernel at 8 <= K <= 16


def combine_mode(num_slots: int, slots_per_token: int, hidden: int, num_experts: int,
                 dtype: torch.dtype | None = None, capability: tuple[int, int] | None = None) -> str:
    """What ``combine="auto"`` runs: ``"fused"`` or ``"separate"``, from static shapes only
    (``num_slots`` = T*k, bucketed like the regime; ``slots_per_token`` = K, the plan's
    ``max_slots_per_token``: k for top-k routings, E for Expert Choice and dense; H; E).
    Both modes give the same bits, so the choice is speed only.

    The model (launch shapes on an H200, bench/launch_shape.py's constants):

    * separate: one more launch (about 3-5 us: launch latency plus the fill of a
      T x ceil(H/1024) grid) plus reading y [S, H] and writing out [T, H] once at the
      HBM stream rate; it runs after GEMM2 has finished, so GEMM2's CTAs carry no tail.
    * fused: per (token, column block) one int32 atomic on a counter, and the last
      arriving CTA re-reads the token's K rows of y through L2 (``.cg``) and sums them
      in column order. That gather runs in the CTA's epilogue after its main loop and
      grows with K (an unrolled loop for K <= 16, a runtime loop of K dependent
      accumulations for wider tables: Expert Choice and dense have K = E); the CTA
      holds its SM slot meanwhile, so its tail is only hidden when other CTAs' main
      loops overlap it, i.e. when GEMM2 has many N tiles (large H) per row block.

    The rule:

    1. ``decode`` regime (expected rows per expert <= 16, :func:`regime_of`): fused.
       A decode layer is a 10-30 us weight stream; an extra 3-5 us launch is 15-40%
       of it, while K gathers of a 16-row tile cost a few hundred ns.
    2. K > 16 (Expert Choice / dense with many experts: the runtime-loop gather):
       separate. The fused tail is K serial L2 round trips (0.3-0.5 us each under load),
       e.g. 20-60 us at K = 128, against the separate kernel's one read of y.
    3. ``COMBINE_SEPARATE_MIN_K`` (8) <= K <= 16 and ``H <= COMBINE_SEPARATE_MAX_H``
       (4096): separate. K = 8 gathers are about 3-4 us of tail per CTA, and H <= 4096
       is at most 32-64 N tiles per row block, too few CTAs to hide it; the separate
       kernel costs the launch plus ``(S + T) H`` bytes, e.g. 4 us + 8.5 us for T=1024,
       K=8, H=2048 in bf16, where the fused path reads the same S x H bytes through L2
       but in the GEMM CTAs' epilogues, K dependent loads deep.
    4. otherwise (k <= 7, the common top-k case, or a wide H): fused, which saves the
       launch and the second pass over y.

    ``dtype`` and ``capability`` are accepted for a future per-GPU table and do not
    change the choice today. The constants are estimates from the launch-shape model,
    to be replaced by a side-by-side GPU measurement of both modes.
    """
    del dtype, capability
    k = int(slots_per_token)
    if regime_of(num_slots, num_experts) == "decode":
        return "fused"
    if k > 16:
        return "separate"
    if k >= COMBINE_SEPARATE_MIN_K and int(hidden) <= COMBINE_SEPARATE_MAX_H:
        return "separate"
    return "fused"


def expected_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Row blocks a uniform routing of the bucketed ``num_slots`` fills: at most
    ``min(E, S)`` experts active, each with ``ceil(rows / block_m)`` blocks. The plan
    launches its worst-case bound; the blocks past the used ones exit at once."""
    s = slots_bucket(num_slots)
    active = max(min(int(num_experts), s), 1)
    per = -(-s // active)
    return active * (-(-per // block_m))


def split_k_for(base_ctas: int, k: int, block_k: int, num_sms: int) -> int:
    """Split-K count: the smallest power of two with ``base_ctas * split >= 2 *
    num_sms`` (two waves of useful CTAs), capped so every split keeps at least
    ``max(2 * block_k, 256)`` of K and at 16."""
    split = 1
    floor = max(2 * block_k, _MIN_K_PER_SPLIT)
    while base_ctas * split < 2 * num_sms and split < _MAX_SPLIT and k // (2 * split) >= floor:
        split *= 2
    return split


def _stages_that_fit(capability, block_m, bn, bk, esize, b_tiles, stages) -> int:
    limit = shared_limit_of(capability) - _SHARED_SLACK
    while stages > 2 and pipeline_shared_bytes(capability, block_m, bn, bk, esize, b_tiles, stages) > limit:
        stages -= 1
    return stages


def _heuristic(num_experts, n, k, dtype, capability, block_m, gated_b, heavy_epilogue, num_slots, num_sms):
    wide = dtype in (torch.float16, torch.bfloat16)
    esize = 2 if wide else 4
    fine_grained = n <= 2048 or num_experts >= 32
    regime = _BLOCK_M_REGIME.get(block_m, "prefill" if block_m > 128 else "medium")
    hopper = capability[0] in (9, 10)  # wgmma / tcgen05 and TMA
    b_tiles = 2 if gated_b else 1
    stages = 4 if (wide and capability >= (9, 0)) else 3
    split, tma, persistent = 1, False, False
    if regime in ("decode", "small"):
        bn = 64 if (fine_grained or heavy_epilogue or regime == "decode") else 128
        bk = (128 if regime == "decode" else 64) if wide else 32
        # The gated GEMM1's two 16x64 accumulators and 128-deep tiles on mma.sync + cp.async
        # (sm_8x, sm_12x) need 8 warps: 4 spill on sm_80 with Triton 3.6.
        warps = 8 if (gated_b and not hopper and regime == "decode") else 4
        if num_slots is not None and not heavy_epilogue:
            base = expected_blocks(num_slots, num_experts, block_m) * -(-n // bn)
            split = split_k_for(base, k, bk, num_sms)
    elif regime == "medium":
        bn = 64 if (fine_grained or heavy_epilogue) else 128
        bk = 64 if wide else 32
        warps = 8 if (bn >= 128 or heavy_epilogue) else 4
        tma = hopper
    else:  # prefill
        bn = 32 if heavy_epilogue else (64 if gated_b else 128)
        bk = 64 if wide else 32
        warps = 8
        tma = hopper
        persistent = hopper and not heavy_epilogue
    stages = _stages_that_fit(capability, block_m, bn, bk, esize, b_tiles, stages)
    return GemmConfig(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                      SPLIT_K=split, USE_TMA=tma, PERSISTENT=persistent)


def gemm_config(num_experts: int, n: int, k: int, dtype: torch.dtype, capability: tuple[int, int],
                block_m: int, gated_b: bool = False, heavy_epilogue: bool = False,
                pin: dict[str, int] | None = None, num_slots: int | None = None,
                num_sms: int = DEFAULT_NUM_SMS, kind: str | None = None) -> GemmConfig:
    """Config of one grouped GEMM ``[rows, k] x [E, n, k]^T``; ``block_m`` is the plan's
    (its regime chooses the tiles); ``num_slots`` (``T*k``, bucketed) and ``num_sms``
    size split-K at decode; ``gated_b`` says the B tile is doubled (GEMM1 of a gated
    activation); ``heavy_epilogue`` (the activation backward: five fp32 tiles live at
    once) caps ``BLOCK_N`` and takes 8 warps. A shipped or tuned table entry for
    ``kind`` (``"gemm1"``, ``"gemm2"``, ...) replaces the heuristic's tiles; a pin
    replaces any field but ``BLOCK_M``."""
    if capability == (0, 0):
        cfg = GemmConfig(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    else:
        cfg = _heuristic(num_experts, n, k, dtype, capability, block_m, gated_b, heavy_epilogue, num_slots, num_sms)
        if kind is not None:
            from .tables import lookup
            found = lookup(capability, num_sms, num_experts, n, k, dtype, block_m, kind)
            if found is not None:
                cfg = replace(cfg, **{f: v for f, v in found.items() if f != "BLOCK_M"})
    if pin:
        pin = dict(pin)
        pin.pop("BLOCK_M", None)  # the plan's block size wins; layer_block_m already read it
        cfg = replace(cfg, **pin)
    return cfg


def autotune_configs() -> list[tuple[dict, int, int]]:
    """Candidates for ``autotune=True`` (``MOE_KERNELS_AUTOTUNE=1``): ``({"BLOCK_K": bk}, num_warps,
    num_stages)``. BLOCK_M is the plan's and BLOCK_N the heuristic's (buffer shapes
    depend on them); configs that do not fit in shared memory are skipped by Triton."""
    return [({"BLOCK_K": bk}, w, st) for bk in (32, 64, 128) for w in (4, 8) for st in (3, 4, 5)]
