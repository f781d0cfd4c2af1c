"""Per-GPU tables of GEMM tiles (``tables/*.json``), read by :func:`.configs.gemm_config`.

A table is a JSON object::

    {"version": 1, "gpu": "H100/H200", "capability": [9, 0], "num_sms": 132, "measured": true,
     "source": "how the entries were chosen (tuned on a GPU, or the heuristic)",
     "entries": {"E=8,N=14336,K=4096,dtype=bf16,BLOCK_M=16,gemm=gemm1":
                 {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "SPLIT_K": 1, ...}}}

Keys are static shapes: experts, the GEMM's N and K, the dtype, the plan's ``BLOCK_M``
(the regime) and the GEMM (``gemm1``, ``gemm2``, ``dgemm2``, ``dgemm1``). A table
applies to the GPUs of its compute capability; ``moe-kernels tune`` writes one
(:func:`write_table`, ``"measured": true``). Only measured tables are looked up (the
shipped ones, newest ``version`` first): an entry replaces the heuristic's tile fields
(never ``BLOCK_M``, which is the plan's); a missing key keeps the heuristic.

The shipped files (H100/H200, A100, B200) start as *snapshots* of the heuristic for the
benchmark's model shapes (``"measured": false``): no GPU has run them yet, so they
override nothing; a test keeps them equal to the heuristic, and the first GPU run's
``moe-kernels tune`` output replaces them (``python -m
moe_kernels.backends.triton.tune --snapshot`` regenerates the snapshots).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .gemm_config import GemmConfig

__all__ = ["TABLE_DIR", "entry_key", "load_table", "lookup", "write_table", "TILE_FIELDS"]

TABLE_DIR = Path(__file__).with_name("tables")
TILE_FIELDS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "SPLIT_K", "USE_TMA", "PERSISTENT")
GEMMS = ("gemm1", "gemm2", "dgemm2", "dgemm1")
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def entry_key(num_experts: int, n: int, k: int, dtype: torch.dtype | str, block_m: int, gemm: str) -> str:
    d = dtype if isinstance(dtype, str) else _DTYPES.get(dtype, str(dtype))
    return f"E={num_experts},N={n},K={k},dtype={d},BLOCK_M={block_m},gemm={gemm}"


def _check_entry(key: str, entry: dict, where: str) -> dict:
    if not isinstance(entry, dict) or set(entry) - set(TILE_FIELDS):
        raise ValueError(f"{where}: entry {key!r}: expected fields among {list(TILE_FIELDS)}, got {entry!r}")
    GemmConfig(**entry)  # the config's own checks (powers of two, split vs persistent)
    return entry


def load_table(path: str | Path) -> dict:
    """A table from ``path``, checked: a ValueError names what is wrong."""
    path = Path(path)
    with open(path) as f:
        data = json.load(f)
    where = str(path)
    for field in ("version", "gpu", "capability", "num_sms", "measured", "source", "entries"):
        if field not in data:
            raise ValueError(f"{where}: missing field {field!r}")
    cap = data["capability"]
    if not (isinstance(cap, list) and len(cap) == 2 and all(isinstance(v, int) for v in cap)):
        raise ValueError(f"{where}: capability: expected [major, minor], got {cap!r}")
    data["entries"] = {k: _check_entry(k, v, where) for k, v in data["entries"].items()}
    return data


@functools.lru_cache(maxsize=None)
def _shipped() -> tuple[dict, ...]:
    if not TABLE_DIR.is_dir():
        return ()
    tables = [load_table(p) for p in sorted(TABLE_DIR.glob("*.json"))]
    return tuple(sorted((t for t in tables if t["measured"] is True), key=lambda t: -int(t["version"])))


def lookup(capability: tuple[int, int], num_sms: int, num_experts: int, n: int, k: int, dtype: torch.dtype,
           block_m: int, gemm: str, tables: tuple[dict, ...] | None = None) -> dict | None:
    """The tile fields of a table entry for this GPU and GEMM, or None (use the heuristic)."""
    key = entry_key(num_experts, n, k, dtype, block_m, gemm)
    for table in (_shipped() if tables is None else tables):
        if tuple(table["capability"]) == tuple(capability) and key in table["entries"]:
            return dict(table["entries"][key])
    return None


def write_table(path: str | Path, *, gpu: str, capability: tuple[int, int], num_sms: int, source: str,
                entries: dict[str, dict], measured: bool = True, version: int = 1) -> dict:
    """Write a table (``moe-kernels tune``); returns it as :func:`load_table` reads it back."""
    data = {"version": version, "gpu": gpu, "capability": list(capability), "num_sms": int(num_sms),
            "measured": bool(measured), "source": source,
            "entries": {k: dict(v) for k, v in sorted(entries.items())}}
    for key, entry in data["entries"].items():
        _check_entry(key, entry, str(path))
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    return load_table(path)
