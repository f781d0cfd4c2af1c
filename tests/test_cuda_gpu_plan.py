"""GPU checks (skipped without one) of issue 12's CUDA work: the many-CTA plan against
its twins at prefill sizes, kernels resident after load_kernels() so that every
variant captures in a CUDA graph, no context created on cuda:0 by a process that only
uses cuda:1, bounds guards in permute/unpermute, grouped routing at its shared-memory
edges.
"""

import os
import subprocess
import sys

import pytest
import torch

from moe_kernels.backends import cuda as cb
from moe_kernels.backends.cuda import plan as cplan
from moe_kernels.backends.cuda import twins as tw
from moe_kernels.plan import build_plan_torch
from moe_kernels.routing import Routing, expert_choice

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("expert_counts", "expert_offsets", "sorted_slot", "slot_position", "padded_offsets", "padded_slot",
          "block_expert", "token_slots")


def _run(script: str, *args: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("s,e,bm", [
    pytest.param(4097, 8, 16, id="just-many-CTAs"),
    pytest.param(65536, 256, 64, id="E256-S2^16"),
    pytest.param(131072, 1024, 1, id="E1024-block_m-1"),
    pytest.param(40000, 4000, 16, id="E4000"),
])
def test_many_cta_plan_matches_twin(s, e, bm):
    gen = torch.Generator().manual_seed(s)
    ids = torch.randint(-1, e + 1, (s, 1), generator=gen)  # dropped sentinels on both sides
    r = Routing.from_topk(ids.cuda(), torch.rand(s, 1, device="cuda"), e)
    got = cb.build_plan(r.slot_expert, r.slot_token, r.num_tokens, e, 1, 1, bm)
    want = build_plan_torch(Routing.from_topk(ids, torch.rand(s, 1), e), bm)
    for f, g in zip(FIELDS, got):
        assert torch.equal(g.cpu(), getattr(want, f)), f
    assert cplan.launch_shape(s, e, s, 1, 1, bm)[0][0] == "_plan_hist_fwd_kernel"


def test_many_cta_plan_expert_choice_and_negative_ids():
    torch.manual_seed(0)
    r = expert_choice(torch.randn(3000, 13, device="cuda"), 2.0)
    got = cb.build_plan(r.slot_expert, r.slot_token, r.num_tokens, 13, r.max_slots_per_token, 0, 16)
    cpu = tw.build_plan(r.slot_expert.cpu(), r.slot_token.cpu(), r.num_tokens, 13, r.max_slots_per_token, 0, 16)
    for f, g, w in zip(FIELDS, got, cpu):
        assert torch.equal(g.cpu(), w), f
    se = torch.randint(-5, 9, (9000,), dtype=torch.int32)
    st = torch.arange(9000, dtype=torch.int32)
    got = cb.build_plan(se.cuda(), st.cuda(), 9000, 7, 1, 1, 16)
    for f, g, w in zip(FIELDS, got, tw.build_plan(se, st, 9000, 7, 1, 1, 16)):
        assert torch.equal(g.cpu(), w), f


_CAPTURE_ALL = """
import torch
from moe_kernels.backends import cuda as cb
cb.load_kernels()
x = {dt: torch.randn(64, 136, device="cuda", dtype=dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}
odd = {dt: torch.randn(64, 3, device="cuda", dtype=dt) for dt in x}  # unaligned rows: scalar variants
tok = torch.arange(64, dtype=torch.int32, device="cuda")
rows = torch.arange(64, dtype=torch.int32, device="cuda")
table = rows.view(32, 2)
w = torch.rand(64, device="cuda")
big = torch.randint(0, 256, (70000,), dtype=torch.int32, device="cuda")
logit = {(dt, e): torch.randn(8, e, device="cuda", dtype=dt) for dt in x for e in (16, 64, 128, 256, 512)}
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # every variant's first launch on this device, inside capture
    for dt in x:
        for e in (16, 64, 128, 256, 512):  # VPT 1..16
            logits = logit[dt, e]
            cb.route_softmax_topk(logits, 2, True)
            cb.route_grouped_sigmoid_topk(logits, None, 2, 8 if e >= 64 else 1, 1, 1.0, True)
        for t in (x[dt], odd[dt]):
            cb.permute_rows(t, tok, rows)
            cb.unpermute_rows(t, None, table, w)
    cb.build_plan(tok, tok, 64, 8, 1, 1, 16)
    cb.build_plan(big, big, 70000, 256, 1, 1, 64)
    cb.build_plan(big, big % 700, 700, 256, 256, 0, 64)
graph.replay()
torch.cuda.synchronize()
print("ok")
"""


def test_capture_after_load_kernels_every_variant():
    # load_kernels() makes every kernel resident: no variant loads inside the capture
    _run(_CAPTURE_ALL)


_ONLY_CUDA1 = """
import torch
from moe_kernels.backends import cuda as cb
x = torch.randn(16, 64, device="cuda:1")
tok = torch.arange(16, dtype=torch.int32, device="cuda:1")
cb.permute_rows(x, tok, tok)
cb.route_softmax_topk(torch.randn(4, 8, device="cuda:1"), 2, True)
torch.cuda.synchronize(1)
assert not torch._C._cuda_hasPrimaryContext(0), "a context appeared on cuda:0"
print("ok")
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_process_on_cuda1_creates_no_context_on_cuda0():
    _run(_ONLY_CUDA1)


_BAD_INDEX = """
import sys, torch
from moe_kernels.backends import cuda as cb
x = torch.randn(8, 32, device="cuda")
tok = torch.arange(8, dtype=torch.int32, device="cuda")
rows = torch.tensor([0, 1, 1 << 30, -1, 7], dtype=torch.int32, device="cuda")  # one index far out of range
table = torch.tensor([[0, 1 << 30], [2, 3]], dtype=torch.int32, device="cuda")
w = torch.ones(8, device="cuda")
if sys.argv[1] == "debug":
    for call in (lambda: cb.permute_rows(x, tok, rows), lambda: cb.unpermute_rows(x, None, table, w)):
        try:
            call()
        except ValueError as exc:
            assert "out-of-range" in str(exc), exc
        else:
            raise AssertionError("no ValueError")
else:
    out = cb.permute_rows(x, tok, rows)
    comb = cb.unpermute_rows(x, None, table, w)
    torch.cuda.synchronize()  # the context survived
    assert torch.equal(out[2], torch.zeros(32, device="cuda")) and torch.equal(out[4], x[7])
    assert torch.equal(comb[0], x[0]) and torch.equal(comb[1], x[2] + x[3])
print("ok")
"""


@pytest.mark.parametrize("mode", ["plain", "debug"])
def test_out_of_range_index_is_dropped_not_a_fault(mode):
    _run(_BAD_INDEX, mode, env={"MOE_KERNELS_DEBUG": "1" if mode == "debug" else "0"})


@pytest.mark.parametrize("e,ng,tg,k", [(512, 512, 8, 8), (256, 8, 4, 8), (64, 1, 1, 4), (160, 32, 5, 6)])
def test_grouped_routing_shared_memory_layout(e, ng, tg, k):
    # n_group = E (per = 1, the largest dynamic allocation), DeepSeek's 8 groups of 32
    # (the padded layout), n_group = 1 (no shared memory at all)
    logits = torch.randn(37, e, device="cuda")
    bias = torch.randn(e, device="cuda")
    ids, w, counts = cb.route_grouped_sigmoid_topk(logits, bias, k, ng, tg, 2.5, True)
    rid, rw, rc = tw.route_grouped_sigmoid_topk(logits.cpu(), bias.cpu(), k, ng, tg, 2.5, True)
    assert torch.equal(ids.cpu(), rid) and torch.equal(counts.cpu(), rc)
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-5, atol=1e-6)
