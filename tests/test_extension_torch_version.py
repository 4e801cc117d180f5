"""An extension built against another torch release is not loaded: a warning naming both versions and the fallback
backend, never a crash, and sampling still works (fastdiff/_backend.py, setup.py's build record)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdiff import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_mismatch_compares_releases_not_local_labels():
    assert _backend.torch_mismatch(None, "2.13.0+cpu") is None  # no record: nothing to compare
    assert _backend.torch_mismatch("2.13.0+cpu", "2.13.0+cu130") is None
    assert _backend.torch_mismatch("2.13.0", "2.13.0+cpu") is None
    why = _backend.torch_mismatch("2.14.1+cpu", "2.13.0+cpu")
    assert why is not None and "2.14.1+cpu" in why and "2.13.0+cpu" in why and "reference" in why
    assert _backend.torch_mismatch("2.13.1", "2.13.0") is not None


def test_extension_built_for_another_torch_warns_and_falls_back():
    """A build record naming another torch: import warns (both versions, the fallback), cpp is unavailable with
    that reason, and a sampler runs on the reference backend."""
    code = textwrap.dedent("""
        import sys, types, warnings
        fake = types.ModuleType("fastdiff._build_config")
        fake.BUILT_CPP, fake.BUILT_CUDA, fake.NOTE = True, False, "test record"
        fake.TORCH_VERSION, fake.CXX_STD = "1.99.0+cpu", 17
        sys.modules["fastdiff._build_config"] = fake
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastdiff, torch
        msgs = [str(x.message) for x in w if "fastdiff._C was built against" in str(x.message)]
        assert len(msgs) == 1, [str(x.message) for x in w]
        assert "1.99.0+cpu" in msgs[0] and torch.__version__ in msgs[0] and "reference" in msgs[0], msgs[0]
        info = fastdiff.backends()["cpp"]
        assert not info["available"] and "1.99.0+cpu" in info["why"], info
        assert "fastdiff._C" not in sys.modules
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = fastdiff.ddim_sample(lambda x, t: torch.zeros_like(x), 3, shape=(1, 2),
                                     generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_running_build_matches_running_torch():
    """The build in this environment records the torch it was built against, and that is the torch running."""
    cfg = getattr(_backend, "_cfg", None)
    recorded = getattr(cfg, "TORCH_VERSION", None)
    if cfg is None or not cfg.BUILT_CPP or recorded is None:
        pytest.skip("no C++ build with a torch version record here")
    assert recorded.split("+")[0] == torch.__version__.split("+")[0]


def _build_backend():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "fastdiff_build_backend", os.path.join(ROOT, "build_backend", "fastdiff_build_backend.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_isolated_build_asks_for_the_target_environments_torch(monkeypatch):
    """pip's isolated build gets torch==<the release installed for the interpreter running the build>, not the
    newest torch; FASTDIFF_BUILD_TORCH overrides it; FASTDIFF_SKIP_BUILD=1 needs no torch."""
    pytest.importorskip("setuptools")
    be = _build_backend()
    monkeypatch.delenv("FASTDIFF_BUILD_TORCH", raising=False)
    monkeypatch.delenv("FASTDIFF_SKIP_BUILD", raising=False)
    # what pip sets for the backend: its overlay on PYTHONPATH; the target's site-packages must still be found
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-pip-overlay")
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    release = torch.__version__.split("+")[0]
    assert be.get_requires_for_build_wheel() == [f"torch=={release}", "ninja"]
    assert be.get_requires_for_build_editable() == [f"torch=={release}", "ninja"]
    monkeypatch.setenv("FASTDIFF_BUILD_TORCH", "2.12.1+cpu")
    assert be.get_requires_for_build_wheel() == ["torch==2.12.1", "ninja"]
    monkeypatch.setenv("FASTDIFF_SKIP_BUILD", "1")
    assert be.get_requires_for_build_wheel() == []
