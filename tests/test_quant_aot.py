"""Ahead-of-time compilation of every quantized-experts kernel variant for sm_90 and
sm_100 (and sm_80 for the dequantize-in-registers paths), no GPU needed.

Checks: it compiles (sm_80: the W8A16 and fp4 variants, fp8 bits decoded arithmetically
since sm_80 has no fp8 type); W8A8 uses the FP8 tensor cores (sm_90: ``wgmma ... e4m3.e4m3``,
sm_100: ``tcgen05.mma ... kind::f8f6f4``); the register-dequantized paths use the bf16
MMA (``wgmma ... bf16`` / ``tcgen05.mma ... kind::f16``); shared memory fits; ptxas
reports no local memory (spills) when cuobjdump is available. Signatures carry the
divisibility-by-16 attribute the JIT gives aligned pointers and sizes, and strides of 1
become constexprs, as at run time (without them the compiler sees unaligned accesses and
reports false spills).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import tempfile

import pytest

from triton_interp import import_or_skip

import_or_skip()

# (label, kernel, pointer types, constexprs) of the launches quant_experts.py makes at the
# GPU config (BLOCK_M = 64), for H = 4096, I = 1536 (both multiples of 16).
_BASE = dict(A_TOKEN=True, A_FP8=False, ACT_Q=0, W_FMT=1, SCALE_E8M0=False, BN_S=128, BK_S=128, FP8_NATIVE=True,
             EPI_ACT=True,
             ACT=1, GATED=True, INTERLEAVED=False, HAS_BIAS=False, ROW_SCALE=False, QUANT_OUT=False, BLOCK_M=64,
             BLOCK_N=64, BLOCK_K=128)
_PTRS = dict(a_ptr="*bf16", a_scale_ptr="*fp32", b_ptr="*u8", bs_ptr="*fp32", act_scale_ptr="*fp32",
             bias_ptr="*bf16", c_ptr="*bf16", c_scale_ptr="*fp32", padded_slot_ptr="*i32", slot_token_ptr="*i32",
             slot_weight_ptr="*fp32", block_expert_ptr="*i32")


def _v(label, ptrs=None, **consts):
    return label, "_qgemm_fwd_kernel", dict(_PTRS, **(ptrs or {})), dict(_BASE, **consts)


VARIANTS = [
    _v("fp8-w8a8-gemm1", {"c_ptr": "*fp8e4nv"}, ACT_Q=1, QUANT_OUT=True, BLOCK_N=128),
    _v("fp8-w8a8-gemm2", {"a_ptr": "*u8", "c_ptr": "*fp32"}, A_TOKEN=False, A_FP8=True, ACT_Q=1, EPI_ACT=False,
       GATED=False, ROW_SCALE=True),
    _v("fp8-w8a8-ue8m0-gemm1", {"c_ptr": "*fp8e4nv", "bs_ptr": "*u8"}, ACT_Q=1, QUANT_OUT=True, BLOCK_N=128,
       SCALE_E8M0=True),
    _v("fp8-static-gemm1", {}, ACT_Q=2),
    _v("fp8-static-gemm2", {"c_ptr": "*fp32"}, A_TOKEN=False, ACT_Q=2, EPI_ACT=False, GATED=False, ROW_SCALE=True),
    _v("fp8-w8a16-gemm1", {}, ACT_Q=0),
    _v("mxfp4-oai-gemm1", {"bs_ptr": "*u8"}, W_FMT=2, SCALE_E8M0=True, BN_S=1, BK_S=32, ACT=4, INTERLEAVED=True,
       HAS_BIAS=True, BLOCK_K=64),
    _v("mxfp4-gemm2", {"bs_ptr": "*u8", "c_ptr": "*fp32"}, A_TOKEN=False, W_FMT=2, SCALE_E8M0=True, BN_S=1, BK_S=32,
       EPI_ACT=False, GATED=False, HAS_BIAS=True, ROW_SCALE=True, BLOCK_K=64),
    _v("fp4-float-scales-gemm1", {}, W_FMT=2, BN_S=1, BK_S=32, BLOCK_K=64),
]
# sm_80 has no fp8 type: W8A16 decodes the e4m3 bits, fp4 as everywhere
# (the launcher picks BLOCK_K = 32 and 4 warps there).
SM80 = [(label + ("" if label.endswith("sm80") else "-sm80"), k, p, dict(c, FP8_NATIVE=False, BLOCK_K=32))
        for label, k, p, c in [
            _v("fp8-w8a16-gemm1", {}, ACT_Q=0),
            _v("fp8-w8a16-gemm2", {"c_ptr": "*fp32"}, A_TOKEN=False, EPI_ACT=False, GATED=False, ROW_SCALE=True),
        ] + [v for v in VARIANTS if v[0].startswith(("mxfp4", "fp4"))]]
W8A8 = {"fp8-w8a8-gemm1", "fp8-w8a8-gemm2", "fp8-w8a8-ue8m0-gemm1", "fp8-static-gemm1", "fp8-static-gemm2"}
ARCHS = (90, 100)


def _compile(job):
    label, kname, ptrs, consts, arch = job
    from moe_kernels.backends.triton.quant_gemm import num_warps_for
    warps = num_warps_for(consts) if kname == "_qgemm_fwd_kernel" else 4
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aot import _resource_usage, shared_limit
    from moe_kernels.backends.triton import quant_experts, quant_gemm

    kern = getattr(quant_gemm if kname == "_qgemm_fwd_kernel" else quant_experts, kname)
    sig, attrs, ce = {}, {}, dict(consts)
    for idx, n in enumerate(kern.arg_names):
        if n in ce:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = ptrs[n]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif n in ("stride_bk",):  # unit stride of the quantized storage: the JIT's constexpr 1
            sig[n], ce[n] = "constexpr", 1
        elif n in ("alpha", "limit", "eps"):
            sig[n] = "fp32"
        else:  # sizes and strides: multiples of 16 at these shapes
            sig[n] = "i32"
            attrs[(idx,)] = [["tt.divisibility", 16]]
    try:
        k = triton.compile(ASTSource(kern, sig, ce, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": 3})
    except Exception as exc:  # noqa: BLE001 - reported by the test
        return {"label": label, "arch": arch, "error": f"{type(exc).__name__}: {exc} | cause: {exc.__cause__!r}"[-3000:]}
    regs, local = _resource_usage(k.asm.get("cubin", b""), k.metadata.name)
    ptx = k.asm["ptx"]
    mma = sorted(set(re.findall(r"(wgmma\.mma_async[\w.]*|tcgen05\.mma[\w.:]*|mma\.sync[\w.]*)", ptx)))
    return {"label": label, "arch": arch, "shared": int(k.metadata.shared), "limit": shared_limit(arch), "mma": mma,
            "local": local, "regs": regs}


def _worker_main(jobs_path, out_path):
    with open(jobs_path, "rb") as f:
        jobs = pickle.load(f)
    with open(out_path, "wb") as f:
        pickle.dump([_compile(j) for j in jobs], f)


@pytest.fixture(scope="module")
def compiled():
    jobs = [(label, k, p, c, arch) for label, k, p, c in VARIANTS for arch in ARCHS]
    jobs += [(label, k, p, c, 80) for label, k, p, c in SM80]
    jobs.append(("post-norm-combine", "_post_norm_combine_fwd_kernel",
                 {"y_ptr": "*bf16", "w_ptr": "*bf16", "token_slots_ptr": "*i32", "slot_weight_ptr": "*fp32",
                  "out_ptr": "*fp32"}, {"INPUT_SCALED": True, "BLOCK_H": 1024}, 90))
    env = dict(os.environ, TRITON_INTERPRET="0")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in sys.path if p])
    workers = 2
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for w in range(workers):
            jp, op = os.path.join(d, f"j{w}.pkl"), os.path.join(d, f"o{w}.pkl")
            with open(jp, "wb") as f:
                pickle.dump(jobs[w::workers], f)
            cmd = [sys.executable, "-c", f"from test_quant_aot import _worker_main; _worker_main({jp!r}, {op!r})"]
            procs.append((op, subprocess.Popen(cmd, env=env, cwd=here, stderr=subprocess.PIPE, text=True)))
        out = []
        for op, p in procs:
            _, err = p.communicate()
            assert p.returncode == 0, err[-3000:]
            with open(op, "rb") as f:
                out += pickle.load(f)
    return {(r["label"], r["arch"]): r for r in out}


@pytest.mark.parametrize("label", [v[0] for v in VARIANTS])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_variant_compiles(compiled, label, arch):
    r = compiled[(label, arch)]
    assert "error" not in r, r.get("error")
    assert r["shared"] <= r["limit"], r
    assert r["local"] in (None, 0), f"{label} sm_{arch}: {r['local']} bytes of local memory (spills)"
    mma = " ".join(r["mma"])
    if arch == 90:
        assert "wgmma.mma_async" in mma, r["mma"]
        want = ".e4m3.e4m3" if label in W8A8 else ".bf16.bf16"
        assert want in mma, (label, r["mma"])
    else:
        want = "kind::f8f6f4" if label in W8A8 else "kind::f16"
        assert "tcgen05.mma" in mma and want in mma, (label, r["mma"])


@pytest.mark.parametrize("label", [v[0] for v in SM80])
def test_dequantize_in_registers_variants_compile_for_sm80(compiled, label):
    r = compiled[(label, 80)]
    assert "error" not in r, r.get("error")
    assert r["shared"] <= r["limit"], r
    assert r["local"] in (None, 0), f"{label} sm_80: {r['local']} bytes of local memory (spills)"
    assert any("mma.sync" in m and "bf16" in m for m in r["mma"]), r["mma"]


def test_post_norm_combine_compiles(compiled):
    r = compiled[("post-norm-combine", 90)]
    assert "error" not in r, r.get("error")
    assert r["local"] in (None, 0)
