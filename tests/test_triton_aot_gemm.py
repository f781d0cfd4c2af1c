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
ptxas reports no register spills for the GEMMs. Further batches of the same machinery:

* large experts (Mixtral's sizes choose the config: BLOCK_N=128, 8 warps) for sm_80,
  sm_89, sm_90 and sm_120 (99 KB of shared memory on the consumer parts): fits, no
  spills, and the config heuristic's shared-memory estimate matches the compiler's;
* an Expert Choice layer with E = 256 (``token_slots`` has 256 columns): the fused
  combine and the prologue read it in chunks, so no spills;
* 64-bit row offsets, read from the Triton IR (see test_row_offsets_are_64_bit).

All batches compile in one pool of worker processes (module fixture), each test checks
its own part.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from triton_interp import DEVICE, import_or_skip

import_or_skip()

import moe_kernels as mk  # noqa: E402
from moe_kernels.params import expert_params  # noqa: E402
from moe_kernels.backends.triton import configs, experts as ops  # noqa: E402
from moe_kernels.backends.triton.configs import GemmConfig  # noqa: E402

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
       torch.int64: "i64"}
_OURS = ("_grouped_gemm_kernel", "_combine_fwd_kernel")


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


def _record(monkeypatch, variant: dict, capability=(9, 0), config=None) -> list[tuple]:
    """Launches of one forward+backward, as (kernel name, bound arguments, names of the
    constexpr parameters, num_warps, num_stages). ``capability`` chooses the configs
    (``config``, when given, replaces ``gemm_config`` with the same arguments)."""
    import inspect

    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    import moe_kernels._checks as checks
    import moe_kernels.plan as plan_mod
    import moe_kernels.routing as routing_mod
    for mod in (checks, routing_mod):  # outputs are never computed: skip value checks
        monkeypatch.setattr(mod, "value_checks_enabled", lambda t: False)
    monkeypatch.setattr(plan_mod, "deep_checks_enabled", lambda: False)
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
    t, h, i, e = 64, variant.get("h", 256), variant.get("i", 128), variant.get("e", 8)
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
    logits = torch.randn(t, e, device=DEVICE, requires_grad=True)
    router = variant.get("router", "softmax_topk")
    routing = mk.route(logits, router, top_k=2) if router == "softmax_topk" else mk.route(logits, router)
    from moe_kernels.plan import build_plan_torch
    plan = build_plan_torch(routing, variant.get("block_m", 64))  # the medium regime's BLOCK_M by default
    monkeypatch.setattr(ops, "capability_of", lambda d: capability)  # the GPU configs, not the interpreter's
    if config is not None:
        monkeypatch.setattr(ops, "gemm_config", config)
    out = ops.moe_experts(x, plan, params, recompute_h=variant.get("recompute", False),
                          combine=variant.get("combine", "fused"))
    if not variant.get("forward_only", False):
        out.sum().backward()
    return seen


_VARIANTS = {
    "swiglu-concat": {},
    "oai-interleaved-transposed": {"act": "swiglu_oai", "interleaved": True, "transposed": True},
    "gelu-plain": {"act": "gelu"},
    "recompute-h": {"recompute": True},
    "separate-combine": {"combine": "separate"},
}


def _variants(monkeypatch, variants=None, capability=(9, 0), config=None) -> dict:
    """Distinct launches over every configuration, keyed by their specialisation."""
    out = {}
    for vname, v in (variants or _VARIANTS).items():
        for name, bound, consts, warps, stages in _record(monkeypatch, v, capability, config):
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

    from moe_kernels.backends.triton import combine, gemm
    from aot import _resource_usage, shared_limit
    kern = getattr(gemm if name == "_grouped_gemm_kernel" else combine, name)
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
    # Result types of every integer multiply in the Triton IR (index arithmetic).
    muls = collections.Counter(re.findall(r"arith\.muli [^:]*: (\S+)", k.asm.get("ttir", "")))
    # Induction-variable types of every loop (the prologue's grid-stride loops are i64).
    fors = collections.Counter(re.findall(r"scf\.for [^\n]*: (i\d+)", k.asm.get("ttir", "")))
    ptx = k.asm["ptx"]
    return {"label": label, "arch": arch, "dtype": dtype, "shared": int(k.metadata.shared),
            "limit": shared_limit(arch), "wgmma": "wgmma" in ptx, "local": local, "regs": regs,
            "gemm": name == "_grouped_gemm_kernel", "muls": dict(muls), "fors": dict(fors),
            "tma": "cp.async.bulk.tensor" in ptx, "tcgen05": "tcgen05.mma" in ptx, "mma_sync": "mma.sync" in ptx}


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


# Large experts: Mixtral's sizes (E=8, H=4096, I=14336) choose each GEMM's config; the
# recorded tensors stay small (a config is all the compiler needs from the sizes).
LARGE_ARCHS = {80: (8, 0), 89: (8, 9), 90: (9, 0), 120: (12, 0)}
# 64-bit check: tile sizes whose shapes tell rows apart: rows are [64, 1] / [64] (the
# prologue's [16, 1] / [16]), K offsets [32, 1], columns [1, 32].
ROW_CFG = GemmConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)


def _mixtral_config(e, n, k, dtype, capability, block_m, **kw):
    real = configs.gemm_config
    return real(8, {128: 14336, 256: 4096}[n], k, dtype, capability, block_m, **kw)


def _batches() -> dict:
    """Every batch's jobs: {batch: [(job, recorded bound arguments)]}."""
    out: dict = {"all": [], "large": [], "ks256": [], "rows64": []}
    with pytest.MonkeyPatch.context() as mp:
        for v in _variants(mp).values():
            out["all"] += [((*v, arch, dt), None) for arch in (90, 80) for dt in ("bf16", "fp16")]
        for arch, cap in LARGE_ARCHS.items():
            for v in _variants(mp, {"large": {}}, cap, _mixtral_config).values():
                if v[1] == "_grouped_gemm_kernel":
                    out["large"].append(((*v, arch, "bf16"), cap))
        ec = {"ec256": {"router": "expert_choice", "e": 256, "h": 64, "i": 32}}
        for v in _variants(mp, ec).values():
            if v[1] == "_grouped_gemm_kernel":
                out["ks256"].append(((*v, 90, "bf16"), None))
        rows = {"concat": {}, "interleaved": {"act": "swiglu_oai", "interleaved": True, "transposed": True}}
        for v in _variants(mp, rows, (9, 0), lambda *a, **k: ROW_CFG).values():
            if v[1] == "_grouped_gemm_kernel":
                out["rows64"].append(((*v, 80, "fp16"), None))
    return out


@pytest.fixture(scope="module")
def compiled() -> dict:
    """{batch: [(job, extra, result)]}, every batch compiled in one pool of workers."""
    batches = _batches()
    flat = [(b, job, extra) for b, items in batches.items() for job, extra in items]
    results = _compile_all([job for _, job, _ in flat])
    out: dict = {b: [] for b in batches}
    for (b, job, extra), r in zip(flat, results):
        out[b].append((job, extra, r))
    return out


def _no_errors(items):
    errors = [r for _, _, r in items if "error" in r]
    assert not errors, "\n".join(f"{r['label']} sm_{r['arch']} {r['dtype']}: {r['error']}" for r in errors)


def _where(r):
    return f"{r['label']} sm_{r['arch']} {r['dtype']}"


def test_every_kernel_variant_compiles_for_sm90_and_sm80(compiled):
    items = compiled["all"]
    labels = sorted({job[0] for job, _, _ in items})
    # Forward GEMM1 (3 epilogue shapes + recompute), GEMM2 (fused / plain), dGEMM2 (3), dGEMM1 (2), combine.
    assert len(labels) >= 10, labels
    assert any(":_combine_fwd_kernel" in lab for lab in labels)
    _no_errors(items)
    results = [r for _, _, r in items]
    for r in results:
        assert r["shared"] <= r["limit"], f"{_where(r)}: {r['shared']} bytes of shared memory > {r['limit']}"
        if r["gemm"] and r["arch"] == 90:
            assert r["wgmma"], f"{_where(r)}: the GEMM does not use wgmma"
        if r["gemm"] and r["local"] is not None:
            assert r["local"] == 0, f"{_where(r)}: {r['local']} bytes of local memory (register spills), {r['regs']} regs"
    # The pipeliner really pipelines the prefill GEMM (several stages of A and B tiles).
    gemm1 = [r for r in results if r["gemm"] and r["arch"] == 90 and "swiglu-concat" in r["label"]]
    assert max(r["shared"] for r in gemm1) >= 3 * (64 * 64 + 2 * 64 * 64) * 2


def test_large_expert_configs_fit_consumer_and_datacenter_gpus(compiled):
    """Mixtral-sized configs (gated GEMM1 with two 128-wide B tiles, 8 warps) on sm_80,
    sm_89, sm_90 and sm_120: each fits the arch's shared memory (sm_120 has 99 KB: 4
    stages of that GEMM1 need 120 KB), none spills, and the heuristic's estimate of the
    pipeline's shared memory is what the compiler allocates."""
    items = compiled["large"]
    _no_errors(items)
    assert {job[5] for job, _, _ in items} == set(LARGE_ARCHS)
    for job, cap, r in items:
        spec = job[2]
        c = {n: spec[n][1] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "EPI", "GATED")}
        stages = job[4]
        assert r["shared"] <= r["limit"], f"{_where(r)}: {r['shared']} B of shared memory > {r['limit']} ({stages} stages)"
        if r["local"] is not None:
            assert r["local"] == 0, f"{_where(r)}: {r['local']} B of local memory (register spills), {r['regs']} regs"
        b_tiles = 2 if (c["EPI"] == 1 and c["GATED"]) else 1
        est = configs.pipeline_shared_bytes(cap, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], 2, b_tiles, stages)
        assert est <= r["shared"] <= est + 1024, f"{_where(r)}: estimate {est} B, compiled {r['shared']} B"
    gemm1 = {job[5]: job for job, _, _ in items if job[2]["EPI"][1] == 1}
    for arch, job in gemm1.items():
        assert job[2]["BLOCK_N"][1] == 128 and job[3] == 8, f"sm_{arch}: not the large-expert GEMM1 config"
    # sm_90 keeps 4 stages (4 buffers: 160 KB), sm_120 drops from 4 to 3 (2 buffers: 80 KB).
    assert gemm1[90][4] == 4 and gemm1[80][4] == 3 and gemm1[120][4] == 3 and gemm1[89][4] == 3


def test_expert_choice_256_columns_no_spills(compiled):
    """Expert Choice with E = 256: token_slots has 256 columns. The fused combine and the
    prologue read them 16 at a time (one [64, 256] int32 tile took 249 registers and
    spilled on sm_90)."""
    items = compiled["ks256"]
    _no_errors(items)
    assert any(job[2]["FUSED_COMBINE"][1] for job, _, _ in items)
    assert any(job[2]["PRO_EMPTY_ROWS"][1] for job, _, _ in items)
    if items[0][2]["local"] is None:
        pytest.skip("cuobjdump not found: no register report")
    for job, _, r in items:
        assert job[2]["KS_BLOCK"][1] == 16
        assert r["local"] == 0, f"{_where(r)}: {r['local']} B of local memory (register spills), {r['regs']} regs"


def test_row_offsets_are_64_bit(compiled):
    """Row indices are multiplied by row strides in 64 bits, in every GEMM mode: the
    Triton IR has the integer width of each multiply, before LLVM folds them into
    addresses. With rows [64, 1] (prologue [16, 1]) and K/N offsets 32 wide, any 32-bit
    multiply of a row-shaped tensor is a row offset that overflows past 2^31 elements
    (a [T, H] activation with T*H > 2^31: 262144 tokens of H = 8192). The interpreter
    cannot show it: it would need a buffer of 2^31 elements."""
    items = compiled["rows64"]
    _no_errors(items)
    assert {job[2]["EPI"][1] for job, _, _ in items} == {0, 1, 2}
    for job, _, r in items:
        assert ROW_CFG.BLOCK_M == job[2]["BLOCK_M"][1]
        narrow = {t: n for t, n in r["muls"].items() if t in ("tensor<64x1xi32>", "tensor<64xi32>",
                                                             "tensor<16x1xi32>", "tensor<16xi32>")}
        assert not narrow, f"{r['label']}: 32-bit row offset multiplies {narrow}"
        assert r["muls"].get("tensor<64x1xi64>", 0) > 0, f"{r['label']}: no 64-bit row multiply found {r['muls']}"


def test_prologue_loops_are_64_bit(compiled):
    """The prologue's grid-stride loops (counters, fp32 zeros, empty rows) run on 64-bit
    induction variables: with int32 bounds, ``pid * 1024`` wraps past 2^21 programs and
    the next kernel's combine counters are silently not zeroed. One i64 ``scf.for`` per
    enabled prologue part, read from the Triton IR (the other loops: K, token_slots
    columns, output columns, are i32)."""
    items = [(job, r) for job, _, r in compiled["rows64"] + compiled["all"] if r.get("gemm") and "error" not in r]
    with_pro = 0
    for job, r in items:
        spec = job[2]
        parts = sum(bool(spec[f][1]) for f in ("PRO_COUNTERS", "PRO_EMPTY_ROWS", "PRO_F32"))
        with_pro += parts > 0
        assert r["fors"].get("i64", 0) >= parts, f"{_where(r)}: {parts} prologue loops, loop types {r['fors']}"
    assert with_pro >= 2, "the batch must hold GEMMs with a prologue (GEMM1, dGEMM2)"


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
