"""``combine="auto"`` (the default): the rule (backends/triton/configs.combine_mode) picks
each mode in its documented regime, the options accept and validate "auto", the launch-
shape model reports the chosen mode, and through the interpreter an "auto" forward +
backward equals the reference for a case that picks fused and one that picks separate,
running the kernels of the mode picked and giving the same bits as both explicit modes.

The rule tests need no Triton; the interpreter tests skip without it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import moe_kernels as mk
from moe_kernels.backends.triton.configs import COMBINE_SEPARATE_MAX_H, COMBINE_SEPARATE_MIN_K, combine_mode
from moe_kernels.bench.launch_shape import GPUS, ISSUE_SHAPES, format_launches, layer_launches

HAVE_TRITON = importlib.util.find_spec("triton") is not None

if HAVE_TRITON:
    from test_triton_backward import _NAMES, _check_grads, _leaves, _run
    from test_triton_gemm import assert_close, fast_interpreter  # noqa: F401
    from triton_interp import DEVICE, poison_empty

    from moe_kernels.backends.triton import experts as ops
    from moe_kernels.backends.triton import wgrad

H90 = (9, 0)
BF16 = torch.bfloat16


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("s,k,h,e,want", [
    # decode (<= 16 expected rows per expert): fused whatever K and H (the launch dominates)
    pytest.param(1 * 8, 8, 2048, 128, "fused", id="decode-T1-k8"),
    pytest.param(16 * 128, 128, 1024, 128, "fused", id="decode-dense-T16-K=E=128"),
    pytest.param(128 * 4, 4, 2880, 128, "fused", id="decode-gptoss-T128"),
    # many slots per token, small H, past decode: separate
    pytest.param(2048 * 8, 8, 2048, 128, "separate", id="qwen3-T2048-k8-H2048"),
    pytest.param(4096 * 8, 8, COMBINE_SEPARATE_MAX_H, 64, "separate", id="k8-H-at-the-limit"),
    pytest.param(1000 * 16, 16, 1024, 64, "separate", id="k16-unrolled-max"),
    # K > 16 (Expert Choice / dense, runtime-loop gather): separate even at a wide H
    pytest.param(64 * 128, 128, 7168, 128, "separate", id="dense-T64-K=E=128-wide-H"),
    pytest.param(21 * 17, 17, 40, 17, "separate", id="dense-E17-small"),
    # many slots per token but a wide H (enough N tiles to hide the tail): fused
    pytest.param(2048 * 8, 8, 7168, 256, "fused", id="deepseek-T2048-k8-H7168"),
    pytest.param(4096 * 8, 8, COMBINE_SEPARATE_MAX_H + 1, 64, "fused", id="k8-H-past-the-limit"),
    # few slots per token: fused in every regime
    pytest.param(16384 * 2, 2, 4096, 8, "fused", id="mixtral-prefill-k2"),
    pytest.param(16384 * (COMBINE_SEPARATE_MIN_K - 1), COMBINE_SEPARATE_MIN_K - 1, 512, 8, "fused",
                 id="k-just-below-min"),
])
def test_rule_picks_the_documented_mode(s, k, h, e, want):
    assert combine_mode(s, k, h, e, BF16, H90) == want
    # static shapes only: every T*k of one power-of-two bucket gets the same mode
    lo = max(1, (1 << (s - 1).bit_length()) // 2 + 1)
    assert combine_mode(lo, k, h, e, BF16, H90) == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cap", [(8, 0), (9, 0), (10, 0), (0, 0)])
def test_rule_is_the_same_for_every_dtype_and_gpu_today(dtype, cap):
    assert combine_mode(2048 * 8, 8, 2048, 128, dtype, cap) == "separate"
    assert combine_mode(8, 8, 2048, 128, dtype, cap) == "fused"


def test_launch_shape_reports_the_chosen_mode():
    qwen = ISSUE_SHAPES["qwen3-30b-a3b"]
    for t, want in ((1, "fused"), (2048, "separate")):
        g1, g2 = layer_launches(qwen, t, GPUS["h200"])
        assert g1.combine == "-" and g2.combine == want
        assert g2.combine == combine_mode(t * qwen.top_k, qwen.top_k, qwen.hidden, qwen.num_experts, BF16, H90)
    table = format_launches(layer_launches(qwen, 2048, GPUS["h200"]))
    assert "combine" in table.splitlines()[0] and "separate" in table


# --------------------------------------------------------------------------- options


def test_options_accept_auto_as_the_default(monkeypatch):
    monkeypatch.delenv(mk.options.ENV_COMBINE, raising=False)
    assert mk.options.COMBINE_MODES == ("auto", "fused", "separate")
    assert mk.options.resolve(None).combine == "auto"
    assert mk.KernelOptions(combine="auto").combine == "auto"
    monkeypatch.setenv(mk.options.ENV_COMBINE, "auto")
    assert mk.options.env_defaults().combine == "auto"
    monkeypatch.setenv(mk.options.ENV_COMBINE, "fused")
    assert mk.options.resolve(None).combine == "fused"
    assert mk.options.resolve(None, combine="auto").combine == "auto"  # a keyword wins over the environment
    with pytest.raises(ValueError, match=r"combine: expected one of \['auto', 'fused', 'separate'\], got 'Auto'"):
        mk.KernelOptions(combine="Auto")
    monkeypatch.setenv(mk.options.ENV_COMBINE, "atomic")
    with pytest.raises(ValueError, match="MOE_KERNELS_COMBINE: expected one of .*'auto'"):
        mk.options.env_defaults()


# --------------------------------------------------------------------------- auto through the interpreter


def _launches(monkeypatch):
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction
    names = []
    for cls in (interp.InterpretedFunction, JITFunction):
        real = cls.run

        def run(self, *a, _real=real, **kw):
            names.append(self.fn.__name__)
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, "run", run)
    return names


# (router, opts, T, H, I, E, dtype, activation, bias, mode "auto" must pick)
_AUTO_CASES = [
    pytest.param("softmax_topk", {"top_k": 8}, 3, 40, 24, 11, torch.float32, "swiglu", True, "fused",
                 id="decode-k8-prime-E11-H40-fused"),
    pytest.param("softmax_topk", {"top_k": 2}, 1, 72, 40, 5, torch.float16, "geglu", False, "fused",
                 id="T1-fp16-fused"),
    pytest.param("softmax_topk", {"top_k": 8}, 37, 72, 40, 13, torch.float32, "swiglu", True, "separate",
                 id="k8-prime-E13-H72-medium-separate"),
    pytest.param("dense", {}, 21, 40, 24, 17, torch.float32, "gelu", False, "separate",
                 id="dense-K=E=17-separate"),
]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("router,opts,t,h,i,e,dtype,act,bias,want", _AUTO_CASES)
def test_auto_forward_backward_match_reference(monkeypatch, router, opts, t, h, i, e, dtype, act, bias, want):
    for mod in (ops, wgrad):
        poison_empty(monkeypatch, mod)  # every output and gradient element must be written
    leaves = _leaves(t, h, i, e, act, dtype, bias, False)
    k = opts.get("top_k", e)
    assert combine_mode(t * k, k, h, e, dtype, (0, 0)) == want, "the case must sit in the regime its id names"
    monkeypatch.delenv(mk.options.ENV_COMBINE, raising=False)
    names = _launches(monkeypatch)
    out, got = _run("triton", leaves, router, opts, act, False, False)  # combine left at the default: auto
    ran_separate = "_combine_fwd_kernel" in names
    assert ran_separate == (want == "separate"), f"auto picked the wrong path: {sorted(set(names))}"
    ref_out, ref = _run("reference", leaves, router, opts, act, False, False)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close(out, ref_out, rtol, "out")
    _check_grads(got, ref, rtol * (3 if dtype == torch.float16 else 1))
    # both explicit modes give auto's bits
    for mode in ("fused", "separate"):
        out_m, got_m = _run("triton", leaves, router, opts, act, False, False, combine=mode)
        assert torch.equal(out, out_m), f"out: auto vs {mode}"
        for n in _NAMES:
            if got[n] is not None:
                assert torch.equal(got[n], got_m[n]), f"d{n}: auto vs {mode}"


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_auto_inference_into_a_callers_buffer_runs_the_picked_path(monkeypatch):
    """The no-grad path (experts_fwd_out) resolves auto too: separate for k=8 past decode."""
    t, h, i, e = 37, 72, 40, 13
    leaves = _leaves(t, h, i, e, "swiglu", torch.float32, False, False)
    x, logits, w13, w2, _, _ = leaves
    be = mk.get_backend("triton", DEVICE)
    params = mk.params.expert_params(w13, w2)
    plan = be.plan(be.route(logits, "softmax_topk", {"top_k": 8}), params)
    names = _launches(monkeypatch)
    with torch.no_grad():
        out = ops.moe_experts(x, plan, params, combine="auto", out=torch.full_like(x, float("nan")))
        fused = ops.moe_experts(x, plan, params, combine="fused")
    assert names.count("_combine_fwd_kernel") == 1
    assert torch.equal(out, fused)
    twin = ops.moe_experts_torch(x, plan, params, combine="auto")
    assert_close(out, twin, 1e-4, "kernels vs their twins")
