"""What was built, and the one dispatch rule every op uses.

Backends: "torch" (plain-PyTorch reference), "triton", "cuda" (csrc/cuda), "cpp" (csrc/cpu).
Rule for backend="auto" (the environment variable FASTDIFF_BACKEND, when set, replaces "auto" for every op):
  CUDA tensor -> "cuda" if the CUDA kernels were built, else "triton" if triton imports, else "torch";
  CPU tensor  -> "cpp" if the extension was built, else "torch"
  (among the backends the op implements; an op may refine an automatic choice afterwards: attention on CUDA
  measures SDPA against its Triton kernel, fastdiff/ops/attention.py).
Falling back from the preferred backend warns once per (op, reason); it is never silent.
An explicitly requested backend that cannot run raises a RuntimeError naming why. FASTDIFF_BACKEND naming a backend
an op does not implement (e.g. "cpp" for attention) leaves that op on its automatic choice, with a one-time warning.
`resolve` caches its answers, so the per-call cost is a dictionary lookup (ops call it on every call).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")

try:
    from fastdiff import _build_config as _cfg
except ImportError:  # running from a source tree that was never built
    _cfg = None


def torch_mismatch(built: str | None, running: str) -> str | None:
    """Why an extension compiled against torch `built` must not be loaded into torch `running` (None: it may).
    torch's C++ ABI changes between releases; the local label (+cpu, +cu130) is not compared."""
    if not built or built.split("+")[0] == running.split("+")[0]:
        return None
    return (f"fastdiff._C was built against torch {built} but torch {running} is running; not loaded, using the "
            f"plain-PyTorch reference backend (and Triton on CUDA) instead. Rebuild fastdiff against this torch: "
            f"pip install --no-build-isolation --force-reinstall --no-deps .")


_ext_error: str | None = torch_mismatch(getattr(_cfg, "TORCH_VERSION", None), torch.__version__)
_EXT = False
if _ext_error is not None:  # loading it could fail on missing symbols or, worse, crash: warn instead
    warnings.warn(f"fastdiff: {_ext_error}", RuntimeWarning, stacklevel=2)
else:
    try:  # importing registers the compiled ops with the dispatcher
        importlib.import_module("fastdiff._C")
        _EXT = True
    except ImportError as e:  # pure-Python install or a broken build: say so in backends()
        _ext_error = f"fastdiff._C not importable: {e}"


def _fix_triton_interpreter_index() -> None:
    """Triton 3.6's CPU interpreter (TRITON_INTERPRET=1) on NumPy >= 2.4: make `range(tensor_bound)` work again.

    Its scalar tensors get `__index__ = int(self.handle.data)`, a 1-element 1-d array, which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); every kernel whose loop bound is a runtime value
    then fails. Triton 3.9 squeezes first: install the same `__index__` when the interpreter's own does not. The
    interpreter patches tensor methods per launch (`_patch_lang_tensor`, restored after it), so this wraps that function.
    Compiled kernels are untouched. Runs at import when TRITON_INTERPRET=1 (triton.jit picks the interpreter then).
    """
    try:
        import inspect

        from triton.runtime import interpreter as ti
        patch = ti._patch_lang_tensor
        if getattr(patch, "_fastdiff_index_fix", False) or "squeeze" in inspect.getsource(patch):
            return
    except (ImportError, AttributeError, OSError, TypeError):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._fastdiff_index_fix = True
    ti._patch_lang_tensor = _patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton_interpreter_index()


_TRITON_STATUS: dict[tuple[bool, bool], tuple[bool, str]] = {}


def _triton_status() -> tuple[bool, str]:
    """Cached per (interpreter flag, CUDA visible): resolve() runs once per op call, in sampling loops too."""
    key = (os.environ.get("TRITON_INTERPRET") == "1", torch.cuda.is_available())
    if key not in _TRITON_STATUS:
        _TRITON_STATUS[key] = _probe_triton(*key)
    return _TRITON_STATUS[key]


def _probe_triton(interp: bool, cuda: bool) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton not importable: {e}"
    if cuda:
        return True, f"triton {triton.__version__} on CUDA"
    if interp:
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU interpreter, slow)"
    return False, "triton needs a CUDA device (or TRITON_INTERPRET=1 to run the interpreter on CPU)"


def compiled_op_loaded(name: str) -> bool:
    """Whether fastdiff._C registered the schema fastdiff::<name> (then its fake kernel can be registered)."""
    try:
        getattr(torch.ops.fastdiff, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_cpp() -> bool:
    return _EXT


def has_cuda_kernels() -> bool:
    return _EXT and bool(getattr(_cfg, "BUILT_CUDA", False)) and torch.cuda.is_available()


def backends() -> dict[str, dict[str, object]]:
    """What each backend can do on this machine: {name: {"available": bool, "why": str}}."""
    tri_ok, tri_why = _triton_status()
    if _EXT:
        cpp_why = "fastdiff._C CPU kernels loaded"
        cuda_why = getattr(_cfg, "NOTE", "built without a build record")
        if getattr(_cfg, "BUILT_CUDA", False) and not torch.cuda.is_available():
            cuda_why += "; but no CUDA device is visible"
    else:
        cpp_why = cuda_why = _ext_error or "extension not built"
        if _cfg is not None and not _cfg.BUILT_CPP:
            cpp_why = cuda_why = _cfg.NOTE
    return {
        "torch": {"available": True, "why": f"plain PyTorch {torch.__version__} reference"},
        "triton": {"available": tri_ok, "why": tri_why},
        "cuda": {"available": has_cuda_kernels(), "why": cuda_why},
        "cpp": {"available": _EXT, "why": cpp_why},
    }


_warned: set[tuple[str, str]] = set()


def cpu_half(x: torch.Tensor) -> bool:
    """float16 on the CPU: where fastdiff's convolutions, linears and attention compute in float32 and round once.
    PyTorch's CPU fp16 kernels for these are slow paths on CPUs without fp16 arithmetic (fastdiff/nn/layers.py has
    the figures), and products of fp16 values are exact in fp32: the result a GPU's fp16 kernels return."""
    return x.dtype == torch.float16 and x.device.type == "cpu"


def _warn_once(op: str, msg: str) -> None:
    if (op, msg) not in _warned:
        _warned.add((op, msg))
        warnings.warn(f"fastdiff.{op}: {msg}", RuntimeWarning, stacklevel=3)


def requested(backend: str) -> str:
    """The request after the environment: `backend`, or FASTDIFF_BACKEND's value when `backend` is "auto"."""
    if backend == "auto":
        raw = _env_get(_K_BACKEND)
        if raw is not None:
            return _env_decode(raw) or "auto"
    return backend


# os.environ.get costs ~0.7 µs (it encodes the key and decodes the value on every call); the cache key needs two
# variables per resolve() call, so read os.environ's own mapping of encoded keys (what os.environ[...] = ... and
# monkeypatch.setenv update) and decode only on a cache miss. Platforms without that mapping use os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
if isinstance(_ENV_DATA, dict) and callable(getattr(os.environ, "encodekey", None)):
    _env_get = _ENV_DATA.get
    _K_BACKEND = os.environ.encodekey("FASTDIFF_BACKEND")
    _K_INTERP = os.environ.encodekey("TRITON_INTERPRET")

    def _env_decode(raw) -> str:
        return os.environ.decodevalue(raw)
else:  # pragma: no cover - not CPython's posix/nt os.environ
    _env_get = os.environ.get
    _K_BACKEND, _K_INTERP = "FASTDIFF_BACKEND", "TRITON_INTERPRET"

    def _env_decode(raw) -> str:
        return raw


_RESOLVED: dict[tuple, str] = {}


def clear_resolve_cache() -> None:
    """Forget every cached resolve() answer (they depend on what was built and which devices are visible, which is
    fixed for a process; the environment variables are part of the cache key and need no clearing)."""
    _RESOLVED.clear()
    _TRITON_STATUS.clear()


def resolve(op: str, backend: str, device: torch.device, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend `op` runs on for tensors on `device`, given the request `backend` (the rule in the module
    docstring). `supported` lists the backends this op implements (the reference "torch" always).

    Cached per (op, backend, device, supported, FASTDIFF_BACKEND, TRITON_INTERPRET): a hit is one dict lookup
    (~0.2 µs, docs/benchmarks.md "Dispatch cost"); the rule itself runs once per key. Requests that raise are not
    cached (they raise every time).
    """
    key = (op, backend, device, supported, _env_get(_K_BACKEND), _env_get(_K_INTERP))
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = _resolve_uncached(op, backend, device, supported)
    return hit


def _resolve_uncached(op: str, backend: str, device, supported: tuple[str, ...]) -> str:
    from_env = backend == "auto"
    backend = requested(backend)
    if backend not in (*BACKENDS, "auto"):
        where = "FASTDIFF_BACKEND" if from_env else "backend"
        raise ValueError(f"{where} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if from_env and backend != "auto" and backend not in supported:
        # FASTDIFF_BACKEND is one setting for every op: an op without that backend keeps its own rule, and says so
        _warn_once(op, f"FASTDIFF_BACKEND={backend!r} is not implemented for this op (supported: {supported}); "
                       f"using the automatic choice")
        backend = "auto"
    info = backends()
    device = torch.device(device)
    if backend != "auto":
        if backend not in supported:
            raise RuntimeError(f"fastdiff.{op}: backend {backend!r} is not implemented for this op "
                               f"(supported: {supported})")
        if backend in ("cuda",) and device.type != "cuda":
            raise RuntimeError(f"fastdiff.{op}: backend 'cuda' needs CUDA tensors, got device {device}")
        if backend == "cpp" and device.type != "cpu":
            raise RuntimeError(f"fastdiff.{op}: backend 'cpp' needs CPU tensors, got device {device}")
        if not info[backend]["available"]:
            raise RuntimeError(f"fastdiff.{op}: backend {backend!r} unavailable: {info[backend]['why']}")
        return backend
    prefs = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    for name in prefs:
        if name in supported and info[name]["available"]:
            return name
    best = prefs[0]
    if best in supported:
        _warn_once(op, f"falling back to the plain-PyTorch reference ({best}: {info[best]['why']})")
    return "torch"
