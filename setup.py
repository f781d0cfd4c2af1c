"""Build of the CPU kernels and the optional CUDA extension (package metadata: pyproject.toml).

``moe_kernels._cpu_kernels`` (csrc/cpu/, plain C, about 10 s): always built, with
the C compiler Python was built with (``CC`` overrides); loaded with ctypes, so it needs
no Python or torch headers. Without a working compiler the install goes on without it
and the torch backend keeps to its library paths (moe_kernels/cpu_kernel.py says why).

The extension is built when a CUDA toolchain is found and skipped (with a message)
otherwise, so ``pip install .`` and ``pip install -e .`` always work;
``moe_kernels.backends.cuda.backend`` then says why the cuda backend is unavailable. No step
asks for a GPU.

Two builders, one description: ``_build_spec`` computes every input of the build
(csrc/tools/device_compile.py's command, the defines, flags, include folders, link
libraries and the output file) and either hands it to CMakeLists.txt, when ``cmake`` is
found (on ``PATH``, else from the ``cmake`` Python package), or runs the same commands
itself with the system C++ compiler (``_build_direct``: machines with no cmake and no
network). Change the build here, never in CMakeLists.txt alone.

The module uses only CPython's limited API (3.10): it is built as ``_C.abi3.so`` and the
wheel is tagged ``cp310-abi3``, one wheel per CUDA version for every CPython >= 3.10.
Next to it the build writes ``moe_kernels/_build_variant.py`` (CUDA variant, version,
archs), which the package reads without importing the extension.

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
* ``MOE_KERNELS_CUDA_VARIANT``: the name of this build in ``moe_kernels.build_variant()``
  and ``__version__`` (default ``cu`` + the toolkit's major and minor, e.g. ``cu130``).
* ``MOE_KERNELS_BUILDER=cmake|direct``: force one builder (default: cmake when found,
  else direct). ``CXX`` (else sysconfig's, else ``c++``): the direct builder's compiler.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEVICE_TOOL = CSRC / "tools" / "device_compile.py"
DEFAULT_ARCHS = "80;90a;100a"

# The build, for both builders (CMakeLists.txt receives all of it from _cmake_args).
IMAGES = ("routing", "plan", "permute")  # csrc/<image>.cu -> <image>.fatbin + <image>.ptxas.log
HOST_SOURCES = ("bindings.cpp", "ops.cpp", "runtime.cpp", "images.cpp")
EMBEDDING_SOURCE = "images.cpp"  # .incbin's the images, so it compiles after them
BUILD_TYPE_FLAGS = ["-O3", "-DNDEBUG", "-fPIC"]  # a Release build of a loadable module
# One binary for every CPython >= 3.10: the stable ABI only (csrc/bindings.cpp checks it).
LIMITED_API = "0x030A0000"
ABI3_TAG = "cp310"
CXX_FLAGS = [f"-DPy_LIMITED_API={LIMITED_API}", "-std=c++17", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]
# Static CUDA runtime, its symbols kept private (a version script that exports
# PyInit__C only; it works with GNU ld, lld and zig's linker, --exclude-libs does not)
# and bound inside the module (-Bsymbolic), so the process's other CUDA runtimes
# (torch's) never mix in; -s strips the symbol table (a Release build).
LINK_FLAGS = [f"-Wl,--version-script={CSRC / 'module.map'}", "-Wl,-Bsymbolic", "-s"]
SYSTEM_LIBS = ["-lpthread", "-ldl", "-lrt"]  # what libcudart_static.a needs
# The CPU kernels (csrc/cpu/): a shared library, every symbol hidden but its API.
CPU_FLAGS = ["-O3", "-std=gnu99", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-Wall", "-Wextra"]
CPU_LIBS = ["-ldl"]  # dlopen/dlsym (in libc itself from glibc 2.34)


class CpuLibrary(Extension):
    """A plain C shared library loaded with ctypes (moe_kernels/cpu_kernel.py): no Python
    or torch headers, so it ties to no ABI; named like an abi3 module to ship in the wheel."""

    def __init__(self, name: str, sources: list[str]):
        super().__init__(name, sources=sources, py_limited_api=True)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[], py_limited_api=True)  # -> _C.abi3.so


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
                         check=False, capture_output=True, text=True)
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
    out = subprocess.run([str(nvcc), "--version"], check=False, capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    codes = subprocess.run([str(nvcc), "--list-gpu-code"], check=False, capture_output=True,
                           text=True).stdout.split()
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


def _describe_archs(archs: str) -> tuple[list[str], list[str]]:
    """(real, PTX) architectures, as csrc/tools/device_compile.py reads ``archs``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("moe_kernels_device_compile", DEVICE_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.parse_archs(archs)
    except SystemExit as e:  # its command-line way of saying ValueError
        raise RuntimeError(f"moe_kernels: {e}") from None


def _c_string(value: str) -> str:
    """``value`` as a C string literal, for a -D define (no shell in between)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _build_spec(tc: dict, image_dir: Path) -> dict:
    """Every input of the build, for either builder. CMakeLists.txt adds nothing of its
    own (no build type, no CMake helpers), so what _build_direct runs is what CMake
    runs."""
    archs = _archs(tc)
    real, ptx = _describe_archs(archs)
    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").is_file():
        raise RuntimeError(f"moe_kernels: no Python.h in {python_include}; install the Python development headers "
                           "(e.g. python3-dev) or set MOE_KERNELS_SKIP_CUDA_BUILD=1")
    cuda_includes = [d for d in tc["include"].split(";") if d]
    device_args = ["--archs", ",".join(a for a in re.split(r"[;,\s]+", archs) if a), "--include", str(CSRC)]
    for d in cuda_includes:
        device_args += ["--include", d]
    if tc["compiler"] == "nvcc":
        device_args += ["--compiler", "nvcc", "--nvcc", tc["nvcc"]]
    else:
        device_args += ["--compiler", "nvrtc", "--nvrtc-lib", tc["nvrtc_lib"], "--nvfatbin-lib", tc["nvfatbin_lib"],
                        "--ptxas", tc["ptxas"]]
    defines = {
        "MOE_IMAGE_DIR": str(image_dir),  # where csrc/images.cpp .incbin's the images from
        "MOE_KERNELS_ARCHS": ",".join(real),
        "MOE_KERNELS_PTX": ",".join(ptx),
        "MOE_KERNELS_DEVICE_COMPILER": f"{tc['compiler']} {tc['version']}",
    }
    return {
        "image_dir": image_dir,
        # + --src/--out/--log per image (_device_command; CMakeLists.txt does the same)
        "device_command": [sys.executable, str(DEVICE_TOOL), *device_args],
        "defines": [f"{k}={_c_string(v)}" for k, v in defines.items()],
        "include_dirs": [str(CSRC), *cuda_includes],
        "system_include_dirs": [python_include],  # -isystem: outside -Werror
        "cxx_flags": [*BUILD_TYPE_FLAGS, *CXX_FLAGS],
        "link_flags": LINK_FLAGS,
        "link_libs": [tc["cudart_static"], *SYSTEM_LIBS],
    }


VARIANT_FILE = "_build_variant.py"  # written next to the built module


def _variant_source(tc: dict, archs: str) -> str:
    """moe_kernels/_build_variant.py of this build: what the package reports as its CUDA
    variant (``moe_kernels.build_variant()``, ``__version__``) without importing _C."""
    real, ptx = _describe_archs(archs)
    major, minor = (tc["version"].split(".") + ["0"])[:2]
    variant = os.environ.get("MOE_KERNELS_CUDA_VARIANT") or f"cu{major}{minor}"
    if not re.fullmatch(r"[a-z0-9]+", variant):
        raise RuntimeError(f"MOE_KERNELS_CUDA_VARIANT={variant!r}: lower-case letters and digits only")
    compiler = f"{tc['compiler']} {tc['version']}"
    return ("# Written by setup.py when it builds moe_kernels._C; not in the source tree.\n"
            f"VARIANT = {variant!r}\nCUDA_VERSION = {major + '.' + minor!r}\nARCHS = {tuple(real)!r}\n"
            f"PTX = {tuple(ptx)!r}\nDEVICE_COMPILER = {compiler!r}\n")


def _device_command(spec: dict, image: str) -> list[str]:
    d = spec["image_dir"]
    return [*spec["device_command"], "--src", str(CSRC / f"{image}.cu"), "--out", str(d / f"{image}.fatbin"),
            "--log", str(d / f"{image}.ptxas.log")]


def _cmake_args(spec: dict, output: Path) -> list[str]:
    def cmake_list(items) -> str:
        items = [str(i) for i in items]
        bad = [i for i in items if ";" in i]
        if bad:
            raise RuntimeError(f"moe_kernels: CMake cannot take {bad} (a ';' in a path); "
                               "use MOE_KERNELS_BUILDER=direct")
        return ";".join(items)

    values = {
        "IMAGES": IMAGES, "IMAGE_DIR": [spec["image_dir"]], "DEVICE_COMMAND": spec["device_command"],
        "HOST_SOURCES": HOST_SOURCES, "EMBEDDING_SOURCE": [EMBEDDING_SOURCE], "DEFINES": spec["defines"],
        "INCLUDE_DIRS": spec["include_dirs"], "SYSTEM_INCLUDE_DIRS": spec["system_include_dirs"],
        "CXX_FLAGS": spec["cxx_flags"], "LINK_FLAGS": spec["link_flags"], "LINK_LIBS": spec["link_libs"],
        "OUTPUT": [output],
    }
    # An empty build type: the flags are all in CXX_FLAGS, as the direct build has them.
    return ["-DCMAKE_BUILD_TYPE="] + [f"-DMOE_KERNELS_{k}:STRING={cmake_list(v)}" for k, v in values.items()]


def _find_tool(name: str, package: str, bin_dir_attr: str) -> str | None:
    """``name`` on PATH, else the one of its PyPI package (cmake, ninja), whose scripts
    are off PATH when its environment is not activated."""
    found = shutil.which(name)
    if found:
        return found
    try:
        exe = Path(getattr(__import__(package), bin_dir_attr)) / name
        if exe.is_file():
            return str(exe)
    except (ImportError, AttributeError, TypeError):
        pass
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.is_file() else None


def _cxx() -> list[str]:
    """The direct build's C++ compiler: CXX (as CMake reads it), else Python's own, else c++."""
    for candidate in (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++"):
        cmd = shlex.split(candidate or "")
        if cmd and shutil.which(cmd[0]):
            return cmd
    raise RuntimeError("moe_kernels: no C++ compiler (CXX, sysconfig's CXX, c++) to build the CUDA extension; "
                       "install one, or set MOE_KERNELS_SKIP_CUDA_BUILD=1")


def _run(cmd: list[str]) -> None:
    print(shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _build_direct(spec: dict, output: Path, work: Path, jobs: int) -> None:
    """What CMakeLists.txt does with ``spec``, without CMake: the images and the host
    objects in parallel (the embedding source after the images), then the link."""
    cxx = _cxx()
    # CMake's CMAKE_CXX_FLAGS / linker flags start from these.
    env_cxxflags = shlex.split(os.environ.get("CXXFLAGS", ""))
    env_ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
    compile_cmd = [*cxx, *env_cxxflags, *(f"-D{d}" for d in spec["defines"]),
                   *(f"-I{d}" for d in spec["include_dirs"])]
    for d in spec["system_include_dirs"]:
        compile_cmd += ["-isystem", d]
    compile_cmd += spec["cxx_flags"]
    objects_dir = work / "objects"
    for d in (objects_dir, spec["image_dir"], output.parent):
        d.mkdir(parents=True, exist_ok=True)

    def compile_source(source: str) -> str:
        obj = objects_dir / f"{source}.o"
        _run([*compile_cmd, "-c", str(CSRC / source), "-o", str(obj)])
        return str(obj)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        images = [pool.submit(_run, _device_command(spec, image)) for image in IMAGES]
        objects = [pool.submit(compile_source, s) for s in HOST_SOURCES if s != EMBEDDING_SOURCE]
        for job in images:
            job.result()
        objects.append(pool.submit(compile_source, EMBEDDING_SOURCE))
        objects = [job.result() for job in objects]
    _run([*cxx, *env_cxxflags, *env_ldflags, *spec["link_flags"], "-shared", "-o", str(output), *objects,
          *spec["link_libs"]])


def _build_cmake(cmake: str, ninja: str | None, spec: dict, output: Path, build_dir: Path, jobs: int) -> None:
    cache = build_dir / "CMakeCache.txt"
    if cache.exists():
        # A tree configured from an isolated build environment that pip has since deleted.
        make = re.search(r"^CMAKE_MAKE_PROGRAM:\w+=(.*)$", cache.read_text(), re.MULTILINE)
        if make and make.group(1) and not Path(make.group(1)).exists():
            shutil.rmtree(build_dir)
    args = [cmake, "-S", str(ROOT), "-B", str(build_dir), *_cmake_args(spec, output)]
    if not cache.exists() and ninja:
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    subprocess.run(args, check=True)
    subprocess.run([cmake, "--build", str(build_dir), "-j", str(jobs)], check=True)


class BuildExt(build_ext):
    """Builds CMakeExtension modules with CMake (or, without it, directly), or skips
    them with a message."""

    def run(self) -> None:
        skip = self._cuda_skip_reason()
        if skip:
            print(f"moe_kernels: {skip}", flush=True)
            self._drop_stale([e for e in self.extensions if isinstance(e, CMakeExtension)])
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        super().run()

    def _cuda_skip_reason(self) -> str | None:
        """Why the CUDA extension is not built (None: it is; the toolchain is then set)."""
        if os.environ.get("MOE_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
            return "MOE_KERNELS_SKIP_CUDA_BUILD=1, not building the CUDA extension"
        if os.environ.get("MOE_KERNELS_PIP_CUDA"):
            self._toolchain = _pip_toolchain(Path(os.environ["MOE_KERNELS_PIP_CUDA"]))
        else:
            self._toolchain = _nvcc_toolchain()
        if self._toolchain is None:
            return ("no nvcc found (CUDA_HOME, PATH, /usr/local/cuda): installing without the CUDA "
                    "extension; the 'cuda' backend will be unavailable")
        return None

    def _drop_stale(self, extensions: list[Extension]) -> None:
        """A module left by an earlier build (build/lib, or in place) would otherwise be
        installed as if it had just been built."""
        for ext in extensions:
            path = Path(self.get_ext_fullpath(ext.name))
            for stale in (path, path.parent / VARIANT_FILE):
                if stale.exists():
                    print(f"moe_kernels: removing {stale} from an earlier build", flush=True)
                    stale.unlink()

    def copy_extensions_to_source(self) -> None:
        """--inplace / editable installs: the module and, next to it, its variant file (a
        CPU library that failed to build is left out, and any older copy removed)."""
        failed = getattr(self, "_failed", [])
        for ext in failed:
            stale = Path(self.get_finalized_command("build_py").get_package_dir("moe_kernels"),
                         Path(self.get_ext_filename(ext.name)).name)
            if stale.exists():
                print(f"moe_kernels: removing {stale} from an earlier build", flush=True)
                stale.unlink()
        built, self.extensions = self.extensions, [e for e in self.extensions if e not in failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = built
        build_py = self.get_finalized_command("build_py")
        for ext in (e for e in self.extensions if isinstance(e, CMakeExtension)):
            built = Path(self.build_lib, *ext.name.split(".")[:-1], VARIANT_FILE)
            package_dir = Path(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            if built.exists():
                shutil.copyfile(built, package_dir / VARIANT_FILE)

    def build_extension(self, ext: Extension) -> None:
        if isinstance(ext, CpuLibrary):
            return self._build_cpu_library(ext)
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        builder = os.environ.get("MOE_KERNELS_BUILDER", "").strip().lower()
        if builder not in ("", "cmake", "direct"):
            raise RuntimeError(f"MOE_KERNELS_BUILDER: expected cmake or direct, got {builder!r}")
        cmake = ninja = None
        why = "MOE_KERNELS_BUILDER=direct"
        if builder != "direct":
            cmake = _find_tool("cmake", "cmake", "CMAKE_BIN_DIR")
            ninja = _find_tool("ninja", "ninja", "BIN_DIR")
            why = "no cmake found (PATH, the cmake Python package)"
            if cmake and not (ninja or shutil.which("make")):
                why, cmake = f"{cmake} found but neither ninja nor make", None
            if builder == "cmake" and cmake is None:
                raise RuntimeError("MOE_KERNELS_BUILDER=cmake: no cmake (with ninja or make) found; pip install cmake")
        tc = self._toolchain
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        work = Path(self.build_temp).resolve()
        jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
        start = time.monotonic()
        if cmake:
            print(f"moe_kernels: building the CUDA extension with CMake ({cmake}) and {tc['compiler']} "
                  f"{tc['version']} into {output}", flush=True)
            build_dir = work / "moe_kernels_cuda"
            _build_cmake(cmake, ninja, _build_spec(tc, build_dir / "images"), output, build_dir, jobs)
        else:
            print(f"moe_kernels: {why}: building the CUDA extension directly (C++ compiler {shlex.join(_cxx())}) "
                  f"with {tc['compiler']} {tc['version']} into {output}", flush=True)
            build_dir = work / "moe_kernels_cuda_direct"
            _build_direct(_build_spec(tc, build_dir / "images"), output, build_dir, jobs)
        (output.parent / VARIANT_FILE).write_text(_variant_source(tc, _archs(tc)))
        print(f"moe_kernels: CUDA extension built by the {'cmake' if cmake else 'direct'} build in "
              f"{time.monotonic() - start:.1f} s", flush=True)


    def _build_cpu_library(self, ext: Extension) -> None:
        """The CPU kernels: plain C, one compiler call. Without a working C compiler the
        package still installs; the torch backend then keeps to its library paths."""
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        cmd = [*cc, *CPU_FLAGS, *[str(ROOT / s) for s in ext.sources], "-o", str(output), *CPU_LIBS]
        start = time.monotonic()
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            if output.exists():
                output.unlink()
            self._failed = [*getattr(self, "_failed", []), ext]
            print(f"moe_kernels: could not build the CPU kernels ({err}); installing without them: the torch "
                  f"backend will use its library paths only", flush=True)
            return
        print(f"moe_kernels: CPU kernels built in {time.monotonic() - start:.1f} s ({output.name})", flush=True)

setup(ext_modules=[CpuLibrary("moe_kernels._cpu_kernels", ["csrc/cpu/expert_linear.c"]),
                   CMakeExtension("moe_kernels._C")], cmdclass={"build_ext": BuildExt},
      options={"bdist_wheel": {"py_limited_api": ABI3_TAG}})
