"""Test tooling: ahead-of-time compilation of Triton kernels for a GPU architecture, without a GPU.

:func:`compile_for` runs Triton's whole compiler (TTIR → TTGIR → LLVM → PTX → cubin via
ptxas) for ``sm_<arch>`` on a machine with no GPU, and reports what a test can check:
the PTX and the Triton IR, the shared memory the launch needs (against
:func:`shared_limit`), whether the matrix ops became Hopper ``wgmma``, and registers
and local memory (where spills go) when ``cuobjdump`` is found.
It catches type and lowering errors of every kernel variant (bf16 included, which the
interpreter cannot run) and configurations that cannot launch.

Under ``TRITON_INTERPRET=1`` the interpreter replaces Triton's JIT in the process (its
``tl`` functions become interpreter objects), so :func:`compile_many` then compiles in
worker processes started without it, re-importing each kernel by module and name;
:func:`compile_many` batches many variants into one worker per CPU.

Works with Triton 3.6 through 3.9: ``ASTSource(fn, signature, constexprs)`` with the
signature naming every argument (constexprs as ``"constexpr"``) and
``GPUTarget("cuda", arch, 32)``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass

# SHARED_LIMITS: the largest dynamic shared memory one CTA may use
# (cudaDevAttrMaxSharedMemoryPerBlockOptin), the table the config heuristic sizes its
# pipelines with.
from moe_kernels.backends.triton import interpreting
from moe_kernels.backends.triton.configs import SHARED_LIMITS

__all__ = ["CompiledInfo", "compile_for", "compile_many", "shared_limit", "SHARED_LIMITS"]


def shared_limit(arch: int) -> int:
    """Opt-in shared memory per block in bytes for ``sm_<arch>`` (sm_90: 227 KB = 232448,
    sm_80: 163 KB = 166912)."""
    if arch not in SHARED_LIMITS:
        raise ValueError(f"arch: expected one of {sorted(SHARED_LIMITS)}, got {arch!r}")
    return SHARED_LIMITS[arch]


@dataclass
class CompiledInfo:
    """What the compiler produced for one kernel variant."""

    name: str
    arch: int
    ptx: str
    shared_bytes: int
    num_warps: int
    num_stages: int
    uses_wgmma: bool
    n_regs: int | None = None  # from cuobjdump, None when it is not available
    # Stack frame + local memory per thread, from cuobjdump (None when not available):
    # register spills land here; a few bytes of stack frame without spills are common.
    local_bytes: int | None = None
    ttir: str = ""  # Triton IR before lowering: integer widths of the index arithmetic, per op

    @property
    def fits_shared(self) -> bool:
        return self.shared_bytes <= shared_limit(self.arch)


def _cuobjdump() -> str | None:
    try:
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - optional tool, any failure means "not available"
        pass
    return shutil.which("cuobjdump")


def _resource_usage(cubin: bytes, name: str) -> tuple[int | None, int | None]:
    tool = _cuobjdump()
    if tool is None or not cubin:
        return None, None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    m = re.search(r"Function\s+" + re.escape(name) + r"\s*:\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", out)
    if not m:
        return None, None
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def _kernel_ref(kernel) -> tuple[str, str, list[str]]:
    """(module, name, argument names) of a ``@triton.jit`` kernel, JIT or interpreted."""
    fn = getattr(kernel, "fn", None)
    if fn is None or not callable(fn):
        raise ValueError(f"kernel: expected a @triton.jit function, got {type(kernel).__name__}")
    names = list(getattr(kernel, "arg_names", None) or fn.__code__.co_varnames[:fn.__code__.co_argcount])
    return fn.__module__, fn.__qualname__, names


def _full_signature(names, signature, constexprs, kernel_name):
    missing = [n for n in names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"signature: every kernel argument needs a type or a constexpr value; missing {missing}")
    extra = [n for n in list(signature) + list(constexprs) if n not in names]
    if extra:
        raise ValueError(f"signature: {extra} are not arguments of {kernel_name}")
    return {n: ("constexpr" if n in constexprs else signature[n]) for n in names}


def _compile_here(kernel, sig: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> CompiledInfo:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(kernel, sig, dict(constexprs)), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    regs, local = _resource_usage(compiled.asm.get("cubin", b""), compiled.metadata.name)
    return CompiledInfo(name=compiled.metadata.name, arch=arch, ptx=ptx, shared_bytes=int(compiled.metadata.shared),
                        num_warps=num_warps, num_stages=num_stages, uses_wgmma="wgmma" in ptx,
                        n_regs=regs, local_bytes=local, ttir=compiled.asm.get("ttir", ""))


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child_main(jobs_path: str, out_path: str) -> None:
    """Entry point of a compile worker: a process where Triton was imported without the
    interpreter, so ``@triton.jit`` gives real JIT functions."""
    with open(jobs_path, "rb") as f:
        jobs = pickle.load(f)
    results = []
    for module, qualname, sig, constexprs, arch, warps, stages in jobs:
        try:
            results.append(_compile_here(_resolve(module, qualname), sig, constexprs, arch, warps, stages))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises
            results.append(traceback.format_exc())
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def compile_many(jobs: list[dict], raise_errors: bool = True) -> list:
    """Compile several kernel variants; each job is a dict of :func:`compile_for`'s
    arguments (``kernel``, ``signature``, ``constexprs``, ``arch``, optional
    ``num_warps``, ``num_stages``). Returns a :class:`CompiledInfo` per job, or with
    ``raise_errors=False`` a ``RuntimeError`` in place of each job that failed.

    Under ``TRITON_INTERPRET=1`` the interpreter has replaced Triton's JIT in this
    process, so the jobs run in worker processes without it (one per CPU, at most one
    per job; the kernels are re-imported there by module and name, with this process's
    ``sys.path``). Otherwise they run here."""
    prepared = []
    for job in jobs:
        job = dict(job)
        kernel = job.pop("kernel")
        module, qualname, names = _kernel_ref(kernel)
        sig = _full_signature(names, job.pop("signature"), job.get("constexprs", {}), qualname)
        prepared.append((kernel, module, qualname, sig, dict(job.pop("constexprs", {})), int(job.pop("arch")),
                         int(job.pop("num_warps", 4)), int(job.pop("num_stages", 3))))
        if job:
            raise ValueError(f"jobs: unknown keys {sorted(job)}")
    if not interpreting():
        results = []
        for kernel, _m, qualname, sig, ce, arch, warps, stages in prepared:
            try:
                results.append(_compile_here(kernel, sig, ce, arch, warps, stages))
            except Exception as exc:  # noqa: BLE001
                if raise_errors:
                    raise
                results.append(RuntimeError(f"compiling {qualname} for sm_{arch} failed: {exc!r}"))
        return results
    return _compile_in_workers(prepared, raise_errors)


def _compile_in_workers(prepared, raise_errors):
    nproc = max(1, min(len(prepared), os.cpu_count() or 1))
    shares = [list(range(i, len(prepared), nproc)) for i in range(nproc)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    results: list = [None] * len(prepared)
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for w, share in enumerate(shares):
            jobs_path, out_path = os.path.join(d, f"jobs{w}.pkl"), os.path.join(d, f"out{w}.pkl")
            with open(jobs_path, "wb") as f:
                pickle.dump([prepared[i][1:] for i in share], f)
            cmd = [sys.executable, "-c",
                   f"from aot import _child_main; _child_main({jobs_path!r}, {out_path!r})"]
            procs.append((share, out_path, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.PIPE, text=True)))
        for share, out_path, proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0 or not os.path.exists(out_path):
                raise RuntimeError(f"AOT compile worker failed (exit {proc.returncode}):\n{err[-4000:]}")
            with open(out_path, "rb") as f:
                for i, res in zip(share, pickle.load(f)):
                    results[i] = res
    for i, res in enumerate(results):
        if isinstance(res, str):
            _k, _m, qualname, _s, _c, arch, _w, _st = prepared[i]
            res = RuntimeError(f"compiling {qualname} for sm_{arch} failed:\n{res}")
            if raise_errors:
                raise res
            results[i] = res
    return results


def compile_for(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                num_stages: int = 3) -> CompiledInfo:
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``sm_<arch>``.

    ``signature`` maps each runtime argument name to its Triton type (``"*fp32"``,
    ``"*bf16"``, ``"*i32"``, ``"i32"``, ``"i64"``, ``"fp32"``, ...); ``constexprs`` maps
    each ``tl.constexpr`` argument to its value (they need not appear in ``signature``).
    Every argument of the kernel must be named in one of the two. Under
    ``TRITON_INTERPRET=1`` each call starts a worker process (seconds): batch variants
    with :func:`compile_many`."""
    return compile_many([dict(kernel=kernel, signature=signature, constexprs=constexprs, arch=arch,
                              num_warps=num_warps, num_stages=num_stages)])[0]
