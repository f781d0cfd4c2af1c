"""Expert-parallel MoE layer: all-to-all volume and time per layer.

On the CPU (default): spawns ``--world`` ranks (2) on loopback with gloo. On GPUs, launch
it with torchrun, one process per GPU, and it uses NCCL::

    python bench/bench_ep.py                                   # 2 CPU ranks, gloo
    python bench/bench_ep.py --world 4 --tokens 512
    torchrun --nproc-per-node 8 bench/bench_ep.py --tokens 4096 --hidden 4096 \\
        --intermediate 1536 --experts 64 --top-k 6 --dtype bfloat16

Per layer it reports, from rank 0 (max over ranks for times, per-rank mean for bytes):

* ``a2a MB/rank``: bytes each rank sends through the two variable-split all-to-alls of
  the forward (token rows out, expert results back; the backward moves the same again),
  and the part that leaves the rank (``off-rank``); plus the count exchange header;
* ``fwd ms`` and ``fwd+bwd ms`` of the whole layer (routing, exchanges, experts, combine);
* ``a2a ms``: the two forward exchanges alone, replayed with the same split sizes, and
  the bandwidth that implies (off-rank bytes / time).

See docs/PARALLEL.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun (CPU/gloo)")
    p.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None, help="default: nccl on CUDA, else gloo")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", default="softmax_topk")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--backend", default="auto", help="expert backend: auto, torch, triton, cuda")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results to this file (rank 0)")
    return p.parse_args(argv)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev, iters, warmup, group):
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier(group)
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args):
    import torch.distributed as dist

    from moe_kernels import MoEConfig
    from moe_kernels.parallel import ExpertParallelMoE
    from moe_kernels.parallel.comm import all_to_all

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and args.dist_backend != "gloo"
    backend = args.dist_backend or ("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    torch.manual_seed(0)  # the same router on every rank
    # Only the options the router takes: MoEConfig refuses the ones a router would ignore.
    per_router = {"switch": {"capacity_factor": args.capacity_factor},
                  "expert_choice": {"capacity_factor": args.capacity_factor}}
    router_kw = per_router.get(args.router, {} if args.router in ("dense", "dense_softmax") else {"top_k": args.top_k})
    cfg = MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_experts=args.experts,
                    router=args.router, backend=args.backend, **router_kw)
    layer = ExpertParallelMoE(cfg, device=dev, dtype=dtype)
    layer.broadcast_replicated_()
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype)
    xg = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        out = layer(xg)
        (out.float().square().mean() + layer.aux_loss).backward()

    t_fwd = _time(fwd, dev, args.iters, args.warmup, None)
    t_step = _time(fwd_bwd, dev, args.iters, args.warmup, None)
    d = layer.last_dispatch
    rows = torch.randn(d["rows_sent"], args.hidden, device=dev, dtype=dtype)
    back = torch.randn(d["rows_received"], args.hidden, device=dev, dtype=dtype)

    def exchanges():
        all_to_all(rows, d["recv_splits"], d["send_splits"])
        all_to_all(back, d["send_splits"], d["recv_splits"])

    t_a2a = _time(exchanges, dev, args.iters, args.warmup, None)
    mine = torch.tensor([t_fwd, t_step, t_a2a, d["bytes_sent"], d["bytes_sent_off_rank"]], dtype=torch.float64, device=dev)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()
    result = {
        "world": world, "dist_backend": backend, "device": str(dev.type), "dtype": str(dtype).replace("torch.", ""),
        "tokens_per_rank": args.tokens, "hidden": args.hidden, "intermediate": args.intermediate,
        "experts": args.experts, "top_k": args.top_k, "router": args.router,
        "fwd_ms": 1e3 * float(every[:, 0].max()), "fwd_bwd_ms": 1e3 * float(every[:, 1].max()),
        "a2a_ms": 1e3 * float(every[:, 2].max()),
        "a2a_MB_per_rank": float(every[:, 3].mean()) / 1e6, "a2a_off_rank_MB_per_rank": float(every[:, 4].mean()) / 1e6,
        "header_bytes": d["header_bytes"],
    }
    result["a2a_off_rank_GBps_per_rank"] = (result["a2a_off_rank_MB_per_rank"] / 1e3) / max(result["a2a_ms"] / 1e3, 1e-12)
    if rank == 0:
        cols = ["world", "dist_backend", "dtype", "tokens_per_rank", "experts", "top_k", "a2a_MB_per_rank",
                "a2a_off_rank_MB_per_rank", "fwd_ms", "fwd_bwd_ms", "a2a_ms", "a2a_off_rank_GBps_per_rank"]
        for c in cols:
            v = result[c]
            print(f"{c:28s} {v:.3f}" if isinstance(v, float) else f"{c:28s} {v}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()
    return result


def _spawn(args, argv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.world))
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(args.world)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    a = _args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        run(a)
    else:
        _spawn(a, argv)
