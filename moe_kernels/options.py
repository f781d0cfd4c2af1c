"""Typed options of the expert computation, and the one place environment variables are read.

What a user can tune is a field of :class:`KernelOptions`, reachable from
:class:`~moe_kernels.MoEConfig` (fields of the same names), :func:`~moe_kernels.fused_experts`
and :func:`~moe_kernels.moe` (keywords of the same names), and passed down explicitly to
the backend: nothing below this module reads the environment.

========================  =====================  ==============================================
option                    environment default    meaning
========================  =====================  ==============================================
``combine``               ``MOE_KERNELS_COMBINE``  ``"auto"`` (default: the backend picks
                                                 from static shapes), ``"fused"`` (per-token
                                                 sum in GEMM2's epilogue) or ``"separate"``
                                                 (its own kernel); deterministic, same bits
``recompute_h``           ``MOE_KERNELS_RECOMPUTE_H``  save no expert pre-activation for
                                                 backward; recompute it (less memory,
                                                 about +20% FLOPs)
``gemm_config``           ``MOE_KERNELS_TRITON_CONFIG``  pin fields of the Triton GEMM tiles,
                                                 e.g. ``{"BLOCK_N": 128, "num_warps": 8}``;
                                                 ``BLOCK_M`` also sets the plan's padding
``autotune``              ``MOE_KERNELS_AUTOTUNE``  let ``triton.autotune`` pick BLOCK_K,
                                                 warps and stages on the GPU
========================  =====================  ==============================================

Two more variables are read here and nowhere else: ``MOE_KERNELS_DEBUG=1`` (value checks on
GPU tensors too, :func:`debug_checks`) and ``MOE_KERNELS_HF_BACKEND`` (the default backend of
the HF transformers integration, :func:`hf_backend_default`).

Precedence: an explicit keyword (or config field) set to a value wins; ``None`` means "the
process default", which is :func:`set_defaults`' value if one was set (or
:func:`override`'s inside its ``with`` block), else the environment's, else the built-in
default. The process defaults are the small pin/override API of the kind triton_kernels'
``opt_flags`` offers::

    import moe_kernels
    moe_kernels.options.set_defaults(gemm_config={"BLOCK_N": 128})   # every later call
    with moe_kernels.options.override(combine="separate"):           # this block only
        y = layer(x)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields, replace
from typing import Iterator, Mapping

__all__ = ["KernelOptions", "GEMM_FIELDS", "COMBINE_MODES", "resolve", "set_defaults", "reset_defaults", "override",
           "env_defaults", "debug_checks", "hf_backend_default"]

ENV_COMBINE = "MOE_KERNELS_COMBINE"
ENV_RECOMPUTE = "MOE_KERNELS_RECOMPUTE_H"
ENV_CONFIG = "MOE_KERNELS_TRITON_CONFIG"
ENV_AUTOTUNE = "MOE_KERNELS_AUTOTUNE"
ENV_DEBUG = "MOE_KERNELS_DEBUG"
ENV_HF_BACKEND = "MOE_KERNELS_HF_BACKEND"

COMBINE_MODES = ("auto", "fused", "separate")
GEMM_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _check_gemm_pin(value: object, source: str = "gemm_config") -> tuple[tuple[str, int], ...]:
    """A GEMM config pin as sorted ``(field, int)`` pairs (hashable: options key caches)."""
    if value is None:
        return ()
    if hasattr(value, "__dataclass_fields__"):  # a full GemmConfig
        value = {f: getattr(value, f) for f in GEMM_FIELDS}
    elif isinstance(value, tuple):  # the normalised form itself
        value = dict(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: expected a mapping of {list(GEMM_FIELDS)} to ints, or a GemmConfig, "
                         f"got {type(value).__name__}")
    out = {}
    for key, v in value.items():
        if key not in GEMM_FIELDS:
            raise ValueError(f"{source}: expected fields among {list(GEMM_FIELDS)}, got {key!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{source}: expected a positive int for {key}, got {v!r}")
        if key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps") and v & (v - 1):
            raise ValueError(f"{source}: expected a power of two for {key}, got {v}")
        if key in ("BLOCK_M", "BLOCK_N", "BLOCK_K") and v < 16:
            raise ValueError(f"{source}: expected {key} >= 16 (tl.dot's minimum), got {v}")
        out[key] = v
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class KernelOptions:
    """Tunables of the expert computation; ``None`` = the process default (see module doc).

    ``combine``: ``"auto"`` | ``"fused"`` | ``"separate"`` (``"auto"``: the triton backend
    picks per call from static shapes, ``backends/triton/configs.combine_mode``); ``recompute_h``: bool; ``gemm_config``: a
    mapping of :data:`GEMM_FIELDS` to ints (any subset) or a full ``GemmConfig``;
    ``autotune``: bool. Backends that have no such knob ignore it (the torch backend
    has none of them)."""

    combine: str | None = None
    recompute_h: bool | None = None
    gemm_config: tuple[tuple[str, int], ...] | Mapping[str, int] | None = None
    autotune: bool | None = None

    def __post_init__(self) -> None:
        if self.combine is not None and self.combine not in COMBINE_MODES:
            raise ValueError(f"combine: expected one of {list(COMBINE_MODES)}, got {self.combine!r}")
        for name in ("recompute_h", "autotune"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name}: expected a bool (or None for the default), got {v!r}")
        if self.gemm_config is not None:
            object.__setattr__(self, "gemm_config", _check_gemm_pin(self.gemm_config))

    @property
    def gemm_pin(self) -> dict[str, int]:
        """The pinned GEMM fields as a dict (empty: nothing pinned)."""
        return dict(self.gemm_config or ())

    def merged_over(self, base: "KernelOptions") -> "KernelOptions":
        """These options, with every ``None`` field taken from ``base``."""
        return replace(base, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})


_BUILTIN = KernelOptions(combine="auto", recompute_h=False, gemm_config=(), autotune=False)


def _flag(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    if raw.strip() not in ("0", "1"):
        raise ValueError(f"{name}: expected 0 or 1, got {raw!r}")
    return raw.strip() == "1"


def _env_gemm_pin() -> dict[str, int] | None:
    text = os.environ.get(ENV_CONFIG, "").strip()
    if not text:
        return None
    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or key not in GEMM_FIELDS:
            raise ValueError(f"{ENV_CONFIG}: expected comma-separated NAME=INT with NAME in {list(GEMM_FIELDS)}, "
                             f"got {item!r}")
        try:
            out[key] = int(val)
        except ValueError:
            raise ValueError(f"{ENV_CONFIG}: expected an int for {key}, got {val.strip()!r}") from None
    _check_gemm_pin(out, ENV_CONFIG)
    return out


def env_defaults() -> KernelOptions:
    """The defaults the environment supplies (``None`` where a variable is unset).
    Read on every call, so tests and launchers may set variables late."""
    combine = os.environ.get(ENV_COMBINE, "").strip() or None
    if combine is not None and combine not in COMBINE_MODES:
        raise ValueError(f"{ENV_COMBINE}: expected one of {list(COMBINE_MODES)}, got {combine!r}")
    return KernelOptions(combine=combine, recompute_h=_flag(ENV_RECOMPUTE), gemm_config=_env_gemm_pin(),
                         autotune=_flag(ENV_AUTOTUNE))


_process: list[KernelOptions] = [KernelOptions()]


def set_defaults(**fields_: object) -> None:
    """Set process-wide defaults (fields of :class:`KernelOptions`); they win over the
    environment, and explicit keywords win over them. ``reset_defaults()`` undoes it."""
    _process[-1] = KernelOptions(**fields_).merged_over(_process[-1])


def reset_defaults() -> None:
    """Forget every :func:`set_defaults` value (the environment's defaults apply again)."""
    _process[:] = [KernelOptions()]


@contextlib.contextmanager
def override(**fields_: object) -> Iterator[KernelOptions]:
    """Within the ``with`` block, these fields are the process defaults."""
    _process.append(KernelOptions(**fields_).merged_over(_process[-1]))
    try:
        yield _process[-1]
    finally:
        _process.pop()


def resolve(options: KernelOptions | None = None, **fields_: object) -> KernelOptions:
    """Complete options (no ``None`` left): ``fields_`` (keywords; ``None`` = unset) over
    ``options`` over the process defaults over the environment over the built-ins."""
    explicit = KernelOptions(**{k: v for k, v in fields_.items() if v is not None})
    if options is not None:
        if not isinstance(options, KernelOptions):
            raise ValueError(f"options: expected a moe_kernels.options.KernelOptions, got {type(options).__name__}")
        explicit = explicit.merged_over(options)
    return explicit.merged_over(_process[-1]).merged_over(env_defaults()).merged_over(_BUILTIN)


def debug_checks() -> bool:
    """``MOE_KERNELS_DEBUG=1``: run value checks (they synchronise) on GPU tensors too."""
    return os.environ.get(ENV_DEBUG, "0") == "1"


def hf_backend_default() -> str:
    """Backend of the HF integration when :func:`register` was given none: ``MOE_KERNELS_HF_BACKEND``
    or ``"auto"``."""
    return os.environ.get(ENV_HF_BACKEND, "auto") or "auto"
