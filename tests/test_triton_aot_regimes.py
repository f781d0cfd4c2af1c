"""Ahead-of-time compilation of each GEMM regime's config (configs.py) at real model
sizes, no GPU needed: the forward's GEMM1 and GEMM2 launches of a layer are recorded
(test_triton_aot_gemm's machinery: Triton's JIT specialisation, divisibility attrs) with
the model's config for the regime, and compiled.

Checks, per regime and arch: it compiles, ptxas reports no register spills, shared
memory fits the arch; decode (BLOCK_M 16) and small (32) run on ``mma.sync`` (Triton
needs 64 rows for wgmma: the documented fallback) and really split K; the sm_90 medium
and prefill configs use wgmma and TMA (``cp.async.bulk.tensor`` in the PTX), the
sm_100 ones tcgen05 and TMA; sm_80 never uses TMA. sm_90 runs by default; sm_80 and
sm_100 under ``-m slow`` (each compile takes tens of seconds on a small CPU).
"""

from __future__ import annotations

import pytest

from triton_interp import import_or_skip

import_or_skip()

from moe_kernels.backends.triton import configs  # noqa: E402
from test_triton_aot_gemm import _compile_all, _variants, _where  # noqa: E402

# Recorded sizes map to the model's: H = 256, I = 64 (so 2I = 128 is unambiguous; K % 64 == 0 for TMA).
_H, _I = 256, 64
MODELS = {"mixtral": (8, 4096, 14336), "qwen3": (128, 2048, 768), "gpt-oss": (128, 2880, 2880)}

# (model, BLOCK_M, T*k of the regime, variant extras)
REGIMES = {
    "decode-mixtral": ("mixtral", 16, 2, {}),            # GEMM2 splits K (128 CTAs unsplit)
    "decode-qwen3": ("qwen3", 16, 8, {}),                # GEMM1 (gate + up tiles) splits K too
    "small-mixtral": ("mixtral", 32, 256, {}),
    "medium-qwen3": ("qwen3", 64, 16384, {}),
    "prefill-mixtral": ("mixtral", 128, 32768, {}),
    "prefill-gpt-oss": ("gpt-oss", 128, 65536, {"act": "swiglu_oai", "interleaved": True, "transposed": True}),
    # Training at prefill: the backward's four GEMMs (act_bwd with its heavy epilogue) too.
    "prefill-mixtral-bwd": ("mixtral", 128, 32768, {"backward": True}),
    "decode-qwen3-bwd": ("qwen3", 16, 8, {"backward": True}),
}


def _model_config(model, num_slots):
    e, h, i = MODELS[model]
    size = {_H: h, _I: i, 2 * _I: 2 * i}

    def cfg(_e, n, k, dtype, capability, block_m, **kw):
        kw = dict(kw, num_slots=num_slots, num_sms=132)
        return configs.gemm_config(e, size[n], size[k], dtype, capability, block_m, **kw)
    return cfg


def _jobs(archs) -> list:
    caps = {80: (8, 0), 90: (9, 0), 100: (10, 0)}
    jobs = []
    with pytest.MonkeyPatch.context() as mp:
        for name, (model, bm, slots, extra) in REGIMES.items():
            for arch in archs:
                extra = dict(extra)
                fwd_only = not extra.pop("backward", False)
                variant = {name: dict(extra, h=_H, i=_I, block_m=bm, forward_only=fwd_only, combine="fused")}
                for v in _variants(mp, variant, caps[arch], _model_config(model, slots)).values():
                    if v[1] == "_grouped_gemm_kernel":
                        jobs.append((*v, arch, "bf16"))
    return jobs


def _check(jobs, results):
    errors = [r for r in results if "error" in r]
    assert not errors, "\n".join(f"{_where(r)}: {r['error']}" for r in errors)
    seen = set()
    for job, r in zip(jobs, results):
        spec, arch = job[2], job[5]
        bm, split = spec["BLOCK_M"][1], spec["SPLIT_K"][1]
        tma, persistent = spec["USE_TMA"][1], spec["PERSISTENT"][1]
        regime = job[0].split(":")[0]
        seen.add((regime, arch))
        where = f"{_where(r)} BLOCK_M={bm} split={split} tma={tma} persistent={persistent}"
        assert r["shared"] <= r["limit"], f"{where}: {r['shared']} B of shared memory > {r['limit']}"
        # The heuristic's estimate is what the compiler allocates (+ TMA barriers).
        b_tiles = 2 if (spec["EPI"][1] == 1 and spec["TWO_DOTS"][1]) else 1
        cap = {80: (8, 0), 90: (9, 0), 100: (10, 0)}[arch]
        est = configs.pipeline_shared_bytes(cap, bm, spec["B_TILE_N"][1], spec["BLOCK_K"][1], 2, b_tiles, job[4])
        assert est <= r["shared"] <= est + 1024, f"{where}: estimate {est} B, compiled {r['shared']} B"
        if r["local"] is not None:
            assert r["local"] == 0, f"{where}: {r['local']} B of local memory (spills), {r['regs']} regs"
        if bm <= 32:
            assert r["mma_sync"] and not r["wgmma"], f"{where}: 16/32-row tiles run on mma.sync"
            assert not tma and not r["tma"], where
        if arch == 90 and bm >= 64:
            assert r["wgmma"] and tma and r["tma"], f"{where}: expected wgmma + TMA (cp.async.bulk.tensor)"
        if arch == 100 and bm >= 64:
            assert r["tcgen05"] and r["tma"], f"{where}: expected tcgen05 + TMA"
        if arch == 80:
            assert not r["tma"], f"{where}: no TMA on sm_80"
        if regime.startswith("prefill") and arch in (90, 100):
            # The activation backward (EPI 2, five fp32 tiles) keeps one tile per program.
            assert bm == 128 and persistent == (spec["EPI"][1] != 2), where
        if bm == 16:  # decode: at least two CTAs per SM (registers and shared memory)
            assert r["regs"] is None or r["regs"] * 32 * job[3] * 2 <= 65536, where
            assert 2 * (r["shared"] + 1024) <= 233472, where
    # Split-K really reaches the decode kernels: GEMM2 of Mixtral, both GEMMs of Qwen3.
    splits = {(job[0].split(":")[0], job[2]["EPI"][1]): job[2]["SPLIT_K"][1] for job in jobs}
    for key in (("decode-mixtral", 0), ("decode-qwen3", 0), ("decode-qwen3", 1)):
        assert splits.get(key, 1) > 1, (key, splits)
    return seen


def test_regime_configs_compile_for_sm90():
    jobs = _jobs([90])
    seen = _check(jobs, _compile_all(jobs))
    assert {r for r, _ in seen} == set(REGIMES)


@pytest.mark.slow
def test_regime_configs_compile_for_sm80_and_sm100():
    jobs = _jobs([80, 100])
    seen = _check(jobs, _compile_all(jobs))
    assert seen == {(r, a) for r in REGIMES for a in (80, 100)}
