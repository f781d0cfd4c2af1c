"""Expert parallelism (moe_kernels.parallel) on the CPU with gloo, 2 and 4 ranks.

Each test launches a group of ranks through tests/ep_harness.py (one subprocess per rank
on loopback, a short process-group timeout, a wall-clock bound on the whole group) and
checks what the ranks measured: every router equals the single-process ``MoE`` on the
concatenated batch in output, aux losses and every gradient; a failing or differently
built rank raises everywhere instead of hanging or aborting; the fingerprint that the
ranks exchange tells every configuration field apart.
"""

from __future__ import annotations

import pytest
import torch

from ep_harness import CASES_2, CASES_4, FAIL_PG_TIMEOUT_S, MISMATCHES, H, I, _check_launch, _launch, _pick


@pytest.fixture(scope="module")
def ep2():
    run = _launch(2, "equal", bound_s=120)
    _check_launch(run, 2)
    return run["results"]


@pytest.fixture(scope="module")
def ep4():
    run = _launch(4, "equal", bound_s=150)
    _check_launch(run, 4)
    return run["results"]


def _assert_case(results, cid, opts=None):
    for rank, res in results.items():
        r = res[cid]
        assert "exception" not in r, f"rank {rank}: {r.get('exception')}"
        bad = {k: v for k, v in r["errors"].items() if not v <= r["tol"]}
        assert not bad, f"rank {rank} case {cid}: differs from the single-process layer: {bad}"
        assert r["out_finite"]
        assert r["rerun_equal"], f"rank {rank}: a second no_grad forward is not bitwise equal to the first"
        assert not r["none_grads"], f"rank {rank}: expert grads are None: {r['none_grads']}"
        assert not r["extra_loss_keys"], f"rank {rank}: losses the single-process layer lacks: {r['extra_loss_keys']}"
    for rank in (opts or {}).get("expect_empty", []):
        assert results[rank][cid]["rows_received"] == 0, f"rank {rank} should receive no rows"
    if cid != "t0_all":
        assert any(res[cid]["out_norm"] > 0 for res in results.values()), "every output is zero: the test cannot fail"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES_2, ids=[c[0] for c in CASES_2])
def test_two_ranks_match_single_process(ep2, case):
    _assert_case(ep2, case[0], case[3])
    if case[0] == "switch_drops":
        assert ep2[0]["switch_drops"]["dropped_fraction"] > 0  # the capacity actually dropped tokens


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES_4, ids=[c[0] for c in CASES_4])
def test_four_ranks_match_single_process(ep4, case):
    _assert_case(ep4, case[0], case[3])
    if case[0] == "switch_drops":
        assert ep4[0]["switch_drops"]["dropped_fraction"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_noisy_topk_training_functional(request, world):
    # noisy top-k with noise: output, importance and load losses, router-logit gradient
    _assert_case(request.getfixturevalue(f"ep{world}"), "functional_noisy_train")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_uneven_expert_count_raises(request, world):
    # E = 2*world + 1 is not a multiple of the world size
    for res in request.getfixturevalue(f"ep{world}").values():
        r = res["uneven_experts"]
        assert r["raised"] == "ValueError" and "num_experts" in r["message"]


@pytest.mark.slow
def test_failing_rank_raises_everywhere():
    run = _launch(2, "failure", bound_s=60)
    _check_launch(run, 2)
    res = {r: v["failure"] for r, v in run["results"].items()}
    for case, failing in (("bad_shape", 1), ("nan_input", 0), ("bad_shape_ec", 1)):
        for rank in (0, 1):
            r = res[rank][case]
            want = "ValueError" if rank == failing else "RuntimeError"
            assert r["raised"] == want, f"{case}: rank {rank} raised {r['raised']} ({r.get('message')})"
            assert r["seconds"] < FAIL_PG_TIMEOUT_S, f"{case}: rank {rank} took {r['seconds']:.1f}s (waited for a timeout)"
        assert f"rank(s) [{failing}]" in res[1 - failing][case]["message"]
    for rank in (0, 1):
        _assert_case({rank: {"after_failures": res[rank]["after_failures"]}}, "after_failures")
        assert res[rank]["bad_hint"]["raised"] == "ValueError" and "num_global_tokens" in res[rank]["bad_hint"]["message"]
    assert res[1]["crash_in_experts"]["raised"] == "RuntimeError" and "injected" in res[1]["crash_in_experts"]["message"]
    r0 = res[0]["crash_in_experts"]
    assert r0["raised"] is not None, "rank 0 returned although rank 1 never sent its results"
    assert r0["seconds"] < FAIL_PG_TIMEOUT_S + 10


def test_fingerprint_is_fixed_length_and_tells_configs_apart():
    # No process group needed: the vector every rank sends. Same length for every config
    # (so the exchange itself never disagrees in size); each MISMATCHES pair differs in
    # exactly the named field; identical configs agree.
    from moe_kernels import MoEConfig
    from moe_kernels.parallel.fingerprint import FIELDS, layer_fingerprint

    def fp(cfg, opts, rank):
        kw = {k: _pick(v, rank) for k, v in cfg.items()}
        kw.setdefault("hidden_size", H)
        kw.setdefault("intermediate_size", I)
        dtype = getattr(torch, _pick(opts.get("dtype", "float32"), rank))
        return layer_fingerprint(MoEConfig(**kw), dtype, kw["num_experts"] // 2, True)

    for field, cfg, opts in MISMATCHES:
        a, b = fp(cfg, opts, 0), fp(cfg, opts, 1)
        assert len(a) == len(b) == len(FIELDS)
        differ = [n for n, x, y in zip(FIELDS, a, b) if x != y]
        assert differ and differ[0] == field, (field, differ)
        assert fp(cfg, opts, 0) == a


def test_ranks_built_differently_raise_everywhere():
    # Each case of MISMATCHES: a ValueError naming the field on both ranks, well within the
    # process-group timeout; no rank aborts (the launcher sees exit code 0 on both).
    run = _launch(2, "mismatch", bound_s=90)
    _check_launch(run, 2)
    assert run["codes"] == [0, 0], f"a rank died: codes {run['codes']}, logs {run['logs']}"
    res = {r: v["mismatch"] for r, v in run["results"].items()}
    cases = [k for k, v in res[0].items() if isinstance(v, dict) and "field" in v]
    assert len(cases) == len(MISMATCHES) + 3
    for case in cases:
        for rank in (0, 1):
            r = res[rank][case]
            assert r["raised"] == "ValueError", f"{case}: rank {rank} raised {r['raised']} ({r.get('message')})"
            assert r["message"].startswith(r["field"] + ":"), f"{case}: rank {rank}: {r['message']}"
            assert "rank 0" in r["message"] and "rank 1" in r["message"]
            assert r["seconds"] < FAIL_PG_TIMEOUT_S, f"{case}: rank {rank} took {r['seconds']:.1f}s (waited for a timeout)"
    for rank in (0, 1):
        assert res[rank]["first_forward_ok"]["raised"] is None, res[rank]["first_forward_ok"]
        assert res[rank]["deepcopy_after_forward"]["raised"] is None, res[rank]["deepcopy_after_forward"]
        assert res[rank]["deepcopy_state_empty"]
        assert res[rank]["no_stale_aux_loss"], "the failed forward left the previous step's aux_loss readable"
        assert res[rank]["balance_bias_error"] <= 1e-12 and res[rank]["balance_bias_moved"] > 0
        _assert_case({rank: {"after": res[rank]["after_mismatches"]}}, "after")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_nccl_one_gpu_matches_and_syncs_where_documented():
    run = _launch(1, "device", bound_s=120)
    _check_launch(run, 1)
    for cid, r in run["results"][0].items():
        assert r["errors"]["out"] <= 1e-5, f"{cid}: differs from the single-process layer on {r['device']}"
        assert r["syncs"]["forward"] == r["expected_forward_syncs"], f"{cid}: host syncs {r['syncs']}"
