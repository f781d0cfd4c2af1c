"""Compile one kernel source (csrc/<name>.cu) into a fatbin, and keep its ptxas log.

Two toolchains, one result (a fatbin with a cubin per real architecture and PTX for
the newest, embedded by csrc/images.cpp):

* ``nvcc``: ``nvcc -fatbin`` with warnings as errors on both sides of the compiler.
* ``nvrtc``: for CUDA toolchains from PyPI, which ship no nvcc (nvidia-cuda-nvcc-cu12
  holds ptxas, libnvvm and headers only): NVRTC (nvidia-cuda-nvrtc-cu12) makes PTX
  per virtual architecture, that package's ptxas makes each cubin, and nvFatbin
  (nvidia-nvfatbin-cu12) packs them.

Both run ptxas with ``-v --warn-on-spills --warn-on-local-memory-usage
--warning-as-error``, so a register spill or any local memory fails the build; the
``-v`` output is then parsed as a second guard (every kernel must report 0 bytes of
spill stores and loads) and written to the log that the extension embeds
(``moe_kernels._C.ptxas_log()``).

Architectures: ``--archs 80,90a,100a`` (real targets; ``a`` = architecture-specific);
PTX goes with every entry marked ``+PTX`` or, when none is, with the newest one. The
PTX is for the generic ``compute_NN`` (``a`` dropped): architecture-specific PTX would
JIT only on that exact GPU, which defeats PTX's purpose of running on newer ones.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PTXAS_FLAGS = ["-v", "--warn-on-spills", "--warn-on-local-memory-usage", "--warning-as-error"]
_ARCH = re.compile(r"^(\d+)([af]?)(\+PTX)?$", re.IGNORECASE)


def parse_archs(spec: str) -> tuple[list[str], list[str]]:
    """``"80;90a;100a"`` -> (real ``["80", "90a", "100a"]``, PTX ``["100"]``)."""
    real, ptx = [], []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = _ARCH.match(item)
        if not m:
            raise SystemExit(f"MOE_KERNELS_CUDA_ARCHS: cannot parse {item!r} (expected e.g. 80, 90a, 100a, 100a+PTX)")
        real.append(m.group(1) + m.group(2).lower())
        if m.group(3):
            ptx.append(m.group(1))
    if not real:
        raise SystemExit("MOE_KERNELS_CUDA_ARCHS: no architecture given")
    if not ptx:
        ptx.append(max(real, key=lambda a: int(re.match(r"\d+", a).group())).rstrip("af"))
    return real, sorted(set(ptx), key=int)


def check_ptxas_log(log: str, source: str, real: list[str]) -> str:
    """Fail on any spill; return a one-line summary."""
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    entries = re.findall(r"Compiling entry function '([^']+)' for '(sm_\w+)'", log)
    if not entries:
        raise SystemExit(f"{source}: no ptxas -v report found; cannot check for spills")
    bad = [s for s in spills if s != ("0", "0")]
    if bad:
        raise SystemExit(f"{source}: ptxas reports register spills {bad}; see the log")
    seen = {arch for _, arch in entries}
    missing = [a for a in real if f"sm_{a}" not in seen]
    if missing:
        raise SystemExit(f"{source}: no cubin was built for {missing}")
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    kernels = len({name for name, _ in entries})
    return (f"{source}: {kernels} kernels x {len(seen)} archs, max {max(regs) if regs else 0} registers, "
            f"0 bytes spilled")


def run_nvcc(args, real: list[str], ptx: list[str]) -> str:
    cmd = [args.nvcc, "-fatbin", "-std=c++17", "-O3", "--Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", ",".join(PTXAS_FLAGS)]
    for inc in args.include:
        cmd += ["-I", inc]
    for a in real:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    for p in ptx:
        cmd += ["-gencode", f"arch=compute_{p},code=compute_{p}"]
    cmd += [args.src, "-o", args.out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = f"# {' '.join(cmd)}\n" + proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(log)
        raise SystemExit(f"{args.src}: nvcc failed with exit code {proc.returncode}")
    return log


class _Nvrtc:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(self, res: int, what: str) -> None:
        if res != 0:
            raise SystemExit(f"NVRTC {what} failed: {self.lib.nvrtcGetErrorString(res).decode()}")

    def ptx(self, source: str, name: str, arch: str, options: list[str]) -> tuple[str, str]:
        prog = ctypes.c_void_p()
        self.check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                   "nvrtcCreateProgram")
        try:
            opts = [f"--gpu-architecture=compute_{arch}", *options]
            arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            res = self.lib.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace").strip()
            if res != 0:
                raise SystemExit(f"{name}: NVRTC compilation for compute_{arch} failed:\n{log}")
            if "warning" in log.lower():  # NVRTC has no -Werror: treat any warning as an error
                raise SystemExit(f"{name}: NVRTC warnings (treated as errors) for compute_{arch}:\n{log}")
            self.check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            out = ctypes.create_string_buffer(size.value)
            self.check(self.lib.nvrtcGetPTX(prog, out), "nvrtcGetPTX")
            return out.value.decode(), log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _Fatbin:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.nvFatbinGetErrorString.restype = ctypes.c_char_p
        self.handle = ctypes.c_void_p()
        opts = (ctypes.c_char_p * 1)(b"-64")
        self.check(self.lib.nvFatbinCreate(ctypes.byref(self.handle), opts, ctypes.c_size_t(1)), "nvFatbinCreate")

    def check(self, res: int, what: str) -> None:
        if res != 0:
            raise SystemExit(f"nvFatbin {what} failed: {self.lib.nvFatbinGetErrorString(res).decode()}")

    def add_cubin(self, data: bytes, arch: str, ident: str) -> None:
        self.check(self.lib.nvFatbinAddCubin(self.handle, data, ctypes.c_size_t(len(data)), arch.encode(),
                                             ident.encode()), f"adding the sm_{arch} cubin")

    def add_ptx(self, text: str, arch: str, ident: str) -> None:
        data = text.encode() + b"\0"
        self.check(self.lib.nvFatbinAddPTX(self.handle, data, ctypes.c_size_t(len(data)), arch.encode(),
                                           ident.encode(), None), f"adding the compute_{arch} PTX")

    def get(self) -> bytes:
        size = ctypes.c_size_t()
        self.check(self.lib.nvFatbinSize(self.handle, ctypes.byref(size)), "nvFatbinSize")
        buf = ctypes.create_string_buffer(size.value)
        self.check(self.lib.nvFatbinGet(self.handle, buf), "nvFatbinGet")
        self.lib.nvFatbinDestroy(ctypes.byref(self.handle))
        return buf.raw


def run_nvrtc(args, real: list[str], ptx: list[str]) -> str:
    nvrtc = _Nvrtc(args.nvrtc_lib)
    fatbin = _Fatbin(args.nvfatbin_lib)
    source = Path(args.src).read_text()
    name = Path(args.src).name
    options = ["-std=c++17"]
    options += [f"-I{inc}" for inc in args.include]
    log_parts = [f"# NVRTC {args.nvrtc_lib} + {args.ptxas} {' '.join(PTXAS_FLAGS)} + nvFatbin\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for a in real:
            text, nvrtc_log = nvrtc.ptx(source, name, a, options)
            ptx_path = Path(tmp, f"{name}.compute_{a}.ptx")
            ptx_path.write_text(text)
            cubin = Path(tmp, f"{name}.sm_{a}.cubin")
            proc = subprocess.run([args.ptxas, f"-arch=sm_{a}", "-O3", *PTXAS_FLAGS, str(ptx_path), "-o", str(cubin)],
                                  capture_output=True, text=True)
            log_parts.append(nvrtc_log + proc.stdout + proc.stderr)
            if proc.returncode != 0:
                sys.stderr.write("".join(log_parts))
                raise SystemExit(f"{name}: ptxas failed for sm_{a} with exit code {proc.returncode}")
            fatbin.add_cubin(cubin.read_bytes(), a, f"{name}.sm_{a}")
        for p in ptx:
            text, nvrtc_log = nvrtc.ptx(source, name, p, options)
            log_parts.append(nvrtc_log)
            fatbin.add_ptx(text, p, f"{name}.compute_{p}")
    Path(args.out).write_bytes(fatbin.get())
    return "".join(log_parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--describe-archs", metavar="ARCHS",
                    help="print 'REAL;PTX' (comma-separated lists) for an arch spec and exit")
    ap.add_argument("--src")
    ap.add_argument("--out", help="the fatbin to write")
    ap.add_argument("--log", help="where to write the ptxas -v log")
    ap.add_argument("--archs", help="real architectures, e.g. 80,90a,100a (+PTX marks PTX)")
    ap.add_argument("--compiler", choices=("nvcc", "nvrtc"), default="nvcc")
    ap.add_argument("--nvcc", default="nvcc")
    ap.add_argument("--nvrtc-lib")
    ap.add_argument("--nvfatbin-lib")
    ap.add_argument("--ptxas")
    ap.add_argument("--include", action="append", default=[])
    args = ap.parse_args(argv)
    if args.describe_archs is not None:
        real, ptx = parse_archs(args.describe_archs)
        print(f"{','.join(real)};{','.join(ptx)}")
        return 0
    for opt in ("src", "out", "log", "archs"):
        if not getattr(args, opt):
            ap.error(f"--{opt} is required")
    real, ptx = parse_archs(args.archs)
    if args.compiler == "nvcc":
        log = run_nvcc(args, real, ptx)
    else:
        for opt in ("nvrtc_lib", "nvfatbin_lib", "ptxas"):
            if not getattr(args, opt):
                raise SystemExit(f"--{opt.replace('_', '-')} is required with --compiler nvrtc")
        log = run_nvrtc(args, real, ptx)
    summary = check_ptxas_log(log, Path(args.src).name, real)
    Path(args.log).write_text(log)
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
