"""What the package says about its CUDA build: ``__version__`` (``0.1.0+cuXY`` with the
extension), ``build_variant()`` (from moe_kernels/_build_variant.py, written by the
build next to the module) and ``moe_kernels._C``, imported on first access only."""

import json
import subprocess
import sys

import moe_kernels


def _fresh(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_extension_is_imported_on_first_access_only():
    got = _fresh("import json, sys, moe_kernels as m; before = 'moe_kernels._C' in sys.modules; "
                 "c = getattr(m, '_C', None); print(json.dumps([before, c is not None, "
                 "'moe_kernels._C' in sys.modules, m.build_variant() is not None]))")
    before, reachable, after, has_variant = got
    assert not before
    assert reachable == after == has_variant  # the variant file comes with the module


def test_version_and_variant_agree_with_the_module():
    v = moe_kernels.build_variant()
    base = moe_kernels.__version__.split("+")[0]
    assert base == "0.1.0"
    if v is None:
        assert moe_kernels.__version__ == base
        return
    assert moe_kernels.__version__ == f"{base}+{v['variant']}"
    info = moe_kernels._C.build_info()
    assert (info["cuda_version"], list(info["archs"]), list(info["ptx"])) == \
        (v["cuda_version"], list(v["archs"]), list(v["ptx"]))
    assert v["variant"].isalnum() and v["variant"] == v["variant"].lower()


def test_info_names_the_variant():
    out = subprocess.run([sys.executable, "-m", "moe_kernels", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("variant"))
    v = moe_kernels.build_variant()
    if v is None:
        assert "none" in line
    else:
        assert v["variant"] in line and f"CUDA {v['cuda_version']}" in line and ",".join(v["archs"]) in line


def test_unknown_attributes_still_raise_attribute_error():
    assert not hasattr(moe_kernels, "no_such_thing")
