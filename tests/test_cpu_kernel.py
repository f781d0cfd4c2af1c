"""The compiled CPU kernel (csrc/cpu/expert_linear.c via moe_kernels/cpu_kernel.py):
against its pure-PyTorch twin on both weight layouts and every edge the kernel has
(row blocks of 4, K not a multiple of 16, column tiles, dropped slots, empty experts,
one expert taking everything), poisoned outputs, bitwise repeatability across thread
counts and slot orders, its argument checks, the torch backend's "kernel" path end to
end, and the fallback when the library is missing."""

import pytest
import torch

import moe_kernels.backends.torch.planless as planless
import moe_kernels.cpu_kernel as ck
from moe_kernels import expert_params, fused_experts, moe_reference
from moe_kernels.routing import Routing, softmax_topk
from moe_kernels.testing import assert_close, assert_written, poison, random_weights

needs_kernel = pytest.mark.skipif(not ck.available(), reason=f"CPU kernel not built: {ck.unavailable_reason()}")


def _weight(e, n, k, layout, gen, dtype=torch.float32):
    w = (torch.randn(e, n, k, generator=gen) / k ** 0.5).to(dtype)
    return w.contiguous() if layout == "nk" else w.transpose(1, 2).contiguous().transpose(1, 2)


def _slots(s, e, gen, *, rows=None, only=None, empty=(), dropped=()):
    if only is not None:
        ex = torch.full((s,), only, dtype=torch.int32)
    else:
        allowed = torch.tensor([i for i in range(e) if i not in empty])
        ex = allowed[torch.randint(len(allowed), (s,), generator=gen)].to(torch.int32)
    for d in dropped:
        ex[d] = e if d % 2 == 0 else -1  # past the last expert, and negative: both are dropped
    row = None if rows is None else torch.randint(rows, (s,), generator=gen, dtype=torch.int32)
    return row, ex


# Each case: (S slots, E experts, N, K, rows of x or None for slot order, extra) with the edge it covers.
CASES = [
    pytest.param(1, 1, 16, 16, 1, {}, id="one-slot-one-expert"),
    pytest.param(1, 7, 37, 29, 1, {}, id="T1-odd-N-K"),                       # K % 16 tail, N not a multiple of 4
    pytest.param(9, 13, 40, 24, 3, {"empty": (2, 5)}, id="prime-E-empty-experts"),
    pytest.param(11, 5, 24, 20, None, {"only": 3}, id="all-to-one-expert"),   # 11 slots: blocks of 4, 4, 3
    pytest.param(23, 6, 600, 33, 10, {}, id="N-past-a-column-tile"),          # kn: tiles of 512 + 88
    pytest.param(17, 4, 48, 200, 17, {"dropped": (0, 5, 16)}, id="dropped-slots"),
    pytest.param(64, 32, 72, 36, 16, {}, id="decode-batch"),                  # GPT-OSS-like, ~2 slots per expert
]


@needs_kernel
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("s,e,n,k,rows,extra", CASES)
def test_kernel_matches_twin(s, e, n, k, rows, extra, layout, bias, wdtype):
    # bfloat16 weights are widened exactly, so the float32 tolerance holds for both.
    gen = torch.Generator().manual_seed(s * 31 + e * 7 + n + k)
    w = _weight(e, n, k, layout, gen, wdtype)
    assert ck.kernel_layout(w) == layout
    b = torch.randn(e, n, generator=gen) if bias else None
    x = torch.randn(rows if rows is not None else s, k, generator=gen)
    slot_row, slot_expert = _slots(s, e, gen, rows=rows, **extra)
    out = poison(torch.empty(s, n))
    ck.expert_linear_into(out, x, slot_row, slot_expert, w, b)
    assert_written(out)
    want = ck.expert_linear_reference(x, slot_row, slot_expert, w, b)
    assert_close(out, want, torch.float32)
    for d in extra.get("dropped", ()):
        assert torch.count_nonzero(out[d]) == 0  # a dropped slot's row is zero, bias or not


@needs_kernel
def test_kernel_reads_strided_rows():
    # x with a row stride wider than K (a column slice of a bigger tensor).
    gen = torch.Generator().manual_seed(3)
    w = _weight(5, 40, 24, "nk", gen)
    x = torch.randn(6, 50, generator=gen)[:, 3:27]
    slot_row, slot_expert = _slots(12, 5, gen, rows=6)
    assert_close(ck.expert_linear(x, slot_row, slot_expert, w), ck.expert_linear_reference(x, slot_row, slot_expert, w),
                 torch.float32)


@needs_kernel
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_kernel_bitwise_across_threads_and_slot_order(layout):
    # The same slot gives bitwise the same row whatever the thread count, the other
    # slots, and their order (each element reduced in an order fixed by K alone).
    gen = torch.Generator().manual_seed(11)
    e, n, k, s = 6, 1200, 230, 40
    w = _weight(e, n, k, layout, gen)
    x = torch.randn(s, k, generator=gen)
    slot_row, slot_expert = _slots(s, e, gen, rows=s)
    old = ck.THREAD_MIN_BYTES
    ck.THREAD_MIN_BYTES = 0  # threads used even on this small weight
    try:
        one = ck.expert_linear(x, slot_row, slot_expert, w, threads=1)
        for t in (2, 3, 5):
            assert torch.equal(ck.expert_linear(x, slot_row, slot_expert, w, threads=t), one)
    finally:
        ck.THREAD_MIN_BYTES = old
    perm = torch.randperm(s, generator=gen)
    shuffled = ck.expert_linear(x, slot_row[perm].contiguous(), slot_expert[perm].contiguous(), w, threads=1)
    assert torch.equal(shuffled, one[perm])
    alone = ck.expert_linear(x, slot_row[7:8].contiguous(), slot_expert[7:8].contiguous(), w, threads=1)
    assert torch.equal(alone[0], one[7])


@needs_kernel
def test_kernel_rejects_bad_arguments():
    w = torch.randn(4, 8, 16)
    x = torch.randn(3, 16)
    ex = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="^w: expected a float32"):
        ck.expert_linear(x, None, ex, w.double())
    with pytest.raises(ValueError, match="^w: expected"):
        ck.expert_linear(x, None, ex, w[:, :, ::2])  # neither layout
    with pytest.raises(ValueError, match=r"^x: expected a float32 CPU \[rows, 16\]"):
        ck.expert_linear(torch.randn(3, 15), None, ex, w)
    with pytest.raises(ValueError, match="^x: expected at least S=3 rows"):
        ck.expert_linear(x[:2], None, ex, w)
    with pytest.raises(ValueError, match="^slot_expert: expected a contiguous int32"):
        ck.expert_linear(x, None, ex.long(), w)
    with pytest.raises(ValueError, match=r"^slot_row: expected a contiguous int32 \[3\]"):
        ck.expert_linear(x, torch.zeros(2, dtype=torch.int32), ex, w)
    with pytest.raises(ValueError, match=r"^b: expected a contiguous float32 \[4, 8\]"):
        ck.expert_linear(x, None, ex, w, torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"^out: expected a contiguous float32 \[3, 8\]"):
        ck.expert_linear_into(torch.empty(3, 9), x, None, ex, w)


def test_kernel_layout_table():
    assert ck.kernel_layout(torch.empty(3, 8, 16)) == "nk"
    assert ck.kernel_layout(torch.empty(3, 16, 8).transpose(1, 2)) == "kn"
    assert ck.kernel_layout(torch.empty(3, 8, 16, dtype=torch.bfloat16)) == "nk"
    assert ck.kernel_layout(torch.empty(3, 8, 16, dtype=torch.float16)) is None
    assert ck.kernel_layout(torch.empty(3, 8, 16, dtype=torch.float64)) is None
    assert ck.kernel_layout(torch.empty(3, 8, 32)[:, :, :16]) is None
    assert ck.kernel_layout(torch.empty(8, 16)) is None


# --------------------------------------------------------------------------- the torch backend's path

def _params(e, h, i, gen, *, transposed=False, bias=False, act="swiglu", dtype=torch.float32):
    w13, w2, b13, b2 = random_weights(e, h, i, width=1 if act == "gelu" else 2, bias=bias, transposed=transposed,
                                      generator=gen, dtype=dtype)
    return expert_params(w13, w2, b13, b2, transposed=transposed, interleaved=act == "swiglu_oai", activation=act)


@needs_kernel
@pytest.mark.parametrize("case", [
    dict(t=1, e=13, k=4, transposed=True, bias=True, act="swiglu_oai"),  # T = 1, GPT-OSS layout, prime E
    dict(t=5, e=7, k=2, drop=True),                                       # a dropped slot, an expert used twice
    dict(t=16, e=8, k=2, act="gelu"),                                     # a one-matrix activation, ~4 per expert
    dict(t=37, e=3, k=1, bias=True),                                      # ~12 per expert, blocks of 4 and a tail
    dict(t=9, e=11, k=2, transposed=True, bias=True, dtype=torch.bfloat16),  # bf16 weights, biases, GPT-OSS layout
    dict(t=1, e=5, k=2, dtype=torch.bfloat16),                               # bf16 decode
])
def test_backend_kernel_path_matches_reference(case, monkeypatch):
    from moe_kernels.backends.torch.backend import TorchBackend

    def no_plan(*args, **kwargs):
        raise AssertionError("the kernel path built a plan")
    monkeypatch.setattr(TorchBackend, "plan", no_plan)
    gen = torch.Generator().manual_seed(case["t"] * 3 + case["e"])
    h, i, e, t, k = 40, 36, case["e"], case["t"], case["k"]
    dtype = case.get("dtype", torch.float32)
    params = _params(e, h, i, gen, transposed=case.get("transposed", False), bias=case.get("bias", False),
                     act=case.get("act", "swiglu"), dtype=dtype)
    x = torch.randn(t, h, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    if case.get("drop"):
        ids[1, 0] = e
        ids[2] = ids[0]
    r = Routing.from_topk(ids, torch.rand(t, k, generator=gen), e)
    with torch.no_grad():
        assert planless.planless_path(x, r, params) == "kernel"
        out = fused_experts(x, r, params, backend="torch")
    assert out.dtype == dtype
    assert_close(out, moe_reference(x, r, params), dtype)


def test_kernel_path_is_chosen_from_shapes(monkeypatch):
    def params(e, h, i, **kw):
        return expert_params(torch.empty(e, 2 * i, h, **kw), torch.empty(e, h, i, **kw))

    r = softmax_topk(torch.randn(16, 8), top_k=2)          # 32 slots, 4 per expert
    on = ck.available()
    with torch.no_grad():
        x = torch.randn(16, 64)
        assert (planless.planless_path(x, r, params(8, 64, 32)) == "kernel") == on
        # Rows per expert: float32 up to 32, bfloat16 up to 16, on experts past KERNEL_SMALL_WEIGHT.
        large = params(8, 256, 128)                         # w13: 256 x 256 = 64K elements
        assert 256 * 256 > planless.KERNEL_SMALL_WEIGHT
        for t, dtype, want in ((128, torch.float32, on), (129, torch.float32, False),
                               (64, torch.bfloat16, on), (65, torch.bfloat16, False)):
            rt = softmax_topk(torch.randn(t, 8), top_k=2)   # 2t slots: 2t/8 per expert
            p = large if dtype == torch.float32 else params(8, 256, 128, dtype=dtype)
            assert (planless.planless_path(torch.randn(t, 256, dtype=dtype), rt, p) == "kernel") == want, (t, dtype)
        # Small experts (64 x 64 here) at any row count: 512 rows per expert.
        many = softmax_topk(torch.randn(2048, 8), top_k=2)
        assert (planless.planless_path(torch.randn(2048, 64), many, params(8, 64, 32)) == "kernel") == on
        assert ((planless.planless_path(x.bfloat16(), r, params(8, 64, 32, dtype=torch.bfloat16)) == "kernel")
                == ck.available())
        assert planless.planless_path(x.half(), r, params(8, 64, 32, dtype=torch.half)) != "kernel"
        assert planless.planless_path(x.bfloat16(), r, params(8, 64, 32)) != "kernel"  # mixed dtypes: libraries
        monkeypatch.setattr(ck, "_load", lambda: (None, "not built (test)"))
        assert not ck.available() and ck.unavailable_reason() == "not built (test)"
        assert planless.planless_path(x, r, params(8, 64, 32)) != "kernel"
    # Training records autograd: the kernel is forward-only, so never taken.
    monkeypatch.undo()
    assert planless.planless_path(x.requires_grad_(), r, params(8, 64, 32)) != "kernel"


def test_missing_library_says_why(monkeypatch):
    monkeypatch.setattr(ck, "_load", lambda: (None, "not built (test)"))
    with pytest.raises(RuntimeError, match="CPU kernel unavailable: not built"):
        ck.expert_linear(torch.randn(2, 8), None, torch.zeros(2, dtype=torch.int32), torch.randn(3, 4, 8))
    # The backend falls back to its library paths and still matches the reference.
    gen = torch.Generator().manual_seed(2)
    params = _params(8, 24, 20, gen)
    x = torch.randn(6, 24, generator=gen)
    r = softmax_topk(torch.randn(6, 8, generator=gen), top_k=2)
    with torch.no_grad():
        assert planless.planless_path(x, r, params) != "kernel"
        assert_close(fused_experts(x, r, params, backend="torch"), moe_reference(x, r, params), torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_traces_under_compile(dtype):
    # fullgraph: the kernel is an opaque custom op (fake: shape only) and the path choice
    # reads no ctypes; compiled inference runs the same kernel as eager, bitwise.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(21)
    params = _params(6, 40, 36, gen, bias=True, dtype=dtype)
    x = torch.randn(5, 40, generator=gen).to(dtype)
    r = softmax_topk(torch.randn(5, 6, generator=gen), top_k=2)

    def run(x, slot_token, slot_expert, slot_weight):
        rr = Routing(slot_token, slot_expert, slot_weight, r.num_tokens, r.num_experts, r.max_slots_per_token,
                     top_k=r.top_k)
        return fused_experts(x, rr, params, backend="torch")

    with torch.no_grad():
        assert planless.planless_path(x, r, params) == "kernel"
        eager = run(x, r.slot_token, r.slot_expert, r.slot_weight)
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(x, r.slot_token, r.slot_expert,
                                                                           r.slot_weight)
    assert torch.equal(compiled, eager)
    assert_close(eager, moe_reference(x, r, params), dtype)


def test_info_reports_the_kernel(capsys, monkeypatch):
    import argparse

    from moe_kernels.cli import cmd_info

    assert cmd_info(argparse.Namespace()) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CPU kernel"))
    assert ("built (" in line) == ck.available()
    monkeypatch.setattr(ck, "_load", lambda: (None, "not built (test)"))
    assert cmd_info(argparse.Namespace()) == 0
    assert "CPU kernel  not available: not built (test)" in capsys.readouterr().out
