"""The fused backends provably run: what setup.py recorded as built (fastdiff/_build_config.py) must load.

Without these checks a broken or missing extension only turns ~100 tests into skips and makes backend="auto" run the
plain-PyTorch reference with a warning: the suite would pass while testing none of the C++/CUDA kernels."""
import warnings

import pytest
import torch

from fastdiff import _backend
from fastdiff.ops import sampler_step as ss

cfg = pytest.importorskip("fastdiff._build_config", reason="source tree never built (no build record)")

CPP_OPS = ["group_norm_silu", "multistep_step_"]


def test_recorded_cpp_build_loads():
    if not cfg.BUILT_CPP:
        pytest.skip(f"build record: C++ not built ({cfg.NOTE})")
    info = _backend.backends()["cpp"]
    assert _backend.has_cpp() and info["available"], f"setup.py built the C++ ops but they do not load: {info['why']}"
    for op in CPP_OPS:
        assert _backend.compiled_op_loaded(op), f"fastdiff::{op} is not registered although the build record says C++"


def test_recorded_cuda_build_loads():
    if not cfg.BUILT_CUDA:
        pytest.skip(f"build record: CUDA not built ({cfg.NOTE})")
    if not torch.cuda.is_available():
        pytest.skip("CUDA kernels built, no CUDA device here")
    info = _backend.backends()["cuda"]
    assert _backend.has_cuda_kernels() and info["available"], f"CUDA kernels built but unavailable: {info['why']}"


def test_auto_runs_the_fused_op_on_cpu_when_built():
    """backend="auto" on CPU picks "cpp" without a fallback warning, and the op it runs is the compiled one."""
    if not cfg.BUILT_CPP:
        pytest.skip(f"build record: C++ not built ({cfg.NOTE})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warning would be an error here
        assert _backend.resolve("sampler_step", "auto", torch.device("cpu")) == "cpp"
    x = torch.randn(2, 3)
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6), dtype=torch.float64)
    want = torch.empty_like(x)
    torch.ops.fastdiff.multistep_step_(x, x, None, [], None, None, None, None, ss.to_multistep_row(c), 0, want, None,
                                       None)
    assert torch.equal(ss.sampler_step(x, x, c, backend="auto")[0], want)
