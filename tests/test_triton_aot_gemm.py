"""Ahead-of-time compilation of every grouped-GEMM and combine kernel variant that the
triton backend launches (forward, backward, recompute, separate combine; gated
concatenated and interleaved, plain activations; transposed weights) for sm_90 and
sm_80, with fp16 and bf16 signatures, no GPU needed.

The variants are not listed by hand: a forward+backward of each configuration runs
with kernel launches *recorded* (not executed), and each distinct launch is compiled
with the specialisation Triton's JIT would give it at run time (an int equal to 1
becomes a constexpr, ints and pointers divisible by 16 get the divisibility attribute),
so what compiles here is what a GPU would compile. Checks: it compiles, its shared
memory fits the architecture (aot.shared_limit), the GEMMs use wgmma on sm_90, and
ptxas reports no register spills for the GEMMs.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile

import pytest
import torch

from triton_interp import DEVICE, import_or_skip

import_or_skip()

import moe_kernels as mk  # noqa: E402
from moe_kernels.params import expert_params  # noqa: E402
from moe_kernels.triton import ops  # noqa: E402

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
       torch.int64: "i64"}
_OURS = ("_grouped_gemm_fwd_kernel", "_combine_fwd_kernel")


def _specialize(v):
    """(type, constexpr value or None, divisible by 16) as Triton's JIT specialises ``v``."""
    if isinstance(v, torch.Tensor):
        return "*" + _DT[v.dtype], None, v.data_ptr() % 16 == 0
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return "constexpr", v, False
    if isinstance(v, int):
        if v == 1:
            return "constexpr", 1, False
        return ("i32" if -2**31 <= v < 2**31 else "i64"), None, v % 16 == 0
    if isinstance(v, float):
        return "fp32", None, False
    raise TypeError(type(v))


def _record(monkeypatch, variant: dict) -> list[tuple]:
    """Launches of one forward+backward, as (kernel name, bound arguments, names of the
    constexpr parameters, num_warps, num_stages)."""
    import inspect

    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    import moe_kernels._checks as checks
    import moe_kernels.plan as plan_mod
    import moe_kernels.routing as routing_mod
    for mod in (checks, plan_mod, routing_mod):  # outputs are never computed: skip value checks
        monkeypatch.setattr(mod, "value_checks_enabled", lambda t: False)
    seen = []

    def run(self, *args, grid, warmup=False, **kw):
        name = self.fn.__name__
        if name in _OURS:
            sig = inspect.signature(self.fn).parameters
            params = list(sig)
            bound = dict(zip(params, args))
            bound.update({k: v for k, v in kw.items() if k in params})
            consts = {k for k in params if "constexpr" in str(sig[k].annotation)}
            seen.append((name, bound, consts, kw.get("num_warps", 4), kw.get("num_stages", 3)))
        return None

    for cls in (interp.InterpretedFunction, JITFunction):
        monkeypatch.setattr(cls, "run", run)
    t, h, i, e = 64, 256, 128, 8
    act = variant.get("act", "swiglu")
    n = 2 if act in ("swiglu", "swiglu_oai") else 1
    transposed = variant.get("transposed", False)
    f16 = dict(device=DEVICE, dtype=torch.float16)  # 16-bit configs; bf16 swaps the pointer types at compile time
    w13 = torch.randn(e, n * i, h, **f16)
    w2 = torch.randn(e, h, i, **f16)
    if transposed:
        w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    w13.requires_grad_(True)
    w2.requires_grad_(True)
    b13 = torch.zeros(e, n * i, **f16, requires_grad=True)
    b2 = torch.zeros(e, h, **f16, requires_grad=True)
    params = expert_params(w13, w2, b13, b2, activation=act, transposed=transposed,
                           interleaved=variant.get("interleaved", False))
    x = torch.randn(t, h, **f16, requires_grad=True)
    routing = mk.route(torch.randn(t, e, device=DEVICE, requires_grad=True), "softmax_topk", top_k=2)
    from moe_kernels.plan import build_plan_torch
    plan = build_plan_torch(routing, 64)  # the sm_80/sm_90 BLOCK_M
    monkeypatch.setattr(ops, "capability_of", lambda d: (9, 0))  # the GPU configs, not the interpreter's
    out = ops.moe_experts(x, plan, params, recompute_h=variant.get("recompute", False),
                          combine=variant.get("combine", "fused"))
    out.sum().backward()
    return seen


_VARIANTS = {
    "swiglu-concat": {},
    "oai-interleaved-transposed": {"act": "swiglu_oai", "interleaved": True, "transposed": True},
    "gelu-plain": {"act": "gelu"},
    "recompute-h": {"recompute": True},
    "separate-combine": {"combine": "separate"},
}


def _variants(monkeypatch) -> dict:
    """Distinct launches over every configuration, keyed by their specialisation."""
    out = {}
    for vname, v in _VARIANTS.items():
        for name, bound, consts, warps, stages in _record(monkeypatch, v):
            spec = {k: (("constexpr", val, False) if k in consts else _specialize(val)) for k, val in bound.items()}
            key = (name, tuple(sorted((k, s[0], repr(s[1]), s[2]) for k, s in spec.items())), warps, stages)
            out.setdefault(key, (f"{vname}:{name}:{bound.get('EPI', '')}", name, spec, warps, stages))
        monkeypatch.undo()
    return out


def _compile(job):
    """Compile one variant (in a worker started without the interpreter); returns a
    result dict, or the error."""
    label, name, spec, warps, stages, arch, dtype = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe_kernels.triton import combine, gemm
    from moe_kernels.triton.aot import _resource_usage, shared_limit
    kern = getattr(gemm if name == "_grouped_gemm_fwd_kernel" else combine, name)
    names = list(kern.arg_names)
    sig, consts, attrs = {}, {}, {}
    for idx, n in enumerate(names):
        ty, val, div = spec[n]
        if ty == "constexpr":
            consts[n] = val
            sig[n] = "constexpr"
            continue
        sig[n] = "*" + dtype if ty in ("*fp16", "*bf16") else ty
        if div:
            attrs[(idx,)] = [["tt.divisibility", 16]]
    try:
        k = triton.compile(ASTSource(kern, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # noqa: BLE001 - reported by the test
        return {"label": label, "arch": arch, "dtype": dtype, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    regs, local = _resource_usage(k.asm.get("cubin", b""), k.metadata.name)
    return {"label": label, "arch": arch, "dtype": dtype, "shared": int(k.metadata.shared),
            "limit": shared_limit(arch), "wgmma": "wgmma" in k.asm["ptx"], "local": local, "regs": regs,
            "gemm": name == "_grouped_gemm_fwd_kernel"}


def _worker_main(jobs_path: str, out_path: str) -> None:
    with open(jobs_path, "rb") as f:
        jobs = pickle.load(f)
    with open(out_path, "wb") as f:
        pickle.dump([_compile(j) for j in jobs], f)


def _compile_all(jobs: list, workers: int = 2) -> list:
    """Triton's interpreter has replaced its JIT in this process (TRITON_INTERPRET=1), so
    compile in fresh processes started without it, ``workers`` at a time."""
    env = dict(os.environ, TRITON_INTERPRET="0")  # "0", not unset: triton_interp would set it to "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__))] + [p for p in sys.path if p])
    shares = [jobs[w::workers] for w in range(workers)]
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for w, share in enumerate(shares):
            jp, op = os.path.join(d, f"j{w}.pkl"), os.path.join(d, f"o{w}.pkl")
            with open(jp, "wb") as f:
                pickle.dump(share, f)
            cmd = [sys.executable, "-c", f"import test_triton_aot_gemm as m; m._worker_main({jp!r}, {op!r})"]
            procs.append((op, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                               text=True)))
        out: list = [None] * len(jobs)
        for w, (op, proc) in enumerate(procs):
            _, err = proc.communicate()
            assert proc.returncode == 0 and os.path.exists(op), f"compile worker failed:\n{err[-3000:]}"
            with open(op, "rb") as f:
                out[w::workers] = pickle.load(f)
    return out


def test_every_kernel_variant_compiles_for_sm90_and_sm80(monkeypatch):
    variants = _variants(monkeypatch)
    labels = sorted(v[0] for v in variants.values())
    # Forward GEMM1 (3 epilogue shapes + recompute), GEMM2 (fused / plain), dGEMM2 (3), dGEMM1 (2), combine.
    assert len(variants) >= 10, labels
    assert any(":_combine_fwd_kernel" in lab for lab in labels)
    jobs = [(*v, arch, dt) for v in variants.values() for arch in (90, 80) for dt in ("bf16", "fp16")]
    results = _compile_all(jobs)
    errors = [r for r in results if "error" in r]
    assert not errors, "\n".join(f"{r['label']} sm_{r['arch']} {r['dtype']}: {r['error']}" for r in errors)
    for r in results:
        where = f"{r['label']} sm_{r['arch']} {r['dtype']}"
        assert r["shared"] <= r["limit"], f"{where}: {r['shared']} bytes of shared memory > {r['limit']}"
        if r["gemm"] and r["arch"] == 90:
            assert r["wgmma"], f"{where}: the GEMM does not use wgmma"
        if r["gemm"] and r["local"] is not None:
            assert r["local"] == 0, f"{where}: {r['local']} bytes of local memory (register spills), {r['regs']} regs"
    # The pipeliner really pipelines the prefill GEMM (several stages of A and B tiles).
    gemm1 = [r for r in results if r["gemm"] and r["arch"] == 90 and "swiglu-concat" in r["label"]]
    assert max(r["shared"] for r in gemm1) >= 3 * (64 * 64 + 2 * 64 * 64) * 2


@pytest.mark.parametrize("v", [0, 1, 16, 17, 2**40, 1.5, None, "ieee"])
def test_specialization_mirrors_triton(v):
    """The recorder's specialisation agrees with Triton's own rule where Triton exposes it."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        pytest.skip("this Triton does not expose native_specialize_impl")
    if isinstance(v, str):
        assert _specialize(v)[0] == "constexpr"
        return
    ty, div = native_specialize_impl(BaseBackend, v, False, True, True)
    mine = _specialize(v)
    assert mine[0] == ty
    if ty != "constexpr" and div is not None:
        assert mine[2] == (div == "D")
