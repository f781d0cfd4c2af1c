"""Build of the optional CUDA extension moe_kernels._C (package metadata: pyproject.toml).

The extension is built by CMakeLists.txt when a CUDA toolchain is found and skipped
(with a message) otherwise, so ``pip install .`` and ``pip install -e .`` always work;
``moe_kernels.cuda_backend`` then says why the cuda backend is unavailable. No step
asks for a GPU.

Environment:

* ``MOE_KERNELS_SKIP_CUDA_BUILD=1``: do not build the extension.
* ``MOE_KERNELS_CUDA_ARCHS``: real architectures, default ``80;90a;100a`` (less those
  the nvcc found cannot build, e.g. 100a before CUDA 12.8); PTX goes with the newest
  (generic ``compute_100``) unless entries are marked ``+PTX``.
* ``CUDACXX``, else ``CUDA_HOME`` / ``CUDA_PATH`` (only there when set), else ``nvcc`` on
  ``PATH`` or /usr/local/cuda: the CUDA toolkit (nvcc >= 12.8 for sm_100a).
* ``MOE_KERNELS_PIP_CUDA=<site-packages>/nvidia``: build with the CUDA toolchain from
  PyPI's packages instead (nvidia-cuda-nvcc-cu12 for ptxas, nvidia-cuda-nvrtc-cu12,
  nvidia-nvfatbin-cu12, nvidia-cuda-runtime-cu12), which ship no nvcc: device code goes
  through NVRTC (see csrc/tools/device_compile.py). scripts/build_wheels.sh uses it.
* ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCHS = "80;90a;100a"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _first_file(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _nvcc_toolchain() -> dict | None:
    """The toolkit of the nvcc named by CUDACXX, else the one in CUDA_HOME (or CUDA_PATH)
    when set, else the first of PATH and /usr/local/cuda; None if there is none."""
    home_var = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if os.environ.get("CUDACXX"):
        candidates = [os.environ["CUDACXX"]]
    elif home_var:  # an explicit toolkit: look nowhere else
        candidates = [str(Path(home_var) / "bin" / "nvcc")]
    else:
        candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    nvcc = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if nvcc is None:
        return None
    home = nvcc.resolve().parent.parent
    # nvcc may be a wrapper script elsewhere (/usr/local/bin/nvcc): ask it where it lives.
    dry = subprocess.run([str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if top:
        home = Path(top.group(1).strip()).resolve()
    target = home / "targets" / "x86_64-linux"
    include = next((d for d in (home / "include", target / "include") if (d / "cuda_runtime_api.h").is_file()), None)
    cudart = _first_file(home / "lib64" / "libcudart_static.a", home / "lib" / "libcudart_static.a",
                         target / "lib" / "libcudart_static.a")
    if include is None or cudart is None:
        raise RuntimeError(f"moe_kernels: found {nvcc} but not the CUDA runtime's headers and libcudart_static.a "
                           f"under {home}; set CUDA_HOME to a complete toolkit or MOE_KERNELS_SKIP_CUDA_BUILD=1")
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    codes = subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    return {"compiler": "nvcc", "version": m.group(1) if m else "?", "nvcc": str(nvcc),
            "include": str(include), "cudart_static": str(cudart), "gpu_codes": codes}


def _archs(tc: dict) -> str:
    """MOE_KERNELS_CUDA_ARCHS as given; the default less what this nvcc cannot build
    (an older toolkit still gets an extension for the GPUs it knows)."""
    if os.environ.get("MOE_KERNELS_CUDA_ARCHS"):
        return os.environ["MOE_KERNELS_CUDA_ARCHS"]
    archs = DEFAULT_ARCHS.split(";")
    if tc.get("gpu_codes"):
        known = [a for a in archs if "sm_" + a.rstrip("af") in tc["gpu_codes"]]
        if known != archs:
            print(f"moe_kernels: nvcc {tc['version']} cannot build {sorted(set(archs) - set(known))}; "
                  f"building for {known} (set MOE_KERNELS_CUDA_ARCHS to choose)", flush=True)
        archs = known
    if not archs:
        raise RuntimeError(f"moe_kernels: nvcc {tc['version']} supports none of {DEFAULT_ARCHS}; "
                           "set MOE_KERNELS_CUDA_ARCHS or MOE_KERNELS_SKIP_CUDA_BUILD=1")
    return ";".join(archs)


def _pip_toolchain(root: Path) -> dict:
    """The CUDA toolchain of PyPI's nvidia-* packages under ``root`` (``.../nvidia``)."""
    paths = {
        "include": root / "cuda_runtime" / "include",
        "crt_include": root / "cuda_nvcc" / "include",  # crt/host_defines.h, which cuda_runtime_api.h includes
        "cudart_static": root / "cuda_runtime" / "lib" / "libcudart_static.a",
        "nvrtc_lib": next(iter(sorted((root / "cuda_nvrtc" / "lib").glob("libnvrtc.so.*"))), None),
        "nvfatbin_lib": next(iter(sorted((root / "nvfatbin" / "lib").glob("libnvfatbin.so.*"))), None),
        "ptxas": root / "cuda_nvcc" / "bin" / "ptxas",
    }
    missing = [k for k, p in paths.items() if p is None or not Path(p).exists()]
    if missing:
        raise RuntimeError(f"MOE_KERNELS_PIP_CUDA={root}: missing {missing}; install nvidia-cuda-nvcc-cu12, "
                           "nvidia-cuda-nvrtc-cu12, nvidia-nvfatbin-cu12 and nvidia-cuda-runtime-cu12 there")
    lib = ctypes.CDLL(str(paths["nvrtc_lib"]))
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    tc = {"compiler": "nvrtc", "version": f"{major.value}.{minor.value}", **{k: str(v) for k, v in paths.items()}}
    tc["include"] += ";" + tc.pop("crt_include")
    return tc


class BuildExt(build_ext):
    """Builds CMakeExtension modules with CMake, or skips them with a message."""

    def run(self) -> None:
        if os.environ.get("MOE_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
            print("moe_kernels: MOE_KERNELS_SKIP_CUDA_BUILD=1, not building the CUDA extension", flush=True)
            return self._drop_stale()
        if os.environ.get("MOE_KERNELS_PIP_CUDA"):
            self._toolchain = _pip_toolchain(Path(os.environ["MOE_KERNELS_PIP_CUDA"]))
        else:
            self._toolchain = _nvcc_toolchain()
        if self._toolchain is None:
            print("moe_kernels: no nvcc found (CUDA_HOME, PATH, /usr/local/cuda): installing without the CUDA "
                  "extension; the 'cuda' backend will be unavailable", flush=True)
            return self._drop_stale()
        super().run()

    def _drop_stale(self) -> None:
        """A module left by an earlier build (build/lib, or in place) would otherwise be
        installed as if it had just been built."""
        for ext in self.extensions:
            path = Path(self.get_ext_fullpath(ext.name))
            if path.exists():
                print(f"moe_kernels: removing {path} from an earlier build", flush=True)
                path.unlink()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        tc = self._toolchain
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / "moe_kernels_cuda"
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("moe_kernels: cmake is needed to build the CUDA extension (pip install cmake)")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_temp),
            f"-DMOE_KERNELS_OUTPUT_DIR={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMOE_KERNELS_CUDA_ARCHS={_archs(tc)}",
            f"-DMOE_KERNELS_DEVICE_COMPILER={tc['compiler']}",
            f"-DMOE_KERNELS_DEVICE_COMPILER_VERSION={tc['version']}",
            f"-DMOE_KERNELS_CUDA_INCLUDE_DIR={tc['include']}",
            f"-DMOE_KERNELS_CUDART_STATIC={tc['cudart_static']}",
        ]
        if tc["compiler"] == "nvcc":
            args.append(f"-DMOE_KERNELS_NVCC={tc['nvcc']}")
        else:
            args += [f"-DMOE_KERNELS_NVRTC_LIB={tc['nvrtc_lib']}", f"-DMOE_KERNELS_NVFATBIN_LIB={tc['nvfatbin_lib']}",
                     f"-DMOE_KERNELS_PTXAS={tc['ptxas']}"]
        if not (build_temp / "CMakeCache.txt").exists() and shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"moe_kernels: building the CUDA extension with {tc['compiler']} {tc['version']} into {extdir}",
              flush=True)
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_temp), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("moe_kernels._C")], cmdclass={"build_ext": BuildExt})
