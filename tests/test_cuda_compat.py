"""Whether the cuda backend can run on a GPU: moe_kernels.backends.cuda.extension.compatibility_reason
(a pure function of the GPU's compute capability, the build's archs / PTX / CUDA version
and the driver's version) and CudaBackend.unavailable, which feeds it. CPU only: fake
capabilities, builds and drivers.
"""

import pytest
import torch

from moe_kernels.backends import cuda as cb
from moe_kernels.backends.cuda import extension as cops

# The default CUDA 13 build: sm_80, sm_90a, sm_100a machine code, compute_100 PTX.
DEFAULT = {"cuda_version": "13.0", "archs": ["80", "90a", "100a"], "ptx": ["100"]}
NO_PTX = {"cuda_version": "13.0", "archs": ["80", "90a", "100a"], "ptx": []}
DRIVER_13_0 = 13000

DEFAULT_CASES = [
    pytest.param((7, 0), False, id="sm70-volta-nothing"),
    pytest.param((7, 5), False, id="sm75-turing-nothing"),
    pytest.param((8, 0), True, id="sm80-cubin"),
    pytest.param((8, 6), True, id="sm86-runs-sm80-cubin"),
    pytest.param((8, 9), True, id="sm89-runs-sm80-cubin"),
    pytest.param((9, 0), True, id="sm90-runs-sm90a-cubin"),
    pytest.param((10, 0), True, id="sm100-runs-sm100a-cubin"),
    pytest.param((10, 3), True, id="sm103-jits-compute100"),
    pytest.param((12, 0), True, id="sm120-jits-compute100"),
]


@pytest.mark.parametrize("cap,runs", DEFAULT_CASES)
def test_default_build(cap, runs):
    reason = cb.compatibility_reason(cap, DEFAULT, DRIVER_13_0)
    if runs:
        assert reason is None
    else:
        assert f"sm_{cap[0]}{cap[1]}" in reason and "sm_80, sm_90a, sm_100a" in reason and "compute_100" in reason
        assert "MOE_KERNELS_CUDA_ARCHS" in reason and "backend='torch'" in reason
        assert "triton" not in reason  # the Triton backend needs sm_80 too


@pytest.mark.parametrize("cap,runs", [
    pytest.param((9, 0), True, id="sm90-exact-90a"),
    pytest.param((8, 6), True, id="sm86-sm80-cubin"),
    pytest.param((10, 3), False, id="sm103-100a-is-not-family"),
    pytest.param((12, 0), False, id="sm120-no-ptx"),
    pytest.param((9, 1), False, id="sm91-hypothetical-90a-is-exact"),
])
def test_build_without_ptx(cap, runs):
    assert (cb.compatibility_reason(cap, NO_PTX, DRIVER_13_0) is None) == runs


def test_arch_suffix_rules():
    # 'a': that exact GPU; 'f': the family (same major, minor up); plain: same major up.
    assert cops._runs_on("90a", (9, 0), ptx=False) and not cops._runs_on("90a", (10, 0), ptx=False)
    assert not cops._runs_on("90a", (10, 0), ptx=True)  # arch-specific PTX does not JIT forward either
    assert cops._runs_on("100f", (10, 3), ptx=False) and not cops._runs_on("100f", (12, 0), ptx=False)
    assert cops._runs_on("80", (8, 9), ptx=False) and not cops._runs_on("86", (8, 0), ptx=False)
    assert not cops._runs_on("80", (9, 0), ptx=False) and cops._runs_on("80", (9, 0), ptx=True)
    assert cops._runs_on("120", (12, 1), ptx=True) and not cops._runs_on("120", (10, 0), ptx=True)
    with pytest.raises(ValueError, match="arch"):
        cops._runs_on("sm_90", (9, 0), ptx=False)


@pytest.mark.parametrize("driver", [12080, 12090, 11080])
@pytest.mark.parametrize("cap", [(8, 0), (9, 0), (12, 0)])
def test_driver_older_than_the_static_runtime(driver, cap):
    # A CUDA 12.x driver cannot run the CUDA 13.0 runtime (cudaErrorInsufficientDriver),
    # whatever machine code the build holds.
    reason = cb.compatibility_reason(cap, DEFAULT, driver)
    have = f"{driver // 1000}.{driver % 1000 // 10}"
    assert reason is not None and "driver" in reason and have in reason and "13.0" in reason


def test_no_driver():
    assert "no NVIDIA driver" in cb.compatibility_reason((9, 0), DEFAULT, 0)


def test_minor_version_compatibility():
    # A 13.1 build on a 13.0 driver: machine code runs (minor version compatibility), the
    # 13.1 PTX cannot be compiled by the older driver (edge: MVC and the PTX fallback).
    newer = {**DEFAULT, "cuda_version": "13.1"}
    assert cb.compatibility_reason((9, 0), newer, 13000) is None
    reason = cb.compatibility_reason((12, 0), newer, 13000)
    assert reason is not None and "PTX" in reason and "13.1" in reason and "13.0" in reason
    assert cb.compatibility_reason((12, 0), newer, 13010) is None
    assert cb.compatibility_reason((12, 0), DEFAULT, 13020) is None  # a newer driver is fine


def test_cuda_12_build():
    b12 = {"cuda_version": "12.9", "archs": ["80", "90a", "100a"], "ptx": ["100"]}
    assert cb.compatibility_reason((9, 0), b12, 12040) is None  # MVC: 12.4 driver, 12.9 cubins
    assert cb.compatibility_reason((9, 0), b12, 13000) is None  # newer major driver: backward compatible
    assert cb.compatibility_reason((12, 0), b12, 12080) is not None  # PTX from 12.9 on a 12.8 driver


class _FakeExt:
    """Stands in for moe_kernels._C: a build and a driver."""

    def __init__(self, build, driver):
        self._build, self._driver = build, driver

    def build_info(self):
        return dict(self._build)

    def driver_version(self):
        return self._driver


@pytest.mark.parametrize("cap,driver,ok", [
    pytest.param((7, 5), 13000, False, id="sm75"),
    pytest.param((9, 0), 13000, True, id="sm90"),
    pytest.param((9, 0), 12080, False, id="sm90-old-driver"),
])
def test_backend_unavailable_uses_the_device_and_the_build(monkeypatch, cap, driver, ok):
    monkeypatch.setattr(cops, "_C", _FakeExt(DEFAULT, driver))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: asked.append(i) or cap)
    backend = cb.CudaBackend()
    reason = backend.unavailable(torch.device("cuda"))
    assert (reason is None) == ok, reason
    assert backend.unavailable(torch.device("cuda:0")) == reason and asked == [0]  # cached per device
    if not ok:
        assert ("driver" in reason) == (driver < 13000)


def test_backend_unavailable_for_a_device_torch_cannot_query(monkeypatch):
    monkeypatch.setattr(cops, "_C", _FakeExt(DEFAULT, 13000))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_such_device(i=None):
        raise AssertionError("Invalid device id")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_such_device)
    assert "cannot query cuda:3" in cb.CudaBackend().unavailable(torch.device("cuda:3"))


def test_backend_unavailable_without_cuda_in_torch(monkeypatch):
    monkeypatch.setattr(cops, "_C", _FakeExt(DEFAULT, 13000))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda.is_available() is False" in cb.CudaBackend().unavailable(torch.device("cuda"))
    assert "CUDA devices only" in cb.CudaBackend().unavailable(torch.device("cpu"))


def test_load_kernels_rejects_a_cpu_device(monkeypatch):
    monkeypatch.setattr(cops, "_C", _FakeExt(DEFAULT, 13000))
    with pytest.raises(ValueError, match="device"):
        cb.load_kernels("cpu")
