"""The launch-shape model (bench/launch_shape.py), the per-GPU config tables
(backends/triton/tables.py) and ``moe-kernels tune`` / ``bench --explain``, on the CPU.

The decode launch shapes are the issue's acceptance numbers: at T=1 (and 16) every
forward GEMM of Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3 and GPT-OSS-120B launches at
least 2 x 132 useful CTAs on an H200 (split-K where the unsplit grid is smaller), and
the T=1 count is checked against a real plan, not only the model's expectation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_kernels.bench.launch_shape import GPUS, ISSUE_SHAPES, estimate_table, format_launches, layer_launches
from moe_kernels.backends.triton import configs, tables
from moe_kernels.plan import build_plan_torch
from moe_kernels.routing import route

H200 = GPUS["h200"]


@pytest.mark.parametrize("name", list(ISSUE_SHAPES))
@pytest.mark.parametrize("t", [1, 16])
def test_decode_fills_the_gpu(name, t):
    shape = ISSUE_SHAPES[name]
    launches = layer_launches(shape, t, H200)
    assert [x.gemm for x in launches] == ["gemm1", "gemm2"]
    for x in launches:
        assert x.regime == "decode" and x.tile.startswith("16x"), x
        assert x.ctas_useful >= 2 * H200.num_sms, f"{name} T={t} {x.gemm}: {x.ctas_useful} useful CTAs"
    if t == 1:
        # The real plan of one token: k blocks (one per chosen expert), whatever the logits.
        logits = torch.randn(1, shape.num_experts, generator=torch.Generator().manual_seed(0))
        plan = build_plan_torch(route(logits, "softmax_topk", top_k=shape.top_k), 16)
        used = int((plan.block_expert >= 0).sum())
        assert used == shape.top_k
        for x, n in zip(launches, (shape.intermediate, shape.hidden)):
            cfg = configs.gemm_config(shape.num_experts, n, shape.hidden + shape.intermediate - n, torch.bfloat16,
                                      H200.capability, 16, gated_b=x.gemm == "gemm1" and shape.gated,
                                      num_slots=shape.top_k, num_sms=H200.num_sms)
            real = used * math.ceil(n / cfg.BLOCK_N) * cfg.SPLIT_K
            assert real == x.ctas_useful >= 2 * H200.num_sms, (name, x.gemm, real, x.ctas_useful)


def test_split_k_where_the_unsplit_grid_is_small():
    """The cases the issue names: Mixtral GEMM2 (2 x 64 CTAs unsplit), Qwen3 GEMM1
    (8 x 12), DeepSeek GEMM1 (8 x 32), GPT-OSS (4 x 45) split; DeepSeek GEMM2 (896)
    does not; nothing splits at prefill."""
    split = {(n, x.gemm): x.split_k for n, sh in ISSUE_SHAPES.items() for x in layer_launches(sh, 1, H200)}
    assert split[("mixtral-8x7b", "gemm2")] >= 2 and split[("qwen3-30b-a3b", "gemm1")] >= 2
    assert split[("deepseek-v3", "gemm1")] >= 2 and split[("gpt-oss-120b", "gemm1")] >= 2
    assert split[("deepseek-v3", "gemm2")] == 1 and split[("mixtral-8x7b", "gemm1")] == 1
    for sh in ISSUE_SHAPES.values():
        for x in layer_launches(sh, 16384, H200):
            assert x.split_k == 1 and x.regime == "prefill" and x.tma and x.persistent and x.tile.startswith("128x")
            assert x.ctas_launched == H200.num_sms
        for x in layer_launches(sh, 16384, GPUS["a100"]):
            assert not x.tma and not x.persistent


def test_split_k_rule():
    assert configs.split_k_for(128, 14336, 128, 132) == 4      # Mixtral GEMM2 at T=1
    assert configs.split_k_for(96, 2048, 128, 132) == 4        # Qwen3 GEMM1
    assert configs.split_k_for(256, 768, 128, 132) == 2        # Qwen3 GEMM2: 384 of K per split
    assert configs.split_k_for(896, 2048, 128, 132) == 1       # DeepSeek GEMM2: already 6.8 waves
    assert configs.split_k_for(1, 512, 128, 132) == 2          # K floor: >= 256 per split
    assert configs.split_k_for(1, 10**6, 64, 132) == 16        # the cap


def test_estimate_table_and_explain_format():
    md = estimate_table(tokens=(1, 2048))
    lines = md.splitlines()
    assert lines[0].startswith("| shape | T=1 est. | T=1 measured")
    assert len(lines) == 2 + len(ISSUE_SHAPES)
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        ests = [float(c.rstrip("%")) for c in cells[1::2]]
        assert all(0 < v <= 100 for v in ests) and all(c == "" for c in cells[2::2]), line
    text = format_launches(layer_launches(ISSUE_SHAPES["mixtral-8x7b"], 1, H200), markdown=True)
    assert "CTAs launched" in text and "waves" in text and "W KB/CTA" in text and "MFLOP/CTA" in text


# --------------------------------------------------------------------------- tables


def test_shipped_tables_are_the_heuristics_snapshot():
    """The shipped tables parse, name their GPUs, and (unmeasured) equal what the
    heuristic picks today, so they never go stale silently; regenerate them with
    ``python -m moe_kernels.backends.triton.tune --snapshot``."""
    from moe_kernels.backends.triton.tune import SNAPSHOT_GPUS, snapshot_entries
    files = {p.name for p in tables.TABLE_DIR.glob("*.json")}
    assert files == {f for f, *_ in SNAPSHOT_GPUS}
    for fname, gpu, cap, sms in SNAPSHOT_GPUS:
        t = tables.load_table(tables.TABLE_DIR / fname)
        assert t["gpu"] == gpu and tuple(t["capability"]) == cap and t["num_sms"] == sms
        if not t["measured"]:
            assert t["entries"] == snapshot_entries(cap, sms), f"{fname}: stale snapshot of the heuristic"
    # Every regime appears for the large-expert model on the H100/H200 table.
    t = tables.load_table(tables.TABLE_DIR / "h100_h200.json")
    bms = {int(k.split("BLOCK_M=")[1].split(",")[0]) for k in t["entries"] if k.startswith("E=8,")}
    assert bms == {16, 32, 64, 128}


def test_a_measured_table_overrides_the_heuristic_and_an_unknown_gpu_keeps_it(tmp_path):
    key_args = (8, 4096, 14336, torch.bfloat16, 16, "gemm2")
    entry = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "SPLIT_K": 8}
    t = tables.write_table(tmp_path / "x.json", gpu="test", capability=(9, 0), num_sms=132, source="test",
                           entries={tables.entry_key(*key_args): entry})
    assert t["measured"] is True
    assert tables.lookup((9, 0), 132, 8, 4096, 14336, torch.bfloat16, 16, "gemm2", tables=(t,)) == entry
    assert tables.lookup((8, 0), 108, 8, 4096, 14336, torch.bfloat16, 16, "gemm2", tables=(t,)) is None
    assert tables.lookup((9, 0), 132, 8, 4096, 14336, torch.bfloat16, 32, "gemm2", tables=(t,)) is None
    # Unmeasured (shipped snapshots) override nothing; an unknown GPU uses the heuristic.
    assert tables.lookup((9, 0), 132, *key_args) is None
    heur = configs.gemm_config(8, 4096, 14336, torch.bfloat16, (12, 1), 16, num_slots=2, num_sms=48, kind="gemm2")
    assert heur == configs.gemm_config(8, 4096, 14336, torch.bfloat16, (12, 1), 16, num_slots=2, num_sms=48)
    # Bad tables: a ValueError naming the file and the field.
    bad = dict(json.loads((tmp_path / "x.json").read_text()))
    bad["entries"] = {"k": {"BLOCK_Q": 1}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json.*BLOCK_Q"):
        tables.load_table(tmp_path / "bad.json")
    bad["entries"] = {"k": {"BLOCK_N": 48}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="BLOCK_N"):
        tables.load_table(tmp_path / "bad.json")


def test_cli_tune_needs_a_gpu_and_bench_explain_writes_the_model(tmp_path, capsys):
    from moe_kernels.cli import main
    assert main(["tune", "--out", str(tmp_path / "t.json"), "--device", "cpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    rc = main(["bench", "--explain-only", "--shapes", "mixtral,qwen3", "--tokens", "1,8192", "--size", "full",
               "--out", str(tmp_path), "--explain-gpu", "h100"])
    assert rc == 0
    text = (tmp_path / "launch_shapes.md").read_text()
    assert "H100" in text and text.count("| mixtral-8x7b |") == 4 and text.count("| qwen3-30b-a3b |") == 4
    assert "decode" in text and "prefill" in text
    assert main(["bench", "--explain-only", "--explain-gpu", "v100", "--out", str(tmp_path)]) == 2
