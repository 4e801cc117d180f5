"""Shared test fixtures and the skip markers: one marker per condition, used by every test file.

    requires_cuda          a CUDA device is visible
    requires_triton        Triton can run: a CUDA device, or TRITON_INTERPRET=1 (its CPU interpreter)
    requires_cpp           fastdiff._C (the C++ CPU kernels) is importable
    requires_cuda_kernels  the CUDA kernels were built and a CUDA device is visible

Tests marked `gpu` (a label for `-m gpu`) skip cleanly, with a reason, on a machine without CUDA (pytest_collection_modifyitems).
A build that was recorded as done but does not load is not a skip: tests/test_build_record.py fails then.
"""
import os

import pytest
import torch

from fastdiff import _backend

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
HAS_CPP = _backend.has_cpp()
HAS_CUDA_KERNELS = _backend.has_cuda_kernels()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs a CUDA device or TRITON_INTERPRET=1")
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdiff._C (C++ kernels) not built")
requires_cuda_kernels = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="fastdiff CUDA kernels not built (or no CUDA "
                                           "device)")


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


# FASTDIFF_TRITON_RECORD=FILE: record the specialization of every fastdiff Triton kernel this run launches (under the
# interpreter) and write them to FILE at the end, for `scripts/triton_aot_check.py --from-record FILE`
# (scripts/test.sh: the GPU compile check then needs no second run of the Triton tests).
_TRITON_SPECS = None
if os.environ.get("FASTDIFF_TRITON_RECORD") and os.environ.get("TRITON_INTERPRET") == "1":
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_triton_aot_check", os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts",
                                          "triton_aot_check.py"))
    _aot = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_aot)
    _TRITON_SPECS = {}
    _aot.install_recorder(_TRITON_SPECS)


def pytest_sessionfinish(session, exitstatus):
    if _TRITON_SPECS is not None:
        _aot.write_record(_TRITON_SPECS, os.environ["FASTDIFF_TRITON_RECORD"])
