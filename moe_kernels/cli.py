"""The ``moe-kernels`` command.

``info``       what is available: torch, triton, the CPU kernel, the CUDA extension and its archs, GPUs,
               and every backend with the reason it is unavailable.
``check``      every available backend against the reference loop on fresh random
               inputs, for every router: prints max errors, exits 1 on a mismatch.
``bench``      times the backends against the reference (CPU by default, small shapes);
               ``--explain`` adds the launch-shape model of the triton GEMMs.
``tune``       measures the triton GEMM tiles on this GPU and writes a config table.
``gpu-check``  the one-shot GPU session: build, tests, reduced benchmark (see
               bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # any import failure means "not usable"
        return f"not available ({type(exc).__name__}: {exc})"


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, build_variant
    from .backends import available_backends

    print(f"moe_kernels {__version__}")
    v = build_variant()
    print(f"variant     {v['variant']} (CUDA {v['cuda_version']}, archs {','.join(v['archs'])}, PTX "
          f"{','.join(v['ptx']) or 'none'})" if v else "variant     none: no CUDA extension (pure-Python install)")
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"torch       {torch.__version__} (CUDA runtime {torch.version.cuda or 'none: CPU build'})")
    print(f"triton      {_triton_version()}")
    try:
        from .backends.cuda.extension import extension_info

        ext = extension_info()
    except ImportError as exc:
        ext = {"built": False, "error": str(exc)}
    if ext.get("built"):
        print(f"CUDA ext    built for {ext.get('archs')} with CUDA {ext.get('cuda_version')}")
    else:
        print(f"CUDA ext    not available: {ext.get('error', 'not built')}")
    from . import cpu_kernel

    if cpu_kernel.available():
        print(f"CPU kernel  built ({cpu_kernel.threading_model()} threads): the torch backend's CPU inference "
              f"path (float32, bfloat16)")
    else:
        print(f"CPU kernel  not available: {cpu_kernel.unavailable_reason()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"GPU {i}       {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("GPU         none visible to torch")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"backends on {dev}:")
        for name, reason in available_backends(dev).items():
            print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


CHECK_CASES = [
    ("softmax_topk", {"top_k": 2}),
    ("grouped_sigmoid_topk", {"top_k": 2, "n_group": 2, "topk_group": 1}),
    ("noisy_topk", {"top_k": 2}),
    ("switch", {"capacity_factor": 1.0}),
    ("expert_choice", {"capacity_factor": 1.0}),
    ("dense_softmax", {}),
]


def cmd_check(args: argparse.Namespace) -> int:
    from .backends import available_backends
    from .functional import fused_experts
    from .reference import moe_reference
    from .routing import route
    from .testing import TOLERANCES, max_error, random_params

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = [n for n, r in available_backends(device).items() if r is None]
    t, h, i, e = args.tokens, args.hidden, args.intermediate, args.experts
    print(f"device={device} dtype={args.dtype} T={t} H={h} I={i} E={e}; backends: {', '.join(backends)}")
    print(f"{'router':22s} {'backend':8s} {'max abs err':>12s} {'max rel err':>12s}  result")
    failed = 0
    atol, rtol = TOLERANCES[dtype]
    for router, opts in CHECK_CASES:
        x = torch.randn(t, h, device=device, dtype=dtype)
        logits = torch.randn(t, e, device=device, dtype=torch.float32)
        params = random_params(e, h, i, dtype=dtype, device=device)
        if router == "noisy_topk":
            opts = dict(opts, noise_logits=torch.randn_like(logits))
        routing = route(logits, router, **opts)
        ref = moe_reference(x.double(), routing, random_params_like(params))
        for name in backends:
            out = fused_experts(x, routing, params, backend=name)
            abs_err, rel_err = max_error(out, ref)
            ok = torch.isfinite(out).all().item() and abs_err <= atol + rtol * ref.abs().max().item() * 2
            failed += not ok
            print(f"{router:22s} {name:8s} {abs_err:12.3e} {rel_err:12.3e}  {'ok' if ok else 'MISMATCH'}")
    print("all backends match the reference" if not failed else f"{failed} mismatches")
    return 1 if failed else 0


def random_params_like(params):
    """The same weights in float64, for a reference that rounds nothing."""
    from dataclasses import replace

    cast = (lambda v: None if v is None else v.double())
    return replace(params, w13=cast(params.w13), w2=cast(params.w2), b13=cast(params.b13), b2=cast(params.b2))


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-kernels", description="Fused Mixture-of-Experts kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what is available: torch, triton, CUDA extension, GPU, backends")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="every available backend against the reference on random inputs",
                       description="Run every available backend on fresh random inputs for each router "
                                   "(softmax top-k, grouped sigmoid, noisy top-k, Switch, Expert Choice, dense) "
                                   "and compare with the float64 reference loop; exit code 1 on a mismatch.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                   help="dtype of the activations and expert weights (the routing runs in float32)")
    p.add_argument("--tokens", type=int, default=37, help="tokens T (rows of x)")
    p.add_argument("--hidden", type=int, default=72, help="hidden size H")
    p.add_argument("--intermediate", type=int, default=56, help="expert intermediate size I")
    p.add_argument("--experts", type=int, default=6, help="number of experts E (top-2 routing where a k applies)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("bench", help="time the backends against the reference (CPU by default)")
    try:
        from .bench.run import add_bench_arguments

        add_bench_arguments(p)
    except ImportError as exc:  # the benchmark module needs nothing optional; this guards a broken install
        p.set_defaults(_bench_error=str(exc))
    p.set_defaults(func=cmd_bench)
    try:
        from .backends.triton.tune import add_tune_arguments, run_tune

        p = sub.add_parser("tune", help="time the triton GEMM tiles on this GPU and write a config table (JSON)")
        add_tune_arguments(p)
        p.set_defaults(func=run_tune)
    except ImportError:
        pass
    try:
        from .bench.run import add_gpu_check_arguments, run_gpu_check

        p = sub.add_parser("gpu-check", help="build, test and benchmark on a GPU machine in one go")
        add_gpu_check_arguments(p)
        p.set_defaults(func=run_gpu_check)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
