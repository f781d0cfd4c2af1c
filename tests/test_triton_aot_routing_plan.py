"""Ahead-of-time compilation (no GPU needed) of the routing, plan and weight-gradient
kernels for sm_90 and sm_80, with fp32, fp16 and bf16 signatures: catches type and
lowering errors the interpreter cannot see (bf16 above all), and checks each variant
fits in shared memory, keeps out of register spills, and that the wgrad GEMM runs on
Hopper wgmma for 16-bit inputs. All variants compile in one batch (compile_many: worker
processes under the interpreter), each test checks its own.
"""

import pytest
import torch

from triton_interp import import_or_skip

import_or_skip()

from moe_kernels.backends.triton import plan as TP  # noqa: E402
from moe_kernels.backends.triton import plan_multi as TM  # noqa: E402
from moe_kernels.backends.triton import routing as TR  # noqa: E402
from moe_kernels.backends.triton import wgrad as TW  # noqa: E402
from aot import compile_for, compile_many, shared_limit  # noqa: E402

ARCHS = (90, 80)
FLOATS = ("fp32", "fp16", "bf16")
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROUTING_VARIANTS = {  # name: (E, k, sigmoid, n_group, topk_group)
    "softmax": (64, 8, False, 1, 1), "deepseek": (256, 8, True, 8, 4), "wide": (512, 32, False, 1, 1)}
# (dtype, variant, arch): every dtype on both archs, plus the widest routing on sm_90
ROUTING_FWD = [(dt, v, a) for a in ARCHS for dt, v in (("fp32", "softmax"), ("fp16", "softmax"), ("bf16", "deepseek"))]
ROUTING_FWD += [("bf16", "wide", 90)]
# (E, token-major layout, arch)
PLAN = [(e, tm, a) for a in ARCHS for e, tm in ((256, True), (64, False))] + [(1024, True, 90)]
WGRAD_SIG = {"scale_ptr": "*fp32", "padded_slot_ptr": "*i32", "slot_token_ptr": "*i32", "padded_offsets_ptr": "*i32",
             "counts_ptr": "*i32", **{n: "i32" for n in ("N", "K", "stride_am", "stride_ak", "stride_bm", "stride_bn",
                                                         "stride_we", "stride_wn", "stride_wk", "stride_de",
                                                         "stride_dn")}}


def _routing_fwd(dt, variant, arch):
    sig = {"logits_ptr": f"*{dt}", "bias_ptr": "*fp32", "ids_ptr": "*i32", "w_ptr": "*fp32", "token_ptr": "*i32",
           "counts_ptr": "*i32", **{n: "i32" for n in ("T", "E", "stride_t", "stride_e", "stride_b", "per_group")},
           "scale": "fp32"}
    e, k, sigmoid, ng, tg = ROUTING_VARIANTS[variant]
    bt, be, warps = TR._blocks(e)
    ce = dict(TOP_K=k, K_POW2=k, BLOCK_T=bt, BLOCK_E=be, SIGMOID=sigmoid, RENORM=True, HAS_BIAS=sigmoid,
              N_GROUP=ng, TOPK_GROUP=tg, COUNT=True, ATOMIC_COUNT=True)
    return dict(kernel=TR._topk_route_fwd_kernel, signature=sig, constexprs=ce, arch=arch, num_warps=warps)


def _routing_bwd(dt, arch):
    sig = {"logits_ptr": f"*{dt}", "ids_ptr": "*i32", "gw_ptr": "*fp32", "dx_ptr": f"*{dt}",
           **{n: "i32" for n in ("T", "E", "stride_t", "stride_e", "stride_gt", "stride_gk")}, "scale": "fp32"}
    bt, be, warps = TR._blocks(256)
    ce = dict(TOP_K=8, BLOCK_T=bt, BLOCK_E=be, SIGMOID=dt == "fp16", RENORM=True)
    return dict(kernel=TR._topk_route_bwd_kernel, signature=sig, constexprs=ce, arch=arch, num_warps=warps)


def _plan(e, token_major, arch):
    ptrs = ("slot_expert_ptr", "slot_token_ptr", "counts_ptr", "offsets_ptr", "sorted_slot_ptr",
            "slot_position_ptr", "padded_offsets_ptr", "padded_slot_ptr", "block_expert_ptr", "token_slots_ptr",
            "cursor_ptr")
    sig = {**{p: "*i32" for p in ptrs}, **{n: "i32" for n in ("S", "E", "T", "P", "NB", "K", "TOP_K")}}
    cfg = TP._config(e, 64)
    warps = cfg.pop("num_warps")
    return dict(kernel=TP._plan_fwd_kernel, signature=sig, constexprs=dict(BLOCK_M=64, TOKEN_MAJOR=token_major, **cfg),
                arch=arch, num_warps=warps)


# The many-program plan's kernels: (E, arch); each kernel with the constexprs it takes.
PLAN_MULTI = [(256, 90), (256, 80), (1024, 90), (1, 80)]
PLAN_MULTI_KERNELS = ("_plan_hist_fwd_kernel", "_plan_scan_fwd_kernel", "_plan_offsets_fwd_kernel",
                      "_plan_place_fwd_kernel", "_plan_blocks_fwd_kernel", "_plan_token_major_fwd_kernel",
                      "_plan_token_fill_fwd_kernel", "_plan_token_append_fwd_kernel", "_plan_token_sort_fwd_kernel")


def _plan_multi(name, e, arch, k=16):
    kernel = getattr(TM, name)
    cfg = TM.multi_config(e, 64, k)
    names = kernel.arg_names
    ce = {n: v for n, v in dict(cfg, BLOCK_M=64, NUM_LEVELS=2, E_TILE=cfg["E_TILE"]).items() if n in names}
    if name == "_plan_offsets_fwd_kernel":
        ce["E_TILE"] = cfg["OFFS_TILE"]
    if name == "_plan_blocks_fwd_kernel":
        ce["E_TILE"] = cfg["BLOCKS_E_TILE"]
    sig = {n: ("*i32" if n.endswith("_ptr") else "i32") for n in names if n not in ce}
    return dict(kernel=kernel, signature=sig, constexprs=ce, arch=arch, num_warps=4)


def _wgrad(dt, arch, has_w=True):
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "dw_ptr": f"*{dt}", "db_ptr": f"*{dt}", **WGRAD_SIG}
    cfg = TW._config(4096, 1024 if has_w else 1, TORCH[dt])
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    if not has_w:
        cfg["BLOCK_K"] = 16
    ce = dict(A_MODE=1 if has_w else 0, B_MODE=0 if has_w else 2, HAS_SCALE=has_w, HAS_W=has_w, HAS_BIAS=True,
              PRECISION="ieee" if dt == "fp32" else None, **cfg)
    return dict(kernel=TW._expert_wgrad_bwd_kernel, signature=sig, constexprs=ce, arch=arch, num_warps=warps,
                num_stages=stages)


def _all_jobs():
    jobs = {}
    for dt, variant, arch in ROUTING_FWD:
        jobs[("fwd", dt, variant, arch)] = _routing_fwd(dt, variant, arch)
    for e, tm, arch in PLAN:
        jobs[("plan", e, tm, arch)] = _plan(e, tm, arch)
    for e, arch in PLAN_MULTI:
        for name in PLAN_MULTI_KERNELS:
            jobs[("plan-multi", name, e, arch)] = _plan_multi(name, e, arch)
    for k in (1024, 4096):  # expert-choice rows of up to MULTI_MAX_K slots, sorted as one tile
        jobs[("plan-sort", k)] = _plan_multi("_plan_token_sort_fwd_kernel", 256, 90, k=k)
    for arch in ARCHS:
        for dt in FLOATS:
            jobs[("bwd", dt, arch)] = _routing_bwd(dt, arch)
            jobs[("wgrad", dt, arch)] = _wgrad(dt, arch)
    jobs[("bias-only", "bf16", 90)] = _wgrad("bf16", 90, has_w=False)
    for arch in ARCHS:  # fp32 weight gradients under TF32 (when torch allows it, like the GEMMs)
        job = _wgrad("fp32", arch)
        job["constexprs"] = dict(job["constexprs"], PRECISION="tf32")
        jobs[("wgrad-tf32", arch)] = job
    # Triton's JIT turns integer arguments equal to 1 into constants: compile the launches
    # where that happens (decode T=1 and unit strides, Switch K=top_k=1, bias-only K=1).
    for key, job, ones in ((("one", "routing"), _routing_fwd("bf16", "softmax", 90), ("T", "stride_e", "stride_b")),
                           (("one", "plan"), _plan(64, True, 90), ("T", "K", "TOP_K", "S")),
                           (("one", "wgrad"), _wgrad("bf16", 90, has_w=False), ("K", "stride_bn", "stride_dn"))):
        job["signature"] = {n: v for n, v in job["signature"].items() if n not in ones}
        job["constexprs"] = dict(job["constexprs"], **{n: 1 for n in ones})
        jobs[key] = job
    bad = _wgrad("fp16", 90)
    bad["constexprs"] = dict(bad["constexprs"], BLOCK_R=3)  # tl.arange needs a power of two
    jobs[("bad",)] = bad
    return jobs


@pytest.fixture(scope="module")
def compiled():
    jobs = _all_jobs()
    return dict(zip(jobs, compile_many(list(jobs.values()), raise_errors=False)))


def _get(compiled, key):
    info = compiled[key]
    if isinstance(info, Exception):
        pytest.fail(str(info))
    return info


def _check(info, arch):
    assert info.shared_bytes <= shared_limit(arch), f"{info.name}: {info.shared_bytes} B of shared memory"
    assert f".target sm_{arch}" in info.ptx
    if info.local_bytes is not None:  # cuobjdump found; a spilling variant takes hundreds of bytes
        assert info.local_bytes <= 16, f"{info.name}: {info.local_bytes} B of local memory (register spills)"


@pytest.mark.parametrize("dt,variant,arch", ROUTING_FWD)
def test_routing_fwd(compiled, dt, variant, arch):
    _check(_get(compiled, ("fwd", dt, variant, arch)), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dt", FLOATS)
def test_routing_bwd(compiled, arch, dt):
    _check(_get(compiled, ("bwd", dt, arch)), arch)


@pytest.mark.parametrize("e,token_major,arch", PLAN)
def test_plan(compiled, e, token_major, arch):
    info = _get(compiled, ("plan", e, token_major, arch))
    _check(info, arch)
    if not token_major:
        assert "bar.sync" in info.ptx  # the cursor barriers survived


@pytest.mark.parametrize("e,arch", PLAN_MULTI)
@pytest.mark.parametrize("name", PLAN_MULTI_KERNELS)
def test_plan_many_programs(compiled, name, e, arch):
    # every kernel of the prefill plan compiles, fits and keeps out of register spills
    _check(_get(compiled, ("plan-multi", name, e, arch)), arch)


@pytest.mark.parametrize("k", [1024, 4096])
def test_plan_token_sort_wide_rows(compiled, k):
    _check(_get(compiled, ("plan-sort", k)), 90)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dt", FLOATS)
def test_wgrad(compiled, arch, dt):
    info = _get(compiled, ("wgrad", dt, arch))
    _check(info, arch)
    assert info.uses_wgmma == (arch == 90 and dt != "fp32"), "16-bit wgrad on sm_90 must use wgmma"


@pytest.mark.parametrize("arch", ARCHS)
def test_wgrad_tf32(compiled, arch):
    _check(_get(compiled, ("wgrad-tf32", arch)), arch)


def test_bias_only_variant(compiled):
    _check(_get(compiled, ("bias-only", "bf16", 90)), 90)


@pytest.mark.parametrize("kernel", ["routing", "plan", "wgrad"])
def test_integer_arguments_equal_to_one(compiled, kernel):
    _check(_get(compiled, ("one", kernel)), 90)


def test_helpers():
    assert shared_limit(90) == 232448 and shared_limit(80) == 166912
    with pytest.raises(ValueError, match="arch"):
        shared_limit(75)
    with pytest.raises(ValueError, match="missing"):
        compile_for(TW._expert_wgrad_bwd_kernel, {"a_ptr": "*fp32"}, {}, 90)
    job = _routing_bwd("fp32", 90)
    with pytest.raises(ValueError, match="not arguments"):
        compile_for(TR._topk_route_bwd_kernel, dict(job["signature"], nope="i32"), job["constexprs"], 90)


def test_compile_error_is_reported(compiled):
    # an impossible variant must come back as an error naming the kernel, not abort the batch
    res = compiled[("bad",)]
    assert isinstance(res, RuntimeError) and "_expert_wgrad_bwd_kernel" in str(res)
