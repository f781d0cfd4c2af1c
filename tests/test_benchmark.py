"""The benchmark: roofline arithmetic on hand-computed cases, the providers computing the
same layer as the reference, the CSV/table/summary writers, a tiny end-to-end CPU run,
and bench/gpu_check.sh --dry-run. No test asserts a time."""

import csv
import dataclasses
import importlib.util
import math
import os
import subprocess

import pytest
import torch

from moe_kernels.bench.gpucheck import parse_pytest_log, summarize
from moe_kernels.bench.providers import (
    PROVIDERS,
    build_calls,
    grouped_mm_pipeline,
    expert_load,
    make_inputs,
    make_weights,
    parse_providers,
    rotation_copies,
)
from moe_kernels.bench.report import (COLUMNS, CsvWriter, fastest_summary, format_seconds, format_table, load_summary,
                                      plot_title, read_csv)
from moe_kernels.bench.roofline import (
    SHAPES,
    ModelShape,
    Roofline,
    expected_active_experts,
    expected_active_experts_with_replacement,
    expert_weight_bytes,
    layer_flops,
    layer_min_bytes,
    parse_shapes,
    scaled_shape,
)
from moe_kernels.bench.timing import time_calls
from moe_kernels.bench.run import main as bench_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many tiny ops: one thread avoids OpenMP barrier stalls on a busy 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- roofline arithmetic

def test_layer_flops_hand_computed():
    # gated: 2*S*H*I*3 = 2*4*8*16*3; plain: 2 GEMMs of 2*S*H*I; fwdbwd = 3x forward
    assert layer_flops(4, 8, 16) == 3072
    assert layer_flops(4, 8, 16, gated=False) == 2048
    assert layer_flops(4, 8, 16, mode="fwdbwd") == 9216
    assert layer_flops(0, 8, 16) == 0  # edge: no valid slot
    with pytest.raises(ValueError, match="mode"):
        layer_flops(4, 8, 16, mode="bwd")


def test_expert_weight_bytes_hand_computed():
    # Mixtral expert in bf16: W13 2*I*H + W2 H*I = 3*4096*14336 elements of 2 bytes
    assert expert_weight_bytes(SHAPES["mixtral-8x7b"], 2) == 3 * 4096 * 14336 * 2 == 352_321_536
    # GPT-OSS adds the biases b13 [2I] and b2 [H]
    assert expert_weight_bytes(SHAPES["gpt-oss-20b"], 2) == (3 * 2880 * 2880 + 2 * 2880 + 2880) * 2
    plain = ModelShape("plain", 4, 1, 8, 16, activation="gelu")
    assert expert_weight_bytes(plain, 4) == (16 * 8 + 8 * 16) * 4  # edge: non-gated W13 has I rows


def test_expected_active_experts_hand_computed():
    assert expected_active_experts(8, 2, 1) == pytest.approx(2.0)   # one token hits exactly k experts
    assert expected_active_experts(8, 8, 1) == pytest.approx(8.0)   # edge: k = E hits all
    assert expected_active_experts(4, 1, 2) == pytest.approx(4 * (1 - 0.75 ** 2))  # 1.75
    assert expected_active_experts(8, 2, 2) == pytest.approx(3.5)   # 8 * (1 - (6/8)^2)
    assert expected_active_experts(8, 2, 0) == 0                    # edge: no token
    assert expected_active_experts_with_replacement(4, 2) == pytest.approx(1.75)
    # with replacement undercounts top-k's distinct picks
    assert expected_active_experts_with_replacement(8, 4) < expected_active_experts(8, 2, 2)
    with pytest.raises(ValueError, match="top_k"):
        expected_active_experts(4, 5, 1)


def test_layer_min_bytes_hand_computed():
    s = ModelShape("toy", 4, 2, 8, 16)
    # per expert (2*16*8 + 8*16) * 2 bytes = 768; 2 active; x and out 3*8*2 bytes each
    assert layer_min_bytes(s, 3, 2, 2) == 2 * 768 + 2 * 48 == 1632
    # fwdbwd: weights read twice + grads written (3x), x, out, dout, x again, dx (5x)
    assert layer_min_bytes(s, 3, 2, 2, mode="fwdbwd") == 3 * 1536 + 5 * 48


def test_roofline_floor_and_fraction():
    r = Roofline(peak_flops=100.0, peak_bytes=10.0)
    assert r.floor(1000, 50) == (10.0, "compute")
    assert r.floor(100, 50) == (5.0, "memory")
    assert r.fraction(1000, 50, 20.0) == pytest.approx(0.5)
    assert math.isnan(r.fraction(1000, 50, 0.0))  # edge: no time measured


def test_qwen3_decode_floor_matches_design_doc():
    # DESIGN.md: Qwen3-30B-A3B at T=1 on the H200 (790 TFLOP/s, 4.3 TB/s) has a 17.6 us floor
    s = SHAPES["qwen3-30b-a3b"]
    nbytes = layer_min_bytes(s, 1, expected_active_experts(s.num_experts, s.top_k, 1), 2)
    floor, bound = Roofline(790e12, 4.3e12).floor(layer_flops(8, s.hidden, s.intermediate), nbytes)
    assert bound == "memory"
    assert floor * 1e6 == pytest.approx(17.56, abs=0.01)


def test_scaled_shapes_and_parsing():
    m = scaled_shape(SHAPES["mixtral-8x7b"], "small")
    assert (m.hidden, m.intermediate, m.num_experts, m.top_k) == (256, 896, 8, 2)
    g = scaled_shape(SHAPES["gpt-oss-20b"], "small")
    assert g.hidden % 8 == 0 and g.intermediate % 8 == 0  # 2880/16 = 180 rounds to a multiple of 8
    assert scaled_shape(SHAPES["olmoe"], "full") == SHAPES["olmoe"]
    assert [s.name for s in parse_shapes("mixtral,qwen3")] == ["mixtral-8x7b", "qwen3-30b-a3b"]
    assert len(parse_shapes("all")) == 5
    with pytest.raises(ValueError, match="shapes"):
        parse_shapes("llama")
    with pytest.raises(ValueError, match="size"):
        scaled_shape(SHAPES["olmoe"], "huge")


def test_rotation_copies():
    s = ModelShape("toy", 4, 2, 8, 16)  # 4 experts * 768 bytes = 3072 bytes per weight set
    assert rotation_copies(s, 2, cache=1024, budget=1 << 30) == 1        # one set already overflows 3x
    assert rotation_copies(s, 2, cache=4096, budget=1 << 30) == 4        # ceil(3*4096/3072)
    assert rotation_copies(s, 2, cache=1 << 20, budget=1 << 30) == 8     # capped
    assert rotation_copies(s, 2, cache=1 << 20, budget=2 * 3072) == 2    # memory budget
    assert rotation_copies(s, 2, cache=1 << 20, budget=0) == 1           # edge: always one


# --------------------------------------------------------------------------- providers

@pytest.mark.parametrize("name", list(SHAPES))
def test_providers_compute_the_same_layer(name):
    # Every provider the CPU can run, on the model's own layout (GPT-OSS: transposed,
    # interleaved, biased, clamped swiglu), against the reference loop, value and grads.
    # at most 16 experts: the layouts are the point here, and E=256 Python loops are slow
    shape = dataclasses.replace(scaled_shape(SHAPES[name], "tiny"), num_experts=min(16, SHAPES[name].num_experts))
    w = make_weights(shape, torch.float32, torch.device("cpu"))[0]
    inp = make_inputs(shape, 5, torch.float32, torch.device("cpu"), copies=1)[0]  # T=5: odd
    ref_fwd, ref_diff = PROVIDERS["reference"].forward(shape, w, inp)
    ref = ref_fwd()
    assert ref.abs().mean() > 1e-3  # the inputs are not degenerate
    ref_grads = torch.autograd.grad(ref, ref_diff[:-1], inp.grad_out)
    names = ["torch", "torch:layer"] + (["hf_eager", "hf_grouped_mm"] if HAS_HF else [])
    for p in names:
        fwd, diff = PROVIDERS[p].forward(shape, w, inp)
        out = fwd()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m, p=p: f"{p}: {m}")
        grads = torch.autograd.grad(out, diff, inp.grad_out, allow_unused=True)
        # x first, then the weights (HF orders its parameters its own way: match by shape)
        torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-4, atol=1e-5)
        by_shape = {tuple(g.shape): g for g in grads[1:-1]}
        for g in ref_grads[1:]:
            torch.testing.assert_close(by_shape[tuple(g.shape)], g, rtol=1e-4, atol=1e-5)


def test_grouped_mm_pipeline_matches_reference():
    # The CUDA-only provider's pipeline, run on the CPU where torch has the op.
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    shape = scaled_shape(SHAPES["gpt-oss-20b"], "tiny")  # biases + interleaved + transposed storage
    w = make_weights(shape, torch.float32, torch.device("cpu"))[0]
    inp = make_inputs(shape, 7, torch.float32, torch.device("cpu"), copies=1)[0]
    t = inp.routing.num_tokens
    try:
        out = grouped_mm_pipeline(inp.x, inp.topk_ids, inp.routing.slot_weight.view(t, -1), w.params)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._grouped_mm does not run on the CPU here: {exc}")
    torch.testing.assert_close(out, PROVIDERS["reference"].forward(shape, w, inp)[0](), rtol=1e-4, atol=1e-5)


def test_skewed_routing_concentrates_on_few_experts():
    shape = SHAPES["qwen3-30b-a3b"]  # E=128, k=8
    uni = make_inputs(shape, 64, torch.float32, torch.device("cpu"), copies=1)[0]
    skew = make_inputs(shape, 64, torch.float32, torch.device("cpu"), routing="skewed", zipf=1.5, copies=1)[0]
    assert skew.active_experts < uni.active_experts
    for i in (uni, skew):  # k distinct experts per token, top-k layout
        ids = i.topk_ids
        assert all(len(set(row.tolist())) == shape.top_k for row in ids)
    with pytest.raises(ValueError, match="routing"):
        make_inputs(shape, 4, torch.float32, torch.device("cpu"), routing="zipf")


def test_parse_providers():
    cpu = torch.device("cpu")
    assert parse_providers("default", cpu)[:2] == ["torch", "torch:layer"]
    assert parse_providers("torch,reference", cpu) == ["torch", "reference"]
    assert "grouped_mm" in parse_providers("all", cpu)
    with pytest.raises(ValueError, match="providers"):
        parse_providers("torch,fast", cpu)
    # unavailable on the CPU, with a reason: the grouped_mm pipeline and fwdbwd of routing
    assert PROVIDERS["grouped_mm"].unavailable(cpu, torch.float32, SHAPES["olmoe"], "fwd")
    assert PROVIDERS["torch:routing"].unavailable(cpu, torch.float32, SHAPES["olmoe"], "fwdbwd")


def test_time_calls_rotates_and_counts():
    seen = []
    calls = [lambda i=i: seen.append(i) for i in range(3)]
    t = time_calls(calls, torch.device("cpu"), warmup=2, repeats=5, budget_s=100.0)
    assert t.samples == 5 and t.minimum <= t.median
    assert seen == [0, 1, 2, 0, 1, 2, 0]  # warm-up then samples, cycling through the sets
    seen.clear()
    t = time_calls(calls, torch.device("cpu"), warmup=3, repeats=10, budget_s=0.0)
    assert t.samples == 1  # edge: one call over the budget: one warm-up, one sample
    assert seen == [0, 1]


def test_build_calls_fwdbwd_leaves_no_grad_behind():
    shape = scaled_shape(SHAPES["olmoe"], "tiny")
    w = make_weights(shape, torch.float32, torch.device("cpu"), copies=2)
    inp = make_inputs(shape, 3, torch.float32, torch.device("cpu"), copies=3)
    calls = build_calls(PROVIDERS["torch"], shape, w, inp, "fwdbwd")
    assert len(calls) == 3
    for c in calls:
        c()
    assert all(t.grad is None for t in w[0].leaves + [inp[0].x])  # autograd.grad, not .backward


# --------------------------------------------------------------------------- writers

def _row(provider, t, frac, status="ok", note=""):
    return {"shape": "toy", "E": 4, "k": 2, "H": 8, "I": 16, "T": t, "mode": "fwd", "routing": "uniform",
            "dtype": "float32", "provider": provider, "status": status, "note": note,
            "median_ms": 1.0 if status == "ok" else None, "floor_ms": 0.5, "bound": "memory",
            "frac_roofline": frac}


def test_csv_writer_round_trip(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    w = CsvWriter(str(path), {"device": "cpu", "device_name": "test cpu", "torch": "9.9"})
    w.write(_row("torch", 16, 0.5))
    w.write(_row("grouped_mm", 16, float("nan"), status="skipped", note="CUDA only"))
    w.close()
    with open(path) as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = read_csv(str(path))
    assert len(rows) == 2
    assert rows[0]["device_name"] == "test cpu" and rows[0]["frac_roofline"] == "0.5"
    assert rows[1]["frac_roofline"] == "" and rows[1]["note"] == "CUDA only"  # NaN -> empty
    with pytest.raises(ValueError):
        CsvWriter(str(tmp_path / "x.csv"), {}).write({"not_a_column": 1})


def test_format_table_text_and_markdown():
    rows = [_row("torch", 1, 0.5), _row("reference", 1, 0.25), _row("torch", 16, 0.75),
            _row("grouped_mm", 16, float("nan"), status="skipped", note="CUDA only")]
    text = format_table(rows)
    assert "toy (E=4 k=2 H=8 I=16) fwd float32 uniform routing" in text
    assert "1.00ms 50%" in text and "1.00ms 25%" in text and "1.00ms 75%" in text
    assert "skip" in text and "grouped_mm: CUDA only" in text
    md = format_table(rows, markdown=True)
    assert "| T | floor | bound | torch | reference | grouped_mm |" in md and "|---|" in md
    assert format_seconds(2.5e-6) == "2.5us" and format_seconds(0.0125) == "12.50ms"


def _timed(provider, t, ms, frac=0.5, bound="memory", mode="fwd"):
    return dict(_row(provider, t, frac), median_ms=ms, bound=bound, mode=mode)


def test_format_table_speedups_legend_and_verdict():
    rows = [_timed("torch", 1, 1.0), _timed("reference", 1, 2.0), _timed("hf_eager", 1, 1.5),
            _timed("hf_grouped_mm", 1, 0.8), _timed("torch:layer", 1, 0.1),  # whole layer: never compared
            _timed("torch", 16, 1.0, frac=1.3), _timed("reference", 16, 4.0), _timed("hf_eager", 16, 2.5)]
    text = format_table(rows)
    header = next(line for line in text.splitlines() if line.lstrip().startswith("T "))
    assert header.split()[-4:] == ["x", "ref", "x", "peer"]
    row1 = next(line for line in text.splitlines() if line.lstrip().startswith("1 "))
    assert row1.split()[-2:] == ["2.00x", "0.80x"]  # against reference 2.0 ms and best peer hf_grouped_mm 0.8 ms
    row16 = next(line for line in text.splitlines() if line.lstrip().startswith("16 "))
    assert row16.split()[-2:] == ["4.00x", "2.50x"]
    assert "130%(m)" in row16 and "stayed in cache" in text  # above the roofline: flagged with its reason
    assert "floor = max(FLOPs" in text and "bound = " in text and "fraction of the roofline" in text
    assert text.splitlines()[-1].startswith("Fastest provider per cell: ")
    assert "torch in 1 of 2" in text and "hf_grouped_mm in 1 of 2" in text
    md = format_table(rows, markdown=True)
    assert "| x ref | x peer |" in md and "_floor = max(FLOPs" in md
    # compute-bound above 100%: blamed on the measured peak
    assert "(c)" in format_table([_timed("torch", 1, 1.0, frac=1.5, bound="compute"), _timed("reference", 1, 2.0)])
    assert "peak measured" in format_table([_timed("torch", 1, 1.0, frac=1.5, bound="compute")])
    assert fastest_summary([_timed("torch", 1, 1.0), _timed("reference", 1, 3.0)]).startswith(
        "Fastest provider: torch in every one of the 1 cells")


def test_plot_title_names_only_measured_modes():
    assert "dashed" not in plot_title([_timed("torch", 1, 1.0)]) and "forward only" in plot_title([_timed("torch", 1, 1.0)])
    both = plot_title([_timed("torch", 1, 1.0), _timed("torch", 1, 2.0, mode="fwdbwd")])
    assert "dashed = forward+backward" in both


def test_load_summary_from_plan_counts():
    shape = scaled_shape(SHAPES["olmoe"], "tiny")
    uniform = expert_load(make_inputs(shape, 64, torch.float32, torch.device("cpu"), copies=1))
    skewed = expert_load(make_inputs(shape, 64, torch.float32, torch.device("cpu"), routing="skewed", copies=1))
    assert sum(uniform) == sum(skewed) == 64 * shape.top_k and len(skewed) == shape.num_experts
    assert max(skewed) > 2 * max(uniform)
    text = load_summary({"olmoe": (64, "skewed", skewed)})
    assert f"512 slots on 64 experts, busiest {max(skewed)}" in text


def test_parse_pytest_log():
    log = "\n".join([
        "tests/test_a.py::test_one PASSED                                  [ 20%]",
        "tests/test_a.py::test_two[bf16-T=1] FAILED                         [ 40%]",
        "tests/test_b.py::test_gpu SKIPPED (needs a CUDA GPU)               [ 60%]",
        "tests/test_b.py::TestX::test_y PASSED                              [ 80%]",
        "ERROR tests/test_c.py - ImportError: no module",
        "some other line PASSED",
    ])
    got = parse_pytest_log(log)
    assert got["tests/test_a.py"] == {"PASSED": 1, "FAILED": 1}
    assert got["tests/test_b.py"] == {"SKIPPED": 1, "PASSED": 1}
    assert got["tests/test_c.py"] == {"ERROR": 1}
    assert len(got) == 3


def test_summarize_synthetic_outdir(tmp_path):
    (tmp_path / "steps.tsv").write_text("build\t0\t12\ntests-gpu\t1\t30\nbench\t124\t99\n")
    (tmp_path / "tests-gpu.log").write_text("tests/test_a.py::t PASSED\ntests/test_a.py::u FAILED\n")
    w = CsvWriter(str(tmp_path / "bench" / "results.csv"), {"device_name": "gpu0"})
    w.write(_row("torch", 1, 0.5))
    w.write(_row("triton", 1, 0.8))
    w.close()
    text, ok = summarize(str(tmp_path))
    assert not ok
    assert "FAILED (rc 1)" in text and "TIMEOUT" in text
    assert "80% triton" in text  # the best provider at T=1
    assert text.splitlines()[-1].startswith("RESULT: some")


# --------------------------------------------------------------------------- end to end

def test_bench_end_to_end_cpu(tmp_path, capsys):
    # tiny shapes, 2 shapes x 2 T x 2 modes x 4 providers, a few seconds
    out = tmp_path / "out"
    rc = bench_main(["--device", "cpu", "--size", "tiny", "--shapes", "mixtral,gpt-oss", "--tokens", "1,16",
                     "--mode", "fwd,fwdbwd", "--providers", "torch,torch:routing,reference,grouped_mm",
                     "--repeats", "2", "--warmup", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "measured peaks" in printed and "gpt-oss-20b (E=32 k=4" in printed
    with open(out / "results.csv") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = read_csv(str(out / "results.csv"))
    assert len(rows) == 2 * 2 * 2 * 4
    assert {(r["shape"], r["T"], r["mode"], r["provider"]) for r in rows} == {
        (s, t, m, p) for s in ("mixtral-8x7b", "gpt-oss-20b") for t in ("1", "16") for m in ("fwd", "fwdbwd")
        for p in ("torch", "torch:routing", "reference", "grouped_mm")}
    for r in rows:
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["date"]
        if r["provider"] == "grouped_mm" or (r["provider"] == "torch:routing" and r["mode"] == "fwdbwd"):
            assert r["status"] == "skipped" and r["note"]
        else:
            assert r["status"] == "ok", r
            assert float(r["median_ms"]) > 0
        if r["status"] == "ok" and r["provider"] != "torch:routing":
            assert float(r["frac_roofline"]) > 0 and float(r["tflops"]) > 0 and float(r["gbps"]) > 0
            assert r["bound"] in ("memory", "compute")
        if r["provider"] == "torch:routing":
            assert r["frac_roofline"] == ""  # no FLOPs to speak of
    assert (out / "results.md").read_text().count("|---|") >= 4
    assert "Expert load (the plan's expert_counts)" in printed and "Fastest provider" in printed
    if HAS_MPL:
        assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "roofline.png").exists()


@pytest.mark.parametrize("argv,what", [
    (["--tokens", "0"], "tokens"),
    (["--mode", "train"], "mode"),
    (["--shapes", "llama"], "shapes"),
    (["--providers", "nope"], "providers"),
])
def test_bench_bad_flags(tmp_path, capsys, argv, what):
    assert bench_main([*argv, "--out", str(tmp_path)]) == 2
    assert what in capsys.readouterr().err


def test_cli_wires_bench():
    cli = pytest.importorskip("moe_kernels.cli")
    args = cli.build_parser().parse_args(["bench", "--size", "tiny", "--providers", "torch"])
    assert args.size == "tiny" and callable(args.func)
    args = cli.build_parser().parse_args(["gpu-check", "somewhere", "--dry-run"])
    assert args.outdir == "somewhere" and args.dry_run


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOE_KERNELS_GPU_CHECK_DRY_RUN") == "1", reason="inside gpu_check itself")
def test_gpu_check_dry_run(tmp_path):
    # ~30 s on an idle machine: env, wheel build without CUDA, GPU tests collected, tiny CPU benchmark,
    # this file's fast tests, summary.
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    tail = proc.stdout.strip().splitlines()
    assert tail[-1] == "RESULT: all steps passed"
    assert any(line.startswith("== gpu_check summary") for line in tail)
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert set(steps) == {"env", "build", "info", "tests-gpu", "bench", "bench-fwdbwd", "tests-rest"}
    assert steps["build"] == "0" and steps["bench"] == "0" and steps["tests-rest"] == "0"
    assert len(list((out / "wheel").glob("*.whl"))) == 1
    for f in ("bench/results.csv", "bench_fwdbwd/results.csv", "summary.txt", "tests-rest.log"):
        assert (out / f).exists(), f
    assert "tests/test_benchmark.py" in (out / "summary.txt").read_text()


def test_time_side_by_side_interleaves_and_reports_errors():
    from moe_kernels.bench.run import time_side_by_side
    from moe_kernels.bench.timing import Timing

    order = []

    def call(name):
        def f():
            order.append(name)
        return f

    def boom():
        raise RuntimeError("provider broke")

    out = time_side_by_side({"a": [call("a")], "b": [call("b"), call("b")], "bad": [boom]},
                            warmup=1, repeats=4, budget_s=10.0)
    assert isinstance(out["a"], Timing) and isinstance(out["b"], Timing) and out["a"].samples == 4
    assert isinstance(out["bad"], RuntimeError)
    timed = order[2:]  # after one warm-up call of a and of b
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]  # one sample of each per round, first one rotating


def test_time_side_by_side_gives_every_sample_its_own_rotation_set():
    # Edge: two providers sharing weight sets. If both took set i in round i, the second
    # would read what the first left in the caches; one shared sequence makes each
    # sample's set differ from the one timed just before it.
    from moe_kernels.bench.run import time_side_by_side

    used = []

    def call(name, i):
        def f():
            used.append((name, i))
        return f

    sets = 4
    out = time_side_by_side({p: [call(p, i) for i in range(sets)] for p in ("a", "b")},
                            warmup=1, repeats=6, budget_s=10.0)
    assert out["a"].samples == out["b"].samples == 6
    timed = [i for _, i in used[2:]]
    assert timed == [k % sets for k in range(12)]
    assert all(x != y for x, y in zip(timed, timed[1:]))


def test_ratio_table_over_runs(tmp_path):
    # Two runs of one cell: ratios are taken inside each run (ours over the fastest peer
    # of that run), then summarised; a cell missing ours is left out.
    from moe_kernels.bench.ratios import main, ratio_table, run_ratios
    from moe_kernels.bench.report import COLUMNS, CsvWriter, read_csv

    def run(path, times):
        w = CsvWriter(str(path), {})
        for (shape, prov), ms in times.items():
            w.write({"shape": shape, "T": 1, "mode": "fwd", "device_name": "cpu (1 threads)", "provider": prov,
                     "status": "ok", "median_ms": ms})
        w.close()
        return read_csv(str(path))

    a = run(tmp_path / "a.csv", {("m", "torch"): 1.0, ("m", "reference"): 2.0, ("m", "hf_eager"): 1.25,
                                 ("d", "reference"): 1.0})
    b = run(tmp_path / "b.csv", {("m", "torch"): 3.0, ("m", "reference"): 2.0, ("m", "hf_grouped_mm"): 2.5})
    assert run_ratios(a) == {("m", 1, "fwd", "cpu (1 threads)"): 0.8}
    assert run_ratios(b) == {("m", 1, "fwd", "cpu (1 threads)"): 1.5}
    table = ratio_table([a, b])
    assert "| m | 1 | fwd | cpu (1 threads) | 1.15 (0.80-1.50) | 1 of 2 |" in table
    assert "| d |" not in table
    assert main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
    assert main([str(tmp_path / "missing.csv")]) == 2
    assert "shape" in COLUMNS


def test_forms_table_runs_and_times_every_form(capsys):
    # python -m moe_kernels.bench.forms: one tiny shape, two row counts, a few reps.
    from moe_kernels import cpu_kernel
    from moe_kernels.bench.forms import main, time_forms
    from moe_kernels.segment_matmul import dnn_available

    t = time_forms(48, 32, 3, reps=3, cache=1 << 16)
    assert set(t) == ({"mm", "fm"} | ({"dnn"} if dnn_available() else set())
                      | ({"kernel"} if cpu_kernel.available() else set())) and all(v > 0 for v in t.values())
    assert "fm" not in time_forms(48, 32, 3, transposed=True, reps=3, cache=1 << 16)
    assert main(["--shapes", "gpt-oss-20b", "--size", "tiny", "--rows", "1,3", "--reps", "3"]) == 0
    out = capsys.readouterr().out
    assert "| gpt-oss-20b w13 |" in out and "transposed" in out and out.count("\n| ") >= 6


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
def test_balanced_order_is_a_williams_design(n):
    # Over one cycle every provider runs once per position and right after every other
    # provider equally often (odd n: a cycle of 2n rounds).
    from collections import Counter

    from moe_kernels.bench.run import balanced_order

    rows = [balanced_order(n, r) for r in range(n if n % 2 == 0 else 2 * n)]
    assert all(sorted(row) == list(range(n)) for row in rows)
    for pos in range(n):
        assert len(Counter(row[pos] for row in rows).values()) == n
    follows = Counter((a, b) for row in rows for a, b in zip(row, row[1:]))
    assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1
    assert balanced_order(n, len(rows)) == rows[0]


def test_side_by_side_runs_whole_cycles_of_the_order():
    # 3 providers: a balanced cycle is 6 rounds, so repeats=4 becomes 6 samples each.
    from moe_kernels.bench.run import time_side_by_side

    out = time_side_by_side({p: [lambda: None] for p in "abc"}, warmup=1, repeats=4, budget_s=10.0)
    assert [out[p].samples for p in "abc"] == [6, 6, 6]
