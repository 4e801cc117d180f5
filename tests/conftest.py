import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs a CUDA device or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests (as fast, and immune to a CPU shared with other jobs:
    two OpenMP threads on a busy 2-core machine spin at every barrier); restored afterwards.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    # GPU-marked tests skip cleanly, with a reason, on a machine without CUDA.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
