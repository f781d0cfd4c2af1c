"""torch.autograd.gradcheck in float64 on tiny shapes, through the torch backend.

Inputs: x, W13, W2, both biases and the router logits (through routing's slot weights),
for each router. The logits are spaced so a finite-difference step never flips a
top-k choice, a Switch argmax or capacity cut, or an expert-choice pick.
"""

import pytest
import torch

from moe_kernels import expert_params, fused_experts, route

T, E, H, I = 4, 4, 3, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of tiny forwards: intra-op threads only add wake-up cost (a lot of it on a
    loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spaced_logits(t: int, e: int, gen: torch.Generator) -> torch.Tensor:
    """Each row a random permutation of well-separated values (gaps >= 0.3), so neither
    rows (top-k, Switch) nor columns (expert choice) have near-ties."""
    base = torch.arange(t * e, dtype=torch.float64).view(t, e) * 0.3
    perm = torch.randperm(t * e, generator=gen)
    return base.view(-1)[perm].view(t, e) - 0.3 * t * e / 2


ROUTER_OPTIONS = {
    "softmax_topk": dict(top_k=2),
    "softmax_topk_norenorm": dict(top_k=2, renormalize=False),
    "grouped_sigmoid_topk": dict(top_k=2, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                                 bias=torch.tensor([0.05, -0.02, 0.1, 0.0], dtype=torch.float64)),
    "noisy_topk": dict(top_k=2, training=True),  # noise fixed below
    "switch": dict(capacity_factor=1.0),
    "expert_choice": dict(capacity_factor=1.0),
    "dense": {},
}


CASES = [(r, "swiglu") for r in ROUTER_OPTIONS] + [("softmax_topk", "gelu_tanh"), ("expert_choice", "gelu_tanh")]


@pytest.mark.parametrize("router,act", CASES)  # every router gated; two with a plain MLP
def test_gradcheck(router, act):
    gen = torch.Generator().manual_seed(7)
    n = 2 if act == "swiglu" else 1
    d = dict(dtype=torch.float64)
    x = torch.randn(T, H, generator=gen, **d).requires_grad_()
    w13 = (torch.randn(E, n * I, H, generator=gen, **d) * 0.5).requires_grad_()
    w2 = (torch.randn(E, H, I, generator=gen, **d) * 0.5).requires_grad_()
    b13 = (torch.randn(E, n * I, generator=gen, **d) * 0.1).requires_grad_()
    b2 = (torch.randn(E, H, generator=gen, **d) * 0.1).requires_grad_()
    logits = spaced_logits(T, E, gen).requires_grad_()
    name = router.replace("_norenorm", "")
    opts = dict(ROUTER_OPTIONS[router])
    extra = []
    if router == "noisy_topk":
        noise_logits = (torch.randn(T, E, generator=gen, **d) * 0.01 - 3).requires_grad_()  # small std: choice kept
        opts.update(noise_logits=noise_logits, noise=torch.randn(T, E, generator=gen, **d))
        extra = [noise_logits]
    if router == "switch":
        logits.data[:, 1] += 6.0  # every argmax on expert 1 (margin >= 1.5): capacity 1 drops three tokens

    def f(x, w13, w2, b13, b2, logits, *extra_in):
        o = dict(opts)
        if extra_in:
            o["noise_logits"] = extra_in[0]
        r = route(logits, name, **o)
        params = expert_params(w13, w2, b13, b2, activation=act)
        return fused_experts(x, r, params, backend="torch")

    if router == "switch":
        r = route(logits, name, **opts)
        assert int((r.slot_expert == E).sum()) == 3  # the drop path is in the graph
    assert torch.autograd.gradcheck(f, (x, w13, w2, b13, b2, logits, *extra), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_transposed_interleaved_oai():
    gen = torch.Generator().manual_seed(11)
    d = dict(dtype=torch.float64)
    x = torch.randn(T, H, generator=gen, **d).requires_grad_()
    w13 = (torch.randn(E, H, 2 * I, generator=gen, **d) * 0.5).requires_grad_()
    w2 = (torch.randn(E, I, H, generator=gen, **d) * 0.5).requires_grad_()
    logits = spaced_logits(T, E, gen).requires_grad_()

    def f(x, w13, w2, logits):
        r = route(logits, "softmax_topk", top_k=3)
        return fused_experts(x, r, w13, w2, activation="swiglu_oai", transposed=True, interleaved=True,
                             backend="torch")

    assert torch.autograd.gradcheck(f, (x, w13, w2, logits), eps=1e-6, atol=1e-7, rtol=1e-5)
