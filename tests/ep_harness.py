"""The spawned-rank harness of tests/test_parallel.py: the cases, the per-rank suites,
the worker and the launcher (expert parallelism on the CPU with gloo, 2 and 4 ranks).

The tests spawn the ranks themselves: one subprocess per rank running this file (the harness) as a
worker, on loopback (MASTER_ADDR=127.0.0.1, a free port picked at run time), with a
short process-group timeout and a wall-clock bound on the whole group, so a hang fails
the test instead of blocking CI. One spawned group runs every case of a suite (start-up
dominates the cost) and each rank writes its measurements to a JSON file; the pytest
cases below only read them.

Equality target, per case: every rank builds the same full single-process ``MoE`` (all
experts, same seed) and runs it on the concatenation of all ranks' batches, then runs
``ExpertParallelMoE.from_moe`` on its own batch; output rows, aux losses and every
gradient (x, router weight after the sum over ranks, noise weight, w13, w2, b13, b2 of
the local experts) must match. The loss is ``sum(out * g) + aux_loss`` on each rank (the
global aux loss counted once per rank, see parallel.py "Gradients").
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_TIMEOUT_S = 60
FAIL_PG_TIMEOUT_S = 5  # the failure suite waits for this timeout once

# --------------------------------------------------------------------------- cases
# (id, config, tokens per rank, options). Each id names the edge it covers.
H, I = 8, 6  # hidden 8, intermediate 6: not multiples of 16

CASES_2 = [
    # top-k with expert biases, uneven batches, float64
    ("topk_bias_uneven", dict(num_experts=6, top_k=2, router="softmax_topk", bias=True), [5, 7], {}),
    # top-k without renormalisation, plain activation, z-loss, float32
    ("topk_f32_zloss_gelu", dict(num_experts=6, top_k=3, router="softmax_topk", renormalize=False, activation="gelu",
                                 z_loss_coef=0.1), [4, 6], {"dtype": "float32"}),
    # DeepSeek-V3 grouped sigmoid with selection bias and scaling
    ("grouped_sigmoid", dict(num_experts=8, top_k=3, router="grouped_sigmoid_topk", n_group=4, topk_group=2,
                             routed_scaling_factor=2.5), [6, 5], {}),
    # Switch with capacity: tokens dropped, some of rank 1's because rank 0 filled the queue
    ("switch_drops", dict(num_experts=4, router="switch", capacity_factor=0.5, bias=True), [9, 6], {}),
    # Switch without capacity
    ("switch_no_capacity", dict(num_experts=4, router="switch", capacity_factor=None), [5, 4], {}),
    # Expert Choice, global top-C per expert
    ("expert_choice", dict(num_experts=6, router="expert_choice", capacity_factor=1.25), [7, 4], {}),
    # Expert Choice with the num_global_tokens hint (no extra host sync)
    ("expert_choice_hint", dict(num_experts=4, router="expert_choice", capacity_factor=2.0), [3, 6], {"hint": True}),
    # Expert Choice with tied scores (zero router): ties go to the lowest global token index
    ("expert_choice_ties", dict(num_experts=4, router="expert_choice", capacity_factor=1.0), [3, 5],
     {"router_init": "zero"}),
    # noisy top-k in eval mode (deterministic)
    ("noisy_eval", dict(num_experts=6, top_k=2, router="noisy_topk"), [5, 3], {"eval": True}),
    # rank 0's x needs no grad: the backward exchange must still run on every rank
    ("x_no_grad_on_rank0", dict(num_experts=4, top_k=2, router="softmax_topk"), [4, 5], {"no_x_grad_rank": 0}),
    # dense 1991 mixture: every token to every expert on every rank
    ("dense", dict(num_experts=4, router="dense"), [3, 4], {}),
    # an empty rank: no token routed to rank 1's experts
    ("empty_rank", dict(num_experts=6, top_k=2, router="softmax_topk", bias=True), [6, 5],
     {"router_init": "split_sign", "expect_empty": [1]}),
    # T = 0 on one rank, for a per-token router and both global ones
    ("t0_topk", dict(num_experts=6, top_k=2, router="softmax_topk", bias=True), [0, 7], {}),
    ("t0_switch", dict(num_experts=4, router="switch", capacity_factor=0.75), [7, 0], {}),
    ("t0_expert_choice", dict(num_experts=6, router="expert_choice", capacity_factor=1.0), [0, 6], {}),
    # T = 0 everywhere
    ("t0_all", dict(num_experts=4, top_k=2, router="softmax_topk"), [0, 0], {}),
]

CASES_4 = [
    ("topk_t0_rank1", dict(num_experts=8, top_k=2, router="softmax_topk", bias=True), [3, 0, 5, 2], {}),
    ("switch_drops", dict(num_experts=8, router="switch", capacity_factor=0.6), [4, 3, 5, 2], {}),
    ("expert_choice_t0", dict(num_experts=8, router="expert_choice", capacity_factor=1.0), [2, 5, 0, 3], {}),
    ("grouped_sigmoid", dict(num_experts=8, top_k=2, router="grouped_sigmoid_topk", n_group=4, topk_group=2),
     [3, 3, 3, 3], {}),
    # tied zero router: every token to experts 0 and 1, so ranks 1-3 receive nothing
    ("empty_ranks_ties", dict(num_experts=8, top_k=2, router="softmax_topk"), [2, 3, 1, 2],
     {"router_init": "zero", "expect_empty": [1, 2, 3]}),
]


# --------------------------------------------------------------------------- worker side


def _build(cfg_kw, opts, seed=1234):
    from moe_kernels import MoE, MoEConfig

    dtype = getattr(torch, opts.get("dtype", "float64"))
    torch.manual_seed(seed)
    full = MoE(MoEConfig(hidden_size=H, intermediate_size=I, backend="torch", **cfg_kw), dtype=dtype)
    with torch.no_grad():
        for b in (full.b13, full.b2):
            if b is not None:
                b.normal_()  # never zeros: a bias bug must show
        if full.noise_weight is not None:
            full.noise_weight.normal_()
        if full.selection_bias is not None:
            full.selection_bias.normal_(std=0.3)
        e = full.config.num_experts
        if opts.get("router_init") == "zero":
            full.router_weight.zero_()
        elif opts.get("router_init") == "split_sign":  # with x > 0: experts of the upper half never win
            full.router_weight.abs_()
            full.router_weight[e // 2:] *= -1
    if opts.get("eval"):
        full.eval()
    return full, dtype


def _batches(tokens, dtype, opts, seed=99):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, H, generator=g, dtype=torch.float64).to(dtype) for t in tokens]
    if opts.get("router_init") == "split_sign":
        xs = [x.abs() + 0.1 for x in xs]
    gs = [torch.randn(t, H, generator=g, dtype=torch.float64).to(dtype) for t in tokens]
    return xs, gs


def _err(a, b):
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


def _run_case(case, rank, world):
    from moe_kernels.parallel import ExpertParallelMoE

    cid, cfg_kw, tokens, opts = case
    full, dtype = _build(cfg_kw, opts)
    xs, gs = _batches(tokens, dtype, opts)
    x_full = torch.cat(xs).requires_grad_()
    out_full = full(x_full)
    loss = (out_full * torch.cat(gs)).sum() + full.aux_loss
    if loss.requires_grad:
        loss.backward()

    ep = ExpertParallelMoE.from_moe(full, None)
    x = xs[rank].clone().requires_grad_(rank != opts.get("no_x_grad_rank"))
    hint = sum(tokens) if opts.get("hint") else None
    out = ep(x, num_global_tokens=hint)
    (((out * gs[rank]).sum() + ep.aux_loss)).backward()
    ep.reduce_replicated_grads()
    with torch.no_grad():  # inference path (no autograd anchor): reruns bitwise equal to each other
        infer = ep(xs[rank], num_global_tokens=hint)
        rerun_equal = torch.equal(ep(xs[rank], num_global_tokens=hint), infer)

    lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
    s, n = ep.expert_start, ep.num_local_experts
    ref_x_grad = None if x_full.grad is None or not x.requires_grad else x_full.grad[lo:hi]
    # The CPU inference paths (the compiled kernel) may round differently from training's.
    errors = {"out": _err(out, out_full.detach()[lo:hi]), "infer": _err(infer, out.detach()),
              "x.grad": _err(x.grad, ref_x_grad),
              "router_weight.grad": _err(ep.router_weight.grad, full.router_weight.grad),
              "aux_loss": _err(torch.as_tensor(ep.aux_loss), torch.as_tensor(full.aux_loss))}
    if full.noise_weight is not None:
        errors["noise_weight.grad"] = _err(ep.noise_weight.grad, full.noise_weight.grad)
    none_grads = []
    for name in ("w13", "w2", "b13", "b2"):
        p, q = getattr(ep, name), getattr(full, name)
        if q is None:
            continue
        if p.grad is None:
            none_grads.append(name)
        errors[f"{name}.grad"] = _err(p.grad, None if q.grad is None else q.grad[s:s + n])
    for k, v in full.losses.items():
        errors[f"loss:{k}"] = _err(ep.losses.get(k), v) if k in ep.losses else float("inf")
    extra_keys = sorted(set(ep.losses) - set(full.losses))
    return {
        "errors": errors, "none_grads": none_grads if sum(tokens) else [],
        "extra_loss_keys": [k for k in extra_keys if float(ep.losses[k]) != 0.0],
        "rows_received": ep.last_dispatch["rows_received"], "dropped_fraction": float(full.losses.get("dropped_fraction", 0.0)),
        "out_finite": bool(torch.isfinite(out).all()), "out_rows": int(out.shape[0]), "rerun_equal": rerun_equal,
        "out_norm": float(out.double().norm()), "tol": 1e-5 if dtype == torch.float32 else 1e-9,
    }


def _functional_noisy(rank, world):
    """noisy_topk while training, through the functional API with an explicit noise draw
    (the layer draws its own noise per rank): output, importance and load losses."""
    from moe_kernels import moe
    from moe_kernels.parallel import expert_parallel_moe

    tokens, e, k = [6, 5][:world] + [3] * max(0, world - 2), 4, 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(sum(tokens), H, generator=g, dtype=torch.float64)
    logits = torch.randn(sum(tokens), e, generator=g, dtype=torch.float64, requires_grad=True)
    noise_logits = torch.randn(sum(tokens), e, generator=g, dtype=torch.float64)
    noise = torch.randn(sum(tokens), e, generator=g, dtype=torch.float64)
    w13 = torch.randn(e, 2 * I, H, generator=g, dtype=torch.float64)
    w2 = torch.randn(e, H, I, generator=g, dtype=torch.float64)
    ref, routing = moe(x, logits, w13, w2, router="noisy_topk", top_k=k, noise_logits=noise_logits, noise=noise,
                       training=True, return_routing=True, backend="torch")
    (ref.sum() + routing.losses["load"] + routing.losses["importance"]).backward()
    lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
    n = e // world
    my_logits = logits.detach()[lo:hi].clone().requires_grad_()
    out, mine = expert_parallel_moe(x[lo:hi], my_logits, w13[rank * n:(rank + 1) * n], w2[rank * n:(rank + 1) * n],
                                    router="noisy_topk", top_k=k, noise_logits=noise_logits[lo:hi],
                                    noise=noise[lo:hi], training=True, return_routing=True, backend="torch")
    (out.sum() + mine.losses["load"] + mine.losses["importance"]).backward()
    return {"errors": {"out": _err(out, ref.detach()[lo:hi]), "loss:load": _err(mine.losses["load"], routing.losses["load"]),
                       "loss:importance": _err(mine.losses["importance"], routing.losses["importance"]),
                       "logits.grad": _err(my_logits.grad, logits.grad[lo:hi])},
            "none_grads": [], "extra_loss_keys": [], "tol": 1e-9, "out_finite": True, "out_rows": hi - lo, "rerun_equal": True,
            "out_norm": float(out.norm()), "rows_received": -1, "dropped_fraction": 0.0}


def _uneven_experts(world):
    from moe_kernels.parallel import ExpertParallelMoE
    try:
        ExpertParallelMoE(hidden_size=H, intermediate_size=I, num_experts=world * 2 + 1, top_k=1)
    except ValueError as exc:
        return {"raised": "ValueError", "message": str(exc)}
    return {"raised": None}


def _timed(fn):
    t0 = time.monotonic()
    try:
        fn()
        return {"raised": None, "seconds": time.monotonic() - t0}
    except Exception as exc:  # noqa: BLE001 - the type is what the test checks
        return {"raised": type(exc).__name__, "message": str(exc)[:300], "seconds": time.monotonic() - t0}


def _failure_suite(rank, world, outdir):
    """Bad input on one rank must raise on every rank (and leave the group usable); a rank
    that dies inside the experts must make the others raise within the group timeout."""
    from moe_kernels.backends.torch import TorchBackend
    from moe_kernels.parallel import ExpertParallelMoE

    res = {}
    full, dtype = _build(dict(num_experts=4, top_k=2, router="softmax_topk"), {})
    ep = ExpertParallelMoE.from_moe(full)
    x = torch.randn(5, H, dtype=dtype)
    # rank 1 passes the wrong hidden size
    res["bad_shape"] = _timed(lambda: ep(torch.randn(5, H + 1, dtype=dtype) if rank == 1 else x))
    # rank 0 passes NaN (caught by the router's finite check, after the logits)
    res["nan_input"] = _timed(lambda: ep(torch.full((3, H), float("nan"), dtype=dtype) if rank == 0 else x))
    # Expert Choice fails at its T_global gather
    ec = ExpertParallelMoE.from_moe(_build(dict(num_experts=4, router="expert_choice"), {})[0])
    res["bad_shape_ec"] = _timed(lambda: ec(torch.randn(4, H - 1, dtype=dtype) if rank == 1 else x))
    # the group is still usable: a normal step matches the single-process layer
    res["after_failures"] = _run_case(("after", dict(num_experts=4, top_k=2, router="softmax_topk"), [3, 4], {}),
                                      rank, world)
    # inconsistent num_global_tokens hints raise everywhere
    res["bad_hint"] = _timed(lambda: ep(x, num_global_tokens=10 + rank))
    # rank 1 raises inside its experts and stays alive: rank 0 waits in the return
    # all-to-all until the process-group timeout, then raises.
    if rank == 1:
        def boom(self, *a, **k):
            raise RuntimeError("injected failure inside the experts")
        TorchBackend.experts = boom
    res["crash_in_experts"] = _timed(lambda: ep(x))
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"failure": res}, f)
    if rank == 1:  # stay alive until rank 0 has timed out and written its result
        deadline = time.monotonic() + 3 * FAIL_PG_TIMEOUT_S
        while not os.path.exists(os.path.join(outdir, "rank0.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(0)  # the group is broken now; skip destroy_process_group


# Ranks built differently (rank 0's value, rank 1's value): each must raise a ValueError
# naming the field on both ranks, within the process-group timeout, and never abort.
MISMATCHES = [
    # different expert counts: the count exchange would differ in size (gloo abort)
    ("num_experts", dict(num_experts=(4, 6), top_k=2), {}),
    # different hidden size: the row exchange would differ in size
    ("hidden_size", dict(num_experts=4, top_k=2, hidden_size=(H, H + 2)), {}),
    ("intermediate_size", dict(num_experts=4, top_k=2, intermediate_size=(I, I + 1)), {}),
    # different dtype sizes (fp32 vs fp64): row bytes differ
    ("dtype", dict(num_experts=4, top_k=2), {"dtype": ("float32", "float64")}),
    # same size, different meaning: bf16 rows read as fp16 gave garbage silently
    ("dtype", dict(num_experts=4, top_k=2), {"dtype": ("bfloat16", "float16")}),
    # top_k, activation, capacity factor: no size difference, but a per-rank "global" aux loss
    ("top_k", dict(num_experts=4, top_k=(1, 2)), {}),
    ("activation", dict(num_experts=4, top_k=2, activation=("swiglu", "gelu")), {}),
    ("capacity_factor", dict(num_experts=4, router="switch", capacity_factor=(1.0, 0.5)), {}),
    ("capacity_factor", dict(num_experts=4, router="expert_choice", capacity_factor=(1.0, 2.0)), {}),
    ("renormalize", dict(num_experts=4, top_k=2, renormalize=(True, False)), {}),
    # different routers run different collectives: both ranks timed out, group unusable
    ("router", dict(num_experts=4, top_k=1, router=("softmax_topk", "switch")), {}),
    ("router", dict(num_experts=4, router=("switch", "expert_choice")), {}),
    ("router", dict(num_experts=4, router=("expert_choice", "softmax_topk")), {}),
]


def _pick(v, rank):
    return v[rank] if isinstance(v, tuple) else v


def _mismatch_suite(rank, world, outdir):
    """Every MISMATCHES case, then the failures after a first good forward (a dtype change
    on one rank), the functional API, and a normal step proving the group still works."""
    from moe_kernels import MoEConfig
    from moe_kernels.parallel import ExpertParallelMoE, expert_parallel_moe

    res = {}
    for i, (field, cfg, opts) in enumerate(MISMATCHES):
        kw = {k: _pick(v, rank) for k, v in cfg.items()}
        kw.setdefault("hidden_size", H)
        kw.setdefault("intermediate_size", I)
        dtype = getattr(torch, _pick(opts.get("dtype", "float32"), rank))
        torch.manual_seed(0)
        layer = ExpertParallelMoE(MoEConfig(backend="torch", **kw), dtype=dtype)
        x = torch.randn(5, kw["hidden_size"], dtype=dtype)
        res[f"{i}:{field}"] = dict(_timed(lambda: layer(x)), field=field)
    # a good first forward, then rank 1 moves its layer to float64: caught by the hash in
    # the count exchange (the fingerprint was exchanged already), named by a re-exchange
    torch.manual_seed(0)
    layer = ExpertParallelMoE(MoEConfig(hidden_size=H, intermediate_size=I, num_experts=4, top_k=2, backend="torch"))
    x = torch.randn(5, H)
    res["first_forward_ok"] = _timed(lambda: layer(x))
    if rank == 1:
        layer.double()
    had_aux = layer.aux_loss is not None
    res["dtype_changed_later"] = dict(_timed(lambda: layer(x.to(layer.w13.dtype))), field="dtype")
    res["no_stale_aux_loss"] = had_aux and layer.aux_loss is None and layer.losses == {}
    # the functional API checks on every call
    g = torch.Generator().manual_seed(3)
    xf = torch.randn(4, H, generator=g)
    logits = torch.randn(4, 4, generator=g)
    w13, w2 = torch.randn(2, 2 * I, H, generator=g), torch.randn(2, H, I, generator=g)
    res["functional_top_k"] = dict(_timed(lambda: expert_parallel_moe(
        xf, logits, w13, w2, router="softmax_topk", top_k=1 + rank, backend="torch")), field="top_k")
    res["functional_router"] = dict(_timed(lambda: expert_parallel_moe(
        xf, logits, w13, w2, router=("switch", "expert_choice")[rank], backend="torch")), field="router")
    # deepcopy after a forward with grad (the step's non-leaf aux_loss made it raise)
    torch.manual_seed(0)
    layer = ExpertParallelMoE(MoEConfig(hidden_size=H, intermediate_size=I, num_experts=4, top_k=2, backend="torch",
                                        z_loss_coef=0.1))
    out = layer(x.clone().requires_grad_())
    (out.sum() + layer.aux_loss).backward()
    twin = {}
    res["deepcopy_after_forward"] = _timed(lambda: twin.setdefault("m", copy.deepcopy(layer)))
    res["deepcopy_state_empty"] = twin.get("m") is not None and twin["m"].aux_loss is None
    # auxiliary-loss-free balancing: the loads of both ranks are summed, so the update
    # equals the single-process one on the concatenated batch and stays replicated
    from moe_kernels.balance import update_selection_bias
    full, _ = _build(dict(num_experts=4, top_k=2, router="grouped_sigmoid_topk", n_group=2, topk_group=1), {})
    ep = ExpertParallelMoE.from_moe(full)
    xs, _ = _batches([5, 8], torch.float64, {})
    full(torch.cat(xs))
    ep(xs[rank])
    update_selection_bias(full, rate=0.125)
    update_selection_bias(ep, rate=0.125)
    res["balance_bias_error"] = _err(ep.selection_bias, full.selection_bias)
    res["balance_bias_moved"] = float((full.selection_bias - _build(
        dict(num_experts=4, top_k=2, router="grouped_sigmoid_topk", n_group=2, topk_group=1), {})[0].selection_bias
                                       ).abs().max())
    # the group still works: a normal step matches the single-process layer
    res["after_mismatches"] = _run_case(("after", dict(num_experts=4, top_k=2, router="softmax_topk"), [3, 4], {}),
                                        rank, world)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"mismatch": res}, f)


def _device_suite(rank, world, outdir):
    """World size 1 on the default device (NCCL on a GPU): the layer on the device equals
    the single-process layer, and its forward synchronises with the host exactly where
    parallel.py says (the count exchange; Expert Choice's T_global without a hint). The
    expert backend runs with sync checks off: its own syncs are not counted."""
    import warnings

    from moe_kernels.backends.torch import TorchBackend
    from moe_kernels.parallel import ExpertParallelMoE

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    inner = TorchBackend.experts

    def quiet_experts(self, *a, **k):
        if not cuda:
            return inner(self, *a, **k)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return inner(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    TorchBackend.experts = quiet_experts
    results = {}
    cases = [("topk", dict(num_experts=4, top_k=2, router="softmax_topk", bias=True), None, 1),
             ("switch", dict(num_experts=4, router="switch", capacity_factor=0.5), None, 1),
             ("expert_choice", dict(num_experts=4, router="expert_choice"), None, 2),
             ("expert_choice_hint", dict(num_experts=4, router="expert_choice"), 37, 1)]
    for cid, cfg_kw, hint, expected in cases:
        full, dtype = _build(cfg_kw, {"dtype": "float32"})
        full = full.to(dev)
        x = torch.randn(37, H, device=dev, dtype=dtype)
        ref = full(x)
        ep = ExpertParallelMoE.from_moe(full)
        ep(x, num_global_tokens=hint)  # warm-up: lazy initialisation may sync once
        syncs = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            out = ep(x.clone().requires_grad_(), num_global_tokens=hint)
            syncs["forward"] = sum("synchroniz" in str(m.message) for m in caught)
            out.float().square().sum().backward()
            syncs["backward"] = sum("synchroniz" in str(m.message) for m in caught) - syncs["forward"]
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        results[cid] = {"errors": {"out": _err(out, ref)}, "syncs": syncs, "expected_forward_syncs": expected if cuda else 0,
                        "device": str(dev)}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _worker(suite, outdir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = FAIL_PG_TIMEOUT_S if suite in ("failure", "mismatch") else PG_TIMEOUT_S
    backend = "nccl" if suite == "device" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    if suite == "failure":
        _failure_suite(rank, world, outdir)
    if suite == "mismatch":
        _mismatch_suite(rank, world, outdir)
        dist.destroy_process_group()
        return
    if suite == "device":
        _device_suite(rank, world, outdir)
        dist.destroy_process_group()
        return
    results = {}
    for case in (CASES_2 if world == 2 else CASES_4):
        try:
            results[case[0]] = _run_case(case, rank, world)
        except Exception:  # noqa: BLE001 - reported to the parent, which fails that case
            results[case[0]] = {"exception": traceback.format_exc()}
    results["functional_noisy_train"] = _functional_noisy(rank, world)
    results["uneven_experts"] = _uneven_experts(world)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, suite: str, bound_s: float) -> dict:
    """Run ``world`` ranks of ``suite``; kill them all after ``bound_s`` seconds."""
    outdir = tempfile.mkdtemp(prefix=f"moe_ep_{suite}{world}_")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    t0 = time.monotonic()
    procs = []
    for r in range(world):
        log = open(os.path.join(outdir, f"rank{r}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), suite, outdir],
                                       env=dict(env, RANK=str(r)), stdout=log, stderr=subprocess.STDOUT), log))
    timed_out = False
    for p, log in procs:
        try:
            p.wait(timeout=max(0.1, bound_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    logs = {r: open(os.path.join(outdir, f"rank{r}.log")).read()[-4000:] for r in range(world)}
    results = {}
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[r] = json.load(f)
    shutil.rmtree(outdir, ignore_errors=True)  # the logs travel in the result
    return {"results": results, "timed_out": timed_out, "codes": [p.returncode for p, _ in procs], "logs": logs,
            "seconds": time.monotonic() - t0}


def _check_launch(run, world):
    assert not run["timed_out"], f"ranks hung past the bound; logs: {run['logs']}"
    assert sorted(run["results"]) == list(range(world)), \
        f"a rank wrote no results; codes {run['codes']}, logs {run['logs']}"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
