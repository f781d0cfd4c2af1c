"""``generate`` under ``torch.compile(fullgraph=True)`` through experts_implementation="moe_kernels".

transformers' own ``test_generate_compilation_all_outputs`` compiles the model's forward
for a static cache; every path moe_kernels takes there must trace without a graph break
(fullgraph) and without a data-dependent host read. Here: tiny random models on the CPU
in float32 and bfloat16, generation with ``cache_implementation="static"`` and a
``CompileConfig(fullgraph=True)``; the tokens must equal those of the same model run
eagerly (uncompiled, same implementation and cache), and the experts must have run
through moe_kernels inside the compiled graph.

The backend is ``aot_eager``: Dynamo plus AOTAutograd's fake-tensor tracing, which is
where an untraceable op fails, without Inductor's C++ build (``_check(...,
backend="inductor")`` runs the same check through Inductor: about 2 minutes on 2 cores,
so not in the suite).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers.generation import CompileConfig  # noqa: E402

import moe_kernels.integrations.transformers as mkt  # noqa: E402
from test_hf_integration import _model  # noqa: E402



def _generate(model, ids, compiled: bool, backend: str = "aot_eager"):
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    if compiled:
        cc = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
        cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
        kw["compile_config"] = cc
    else:
        kw["disable_compile"] = True
    return model.generate(ids, **kw)


def _check(family, dtype, backend="aot_eager"):
    mkt.register("moe_kernels", backend="torch")
    model = _model(family).to(dtype)
    model.set_experts_implementation("moe_kernels")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    calls = []
    experts = model.model.layers[-1].mlp.experts
    handle = experts.register_forward_hook(lambda *a: calls.append(1))
    try:
        eager = _generate(model, ids, compiled=False)
        n_eager = len(calls)
        torch._dynamo.reset()
        compiled = _generate(model, ids, compiled=True, backend=backend)
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert n_eager == 6, "the experts did not run once per generated token"
    assert compiled.shape == (1, 11)
    assert torch.equal(compiled, eager), (compiled, eager)


# (family, dtype, marks): mixtral (softmax top-k) by default; slow: deepseek_v3 (grouped
# sigmoid with selection bias, shared experts, a dense layer) and gpt_oss (biases,
# interleaved gate/up, clamped SwiGLU), the two other paths through moe_kernels (each
# compiles a bigger graph: 20-40 s on 2 cores). qwen3_moe, olmoe and qwen2_moe take
# mixtral's path through moe_kernels; they passed the same check in bf16 when this test
# was written (loop over all of FAMILIES_ALL to repeat it).
FAMILIES_ALL = ("deepseek_v3", "gpt_oss", "qwen3_moe", "olmoe", "qwen2_moe")
CASES = [
    ("mixtral", torch.float32, []),  # failed before: CPU _grouped_mm on fp32 under fake tensors
    ("mixtral", torch.bfloat16, []),
]
for fam in FAMILIES_ALL[:2]:
    CASES += [(fam, torch.float32, [pytest.mark.slow]), (fam, torch.bfloat16, [pytest.mark.slow])]


@pytest.mark.parametrize("family, dtype", [pytest.param(f, d, marks=m, id=f"{f}-{str(d)[6:]}") for f, d, m in CASES])
def test_generate_compiles_fullgraph(family, dtype):
    _check(family, dtype)

