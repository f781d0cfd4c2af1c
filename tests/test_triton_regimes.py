"""Every GEMM regime (configs.py) under the interpreter against the pure-PyTorch twin:
decode (BLOCK_M 16, split-K), small (32, split-K), medium (64, TMA weights) and prefill
(128, TMA weights + persistent loop), for the gated GEMM1 and GEMM2 with the fused
combine, at odd shapes. Split-K: the result does not depend on which split arrives
last (bitwise) and equals the unsplit kernel within fp32 reassociation.

The interpreter runs programs one after another, so it cannot reorder arrivals by
itself: ``_k_rot`` rotates which K range each program of a tile runs, which changes the
last arriver. Tensor descriptors run on the CPU in the interpreter (Triton >= 3.6).
"""

from __future__ import annotations

import pytest
import torch

from triton_interp import DEVICE, import_or_skip

import_or_skip()

from moe_kernels.activations import Activation  # noqa: E402
from moe_kernels.plan import build_plan_torch  # noqa: E402
from moe_kernels.backends.triton import gemm as gemm_mod  # noqa: E402
from moe_kernels.backends.triton.configs import GemmConfig  # noqa: E402
from moe_kernels.backends.triton.gemm import Prologue, grouped_gemm, grouped_gemm_torch  # noqa: E402
from test_triton_gemm import assert_close, make_routing, make_weights, poisoned, tol  # noqa: E402

# One config per regime, shrunk in N/K so the interpreter stays quick; the flags are the regime's.
REGIMES = {
    "decode-split3": GemmConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1, SPLIT_K=3),
    "small-split2": GemmConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1, SPLIT_K=2),
    "medium-tma": GemmConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1, USE_TMA=True),
    "prefill-tma-persistent": GemmConfig(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=1,
                                         USE_TMA=True, PERSISTENT=True),
}


def _layer_pair(cfg, router, t, e, k, h, i, dtype, k_rot=0):
    """GEMM1 (gated swiglu, concat, bias) then GEMM2 (bias, slot weight, fused combine),
    the kernel and the twin; returns (kernel h, twin h, kernel out, twin out, plan)."""
    routing, _ = make_routing(router, t, e, k=k)
    plan = build_plan_torch(routing, cfg.BLOCK_M)
    s = plan.num_slots
    w13, w2, b13, b2 = make_weights(e, h, i, "swiglu", dtype, bias=True)
    x = torch.randn(t, h, device=DEVICE).to(dtype)
    act = Activation("swiglu")
    res = {}
    for name, fn in (("kernel", grouped_gemm), ("twin", grouped_gemm_torch)):
        out = poisoned((t, h), dtype)
        pro = Prologue.for_combine(out, cfg.BLOCK_N)
        pro.counters.fill_(7)
        h1 = fn(x, w13, plan, a_rows="token", epilogue="act", activation=act, bias=b13, c=poisoned((s, i), dtype),
                prologue=pro, config=cfg, _k_rot=k_rot).c
        fn(h1, w2, plan, a_rows="slot", bias=b2, row_scale=True, combine="fused", out=out, combine_from=pro,
           c=poisoned((s, h), dtype), config=cfg, _k_rot=k_rot)
        res[name] = (h1, out)
    return res["kernel"][0], res["twin"][0], res["kernel"][1], res["twin"][1], plan


def _check(got_h, want_h, got_out, want_out, plan, dtype, what):
    valid = plan.slot_expert < plan.num_experts
    assert_close(got_h[valid], want_h[valid], tol(dtype), f"{what}: h")
    assert torch.isnan(got_h[~valid]).all(), f"{what}: wrote h rows it does not own"
    has = (plan.token_slots >= 0).any(1)
    assert_close(got_out[has], want_out[has], tol(dtype), f"{what}: out")
    assert (got_out[~has] == 0).all(), f"{what}: tokens without a slot get zero rows"


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("router,t,e,k", [
    pytest.param("softmax_topk", 1, 7, 2, id="T1-prime-E"),            # decode shape: one row per expert
    pytest.param("empty_expert", 37, 5, 2, id="T37-empty-expert"),      # an expert with no token, odd T
    pytest.param("one_expert", 19, 3, 1, id="all-tokens-one-expert"),   # one expert gets every row
])
def test_every_regime_against_the_twin(regime, router, t, e, k):
    cfg = REGIMES[regime]
    h, i = 72, 40  # N and K tails (not multiples of 32); rows 16-byte aligned for TMA
    got_h, want_h, got_out, want_out, plan = _layer_pair(cfg, router, t, e, k, h, i, torch.float32)
    _check(got_h, want_h, got_out, want_out, plan, torch.float32, regime)


@pytest.mark.parametrize("regime", ["medium-tma", "prefill-tma-persistent"])
def test_tma_layouts_and_fallbacks(regime, monkeypatch):
    """Which descriptor the weights get, and the results against the twin in each case:
    contiguous [E, N, K] -> K-major; a transposed view of [E, K, N] storage (GPT-OSS,
    the backward) with K % BLOCK_K == 0 -> N-major; the same view with K = 70 and
    contiguous weights with K = 70 (fp32 rows of 280 bytes: not 16-byte multiples) ->
    the pointer path. Plus a whole layer pair at K = 70 / 40 (GEMM1 falls back, GEMM2
    keeps TMA)."""
    cfg = REGIMES[regime]
    seen = []
    real = gemm_mod._tma_layout
    monkeypatch.setattr(gemm_mod, "_tma_layout", lambda c, b: seen.append(real(c, b)) or seen[-1])
    routing, _ = make_routing("empty_expert", 23, 5, k=2)
    plan = build_plan_torch(routing, cfg.BLOCK_M)
    valid = plan.slot_expert < plan.num_experts
    cases = [
        (torch.randn(5, 48, 64, device=DEVICE), "kmajor"),
        (torch.randn(5, 64, 48, device=DEVICE).transpose(1, 2), "nmajor"),
        (torch.randn(5, 70, 48, device=DEVICE).transpose(1, 2), None),
        (torch.randn(5, 48, 70, device=DEVICE), None),
    ]
    for w, layout in cases:
        seen.clear()
        x = torch.randn(23, w.shape[2], device=DEVICE)
        got = grouped_gemm(x, w, plan, a_rows="token", c=poisoned((plan.num_slots, 48), torch.float32),
                           config=cfg).c
        assert seen and seen[0] == layout, (tuple(w.stride()), seen, layout)
        want = grouped_gemm_torch(x, w, plan, a_rows="token", config=cfg).c
        assert_close(got[valid], want[valid], tol(torch.float32), f"layout {layout}")
        assert torch.isnan(got[~valid]).all()
    seen.clear()
    got_h, want_h, got_out, want_out, plan = _layer_pair(cfg, "softmax_topk", 23, 5, 2, 70, 40, torch.float32)
    _check(got_h, want_h, got_out, want_out, plan, torch.float32, f"{regime} K=70")
    assert seen == [None, "kmajor"], seen


@pytest.mark.parametrize("split", [2, 4])
def test_split_k_is_bitwise_repeatable_whoever_arrives_last(split):
    """For each rotation of the K ranges over a tile's programs (a different last
    arriver each time) and for a repeated run: the same bits. Against SPLIT_K=1: equal
    within fp32 reassociation. K = 200 with BLOCK_K = 32: the last split is short."""
    t, e, k, h, i = 9, 5, 2, 200, 48
    base = GemmConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    cfg = GemmConfig(**{**base.as_dict(), "SPLIT_K": split})
    routing, _ = make_routing("softmax_topk", t, e, k=k)
    plan = build_plan_torch(routing, 16)
    s = plan.num_slots
    x = torch.randn(t, i, device=DEVICE)
    w13 = torch.randn(e, 2 * h, i, device=DEVICE) / 7  # [E, 2N, K]: N = 200, K = 48 (splits of 32 and 16)
    w_long = torch.randn(e, 40, h, device=DEVICE) / 14  # [E, N=40, K=200]: the long-K GEMM
    a_long = torch.randn(s, h, device=DEVICE)
    act = Activation("swiglu")
    runs = []
    for rot in list(range(split)) + [0]:
        out = poisoned((t, 40), torch.float32)
        y = grouped_gemm(a_long, w_long, plan, a_rows="slot", row_scale=True, combine="fused", out=out,
                         c=poisoned((s, 40), torch.float32), config=cfg, _k_rot=rot).c
        g1 = grouped_gemm(x, w13, plan, a_rows="token", epilogue="act", activation=act,
                          c=poisoned((s, h), torch.float32), config=cfg, _k_rot=rot).c
        runs.append((y, out, g1))
    same = (lambda a, b: torch.equal(torch.nan_to_num(a, 9.0), torch.nan_to_num(b, 9.0)))  # poisoned rows too
    for y, out, g1 in runs[1:]:
        assert same(y, runs[0][0]) and same(out, runs[0][1]) and same(g1, runs[0][2])
    valid = plan.slot_expert < plan.num_experts
    out1 = poisoned((t, 40), torch.float32)
    y1 = grouped_gemm(a_long, w_long, plan, a_rows="slot", row_scale=True, combine="fused", out=out1,
                      c=poisoned((s, 40), torch.float32), config=base).c
    assert_close(runs[0][0][valid], y1[valid], 1e-5, "split vs unsplit y")
    assert_close(runs[0][1], out1, 1e-5, "split vs unsplit out")
    g_ref = grouped_gemm_torch(x, w13, plan, a_rows="token", epilogue="act", activation=act, config=base).c
    assert_close(runs[0][2][valid], g_ref[valid], 1e-5, "split GEMM1 vs the twin")


def test_tune_writes_a_table_that_the_loader_reads(tmp_path):
    """``tune`` end to end on a tiny shape in the interpreter, with a stand-in timer
    (each candidate runs once; later ones are reported faster, so the last one wins):
    the written table round-trips and its entries are what the sweep picked."""
    from moe_kernels.backends.triton import tables
    from moe_kernels.backends.triton.tune import candidates, tune
    from moe_kernels.bench.roofline import ModelShape
    from moe_kernels.backends.triton.configs import gemm_config
    shape = ModelShape("tiny", 4, 2, 64, 32)
    ran = []

    def timer(fn):
        fn()
        ran.append(1)
        return 1.0 / len(ran)
    entries = tune([shape], [3], "cpu", torch.float32, timer=timer, max_candidates=2, log=lambda *a: None)
    assert len(ran) == 2 * 3  # two GEMMs x (the heuristic + two candidates)
    base = gemm_config(4, 32, 64, torch.float32, (0, 0), 16, gated_b=True)
    want = candidates(base, (0, 0), 4, 2)[1]
    key = tables.entry_key(4, 32, 64, torch.float32, 16, "gemm1")
    assert entries[key] == {f: getattr(want, f) for f in tables.TILE_FIELDS}
    t = tables.write_table(tmp_path / "tuned.json", gpu="cpu-test", capability=(9, 0), num_sms=132,
                           source="test", entries=entries)
    assert tables.lookup((9, 0), 132, 4, 32, 64, torch.float32, 16, "gemm1", tables=(t,)) == entries[key]


@pytest.mark.parametrize("h,i", [pytest.param(72, 40, id="tails"), pytest.param(96, 64, id="backward-N-major-TMA")])
@pytest.mark.parametrize("regime", ["decode-split3", "prefill-tma-persistent"])
def test_layer_forward_and_backward_in_a_regime(regime, h, i, monkeypatch):
    """The whole experts op (GEMM1 -> GEMM2 with the fused combine; backward: dGEMM2
    with the activation backward, dGEMM1 with the combine and dw) with every GEMM on the
    regime's config, against the torch backend: values and gradients. With TMA, the
    backward's transposed weight views take the N-major descriptor where K is a multiple
    of BLOCK_K (H = 96, 2I = 128), pointers where not (H = 72, 2I = 80)."""
    import moe_kernels as mk
    from moe_kernels.backends.triton import experts as ops
    from moe_kernels.params import expert_params
    cfg = REGIMES[regime]
    monkeypatch.setattr(ops, "gemm_config", lambda *a, **kw: cfg)
    t, e, k = 13, 5, 2
    layouts = []
    real = gemm_mod._tma_layout
    monkeypatch.setattr(gemm_mod, "_tma_layout", lambda c, b: layouts.append(real(c, b)) or layouts[-1])
    routing, _ = make_routing("empty_expert", t, e, k=k)
    plan = build_plan_torch(routing, cfg.BLOCK_M)
    w13, w2, b13, b2 = make_weights(e, h, i, "swiglu", torch.float32, bias=True)
    leaves = [v.clone().requires_grad_(True) for v in (w13, w2, b13, b2)]
    x = torch.randn(t, h, device=w13.device, requires_grad=True)
    params = expert_params(*leaves)
    out = ops.moe_experts(x, plan, params)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *leaves], g)
    ref_leaves = [v.clone().requires_grad_(True) for v in (w13, w2, b13, b2)]
    xr = x.detach().clone().requires_grad_(True)
    ref = mk.fused_experts(xr, routing, expert_params(*ref_leaves), backend="torch")
    ref_grads = torch.autograd.grad(ref, [xr, *ref_leaves], g)
    assert_close(out, ref, 1e-4, f"{regime}: out")
    for got, want, name in zip(grads, ref_grads, ("dx", "dw13", "dw2", "db13", "db2")):
        assert_close(got, want, 1e-4, f"{regime}: {name}")
    if cfg.USE_TMA:  # GEMM1, GEMM2, dGEMM2, dGEMM1
        assert layouts == (["kmajor", "kmajor", "nmajor", "nmajor"] if h == 96 else ["kmajor", "kmajor", None, None])
