"""Training check: the same MoE classifier trained with backend="torch" and
backend="triton" from the same seed must follow the same loss curve.

A synthetic task (the class is which of C random directions the input came from, plus
noise) learned by a residual MoE layer and a linear head, with the router's aux loss.
Prints both curves side by side, the largest gap, and the time per step of each
backend. Exit status 1 when the curves differ by more than ``--tol`` (relative).

    python bench/train_check.py                      # GPU, full size, 300 steps, bf16
    python bench/train_check.py --steps 500 --dtype float32
    TRITON_INTERPRET=1 python bench/train_check.py --device cpu --small   # tiny, interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moe_kernels as mk  # noqa: E402


def train(backend: str, args) -> tuple[list[float], float]:
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(args.classes, args.hidden, generator=g)
    torch.manual_seed(args.seed)
    topk = {"top_k": args.top_k} if args.router in ("softmax_topk", "grouped_sigmoid_topk", "noisy_topk") else {}
    layer = mk.MoE(hidden_size=args.hidden, intermediate_size=args.inter, num_experts=args.experts,
                   router=args.router, backend=backend, aux_loss_coef=0.01, **topk).to(dev, dtype)
    head = torch.nn.Linear(args.hidden, args.classes).to(dev, dtype)
    opt = torch.optim.AdamW(list(layer.parameters()) + list(head.parameters()), lr=args.lr)
    losses, elapsed = [], 0.0
    for step in range(args.steps):
        y = torch.randint(0, args.classes, (args.batch,), generator=g)
        x = (centers[y] + 0.5 * torch.randn(args.batch, args.hidden, generator=g)).to(dev, dtype)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(head(x + layer(x)).float(), y.to(dev)) + layer.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # warm-up (compilation, autotune) excluded
            elapsed += time.perf_counter() - t0
        losses.append(float(loss.detach()))
    return losses, elapsed / max(1, args.steps - 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", dest="top_k", type=int, default=2)
    p.add_argument("--router", default="softmax_topk")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=None, help="max relative gap (default: 2e-3 fp32, 5e-2 16-bit)")
    p.add_argument("--small", action="store_true", help="tiny sizes for the CPU interpreter")
    args = p.parse_args()
    if args.small:
        args.hidden, args.inter, args.experts, args.batch, args.classes = 32, 32, 4, 32, 4
        args.steps, args.dtype, args.lr = min(args.steps, 60), "float32", 3e-2
    tol = args.tol if args.tol is not None else (2e-3 if args.dtype == "float32" else 5e-2)
    curves = {}
    for backend in ("torch", "triton"):
        curves[backend] = train(backend, args)
    (ref, t_ref), (tri, t_tri) = curves["torch"], curves["triton"]
    print(f"{'step':>5} {'torch':>10} {'triton':>10} {'gap':>10}")
    worst = 0.0
    for s, (a, b) in enumerate(zip(ref, tri)):
        gap = abs(a - b) / max(1.0, abs(a))
        worst = max(worst, gap)
        if s < 10 or s % max(1, args.steps // 30) == 0 or s == args.steps - 1:
            print(f"{s:>5} {a:>10.5f} {b:>10.5f} {gap:>10.2e}")
    print(f"time per step: torch {t_ref * 1e3:.2f} ms, triton {t_tri * 1e3:.2f} ms "
          f"({t_ref / t_tri if t_tri else float('nan'):.2f}x)")
    print(f"loss {ref[0]:.4f} -> torch {ref[-1]:.4f}, triton {tri[-1]:.4f}; largest relative gap {worst:.2e} "
          f"(tolerance {tol:.1e})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
