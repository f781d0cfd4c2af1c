"""Tile configurations of the grouped GEMMs: a heuristic, a pin, an optional autotune.

Keyed on (E, N, K, dtype, compute capability) only, never on the token count: the
plan's padding depends on ``BLOCK_M``, a CUDA graph or a ``torch.compile`` graph
captured at one batch size must stay valid at another, and a config cache keyed on T
would compile a new kernel for every batch size a server sees.

Why the defaults (all four GEMMs of a layer share ``BLOCK_M``, the plan's padding;
each GEMM picks its own ``BLOCK_N``/``BLOCK_K``/warps/stages from its (N, K)):

* ``BLOCK_M = 64`` on sm_80 and newer. A Hopper warpgroup MMA (wgmma) is m64 per
  warpgroup, so 64 is the smallest M that still runs on wgmma; at decode (about one
  row per active expert) a 64-row block wastes only MMA issue slots, which hide under
  the weight stream, while padded rows cost no memory traffic (their loads are
  masked). 128 would halve that headroom at decode for large experts (Mixtral: two
  experts of 4096x28672 each, 128 rows of MMA per weight tile is already near the
  compute/bandwidth balance point of an H200), so the token-count-free compromise is 64.
* ``BLOCK_N``: decode is a weight stream, and the stream only reaches full bandwidth
  with a few CTAs per SM in flight. With fine-grained experts (N <= 2048 or E >= 32:
  Qwen3-30B-A3B I=768, DeepSeek-V3 I=2048) a 128-wide tile leaves most of 132 SMs
  idle at T=1 (Qwen3: 8 experts x 768/128 = 48 CTAs), so these use 64 (96 CTAs for
  GEMM1, 8 x 2048/64 = 256 for GEMM2). Large experts (Mixtral I=14336) have plenty of
  N tiles and take 128 for better A reuse at prefill (a gated GEMM1 tile then holds
  two 64x128 accumulators: an effective 64x256 wgmma tile).
* ``BLOCK_K = 64`` for 16-bit types (128-byte rows: one swizzled shared-memory line,
  the widest wgmma/cp.async pattern), 32 for fp32 (same bytes).
* ``num_stages``: the deepest of (4 on sm_90 and newer for 16-bit types, else 3) that
  fits the GPU's opt-in shared memory per block (:data:`SHARED_LIMITS`, a property of
  the GPU, like the capability) by :func:`pipeline_shared_bytes`'s estimate. sm_90 has
  227 KB: 4 stages of a gated 64x64 A tile + two 64x128 B tiles (40 KB a stage) =
  160 KB, deep enough to keep wgmma fed at prefill. sm_80 (163 KB, no wgmma, cp.async
  only) takes 3. Consumer GPUs have 99 KB (sm_86, sm_89, sm_120/121: RTX 30xx/40xx/50xx,
  DGX Spark): on sm_120 the large-expert gated GEMM1 drops to 3 stages (two buffers,
  80 KB; 4 would need 120 KB and not launch), its other GEMMs keep 4.
* ``num_warps = 4``: one warpgroup per 64-row tile (wgmma needs a whole warpgroup per
  m64); 8 warps for the 128-wide N tiles so the epilogue's register tile halves, and
  for the activation-backward GEMM, whose epilogue holds five fp32 tiles at once (with
  4 warps ptxas spills it on sm_90; with 8 it stays at <= 186 registers, no spills).
* ``GROUP_M = 8``: program ids are swizzled so that 8 consecutive row blocks (mostly
  one expert's) sweep the N tiles together: the expert's weight tiles are read from
  HBM once and hit L2 for the other 7 blocks at prefill.

Overrides (:class:`moe_kernels.options.KernelOptions`, passed down by the launchers):

* ``gemm_config={"BLOCK_N": 128, "num_warps": 8}`` (``MOE_KERNELS_TRITON_CONFIG`` supplies
  the default) pins any subset of the fields for every GEMM of the call.
* ``autotune=True`` (``MOE_KERNELS_AUTOTUNE=1``) lets ``triton.autotune`` pick ``BLOCK_K``, warps and
  stages among :func:`autotune_configs` on a GPU, keyed on (N, K, dtype, GEMM mode) like
  the heuristic (``BLOCK_M`` stays the plan's and ``BLOCK_N`` the heuristic's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ...options import GEMM_FIELDS

__all__ = ["GemmConfig", "gemm_config", "layer_block_m", "autotune_configs", "capability_of", "SHARED_LIMITS", "shared_limit_of", "pipeline_shared_bytes"]

_FIELDS = GEMM_FIELDS


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int = 64
    BLOCK_N: int = 64
    BLOCK_K: int = 64
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in _FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"{name}: expected a power of two, got {v}")
        if self.BLOCK_M < 16 or self.BLOCK_N < 16 or self.BLOCK_K < 16:
            raise ValueError(f"BLOCK_M, BLOCK_N, BLOCK_K: expected >= 16 (tl.dot's minimum), got "
                             f"{self.BLOCK_M}, {self.BLOCK_N}, {self.BLOCK_K}")


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
    (sm_90, sm_10x) and ``stages - 1`` with mma.sync + cp.async (sm_8x, sm_12x); checked
    against the compiled kernels by tests/test_triton_aot_gemm.py."""
    buffers = stages if capability[0] in (9, 10) else stages - 1
    return buffers * (block_m * block_k + b_tiles * block_n * block_k) * esize


def capability_of(device: torch.device | str | None) -> tuple[int, int]:
    """Compute capability of a CUDA device; ``(0, 0)`` for the CPU (the interpreter)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def layer_block_m(capability: tuple[int, int], pin: dict[str, int] | None = None) -> int:
    """The row-block size shared by a layer's GEMMs (the plan is padded to it); a pinned
    ``BLOCK_M`` (``KernelOptions.gemm_config``) wins."""
    if pin and "BLOCK_M" in pin:
        return GemmConfig(BLOCK_M=pin["BLOCK_M"]).BLOCK_M
    if capability == (0, 0):
        return 16  # the interpreter: numpy is fastest with few, small programs of work
    return 64


def gemm_config(num_experts: int, n: int, k: int, dtype: torch.dtype, capability: tuple[int, int],
                block_m: int, gated_b: bool = False, heavy_epilogue: bool = False,
                pin: dict[str, int] | None = None) -> GemmConfig:
    """Config of one grouped GEMM ``[rows, k] x [E, n, k]^T``; ``gated_b`` says the B
    tile is doubled (GEMM1 of a gated activation: gate and up rows); ``heavy_epilogue``
    (the activation backward: five fp32 tiles live at once) caps ``BLOCK_N`` at 64 and
    takes 8 warps, which keeps it free of register spills on sm_90."""
    if capability == (0, 0):
        cfg = GemmConfig(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    else:
        wide = dtype in (torch.float16, torch.bfloat16)
        fine_grained = n <= 2048 or num_experts >= 32
        bn = 64 if (fine_grained or heavy_epilogue) else 128
        bk = 64 if wide else 32
        stages = 4 if (wide and capability >= (9, 0)) else 3
        warps = 8 if (bn >= 128 or heavy_epilogue) else 4
        limit = shared_limit_of(capability) - _SHARED_SLACK
        b_tiles = 2 if gated_b else 1
        while stages > 2 and pipeline_shared_bytes(capability, block_m, bn, bk, 2 if wide else 4, b_tiles,
                                                   stages) > limit:
            stages -= 1
        cfg = GemmConfig(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
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
