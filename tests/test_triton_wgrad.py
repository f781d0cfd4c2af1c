"""The Triton expert weight/bias-gradient kernel (moe_kernels.backends.triton.wgrad) against its
pure-PyTorch twin, plus a self-test of the interpreter's bf16 shim (tests/triton_interp.py)
that the bf16 cases rely on.
"""

import pytest
import torch

from triton_interp import DEVICE, assert_no_poison, bf16_interp, import_or_skip, poison_empty  # noqa: F401

import_or_skip()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moe_kernels import routing as R  # noqa: E402
from moe_kernels.plan import build_plan_torch  # noqa: E402
from moe_kernels.backends.triton import wgrad as TW  # noqa: E402
from moe_kernels.backends.triton.wgrad import (  # noqa: E402
    expert_bias_grad,
    expert_bias_grad_torch,
    expert_weight_grad,
    expert_weight_grad_torch,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}  # relative to the largest |dW|


def _plan(kind, t, e, bm=16):
    x = torch.randn(t, e, device=DEVICE)
    if kind == "topk2":
        r = R.softmax_topk(x, 2)
    elif kind == "topk1-empty-experts":
        x[:, 0] += 30.0  # expert 0 takes every token, the others get none
        r = R.softmax_topk(x, 1)
    elif kind == "switch-dropped":
        x[:, 1] += 2.0
        r = R.switch(x, capacity_factor=0.75)
    elif kind == "expert-choice":
        r = R.expert_choice(x, capacity_factor=1.5)
    return build_plan_torch(r, bm)


def _rows(mode, plan):
    return {"slot": plan.num_slots, "token": plan.num_tokens, "padded": plan.num_padded_rows}[mode]


def _assert_close(got, want, tol, name):
    scale = max(float(want.abs().max()), 1e-6)
    err = float((got.float() - want.float()).abs().max())
    assert err <= tol * scale, f"{name}: max error {err} > {tol} * {scale}"


CASES = [
    # (routing, T, E, N, K, a_rows, b_rows, scale)     edge covered
    pytest.param("topk2", 33, 5, 24, 40, "token", "slot", False, id="dW13-x-by-token"),
    pytest.param("topk2", 64, 13, 72, 17, "slot", "token", True, id="dW2-dY-by-token-scaled-2-N-tiles"),
    pytest.param("topk1-empty-experts", 1, 4, 16, 16, "padded", "padded", False, id="T1-empty-experts-padded"),
    pytest.param("switch-dropped", 45, 4, 33, 80, "slot", "slot", True, id="dropped-slots-2-K-tiles"),
    pytest.param("expert-choice", 33, 5, 20, 24, "token", "padded", False, id="expert-choice"),
]


def _run_case(monkeypatch, kind, t, e, n, k, a_rows, b_rows, use_scale, dtype):
    poison_empty(monkeypatch, TW)
    plan = _plan(kind, t, e)
    dt = DTYPES[dtype]
    a = torch.randn(_rows(a_rows, plan), k, device=DEVICE).to(dt)
    b = torch.randn(_rows(b_rows, plan), n, device=DEVICE).to(dt)
    scale = torch.rand(plan.num_slots, device=DEVICE) if use_scale else None
    db = torch.full((e, n), float("nan"), dtype=dt, device=DEVICE)
    dw = expert_weight_grad(a, a_rows, b, b_rows, plan, scale=scale, bias_out=db)
    ref_db = torch.empty(e, n, dtype=torch.float32, device=DEVICE)
    ref = expert_weight_grad_torch(a, a_rows, b, b_rows, plan, out=torch.empty(e, n, k, device=DEVICE),
                                   scale=scale, bias_out=ref_db)
    assert dw.shape == (e, n, k) and dw.dtype == dt
    assert_no_poison(dw, "dW")
    assert_no_poison(db, "db")
    assert float(ref.abs().max()) > 0
    _assert_close(dw, ref, TOL[dtype], "dW")
    _assert_close(db, ref_db, TOL[dtype], "db")
    empty = plan.expert_counts == 0
    assert bool((dw[empty] == 0).all()) and bool((db[empty] == 0).all())
    alone = expert_bias_grad(b, b_rows, plan, scale=scale)
    assert_no_poison(alone, "db alone")
    _assert_close(alone, expert_bias_grad_torch(b, b_rows, plan, scale=scale).float(), TOL[dtype], "db alone")


@pytest.mark.parametrize("kind,t,e,n,k,a_rows,b_rows,use_scale", CASES)
def test_matches_twin_fp32(monkeypatch, kind, t, e, n, k, a_rows, b_rows, use_scale):
    _run_case(monkeypatch, kind, t, e, n, k, a_rows, b_rows, use_scale, "fp32")


@pytest.mark.parametrize("kind,t,e,n,k,a_rows,b_rows,use_scale", [CASES[1], CASES[3]])
def test_matches_twin_fp16(monkeypatch, kind, t, e, n, k, a_rows, b_rows, use_scale):
    _run_case(monkeypatch, kind, t, e, n, k, a_rows, b_rows, use_scale, "fp16")


@pytest.mark.parametrize("kind,t,e,n,k,a_rows,b_rows,use_scale", [CASES[0], CASES[1]])
def test_matches_twin_bf16(monkeypatch, bf16_interp, kind, t, e, n, k, a_rows, b_rows, use_scale):
    _run_case(monkeypatch, kind, t, e, n, k, a_rows, b_rows, use_scale, "bf16")


def test_empty_batch_gives_zeros(monkeypatch):
    # no rows at all (T = 0): every expert's gradient is written as zeros
    poison_empty(monkeypatch, TW)
    plan = _plan("topk2", 0, 5)
    a = torch.randn(0, 24, device=DEVICE)
    b = torch.randn(0, 40, device=DEVICE)
    dw = expert_weight_grad(a, "token", b, "slot", plan)
    db = expert_bias_grad(b, "slot", plan)
    assert dw.shape == (5, 40, 24) and bool((dw == 0).all()) and bool((db == 0).all())


def test_out_as_transposed_view():
    # writing straight into a weight-gradient buffer stored transposed ([E, K, N] memory)
    plan = _plan("topk2", 33, 5)
    a = torch.randn(plan.num_tokens, 24, device=DEVICE)
    b = torch.randn(plan.num_slots, 40, device=DEVICE)
    store = torch.full((5, 24, 40), float("nan"), device=DEVICE)
    out = store.transpose(1, 2)
    got = expert_weight_grad(a, "token", b, "slot", plan, out=out)
    assert got.data_ptr() == store.data_ptr()
    assert_no_poison(store, "out")
    _assert_close(got, expert_weight_grad_torch(a, "token", b, "slot", plan), 1e-5, "dW")


def test_strided_inputs():
    # a and b as column slices of wider tensors (row stride != width)
    plan = _plan("topk2", 20, 4)
    a = torch.randn(plan.num_tokens, 50, device=DEVICE)[:, 5:35]
    b = torch.randn(plan.num_slots, 40, device=DEVICE)[:, ::2]
    _assert_close(expert_weight_grad(a, "token", b, "slot", plan),
                  expert_weight_grad_torch(a.contiguous(), "token", b.contiguous(), "slot", plan), 1e-5, "dW")


def test_deterministic():
    plan = _plan("topk2", 64, 4)
    a = torch.randn(plan.num_slots, 32, device=DEVICE)
    b = torch.randn(plan.num_slots, 32, device=DEVICE)
    first = expert_weight_grad(a, "slot", b, "slot", plan)
    assert torch.equal(first, expert_weight_grad(a, "slot", b, "slot", plan))


def test_bad_arguments():
    plan = _plan("topk2", 8, 4)
    a = torch.randn(plan.num_slots, 16, device=DEVICE)
    with pytest.raises(ValueError, match="a_rows"):
        expert_weight_grad(a, "tokens", a, "slot", plan)
    with pytest.raises(ValueError, match="needs 8 rows"):
        expert_weight_grad(a, "token", a, "slot", plan)
    with pytest.raises(ValueError, match="dtype"):
        expert_weight_grad(a, "slot", a.half(), "slot", plan)
    with pytest.raises(ValueError, match="scale"):
        expert_weight_grad(a, "slot", a, "slot", plan, scale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        expert_weight_grad(a, "slot", a, "slot", plan, out=torch.empty(4, 16, 15, device=DEVICE))


# --------------------------------------------------------------------------- bf16 shim self-test


@triton.jit
def _shim_probe_kernel(a_ptr, b_ptr, y_ptr, m_ptr, s_ptr, d_ptr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tile = o[:, None] * BLOCK + o[None, :]
    a = tl.load(a_ptr + tile)  # [BLOCK, BLOCK] bf16
    b = tl.load(b_ptr + tile)  # [BLOCK, BLOCK] bf16
    tl.store(y_ptr + tile, a * b + a - tl.exp(b.to(tl.float32)).to(tl.bfloat16))  # [BLOCK, BLOCK] bf16
    tl.store(m_ptr + o, tl.max(a, 1))  # [BLOCK] bf16
    tl.store(s_ptr + o, tl.sum(a.to(tl.float32), 1).to(tl.bfloat16))  # [BLOCK] bf16
    tl.store(d_ptr + tile, tl.dot(a, b))  # [BLOCK, BLOCK] fp32


def test_bf16_shim_is_exact(bf16_interp):
    # Per-op float32 compute with round-to-nearest-even to bf16, as the GPU does.
    n = 16
    a = torch.randn(n, n).bfloat16().to(DEVICE)
    b = torch.randn(n, n).bfloat16().to(DEVICE)
    y = torch.empty_like(a)
    m = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    s = torch.empty_like(m)
    d = torch.empty(n, n, device=DEVICE)
    _shim_probe_kernel[(1,)](a, b, y, m, s, d, BLOCK=n)
    f = lambda v: v.float()  # noqa: E731
    step = (f((f(a) * f(b)).bfloat16()) + f(a)).bfloat16()
    want_y = (f(step) - f(torch.exp(f(b)).bfloat16())).bfloat16()
    close = (f(y) - f(want_y)).abs() <= 2 ** -7 * f(want_y).abs()  # exp may differ by an fp32 ulp
    assert bool(close.all())
    assert torch.equal(m, a.max(1).values)
    assert torch.equal(s, f(a).sum(1).bfloat16()) or float((f(s) - f(a).sum(1)).abs().max()) < 0.02
    torch.testing.assert_close(d, f(a) @ f(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_precision_follows_the_gemms(monkeypatch, tf32):
    """fp32 weight gradients use TF32 exactly when the GEMMs (and torch's matmuls) do;
    16-bit inputs leave the precision to tl.dot's default."""
    from moe_kernels.backends.triton import gemm
    monkeypatch.setattr(gemm, "tf32_allowed", lambda: tf32)
    seen = []

    class Probe:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(kw["PRECISION"])

    monkeypatch.setattr(TW, "_expert_wgrad_bwd_kernel", Probe())
    plan = _plan("topk2", 9, 4)
    for dt in (torch.float32, torch.float16):
        a = torch.randn(plan.num_tokens, 16, device=DEVICE).to(dt)
        b = torch.randn(plan.num_slots, 16, device=DEVICE).to(dt)
        expert_weight_grad(a, "token", b, "slot", plan)
    assert seen == [gemm.dot_precision(torch.float32), None] == [("tf32" if tf32 else "ieee"), None]
