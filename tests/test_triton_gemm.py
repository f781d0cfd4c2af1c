"""The grouped GEMM kernel (gemm.py) and the combine kernel (combine.py) against their
pure-PyTorch twins, mode by mode, under the interpreter on the CPU (or on a GPU).

Every output buffer is poisoned (NaN) before the call: the rows the kernel owns must be
written, and the rows it does not own (dropped slots, padding) must stay poisoned.
The case builders at the top are shared by the other test_triton_* files.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from triton_interp import DEVICE, import_or_skip, interpreting

import_or_skip()

from moe_kernels.activations import ACTIVATIONS, Activation  # noqa: E402
from moe_kernels.plan import build_plan_torch  # noqa: E402
from moe_kernels.routing import Routing, dense_softmax, expert_choice, route, switch  # noqa: E402
import moe_kernels as mk  # noqa: E402
from moe_kernels import options  # noqa: E402
from moe_kernels.backends.triton import configs  # noqa: E402
from moe_kernels.backends.triton.combine import combine, combine_torch  # noqa: E402
from moe_kernels.backends.triton.configs import GemmConfig, gemm_config, layer_block_m  # noqa: E402
from moe_kernels.backends.triton.gemm import Prologue, grouped_gemm, grouped_gemm_torch  # noqa: E402

NAN = float("nan")


# --------------------------------------------------------------------------- interpreter speed (test-only)

_PATCHED_GLOBALS: set[int] = set()


@pytest.fixture(autouse=True)
def fast_interpreter(monkeypatch):
    """Test-only speed-up of Triton's interpreter (about 2x on these kernels): a call of
    a nested ``@triton.jit`` helper re-patches ``triton.language`` for the helper's module
    each time (``_patch_lang``), and those patches are never undone; patching once per
    module gives the same state for a fraction of the cost. Kernels are unchanged; on a
    GPU, or with another interpreter layout, this does nothing."""
    if not interpreting():
        yield
        return
    import triton.runtime.interpreter as interp
    if not (hasattr(interp, "_patch_lang") and hasattr(interp.InterpretedFunction, "rewrite")):
        yield
        return

    def call(self, *args, **kwargs):
        key = id(self.fn.__globals__)
        if key not in _PATCHED_GLOBALS:
            interp._patch_lang(self.fn)
            _PATCHED_GLOBALS.add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - same wrapping as the interpreter's own
            raise interp.InterpreterError(repr(e)) from e

    monkeypatch.setattr(interp.InterpretedFunction, "__call__", call)
    yield

# --------------------------------------------------------------------------- shared case builders


def make_routing(kind: str, t: int, e: int, k: int = 2, *, device=DEVICE, seed: int = 0,
                 logits: torch.Tensor | None = None) -> tuple[Routing, torch.Tensor]:
    """A routing and the logits it came from. ``kind``: a router name, or an edge:
    ``"empty_expert"`` (top-k that never picks the last expert), ``"one_expert"``
    (every token's first choice is expert 0: k=1 sends all tokens there),
    ``"dropped"`` (top-k ids with dropped entries, from_topk sentinels)."""
    g = torch.Generator().manual_seed(seed)
    if logits is None:
        logits = torch.randn(t, e, generator=g).to(device)
    if kind in ("softmax_topk", "noisy_topk", "grouped_sigmoid_topk"):
        opts = {"top_k": k}
        if kind == "grouped_sigmoid_topk" and e % 2 == 0 and e >= 4:
            opts.update(n_group=2, topk_group=1 if k <= e // 2 else 2, routed_scaling_factor=2.5,
                        bias=torch.randn(e, generator=g).to(device) * 0.1)
        return route(logits, kind, **opts), logits
    if kind == "switch":  # capacity factor 0.5: about half the tokens are dropped
        return switch(logits, capacity_factor=0.5), logits
    if kind == "expert_choice":
        return expert_choice(logits, capacity_factor=1.0), logits
    if kind == "dense":
        return dense_softmax(logits), logits
    if kind == "empty_expert":
        logits = logits.clone()
        logits[:, e - 1] = -30.0
        return route(logits, "softmax_topk", top_k=k), logits
    if kind == "one_expert":
        logits = logits.clone()
        logits[:, 0] = 30.0
        return route(logits, "softmax_topk", top_k=k), logits
    if kind == "dropped":
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
        ids[torch.rand(t, k, generator=g) < 0.3] = -1  # expert-parallel sentinel: dropped
        w = torch.rand(t, k, generator=g)
        return Routing.from_topk(ids.to(device), w.to(device), e), logits
    raise ValueError(kind)


def make_weights(e: int, h: int, i: int, act: str, dtype, *, bias: bool, transposed: bool = False, seed: int = 0):
    """(w13, w2, b13, b2) in the storage layout (transposed: [E, H, nI] and [E, I, H])."""
    g = torch.Generator().manual_seed(seed)
    n = Activation(act).width_factor
    w13 = torch.randn(e, n * i, h, generator=g) / math.sqrt(h)
    w2 = torch.randn(e, h, i, generator=g) / math.sqrt(i)
    b13 = torch.randn(e, n * i, generator=g) * 0.5 if bias else None
    b2 = torch.randn(e, h, generator=g) * 0.5 if bias else None
    if transposed:
        w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    cast = (lambda v: None if v is None else v.to(device=DEVICE, dtype=dtype))
    return cast(w13), cast(w2), cast(b13), cast(b2)


def tol(dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str) -> None:
    """Max error relative to the reference's largest magnitude (robust to cancellation)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(want.float().abs().max().item(), 1e-6)
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:.1g} x {scale:.3g}"


def poisoned(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype, device=DEVICE)


CFG = GemmConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)  # many tiles, tails


def _valid_slots(plan):
    return plan.slot_expert < plan.num_experts


def _check_rows(got, want, rows, dtype, name):
    """``rows``: mask over the buffer's rows the kernel owns; the others must stay poisoned."""
    assert_close(got[rows], want[rows], tol(dtype), name)
    assert torch.isnan(got[~rows]).all(), f"{name}: wrote rows it does not own"


# --------------------------------------------------------------------------- GEMM1: activation epilogue

# Each id names the edge it covers.
_GEMM1 = [
    # (act, interleaved, bias, a_rows, c_rows, transposed weight view, dtype, router)
    pytest.param("swiglu", False, True, "token", "slot", False, torch.float32, "softmax_topk", id="swiglu-concat-bias"),
    pytest.param("swiglu", True, True, "token", "slot", True, torch.float32, "dropped", id="swiglu-interleaved-transposed-dropped"),
    pytest.param("geglu", False, False, "token", "padded", False, torch.float32, "expert_choice", id="geglu-padded-out-ec"),
    pytest.param("geglu_tanh", True, False, "token", "slot", False, torch.float16, "empty_expert", id="geglu_tanh-interleaved-fp16-empty-expert"),
    pytest.param("swiglu_oai", True, True, "token", "slot", True, torch.float32, "switch", id="oai-interleaved-transposed-switch-drops"),
    pytest.param("swiglu_oai", False, False, "slot", "slot", False, torch.float16, "softmax_topk", id="oai-concat-fp16-slot-rows"),
    pytest.param("gelu", False, True, "token", "slot", False, torch.float32, "dense", id="gelu-dense"),
    pytest.param("gelu_tanh", False, False, "padded", "padded", True, torch.float32, "one_expert", id="gelu_tanh-padded-in-all-one-expert"),
    pytest.param("relu", False, True, "token", "slot", False, torch.float16, "grouped_sigmoid_topk", id="relu-fp16-sigmoid"),
    pytest.param("silu", False, False, "token", "slot", True, torch.float32, "softmax_topk", id="silu-transposed"),
]


@pytest.mark.parametrize("act,interleaved,bias,a_rows,c_rows,transposed,dtype,router", _GEMM1)
def test_gemm1_activation_epilogue(act, interleaved, bias, a_rows, c_rows, transposed, dtype, router):
    t, h, i, e = 37, 72, 40, 5  # odd sizes: row, K and N tails
    routing, _ = make_routing(router, t, e, k=2)
    plan = build_plan_torch(routing, 16)
    w13, _, b13, _ = make_weights(e, h, i, act, dtype, bias=bias, transposed=transposed)
    w13 = w13.transpose(1, 2) if transposed else w13  # logical [E, nI, H] as a strided view
    rows_a = {"token": t, "slot": plan.num_slots, "padded": plan.num_padded_rows}[a_rows]
    a = torch.randn(rows_a, h, device=DEVICE).to(dtype)
    activation = Activation(act)
    n_i = w13.shape[1]
    rc = plan.num_slots if c_rows == "slot" else plan.num_padded_rows
    kw = dict(a_rows=a_rows, c_rows=c_rows, epilogue="act", activation=activation, interleaved=interleaved,
              bias=b13, store_pre=True, config=CFG)
    got = grouped_gemm(a, w13, plan, c=poisoned((rc, i), dtype), pre=poisoned((rc, n_i), dtype), **kw)
    want = grouped_gemm_torch(a, w13, plan, c=poisoned((rc, i), dtype), pre=poisoned((rc, n_i), dtype), **kw)
    owned = _valid_slots(plan) if c_rows == "slot" else plan.padded_slot >= 0
    _check_rows(got.c, want.c, owned, dtype, "h")
    _check_rows(got.pre, want.pre, owned, dtype, "pre")
    # The twin itself against an independent formula: act(a_row @ W13[e]^T + b13[e]).
    s = int(torch.nonzero(owned)[0]) if c_rows == "slot" else int(plan.padded_slot[owned][0])
    ex = int(plan.slot_expert[s])
    row = {"token": int(plan.slot_token[s]), "slot": s,
           "padded": int(torch.nonzero(plan.padded_slot == s)[0])}[a_rows]
    h13 = a[row].float() @ w13[ex].float().t() + (b13[ex].float() if bias else 0)
    from moe_kernels.activations import apply_activation
    ref = apply_activation(h13[None], activation, interleaved)[0]
    crow = s if c_rows == "slot" else int(torch.nonzero(plan.padded_slot == s)[0])
    assert_close(got.c[crow], ref, tol(dtype) * 4, "h vs formula")


def test_gemm1_recompute_mode_writes_only_pre():
    """store_c=False (recompute_h in backward): pre written, no activation output."""
    t, h, i, e = 20, 64, 48, 4
    routing, _ = make_routing("softmax_topk", t, e, k=2)
    plan = build_plan_torch(routing, 16)
    w13, _, b13, _ = make_weights(e, h, i, "swiglu", torch.float32, bias=True)
    x = torch.randn(t, h, device=DEVICE)
    kw = dict(a_rows="token", epilogue="act", activation=Activation("swiglu"), bias=b13, store_c=False,
              store_pre=True, config=CFG)
    got = grouped_gemm(x, w13, plan, pre=poisoned((plan.num_slots, 2 * i), torch.float32), **kw)
    want = grouped_gemm_torch(x, w13, plan, **kw)
    assert got.c is None
    _check_rows(got.pre, want.pre, _valid_slots(plan), torch.float32, "pre")


# --------------------------------------------------------------------------- GEMM2 / dGEMM1: plain epilogue


@pytest.mark.parametrize("router,dtype,t,e,k", [
    pytest.param("softmax_topk", torch.float32, 33, 8, 2, id="topk"),
    pytest.param("switch", torch.float16, 41, 5, 1, id="switch-drops-fp16"),
    pytest.param("expert_choice", torch.float32, 29, 7, 0, id="expert-choice-0-to-E-slots"),
    pytest.param("dense", torch.float32, 9, 4, 0, id="dense"),
    pytest.param("one_expert", torch.float32, 50, 4, 1, id="all-tokens-one-expert"),
    pytest.param("dropped", torch.float16, 31, 6, 3, id="from_topk-sentinels"),
])
def test_gemm2_row_scale_fused_combine(router, dtype, t, e, k):
    h, i = 88, 40
    routing, _ = make_routing(router, t, e, k=k)
    plan = build_plan_torch(routing, 16)
    s = plan.num_slots
    _, w2, _, b2 = make_weights(e, h, i, "silu", dtype, bias=True)
    hin = torch.randn(s, i, device=DEVICE).to(dtype)
    nb = -(-h // CFG.BLOCK_N)
    out = poisoned((t, h), dtype)
    pro = Prologue.for_combine(out, CFG.BLOCK_N)
    counters = pro.counters.fill_(5)
    # The previous kernel's prologue (here GEMM1's) zeroes the counters and empty tokens' rows.
    x = torch.randn(t, 32, device=DEVICE).to(dtype)
    w13 = torch.randn(e, 32, 32, device=DEVICE).to(dtype)
    grouped_gemm(x, w13, plan, a_rows="token", epilogue="act", activation=Activation("relu"),
                 prologue=pro, config=CFG)
    assert (counters == 0).all() and pro.ran
    kw = dict(a_rows="slot", bias=b2, row_scale=True, combine="fused", config=CFG)
    got = grouped_gemm(hin, w2, plan, c=poisoned((s, h), dtype), out=out, combine_from=pro, **kw)
    assert not pro.ran, "the fused combine consumes the hand-off"
    want = grouped_gemm_torch(hin, w2, plan, c=poisoned((s, h), dtype), **kw)
    _check_rows(got.c, want.c, _valid_slots(plan), dtype, "y")
    has = (plan.token_slots >= 0).any(1)
    assert_close(out[has], want.out[has], tol(dtype), "out")
    assert (out[~has] == 0).all(), "tokens without a valid slot must get zero rows"
    # Counters end at each token's number of valid slots per column block.
    assert torch.equal(counters.view(t, nb), (plan.token_slots >= 0).sum(1, keepdim=True).int().expand(t, nb))
    # Same bits as the separate combine kernel.
    sep = combine(got.c, plan.token_slots)
    assert torch.equal(sep, out)


def test_act_bwd_every_activation():
    """dGEMM2's epilogue (activation backward, h, slot-weight partials) for every
    activation and both W13 row layouts, against the twin (autograd of the activation)."""
    t, h, i, e = 23, 64, 40, 5
    routing, _ = make_routing("softmax_topk", t, e, k=2)
    plan = build_plan_torch(routing, 16)
    s = plan.num_slots
    dout = torch.randn(t, h, device=DEVICE)
    _, w2, _, b2 = make_weights(e, h, i, "silu", torch.float32, bias=True)
    w2t = w2.transpose(1, 2)  # [E, I, H]
    valid = _valid_slots(plan)
    nbi = -(-i // CFG.BLOCK_N)
    for act in ACTIVATIONS:
        a = Activation(act)
        for inter in ((False, True) if a.gated else (False,)):
            pre = torch.randn(s, a.width_factor * i, device=DEVICE) * 2
            kw = dict(a_rows="token", epilogue="act_bwd", activation=a, interleaved=inter, pre=pre, store_h=True,
                      bias_dot=b2, config=CFG)
            got = grouped_gemm(dout, w2t, plan, c=poisoned((s, a.width_factor * i), torch.float32),
                               h=poisoned((s, i), torch.float32), wpart=poisoned((s, nbi), torch.float32), **kw)
            want = grouped_gemm_torch(dout, w2t, plan, c=poisoned((s, a.width_factor * i), torch.float32),
                                      h=poisoned((s, i), torch.float32), wpart=poisoned((s, nbi), torch.float32),
                                      **kw)
            name = f"{act}{'-interleaved' if inter else ''}"
            _check_rows(got.c, want.c, valid, torch.float32, f"dh13 {name}")
            _check_rows(got.h, want.h, valid, torch.float32, f"h {name}")
            _check_rows(got.wpart, want.wpart, valid, torch.float32, f"wpart {name}")


def test_dgrad_x_dw_final_and_prologue():
    """dGEMM1: dh13 x W13 (a transposed view) combined per token, dw = sum of partials;
    the dGEMM2 prologue zeroes dw (dropped slots keep 0), dx rows of empty tokens, counters."""
    t, h, i, e = 30, 72, 32, 6
    routing, _ = make_routing("switch", t, e)
    plan = build_plan_torch(routing, 16)
    s = plan.num_slots
    w13, _, _, _ = make_weights(e, h, i, "geglu", torch.float32, bias=False)
    dh13 = torch.randn(s, 2 * i, device=DEVICE)
    wpart = torch.randn(s, 3, device=DEVICE)
    dx, dw = poisoned((t, h), torch.float32), poisoned((s,), torch.float32)
    pro = Prologue.for_combine(dx, CFG.BLOCK_N, zero_f32=dw)
    pro.counters.fill_(9)
    grouped_gemm(torch.randn(t, 32, device=DEVICE), w13[:, :32, :32].contiguous(), plan, a_rows="token",
                 epilogue="act", activation=Activation("relu"), store_c=False, store_pre=False,
                 prologue=pro, config=CFG)
    kw = dict(a_rows="slot", combine="fused", dw_final=True, wpart=wpart, config=CFG)
    grouped_gemm(dh13, w13.transpose(1, 2), plan, out=dx, combine_from=pro, dw=dw, **kw)
    want = grouped_gemm_torch(dh13, w13.transpose(1, 2), plan, **kw)
    valid = _valid_slots(plan)
    assert not bool(valid.all()), "the case must drop slots"
    assert_close(dw[valid], want.dw[valid], 1e-6, "dw")
    assert (dw[~valid] == 0).all()
    has = (plan.token_slots >= 0).any(1)
    assert_close(dx[has], want.out[has], tol(torch.float32), "dx")
    assert (dx[~has] == 0).all()


# 64-bit row offsets: the interpreter computes them in numpy and could only show an
# overflow with a buffer of 2^31 elements, so they are checked in the compiled IR
# (test_triton_aot_gemm.py::test_row_offsets_are_64_bit) and on a GPU
# (test_triton_gpu.py::test_rows_past_2_31_elements).


# --------------------------------------------------------------------------- combine kernel


@pytest.mark.parametrize("router", ["softmax_topk", "expert_choice", "switch"])
def test_combine_kernel_vs_twin(router):
    t, e, n = 27, 6, 100
    routing, _ = make_routing(router, t, e, k=3)
    plan = build_plan_torch(routing, 16)
    y = torch.randn(plan.num_slots, n, device=DEVICE)
    got = combine(y, plan.token_slots, out=poisoned((t, n), torch.float32))
    want = combine_torch(y, plan.token_slots)
    assert not torch.isnan(got).any()
    assert_close(got, want, 1e-6, "out")  # the same fp32 sums, maybe associated differently


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_raise_value_errors():
    t, h, i, e = 8, 32, 32, 4
    routing, _ = make_routing("softmax_topk", t, e, k=2)
    plan = build_plan_torch(routing, 16)
    x = torch.randn(t, h, device=DEVICE)
    w = torch.randn(e, i, h, device=DEVICE)
    with pytest.raises(ValueError, match="a_rows"):
        grouped_gemm(x, w, plan, a_rows="rows")
    with pytest.raises(ValueError, match="a: expected 16 rows"):
        grouped_gemm(x, w, plan, a_rows="slot")
    with pytest.raises(ValueError, match="dtype"):
        grouped_gemm(x.half(), w, plan, a_rows="token")
    with pytest.raises(ValueError, match="activation"):
        grouped_gemm(x, w, plan, a_rows="token", epilogue="act")
    with pytest.raises(ValueError, match="BLOCK_M"):
        grouped_gemm(x, w, plan, a_rows="token", config=GemmConfig(BLOCK_M=32))
    with pytest.raises(ValueError, match="combine_from: this Prologue has not run"):
        grouped_gemm(x, w, plan, a_rows="token", combine="fused",
                     combine_from=Prologue.for_combine(torch.empty(t, i, device=DEVICE), 16))
    with pytest.raises(ValueError, match="c: expected"):
        grouped_gemm(x, w, plan, a_rows="token", c=torch.empty(3, 3, device=DEVICE))


# --------------------------------------------------------------------------- configs


def test_config_is_keyed_on_a_bucket_of_rows_per_expert_and_documented(monkeypatch):
    """The contract: configs and the plan's BLOCK_M are functions of static shapes and
    of T*k only through a power-of-two bucket (so a CUDA graph / compiled graph captured
    at one batch size stays valid for every batch size of its bucket), never of a
    runtime value (no tensor argument)."""
    monkeypatch.delenv(options.ENV_CONFIG, raising=False)
    import inspect
    for fn in (gemm_config, layer_block_m):
        params = inspect.signature(fn).parameters
        assert not set(params) & {"num_tokens", "t", "m", "x", "routing", "plan"}, fn.__name__
        assert "num_slots" in params, f"{fn.__name__} takes the slot count (a static shape), bucketed"
    h100 = (9, 0)
    # Every slot count of a bucket gives the same BLOCK_M and the same configs.
    for lo in (1, 2, 16, 128, 1024, 8192):
        bucket = {configs.slots_bucket(s) for s in range(lo + 1, 2 * lo + 1)}
        assert len(bucket) == 1, (lo, bucket)
        for e in (8, 128):
            bms = {layer_block_m(h100, None, s, e) for s in range(lo + 1, 2 * lo + 1)}
            assert len(bms) == 1, (lo, e, bms)
            bm = bms.pop()
            cfgs = {gemm_config(e, 768, 2048, torch.bfloat16, h100, bm, num_slots=s, num_sms=132)
                    for s in range(lo + 1, 2 * lo + 1)}
            assert len(cfgs) == 1, (lo, e, cfgs)
    # The regimes: expected rows per expert (bucketed T*k / E) -> BLOCK_M 16 / 32 / 64 / 128.
    assert [configs.regime_of(s, 8) for s in (1, 128, 129, 256, 257, 1024, 1025)] == \
        ["decode", "decode", "small", "small", "medium", "medium", "prefill"]
    assert [layer_block_m(h100, None, s, 8) for s in (2, 200, 1000, 32768)] == [16, 32, 64, 128]
    assert layer_block_m(h100) == 64 and layer_block_m((0, 0), None, 32768, 8) == 16  # no T: medium; interpreter
    assert layer_block_m(h100, {"BLOCK_M": 32}, 32768, 8) == 32  # a pin wins
    qwen = gemm_config(128, 768, 2048, torch.bfloat16, h100, 64, gated_b=True)   # fine-grained experts
    mixtral = gemm_config(8, 14336, 4096, torch.bfloat16, h100, 64, gated_b=True)
    assert qwen.BLOCK_N == 64 and mixtral.BLOCK_N == 128
    assert mixtral.num_stages == 4 and gemm_config(8, 14336, 4096, torch.bfloat16, (8, 0), 64).num_stages == 3
    assert gemm_config(8, 14336, 4096, torch.bfloat16, h100, 64, heavy_epilogue=True).BLOCK_N == 64
    # Decode splits K; prefill is wide, TMA and persistent on sm_90 but not on sm_80.
    dec = gemm_config(8, 4096, 14336, torch.bfloat16, h100, 16, num_slots=2, num_sms=132)
    assert dec.SPLIT_K > 1 and dec.BLOCK_K == 128 and not dec.USE_TMA
    pre = gemm_config(8, 4096, 14336, torch.bfloat16, h100, 128, num_slots=16384, num_sms=132)
    assert (pre.BLOCK_M, pre.BLOCK_N, pre.num_warps, pre.SPLIT_K) == (128, 128, 8, 1) and pre.USE_TMA and pre.PERSISTENT
    a100 = gemm_config(8, 4096, 14336, torch.bfloat16, (8, 0), 128, num_slots=16384, num_sms=108)
    assert not a100.USE_TMA and not a100.PERSISTENT
    # Shared memory: the estimate fits every GPU's limit (consumer parts: 99 KB), for the
    # fine-grained and the large-expert gated GEMM1, in every regime.
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (12, 1)):
        for d in (torch.float16, torch.bfloat16, torch.float32):
            for e, n in ((64, 7168), (8, 14336)):
                for bm in (16, 32, 64, 128):
                    c = gemm_config(e, n, 4096, d, cap, bm, gated_b=True, num_slots=4, num_sms=132)
                    used = configs.pipeline_shared_bytes(cap, bm, c.BLOCK_N, c.BLOCK_K,
                                                         4 if d == torch.float32 else 2, 2, c.num_stages)
                    assert used <= configs.shared_limit_of(cap), (cap, d, e, bm, c)
    # sm_120 (99 KB) no longer takes Hopper's 4 stages for the large gated GEMM1.
    assert gemm_config(8, 14336, 4096, torch.bfloat16, (12, 0), 64, gated_b=True).num_stages == 3
    assert gemm_config(8, 4096, 14336, torch.bfloat16, (12, 0), 64).num_stages == 4
    assert configs.shared_limit_of((12, 0)) == 101376 and configs.shared_limit_of((9, 0)) == 232448
    for word in ("decode", "prefill", "bucket", "split-K", "TMA", "persistent"):
        assert word in configs.__doc__, word


def test_config_env_pin(monkeypatch):
    """The environment supplies the default pin (read in moe_kernels.options only)."""
    monkeypatch.setenv(options.ENV_CONFIG, "BLOCK_M=32, BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3")
    pin = options.resolve().gemm_pin
    assert layer_block_m((9, 0), pin) == 32
    c = gemm_config(8, 64, 64, torch.float16, (9, 0), 32, pin=pin)
    assert (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages) == (32, 128, 64, 8, 3)
    for bad, what in (("BLOCK_Q=3", "NAME=INT"), ("BLOCK_N=abc", "expected an int"), ("BLOCK_N=48", "power of two"),
                      ("BLOCK_N", "NAME=INT")):
        monkeypatch.setenv(options.ENV_CONFIG, bad)
        with pytest.raises(ValueError, match=what):
            options.resolve()


def test_config_pin_from_the_python_api(monkeypatch):
    """A pin given as a keyword beats the process default, which beats the environment."""
    monkeypatch.setenv(options.ENV_CONFIG, "BLOCK_N=128")
    assert options.resolve().gemm_pin == {"BLOCK_N": 128}
    with options.override(gemm_config={"BLOCK_N": 32, "num_warps": 2}):
        assert options.resolve().gemm_pin == {"BLOCK_N": 32, "num_warps": 2}
        assert options.resolve(gemm_config={"BLOCK_K": 16}).gemm_pin == {"BLOCK_K": 16}
    assert options.resolve().gemm_pin == {"BLOCK_N": 128}
    with pytest.raises(ValueError, match="BLOCK_N"):
        options.KernelOptions(gemm_config={"BLOCK_N": 48})
    with pytest.raises(ValueError, match="gemm_config: expected fields"):
        options.KernelOptions(gemm_config={"BLOCK_Q": 16})


def test_config_env_pin_drives_the_backend(monkeypatch):
    """The pinned BLOCK_M pads the plan (TritonBackend.block_m) and the GEMMs follow."""
    from moe_kernels.backends import get_backend
    from moe_kernels.params import expert_params
    monkeypatch.setenv(options.ENV_CONFIG, "BLOCK_M=32,BLOCK_N=64,BLOCK_K=32")
    w13, w2, _, _ = make_weights(4, 32, 32, "swiglu", torch.float32, bias=False)
    params = expert_params(w13, w2)
    be = get_backend("triton", DEVICE)
    assert be.block_m(params) == 32
    routing, _ = make_routing("softmax_topk", 10, 4, k=2)
    assert be.plan(routing, params).block_m == 32
    # The typed path: a keyword of the call wins over the environment.
    pinned = options.KernelOptions(gemm_config={"BLOCK_M": 16})
    assert be.block_m(params, pinned) == 16 and be.plan(routing, params, pinned).block_m == 16
    x = torch.randn(10, 32, device=DEVICE)
    ref = mk.fused_experts(x, routing, params, backend="torch")
    got = mk.fused_experts(x, routing, params, backend="triton", gemm_config={"BLOCK_M": 16, "BLOCK_N": 32})
    assert_close(got, ref, 1e-5, "pinned-config output")


@pytest.mark.skipif(os.environ.get("MOE_KERNELS_AUTOTUNE") == "1", reason="checks the default")
def test_autotune_flag_default_off():
    assert not options.resolve().autotune
    assert all(set(c) == {"BLOCK_K"} for c, _, _ in configs.autotune_configs())


# --------------------------------------------------------------------------- TF32 setting


@pytest.fixture
def fp32_precision():
    """Set ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9) for one test."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = m.fp32_precision

    def set_(value):
        m.fp32_precision = value

    yield set_
    m.fp32_precision = saved


@pytest.mark.parametrize("value,want", [("tf32", "tf32"), ("ieee", "ieee")])
def test_fp32_gemm_under_the_new_precision_api(fp32_precision, value, want):
    """With the torch >= 2.9 API set, reading the legacy allow_tf32 raises RuntimeError:
    the precision comes from fp32_precision, and an fp32 layer runs."""
    import moe_kernels as mk
    from moe_kernels.backends.triton.gemm import dot_precision
    fp32_precision(value)
    assert dot_precision(torch.float32) == want and dot_precision(torch.float16) == "ieee"
    t, h, i, e = 9, 32, 32, 3
    routing, _ = make_routing("softmax_topk", t, e, k=2)
    w13, w2, _, _ = make_weights(e, h, i, "swiglu", torch.float32, bias=False)
    x = torch.randn(t, h, device=DEVICE)
    out = mk.fused_experts(x, routing, w13, w2, backend="triton")
    assert_close(out, mk.fused_experts(x, routing, w13, w2, backend="torch"), 1e-2 if want == "tf32" else 1e-5,
                 "out")


def test_tf32_rule_every_api_state():
    """The rule itself, on stand-ins for torch's settings objects."""
    from types import SimpleNamespace as NS

    from moe_kernels.backends.triton.gemm import _tf32_allowed

    class Mixed:  # torch when the legacy and new APIs were mixed: allow_tf32 refuses
        @property
        def allow_tf32(self):
            raise RuntimeError("mix of the legacy and new APIs")

    g = (lambda v: NS(fp32_precision=v))
    assert _tf32_allowed(NS(fp32_precision="tf32"), g("ieee"))
    assert not _tf32_allowed(NS(fp32_precision="ieee"), g("tf32"))
    assert _tf32_allowed(NS(fp32_precision="none"), g("tf32"))  # "none": the global setting decides
    assert not _tf32_allowed(NS(fp32_precision="none"), g("none"))
    assert not _tf32_allowed(NS(fp32_precision="none"), g("ieee"))
    assert _tf32_allowed(NS(allow_tf32=True), NS())  # torch < 2.9
    assert not _tf32_allowed(NS(allow_tf32=False), NS())
    assert not _tf32_allowed(Mixed(), NS())
