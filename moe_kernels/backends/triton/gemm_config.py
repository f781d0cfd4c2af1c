"""One GEMM launch's tile configuration (:class:`GemmConfig`): its own module so that the
heuristic (:mod:`.configs`) and the shipped tables (:mod:`.tables`) both build on it
without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from ...options import GEMM_FIELDS

__all__ = ["GemmConfig"]

_FIELDS = GEMM_FIELDS


@dataclass(frozen=True)
class GemmConfig:
    """One GEMM launch's tiles. ``SPLIT_K``: programs per tile along K (partials reduced
    in split order by the last arriver, gemm.py); ``USE_TMA``: weight tiles through a
    tensor descriptor (sm_90+; the launcher falls back to pointers where the weights'
    strides do not allow one); ``PERSISTENT``: ``NUM_SMS`` programs loop over the
    tiles (sm_90+ prefill)."""

    BLOCK_M: int = 64
    BLOCK_N: int = 64
    BLOCK_K: int = 64
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1
    USE_TMA: bool = False
    PERSISTENT: bool = False

    def __post_init__(self) -> None:
        for name in _FIELDS + ("SPLIT_K",):
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
        for name in ("USE_TMA", "PERSISTENT"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.SPLIT_K > 1 and self.PERSISTENT:
            raise ValueError("SPLIT_K, PERSISTENT: split-K (decode) and the persistent loop (prefill) exclude "
                             "each other")

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}
