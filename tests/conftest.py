"""Suite-wide set-up.

Without a CUDA GPU, Triton kernels run in the interpreter on CPU tensors; the variable
must be set before anything imports triton, hence here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs thousands of tiny ops: waking OpenMP workers costs more than it saves
# (a 4x4 softmax: ~5 ms with 2 threads, ~2 us with 1).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def two_threads():
    """torch at 2 threads for one test (the suite runs at 1), restored after: where the
    libraries split their sums and a rerun could differ."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
