"""The CUDA extension as built by the install step (no GPU needed).

* It was built wherever a CUDA toolkit is found (skipped with
  MOE_KERNELS_SKIP_CUDA_BUILD=1 or without nvcc), and imports with no GPU.
* A call without a GPU raises a RuntimeError naming the op; bad arguments to the
  raw module raise ValueError naming the op and the argument.
* It holds machine code for every listed architecture (cuobjdump --list-elf) and
  every kernel name the launchers can ask for.
* Its embedded ptxas -v log shows 0 bytes of spill stores and loads for every
  kernel and architecture (the build also fails on a spill: ptxas --warn-on-spills
  --warning-as-error).
* Without a toolkit the install goes on without the extension.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "tools"))
import device_compile  # noqa: E402

from moe_kernels.backends import cuda as cb  # noqa: E402
from moe_kernels.backends.cuda import extension as cops  # noqa: E402


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return (Path(home) / "bin" / "nvcc").is_file()
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()


SKIPPED = os.environ.get("MOE_KERNELS_SKIP_CUDA_BUILD", "0") == "1"
needs_ext = pytest.mark.skipif(cops._C is None and (SKIPPED or not _nvcc_present()),
                               reason="the CUDA extension was not built (no nvcc, or MOE_KERNELS_SKIP_CUDA_BUILD=1)")


@needs_ext
def test_extension_was_built_and_imports():
    assert cops._C is not None, f"nvcc is here but moe_kernels._C did not import: {cops._C_ERROR}"
    info = cb.extension_info()
    assert info["built"] and info["cuda_runtime"] == "static"
    assert re.fullmatch(r"\d+\.\d", info["cuda_version"])


@needs_ext
def test_imports_in_a_process_without_a_visible_gpu():
    code = "import moe_kernels._C as C, json; print(json.dumps(C.build_info()['archs']))"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("[")


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_a_call_without_a_gpu_raises_a_clear_runtime_error():
    c = cops._C
    calls = {
        "route_softmax_topk": lambda: c.route_softmax_topk(16, 16, 16, 16, 4, 8, 2, True, 0, 0, 0),
        "route_grouped_sigmoid_topk": lambda: c.route_grouped_sigmoid_topk(16, 0, 16, 16, 16, 4, 8, 2, 1, 1, 1.0,
                                                                           True, 0, 0, 0),
        "build_plan": lambda: c.build_plan(*([16] * 12), 0, 8, 4, 8, 1, 1, 2, c.max_padded_rows(8, 4, 2), 0, 0),
        "permute_rows": lambda: c.permute_rows(16, 16, 16, 16, 4, 8, 2, 4, 4, 16, 0, 0),
        "unpermute_rows": lambda: c.unpermute_rows(16, 0, 16, 16, 16, 4, 2, 8, 1, 8, 8, 16, 0, 0),
    }
    for op, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"moe_kernels\._C\.{op}: .*CUDA"):
            call()


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_the_no_gpu_error_names_its_cause():
    # No driver at all reads cudaErrorInsufficientDriver from the runtime: the message
    # must say that no driver is installed, not that the driver is old (and a driver
    # without a GPU: no usable device).
    c = cops._C
    if not hasattr(c, "load_images"):
        pytest.skip("moe_kernels._C predates csrc/ (no load_images): rebuild it (pip install -e .)")
    want = "no NVIDIA driver is installed" if c.driver_version() == 0 else "no usable CUDA device"
    for call in (lambda: c.permute_rows(16, 16, 16, 16, 4, 8, 2, 4, 4, 16, 0, 0), lambda: c.load_images(0),
                 lambda: cb.load_kernels(0), lambda: cb.load_kernels()):
        with pytest.raises(RuntimeError, match=want):
            call()
    assert not c.images_loaded()


@needs_ext
def test_raw_module_rejects_bad_arguments_before_any_cuda_call():
    c = cops._C
    with pytest.raises(ValueError, match=r"route_softmax_topk: num_experts"):
        c.route_softmax_topk(16, 16, 16, 16, 4, 1000, 2, True, 0, 0, 0)
    with pytest.raises(ValueError, match=r"route_softmax_topk: dtype"):
        c.route_softmax_topk(16, 16, 16, 16, 4, 8, 2, True, 7, 0, 0)
    with pytest.raises(ValueError, match=r"build_plan: num_padded_rows"):
        c.build_plan(*([16] * 12), 0, 8, 4, 8, 1, 1, 2, 5, 0, 0)
    big = 5000  # past the one-CTA sizes: the many-CTA plan needs its scan scratch
    with pytest.raises(ValueError, match=r"build_plan: scratch_words"):
        c.build_plan(*([16] * 12), 10, big, 4, big, 1, 1, 2, c.max_padded_rows(big, 4, 2), 0, 0)
    with pytest.raises(ValueError, match=r"permute_rows: elem_size"):
        c.permute_rows(16, 16, 16, 16, 4, 8, 8, 4, 4, 16, 0, 0)
    with pytest.raises(ValueError, match=r"unpermute_rows: token_slots"):
        c.unpermute_rows(16, 0, 0, 16, 16, 4, 2, 8, 1, 8, 8, 16, 0, 0)
    assert c.max_padded_rows(8, 4, 2) == 12


def _expected_archs() -> tuple:
    """(real, ptx) as configured; by default setup.py drops what an older nvcc cannot
    build, so then the build's own list, checked to be a part of the default."""
    if os.environ.get("MOE_KERNELS_CUDA_ARCHS"):
        return device_compile.parse_archs(os.environ["MOE_KERNELS_CUDA_ARCHS"])
    real = cb.extension_info()["archs"]
    assert real and [a for a in ("80", "90a", "100a") if a in real] == real, real
    return device_compile.parse_archs(";".join(real))


@needs_ext
def test_build_lists_the_configured_archs():
    real, ptx = _expected_archs()
    info = cb.extension_info()
    assert info["archs"] == real and info["ptx"] == ptx
    if not os.environ.get("MOE_KERNELS_CUDA_ARCHS") and "release 13." in _nvcc_version():
        assert real == ["80", "90a", "100a"] and ptx == ["100"]  # the default, whole, with CUDA 13


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""


def _cuobjdump() -> str | None:
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.is_file():
            return str(cand)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


@needs_ext
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (triton's or the CUDA toolkit's)")
def test_module_holds_machine_code_for_every_arch():
    real, ptx = _expected_archs()
    out = subprocess.run([_cuobjdump(), "--list-elf", "--list-ptx", cops._C.__file__], capture_output=True,
                         text=True, check=True).stdout
    elf = set(re.findall(r"ELF file\s+\d+: \S+\.(sm_\w+)\.cubin", out))
    assert elf == {f"sm_{a}" for a in real}, out
    assert set(re.findall(r"PTX file\s+\d+: \S+\.(sm_\w+)\.ptx", out)) == {f"sm_{p}" for p in ptx}, out
    # Three images (routing, plan, permute), each with every arch.
    assert len(re.findall(r"ELF file", out)) == 3 * len(real)


def _log_entries(log: str) -> list:
    """(kernel, arch, spill stores, spill loads) for every ptxas report in the log."""
    pat = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'\n.*?Function properties for \1\n"
                     r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", re.S)
    return [(m.group(1), m.group(2), int(m.group(4)), int(m.group(5))) for m in pat.finditer(log)]


@needs_ext
def test_ptxas_reports_no_spills_for_any_kernel():
    entries = _log_entries(cops._C.ptxas_log())
    real, _ = _expected_archs()
    kernels = {k for k, _, _, _ in entries}
    assert len(entries) == len(kernels) * len(real), "a kernel is missing a ptxas report for some arch"
    spilled = [e for e in entries if e[2] or e[3]]
    assert not spilled, f"register spills: {spilled}"


@needs_ext
def test_every_kernel_the_launchers_name_is_in_the_images():
    names = {k for k, _, _, _ in _log_entries(cops._C.ptxas_log())}
    want = {"_plan_build_fwd_kernel", "_plan_hist_fwd_kernel", "_plan_scan_fwd_kernel", "_plan_offsets_fwd_kernel",
            "_plan_place_fwd_kernel", "_plan_blocks_fwd_kernel", "_plan_token_major_fwd_kernel",
            "_plan_token_fill_fwd_kernel", "_plan_token_append_fwd_kernel", "_plan_token_sort_fwd_kernel",
            "_permute_rows_fwd_kernel_v16", "_permute_rows_fwd_kernel_s4",
            "_permute_rows_fwd_kernel_s2"}
    for t in ("f32", "f16", "bf16"):
        for v in (1, 2, 4, 8, 16):
            want |= {f"_route_softmax_topk_fwd_kernel_{t}_v{v}", f"_route_grouped_sigmoid_topk_fwd_kernel_{t}_v{v}"}
        vec = 4 if t == "f32" else 8
        want |= {f"_unpermute_rows_fwd_kernel_{t}_v1", f"_unpermute_rows_fwd_kernel_{t}_v{vec}"}
    assert want <= names, sorted(want - names)


def test_spill_parser_can_fail():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n")
    assert _log_entries(log) == [("k", "sm_90a", 4, 4)]
    with pytest.raises(SystemExit, match="spill"):
        device_compile.check_ptxas_log(log, "x.cu", ["90a"])


def test_arch_spec_parsing():
    assert device_compile.parse_archs("80;90a;100a") == (["80", "90a", "100a"], ["100"])
    assert device_compile.parse_archs("80,90a+PTX") == (["80", "90a"], ["90"])
    with pytest.raises(SystemExit, match="MOE_KERNELS_CUDA_ARCHS"):
        device_compile.parse_archs("sm_90")


def test_install_without_a_toolkit_builds_no_extension(tmp_path):
    pytest.importorskip("setuptools")
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda-here")}
    env.pop("CUDACXX", None)
    env.pop("MOE_KERNELS_SKIP_CUDA_BUILD", None)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "no nvcc found" in proc.stdout
    assert not list(tmp_path.rglob("_C*.so"))
    env = {**os.environ, "MOE_KERNELS_SKIP_CUDA_BUILD": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "MOE_KERNELS_SKIP_CUDA_BUILD=1" in proc.stdout
    assert not list(tmp_path.rglob("_C*.so"))
