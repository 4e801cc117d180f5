"""fastdiff's PEP 517 build backend: setuptools, with the torch that the build needs chosen at build time.

fastdiff's C++ extension is compiled against torch's headers and libraries and loads only into that torch release.
pip's isolated build (plain `pip install .` / `pip wheel .`) would otherwise install the newest torch into the build
environment, whatever the target environment runs. This backend asks for:
  1. torch==$FASTDIFF_BUILD_TORCH when that is set (e.g. 2.13.0);
  2. else the torch release installed for the interpreter that runs the build (pip runs the backend with the target
     environment's Python, hiding its site-packages; a child process without pip's overrides sees them);
  3. else torch>=2.11 (the newest), and setup.py pins the package's runtime torch to whatever that was.
FASTDIFF_SKIP_BUILD=1 (no extension) needs no torch to build. Everything else is setuptools.build_meta.
"""
import os
import subprocess
import sys

from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks this module does not override)

MIN_TORCH = "2.11"


def _target_torch() -> str | None:
    """The torch release (X.Y.Z, no local label) installed for sys.executable outside pip's build overlay."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    code = "import importlib.metadata as m; print(m.version('torch'))"
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    version = r.stdout.strip().split("+")[0]
    return version if r.returncode == 0 and version else None


def torch_requirement() -> str:
    pinned = os.environ.get("FASTDIFF_BUILD_TORCH", "").strip()
    if pinned:
        return f"torch=={pinned.split('+')[0]}"
    found = _target_torch()
    if found:
        print(f"fastdiff build: the target environment has torch {found}: building against torch=={found}",
              file=sys.stderr, flush=True)
        return f"torch=={found}"
    return f"torch>={MIN_TORCH}"


def _requires() -> list[str]:
    if os.environ.get("FASTDIFF_SKIP_BUILD") == "1":
        return []
    return [torch_requirement(), "ninja"]


# setuptools' own get_requires_* run setup.py, which imports torch: not possible before torch is there, and it adds
# nothing setup.py needs (no setup_requires), so these hooks answer without it.
def get_requires_for_build_wheel(config_settings=None):
    return _requires()


def get_requires_for_build_editable(config_settings=None):
    return _requires()


def get_requires_for_build_sdist(config_settings=None):
    return _requires()

