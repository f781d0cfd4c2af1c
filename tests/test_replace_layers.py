"""replace_moe_layers on transformers-4.x-style blocks (experts as an nn.ModuleList).

transformers 5 no longer ships ModuleList experts for these families, so the blocks
below are minimal replicas of the 4.x code (Mixtral, Qwen2-MoE with its gated shared
expert, OLMoE/Qwen3-MoE, DeepSeek-V3 with its grouped sigmoid router), plus user blocks
following the documented protocol. Each test compares the replaced model with an
untouched copy of the original: outputs, the gradient of every parameter (the stacked
weights' gradients sliced back per expert) and the input gradient.
"""

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels import replace_moe_layers
from moe_kernels.backends import get_backend, unavailable_reason
from moe_kernels.integrations.replace import FusedMoEBlock, ReplaceReport


# --------------------------------------------------------------------------- 4.x replicas


class GatedMLP(nn.Module):
    """Qwen2MoeMLP / DeepseekV3MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, h, i, act=nn.SiLU, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = act()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MixtralExpert(nn.Module):
    """MixtralBlockSparseTop2MLP: w2(act(w1(x)) * w3(x))."""

    def __init__(self, h, i):
        super().__init__()
        self.w1 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


def _loop(experts, x, weights, selected):
    """The 4.x per-expert loop: one_hot mask, index_add in the activations' dtype."""
    out = torch.zeros_like(x)
    mask = F.one_hot(selected, num_classes=len(experts)).permute(2, 1, 0)
    for e in range(len(experts)):
        idx, top_x = torch.where(mask[e])
        if top_x.numel():
            y = experts[e](x[top_x]) * weights[top_x, idx, None]
            out.index_add_(0, top_x, y.to(x.dtype))
    return out


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, h=20, i=12, e=7, k=2, jitter=0.0):
        super().__init__()
        self.hidden_dim, self.num_experts, self.top_k = h, e, k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList([MixtralExpert(h, i) for _ in range(e)])
        self.jitter_noise = jitter

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            jitter = torch.empty_like(hidden_states).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
            hidden_states = hidden_states * jitter
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        w = F.softmax(router_logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        return _loop(self.experts, x, w, sel).reshape(b, s, h), router_logits


class Qwen2MoeSparseMoeBlock(nn.Module):
    """Also OLMoE / Qwen3-MoE when shared=False."""

    def __init__(self, h=20, i=12, e=7, k=3, norm_topk_prob=False, shared=True):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = e, k, norm_topk_prob
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList([GatedMLP(h, i) for _ in range(e)])
        if shared:
            self.shared_expert = GatedMLP(h, 2 * i)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        self.shared = shared

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        w = F.softmax(router_logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        out = _loop(self.experts, x, w.to(x.dtype), sel)
        if self.shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(b, s, h), router_logits


class DeepseekV3TopkRouter(nn.Module):
    def __init__(self, h, e, k, n_group, topk_group, scale):
        super().__init__()
        self.top_k, self.n_routed_experts, self.routed_scaling_factor = k, e, scale
        self.n_group, self.topk_group, self.norm_topk_prob = n_group, topk_group, True
        self.weight = nn.Parameter(torch.randn(e, h) / math.sqrt(h))
        self.register_buffer("e_score_correction_bias", 0.05 * torch.randn(e))

    def forward(self, hidden_states):
        x = hidden_states.view(-1, hidden_states.shape[-1])
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.unsqueeze(0)
        per = self.n_routed_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = mask.unsqueeze(-1).expand(-1, self.n_group, per).reshape(-1, self.n_routed_experts)
        idx = torch.topk(choice.masked_fill(~mask.bool(), 0.0), k=self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.routed_scaling_factor


class DeepseekV3MoE(nn.Module):
    def __init__(self, h=20, i=12, e=8, k=3):
        super().__init__()
        self.experts = nn.ModuleList([GatedMLP(h, i) for _ in range(e)])
        self.gate = DeepseekV3TopkRouter(h, e, k, n_group=4, topk_group=2, scale=2.5)
        self.shared_experts = GatedMLP(h, i)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        idx, w = self.gate(hidden_states)
        x = hidden_states.view(-1, shape[-1])
        out = torch.zeros_like(x, dtype=w.dtype)
        mask = F.one_hot(idx, num_classes=len(self.experts)).permute(2, 0, 1)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(mask[e])
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, pos].unsqueeze(-1))
        return out.type(x.dtype).view(*shape) + self.shared_experts(hidden_states)


class PlainExpert(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(h, i), nn.Linear(i, h), nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class UserBlock(nn.Module):
    """A user's own block: plain GELU experts with biases, no norm_topk_prob attribute
    (renormalises), returns a tensor."""

    def __init__(self, h=20, i=12, e=5, k=2, renorm=False):
        super().__init__()
        self.gate = nn.Linear(h, e, bias=True)
        self.experts = nn.ModuleList([PlainExpert(h, i) for _ in range(e)])
        self.num_experts_per_tok, self.renorm = k, renorm

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        p = torch.softmax(self.gate(x2).float(), -1)
        w, sel = torch.topk(p, self.num_experts_per_tok, -1)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        return _loop(self.experts, x2, w.to(x2.dtype), sel).reshape(x.shape)


class SwitchUserBlock(nn.Module):
    """A user's Switch block naming its router through the protocol attribute."""

    def __init__(self, h=20, i=12, e=4, capacity_factor=1.0):
        super().__init__()
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList([GatedMLP(h, i) for _ in range(e)])
        self.capacity_factor = capacity_factor
        self.moe_kernels_router = {"router": "switch", "capacity_factor": capacity_factor}

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        t, e = x2.shape[0], len(self.experts)
        p = torch.softmax(self.gate(x2).float(), -1)
        w, sel = p.max(-1)
        cap = math.ceil(self.capacity_factor * t / e)
        out = torch.zeros_like(x2)
        for ex in range(e):
            toks = torch.nonzero(sel == ex).flatten()[:cap]  # token order, over capacity dropped
            if toks.numel():
                out[toks] += self.experts[ex](x2[toks]) * w[toks, None].to(x2.dtype)
        return out.reshape(x.shape)


class SigmoidTopkBlock(nn.Module):
    """Sigmoid of the top-k logits, unnormalised: shaped like a softmax top-k block but
    routing differently, so the probe must catch the difference and leave it alone.
    (Softmax over the top-k logits, GPT-OSS's router, *is* renormalised softmax top-k.)"""

    def __init__(self, h=20, i=12, e=6, k=2):
        super().__init__()
        self.gate = nn.Linear(h, e)
        self.experts = nn.ModuleList([GatedMLP(h, i) for _ in range(e)])
        self.top_k = k

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        logits = self.gate(x2)
        v, sel = torch.topk(logits, self.top_k, -1)
        return _loop(self.experts, x2, torch.sigmoid(v), sel).reshape(x.shape), logits


class Layer(nn.Module):
    def __init__(self, block, h=20):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.mlp = block

    def forward(self, x):
        y = self.mlp(self.norm(x))
        return x + (y[0] if isinstance(y, tuple) else y)


class Net(nn.Module):
    def __init__(self, blocks, h=20):
        super().__init__()
        self.layers = nn.ModuleList([Layer(b, h) for b in blocks])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1 * r)
    return model


def _expert_grads(block):
    """Per-expert gradients of a fused block's stacked weights, keyed like the original."""
    out = {}
    i = block.w2.shape[2]
    for e in range(block.num_experts):
        for j, n in enumerate(block.expert_names[:-1]):
            out[f"experts.{e}.{n}.weight"] = block.w13.grad[e, j * i:(j + 1) * i]
            if block.b13 is not None:
                out[f"experts.{e}.{n}.bias"] = block.b13.grad[e, j * i:(j + 1) * i]
        out[f"experts.{e}.{block.expert_names[-1]}.weight"] = block.w2.grad[e]
        if block.b2 is not None:
            out[f"experts.{e}.{block.expert_names[-1]}.bias"] = block.b2.grad[e]
    return out


def _compare(original, x, atol_scale=1e-5, train=False, backend="torch"):
    """Replace in a copy; check outputs, input gradient and every parameter gradient."""
    fused = copy.deepcopy(original)
    report = replace_moe_layers(fused, backend=backend)
    original.train(train)
    fused.train(train)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = original(xa), fused(xb)
    scale = ya.abs().max().item()
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=atol_scale * scale)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=atol_scale * xa.grad.abs().max().item())
    fused_grads = {}
    for name, mod in fused.named_modules():
        if isinstance(mod, FusedMoEBlock):
            fused_grads.update({f"{name}.{k}": v for k, v in _expert_grads(mod).items()})
    fused_grads.update({n: p.grad for n, p in fused.named_parameters() if p.grad is not None})
    for n, p in original.named_parameters():
        assert n in fused_grads, f"no gradient for {n} in the replaced model"
        if p.grad is None:  # an expert no token picked: the loop never touched it
            assert not fused_grads[n].any(), n
            continue
        torch.testing.assert_close(fused_grads[n], p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item() + 1e-12,
                                   msg=lambda m: f"{n}: {m}")
    return fused, report


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("block_fn, T, edge", [
    (lambda: MixtralSparseMoeBlock(), 9, "Mixtral 4.x: w1/w3/w2, renormalised, returns (out, logits)"),
    (lambda: Qwen2MoeSparseMoeBlock(norm_topk_prob=False), 9, "Qwen2-MoE 4.x: sigmoid-gated shared expert"),
    (lambda: Qwen2MoeSparseMoeBlock(norm_topk_prob=True, shared=False), 9, "OLMoE/Qwen3-MoE 4.x: norm_topk_prob=True"),
    (lambda: Qwen2MoeSparseMoeBlock(norm_topk_prob=False, shared=False), 1, "OLMoE 4.x at T=1 (decode)"),
    (lambda: DeepseekV3MoE(), 9, "DeepSeek-V3 4.x: grouped sigmoid router with bias + shared experts"),
    (lambda: UserBlock(renorm=False), 9, "user block: plain GELU experts, biases, no norm_topk_prob, not renormalised"),
    (lambda: UserBlock(renorm=True), 9, "user block: renormalised (first candidate)"),
    (lambda: SwitchUserBlock(), 13, "user block naming the Switch router (capacity drops tokens)"),
], ids=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe_T1", "deepseek_v3", "user_plain", "user_renorm", "user_switch"])
def test_replace_matches_original(block_fn, T, edge):
    torch.manual_seed(0)
    model = _randomize(Net([block_fn(), block_fn()]))
    x = torch.randn(1, T, 20)
    fused, report = _compare(model, x)
    assert [r["path"] for r in report.replaced] == ["layers.0.mlp", "layers.1.mlp"], str(report)
    assert not report.skipped
    assert all(isinstance(layer.mlp, FusedMoEBlock) for layer in fused.layers)
    # the router and shared modules are the same objects, not copies
    assert fused.layers[0].mlp.gate is not None


@pytest.mark.slow
@pytest.mark.parametrize("block_fn", [lambda: MixtralSparseMoeBlock(), lambda: DeepseekV3MoE()],
                         ids=["mixtral-softmax-routing-kernel", "deepseek_v3-grouped-sigmoid-routing-kernel"])
def test_replace_through_triton_under_interpreter(block_fn, monkeypatch):
    # the fused block routes with the backend's router (the Triton routing kernels here)
    reason = unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"triton backend unavailable on the CPU: {reason}")
    impl, calls = get_backend("triton", "cpu"), []
    real = impl.route
    monkeypatch.setattr(impl, "route", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    torch.manual_seed(6)
    _compare(_randomize(Net([block_fn()])), torch.randn(1, 7, 20), backend="triton")
    assert calls, "the triton backend never routed"


def test_output_contract_and_logits():
    # Mixtral's block returns (hidden, router_logits); the fused one must too, same logits
    torch.manual_seed(1)
    block = _randomize(MixtralSparseMoeBlock())
    holder = nn.Sequential(copy.deepcopy(block))
    replace_moe_layers(holder, backend="torch")
    x = torch.randn(2, 3, 20)
    ref, got = block(x), holder[0](x)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)


def test_all_tokens_to_one_expert_and_idle_experts():
    # edge: a router biased so every token picks expert 0 first; most experts get no token
    torch.manual_seed(2)
    block = _randomize(UserBlock(e=7, k=2))
    with torch.no_grad():
        block.gate.bias.zero_()
        block.gate.bias[0] = 50.0
    _compare(Net([block]), torch.randn(1, 11, 20))


def test_training_mode_and_mixtral_jitter():
    # training mode; jitter draws the same random numbers in the same order as 4.x
    torch.manual_seed(3)
    model = _randomize(Net([MixtralSparseMoeBlock(jitter=0.1)]))
    fused = copy.deepcopy(model)
    replace_moe_layers(fused, backend="torch")
    model.train()
    fused.train()
    x = torch.randn(1, 6, 20)
    torch.manual_seed(9)
    ya = model(x)
    torch.manual_seed(9)
    yb = fused(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)


def test_unknown_blocks_left_alone_and_listed():
    torch.manual_seed(4)

    class ConvExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(20, 3)
            self.experts = nn.ModuleList([nn.Conv1d(20, 20, 1) for _ in range(3)])
            self.top_k = 1

        def forward(self, x):
            return x

    model = _randomize(Net([SigmoidTopkBlock(), ConvExperts(), Qwen2MoeSparseMoeBlock()]))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    report = replace_moe_layers(model, backend="torch")
    assert [r["path"] for r in report.replaced] == ["layers.2.mlp"]
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert "differs from the original" in reasons["layers.0.mlp"], reasons
    assert "none of the layouts" in reasons["layers.1.mlp"], reasons
    assert isinstance(model.layers[0].mlp, SigmoidTopkBlock) and isinstance(model.layers[1].mlp, ConvExperts)
    for n, p in model.layers[0].state_dict().items():
        torch.testing.assert_close(p, before["layers.0." + n])
    text = str(report)
    assert "replaced 1 MoE block(s), left 2 alone" in text and "layers.0.mlp" in text


def test_unsupported_expert_activation_and_forward():
    class ReluGated(GatedMLP):
        def __init__(self, h, i):
            super().__init__(h, i, act=nn.ReLU)

    class Twisted(GatedMLP):
        def forward(self, x):  # not down(act(gate(x)) * up(x))
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    for cls, why in ((ReluGated, "gated experts with activation 'relu'"), (Twisted, "does not compute")):
        block = Qwen2MoeSparseMoeBlock(shared=False)
        block.experts = nn.ModuleList([cls(20, 12) for _ in range(7)])
        model = _randomize(Net([block]))
        report = replace_moe_layers(model)
        assert not report.replaced and why in report.skipped[0]["reason"], str(report)


def test_state_dict_keeps_original_keys_and_loads_both_layouts():
    torch.manual_seed(5)
    original = _randomize(Net([UserBlock(), MixtralSparseMoeBlock()]))
    fused = copy.deepcopy(original)
    replace_moe_layers(fused)
    sd_orig, sd_fused = original.state_dict(), fused.state_dict()
    assert sorted(sd_fused) == sorted(sd_orig)
    for k in sd_orig:
        torch.testing.assert_close(sd_fused[k], sd_orig[k])
    # no two saved tensors share memory (safetensors refuses that)
    ptrs = [t.data_ptr() for k, t in sd_fused.items() if ".experts." in k]
    assert len(set(ptrs)) == len(ptrs)
    # a per-expert checkpoint loads into the fused model, and back into the original code
    other = _randomize(copy.deepcopy(original), seed=6)
    fused.load_state_dict(other.state_dict())
    x = torch.randn(1, 5, 20)
    torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fresh(x), other(x), rtol=1e-5, atol=1e-5)


def test_meta_device_known_blocks_only():
    with torch.device("meta"):
        model = Net([MixtralSparseMoeBlock(), UserBlock()])
    report = replace_moe_layers(model)
    assert [r["path"] for r in report.replaced] == ["layers.0.mlp"] and report.replaced[0]["max_error"] is None
    assert "meta device" in report.skipped[0]["reason"]


def test_hf5_experts_module_is_pointed_to_the_interface():
    class Experts5(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 20))
            self.down_proj = nn.Parameter(torch.zeros(4, 20, 4))

    class Block5(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.experts = nn.Linear(20, 4), Experts5()

        def forward(self, x):
            return x

    report = replace_moe_layers(Net([Block5()]))
    assert "experts_implementation='moe_kernels'" in report.skipped[0]["reason"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        replace_moe_layers(Net([UserBlock()]), backend="cuda-fast")
    with pytest.raises(ValueError, match="model"):
        replace_moe_layers("not a model")


def test_top_level_api_and_report_type():
    report = replace_moe_layers(_randomize(Net([UserBlock()])))
    assert isinstance(report, ReplaceReport) and len(report.replaced) == 1


def test_replace_does_not_import_transformers():
    import subprocess

    code = ("import sys, torch, moe_kernels; from moe_kernels.integrations import replace; "
            "replace.replace_moe_layers(torch.nn.Linear(2, 2)); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_blocks_with_parts_we_would_drop_are_left_alone():
    class WithDropout(GatedMLP):
        def __init__(self, h, i):
            super().__init__(h, i)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(super().forward(x))

    dropout = Qwen2MoeSparseMoeBlock(shared=False)
    dropout.experts = nn.ModuleList([WithDropout(20, 12) for _ in range(7)])
    post_norm = Qwen2MoeSparseMoeBlock(shared=False)
    post_norm.post_norm = nn.LayerNorm(20)  # an extra part the fused block would not run
    report = replace_moe_layers(_randomize(Net([dropout, post_norm])))
    assert not report.replaced
    assert "dropout" in report.skipped[0]["reason"] and "post_norm" in report.skipped[1]["reason"], str(report)


def test_tied_router_explained_and_verify_false():
    # edge: a zero-initialised router ties every logit; the skip says why, and
    # verify=False replaces a known block anyway
    model = _randomize(Net([MixtralSparseMoeBlock()]))
    with torch.no_grad():
        model.layers[0].mlp.gate.weight.zero_()
    report = replace_moe_layers(copy.deepcopy(model))
    assert not report.replaced and "tie" in report.skipped[0]["reason"], str(report)
    report = replace_moe_layers(model, verify=False)
    assert report.replaced and report.replaced[0]["max_error"] is None
    out, logits = model.layers[0].mlp(torch.randn(1, 4, 20))
    assert out.shape == (1, 4, 20) and logits.shape == (4, 7)


# --------------------------------------------------------------------------- inline activations


class InlineExpert(nn.Module):
    """A hand-written expert with the activation called inline (no act_fn attribute)."""

    def __init__(self, h, i, fn):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)
        self.fn = fn  # a plain function, not a module attribute named like an activation

    def forward(self, x):
        return self.w2(self.fn(self.w1(x)) * self.w3(x))


class HandBlock(nn.Module):
    def __init__(self, fn, h=16, i=12, e=5, k=2):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList([InlineExpert(h, i, fn) for _ in range(e)])

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        w = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return _loop(self.experts, x, w.to(x.dtype), sel).reshape(hidden_states.shape)


@pytest.mark.parametrize("fn,act", [(F.silu, "swiglu"), (F.gelu, "geglu"),
                                    (lambda v: F.gelu(v, approximate="tanh"), "geglu_tanh")])
def test_inline_activation_is_detected(fn, act):
    # Before: replaced nothing, silently (the experts have no act_fn attribute).
    torch.manual_seed(0)
    model = nn.Sequential(HandBlock(fn))
    ref = copy.deepcopy(model)
    report = replace_moe_layers(model, backend="torch")
    assert len(report.replaced) == 1, str(report)
    assert isinstance(model[0], FusedMoEBlock) and model[0].activation.name == act
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_unknown_inline_activation_says_what_to_add():
    torch.manual_seed(0)
    model = nn.Sequential(HandBlock(torch.tanh))
    with pytest.warns(UserWarning, match="replaced 0 MoE block"):
        report = replace_moe_layers(model, backend="torch")
    assert not report.replaced and not isinstance(model[0], FusedMoEBlock)
    reason = report.skipped[0]["reason"]
    assert "no act_fn attribute" in reason and "self.act_fn = nn.SiLU()" in reason, reason
