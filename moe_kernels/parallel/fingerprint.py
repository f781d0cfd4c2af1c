"""Cross-rank configuration check for expert parallelism.

Every rank of an expert-parallel group must build the same layer: the same experts,
sizes, dtype, router and router options. When they do not, the collectives that follow
disagree in size (gloo aborts the process with "Received data size doesn't match"), in
order (different routers run different collectives: both ranks wait until the
process-group timeout and the group is left unusable), or only in meaning (bf16 rows
read as fp16, a per-rank "global" aux loss) - silently wrong.

So before its first collective a layer exchanges a *fingerprint*: a fixed-length int64
vector (the same length for every configuration, so the exchange itself can never
disagree in size), one entry per field below. Every rank gathers every rank's vector
and compares them on the host; on a difference every rank raises the same
``ValueError`` naming the first field that differs and each rank's value, and the group
stays usable. :class:`~moe_kernels.parallel.ExpertParallelMoE` does this once, at its
first forward, and then sends a 31-bit hash of its fingerprint in every forward's count
exchange, so a later change (``layer.to(torch.bfloat16)`` on one rank) is caught before
any expert row travels; the functional :func:`~moe_kernels.parallel.expert_parallel_moe`
exchanges it on every call (``check_ranks=False`` skips it).
"""

from __future__ import annotations

import struct
import zlib

import torch

from .._checks import FLOAT_DTYPES
from ..activations import ACTIVATIONS
from ..routing import ROUTERS
from .comm import all_gather_stack

__all__ = ["FIELDS", "fingerprint", "layer_fingerprint", "options_fingerprint", "fingerprint_hash", "check_fingerprint"]

VERSION = 1
# Every field, in the order they are compared (the first difference is reported).
FIELDS = ("version", "num_experts", "num_local_experts", "hidden_size", "intermediate_size", "dtype", "router",
          "top_k", "renormalize", "n_group", "topk_group", "routed_scaling_factor", "capacity_factor", "jitter_eps",
          "noise_epsilon", "selection_bias", "activation", "alpha", "limit", "interleaved", "bias", "aux_loss_coef",
          "z_loss_coef", "z_loss", "training", "router_options")
_NONE = -(2 ** 63) + 7  # "not set" (an option the router does not take, or None)
_ROUTERS = tuple(ROUTERS)
_DTYPES = tuple(FLOAT_DTYPES)
# Fields whose int is a code: decoded for the error message.
_CODES = {"router": _ROUTERS, "activation": ACTIVATIONS, "dtype": tuple(str(d).replace("torch.", "") for d in _DTYPES)}
_BOOLS = ("renormalize", "selection_bias", "interleaved", "bias", "z_loss", "training")
_FLOATS = ("routed_scaling_factor", "capacity_factor", "jitter_eps", "noise_epsilon", "alpha", "limit",
           "aux_loss_coef", "z_loss_coef")


def _float_bits(v) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _code(table, v) -> int:
    if v in table:
        return table.index(v)
    return 1000 + zlib.crc32(repr(v).encode())  # unknown: still comparable


def _encode(name: str, v) -> int:
    if v is None:
        return _NONE
    if name == "dtype":
        return _code(_DTYPES, v)
    if name in ("router", "activation"):
        return _code(_CODES[name], v)
    if name in _FLOATS:
        try:
            return _float_bits(v)
        except (TypeError, ValueError):  # not a number: the router raises on it; still comparable
            return zlib.crc32(repr(v).encode())
    if isinstance(v, (bool, int)):
        return int(v)
    return zlib.crc32(repr(v).encode())


def _decode(name: str, v: int):
    if v == _NONE:
        return None
    if name in _CODES and 0 <= v < len(_CODES[name]):
        return _CODES[name][v]
    if name in _FLOATS:
        return struct.unpack("<d", struct.pack("<q", v))[0]
    if name in _BOOLS and v in (0, 1):
        return bool(v)
    return v


def fingerprint(**fields) -> list[int]:
    """The int64 vector of ``fields`` (names from :data:`FIELDS`; missing ones are "not set")."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"fingerprint: unknown fields {sorted(unknown)}")
    fields["version"] = VERSION
    return [_encode(n, fields.get(n)) for n in FIELDS]


def options_fingerprint(router: str, options: dict, **fields) -> list[int]:
    """The fingerprint of a functional call: ``router``, its keyword ``options`` (tensors:
    presence only; per-token ones ignored) and ``fields``."""
    scalar = ("top_k", "renormalize", "n_group", "topk_group", "routed_scaling_factor", "capacity_factor",
              "noise_epsilon")
    per_token = ("noise_logits", "noise")
    names = sorted(k for k in options if k not in per_token)
    return fingerprint(router=router, **{k: options[k] for k in scalar if k in options},
                       selection_bias=options.get("bias") is not None, router_options=",".join(names), **fields)


def layer_fingerprint(config, dtype: torch.dtype, num_local_experts: int, training: bool) -> list[int]:
    """The fingerprint of an :class:`~moe_kernels.parallel.ExpertParallelMoE`: its
    config's fields that shape the exchanges or the result, and its weights' dtype."""
    c = config
    from ..layer import router_options  # the router's own options only: the others are ignored, not compared

    opts = router_options(c)
    return fingerprint(
        num_experts=c.num_experts, num_local_experts=num_local_experts, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, dtype=dtype, router=c.router, top_k=opts.get("top_k"),
        renormalize=opts.get("renormalize"), n_group=opts.get("n_group"), topk_group=opts.get("topk_group"),
        routed_scaling_factor=opts.get("routed_scaling_factor"), capacity_factor=opts.get("capacity_factor"),
        jitter_eps=c.jitter_eps if c.router == "switch" else None, activation=c.activation,
        alpha=c.alpha if c.activation == "swiglu_oai" else None, limit=c.limit if c.activation == "swiglu_oai" else None,
        bias=c.bias, aux_loss_coef=c.aux_loss_coef, z_loss_coef=c.z_loss_coef,
        training=training if c.router == "noisy_topk" or (c.router == "switch" and c.jitter_eps) else None)


def fingerprint_hash(fp: list[int]) -> int:
    """A 31-bit hash of a fingerprint (sent in every forward's count exchange)."""
    return zlib.crc32(struct.pack(f"<{len(fp)}q", *fp)) & 0x7FFFFFFF


def check_fingerprint(fp: list[int], group, device, what: str = "layer") -> None:
    """Gather every rank's fingerprint (one ``all_gather`` of ``len(FIELDS)`` int64 and a
    host sync) and raise the same ``ValueError`` on every rank when they differ."""
    mine = torch.tensor(fp, dtype=torch.long, device=device)
    rows = all_gather_stack(mine, group).tolist()
    for i, name in enumerate(FIELDS):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {_decode(name, v)!r}" for r, v in enumerate(values))
            raise ValueError(f"{name}: expected the same value on every rank of the expert-parallel group (each rank "
                             f"must build the same {what}), got {per_rank}")
