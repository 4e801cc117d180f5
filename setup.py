"""Build fastdiff and its extension `fastdiff._C`.

Switches (environment):
  FASTDIFF_SKIP_BUILD=1       no extension at all (pure-Python install; the reference and Triton paths still work)
  FASTDIFF_SKIP_CUDA_BUILD=1  CPU C++ kernels only, even when torch has CUDA and nvcc is found
  FASTDIFF_CUDA_ARCHS="8.0;9.0"  compute capabilities to build for (default 8.0;9.0)
  CUDA_HOME=/usr/local/cuda   the CUDA toolkit; when unset, torch guesses it from `which nvcc`, and setup.py asks nvcc
                              itself where its toolkit is if that guess has no include/cuda_runtime.h (see _cuda_home)
The extension must be built against the torch that runs it (torch's C++ ABI changes between releases):
  - `pip install --no-build-isolation .` builds against the torch installed in the environment;
  - plain `pip install .` / `pip wheel .` (an isolated build) get the same torch release as the target environment
    in their build environment (build_backend/fastdiff_build_backend.py asks the target interpreter; no torch there:
    the newest torch >= 2.11, or FASTDIFF_BUILD_TORCH=X.Y.Z);
  - the built package requires exactly the torch release it was built against (torch==X.Y.Z), and
    fastdiff/_backend.py checks at import that the running torch is that release (otherwise: a warning naming both
    versions, and the plain-PyTorch/Triton backends instead of the extension).
The C++ standard follows torch's headers (C++17 for torch <= 2.13; C++20 where ATen.h requires it).
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


MIN_TORCH = "2.11"


def _write_build_config(built_cpp, built_cuda, note, torch_version=None, cxx_std=None):
    path = os.path.join(HERE, "fastdiff", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"BUILT_CPP = {built_cpp!r}\nBUILT_CUDA = {built_cuda!r}\nNOTE = {note!r}\n")
        f.write(f"TORCH_VERSION = {torch_version!r}  # the torch the extension was compiled against\n")
        f.write(f"CXX_STD = {cxx_std!r}\n")


def _import_torch():
    """torch, or a clear refusal: the extension is compiled against torch's headers and libraries."""
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            f"setup.py: building fastdiff's C++ extension needs torch in the build environment ({e}).\n"
            "  Install torch first and build against it: pip install torch==2.13.0 && "
            "pip install --no-build-isolation .\n"
            "  (plain `pip install .`, with build isolation, installs a matching torch for the build itself; "
            "FASTDIFF_SKIP_BUILD=1 builds no extension)") from None
    release = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if release < tuple(int(p) for p in MIN_TORCH.split(".")):
        raise SystemExit(f"setup.py: fastdiff needs torch >= {MIN_TORCH}; the build environment has "
                         f"torch {torch.__version__}")
    return torch


def _cxx_std(torch_dir: str) -> int:
    """The C++ standard torch's headers require: ATen.h refuses older ones with `#if __cplusplus < 2017..L` /
    `#error C++NN or later ...` (C++17 up to torch 2.13; C++20 in later releases). At least 17."""
    try:
        with open(os.path.join(torch_dir, "include", "ATen", "ATen.h")) as f:
            m = re.search(r"__cplusplus\s*<\s*(\d{4})\d\dL", f.read())  # 201703L: C++17, 202002L: C++20
    except OSError:
        m = None
    return max(17, int(m.group(1)) - 2000) if m else 17


def _cuda_home() -> str:
    """Set CUDA_HOME when torch's guess would be wrong; returns a note for the build record ("" when nothing to say).

    With CUDA_HOME/CUDA_PATH unset, torch.utils.cpp_extension takes dirname(dirname(which nvcc)). When nvcc on PATH is
    a wrapper script (e.g. /usr/local/bin/nvcc that execs /usr/local/cuda-13.0/bin/nvcc) that is /usr/local: no
    cuda_runtime.h, no libcudart, and the glue fails to compile. nvcc --dryrun prints its real toolkit root (TOP=...).
    Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME once, at import).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return ""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return ""
    guess = os.path.dirname(os.path.dirname(nvcc))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return ""
    try:
        r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True, timeout=120)
        lines = (r.stdout + r.stderr).splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    for line in lines:
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip().strip('"'))
            if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")):
                os.environ["CUDA_HOME"] = top
                return f"CUDA_HOME={top} (from nvcc --dryrun; {nvcc} is outside its toolkit)"
    return f"{nvcc} is outside a CUDA toolkit ({guess}/include/cuda_runtime.h missing) and nvcc --dryrun named none"


def _extensions():
    if os.environ.get("FASTDIFF_SKIP_BUILD") == "1":
        _write_build_config(False, False, "extension not built: FASTDIFF_SKIP_BUILD=1")
        return [], {}, f"torch>={MIN_TORCH}"
    torch = _import_torch()
    std = _cxx_std(os.path.dirname(torch.__file__))

    home_note = _cuda_home() if torch.version.cuda is not None else ""
    from torch.utils import cpp_extension as ce

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = []
    cxx = ["-O3", f"-std=c++{std}", "-fopenmp"]
    if torch.version.cuda is None:
        cuda_note = f"CUDA kernels not built: torch {torch.__version__} has no CUDA"
    elif ce.CUDA_HOME is None:
        cuda_note = "CUDA kernels not built: nvcc / CUDA_HOME not found"
    elif not os.path.exists(os.path.join(ce.CUDA_HOME, "include", "cuda_runtime.h")):
        cuda_note = (f"CUDA kernels not built: CUDA_HOME={ce.CUDA_HOME} has no include/cuda_runtime.h "
                     f"(set CUDA_HOME to the toolkit root){'; ' + home_note if home_note else ''}")
        print(f"setup.py: WARNING: {cuda_note}", flush=True)
    elif os.environ.get("FASTDIFF_SKIP_CUDA_BUILD") == "1":
        cuda_note = "CUDA kernels not built: FASTDIFF_SKIP_CUDA_BUILD=1"
    else:
        cuda_note = ""
    with_cuda = not cuda_note
    kwargs = dict(
        name="fastdiff._C",
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        archs = os.environ.get("FASTDIFF_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";")
        gencode = []
        for a in filter(None, (s.strip() for s in archs)):
            cc = a.replace(".", "")
            gencode += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        define_macros.append(("FASTDIFF_WITH_CUDA", "1"))
        ext = ce.CUDAExtension(
            sources=sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", f"-std=c++{std}", "--use_fast_math", *gencode]},
            **kwargs,
        )
        cuda_note = "CUDA kernels built for " + ";".join(archs) + (f"; {home_note}" if home_note else "")
    else:
        ext = ce.CppExtension(sources=sources, define_macros=define_macros,
                              extra_compile_args={"cxx": cxx}, **kwargs)
    release = torch.__version__.split("+")[0]
    _write_build_config(True, with_cuda, cuda_note, torch.__version__, std)
    print(f"setup.py: building fastdiff._C against torch {torch.__version__} with C++{std}", flush=True)
    # the package requires the torch release its extension was compiled against (any local build: +cpu, +cu130)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}, f"torch=={release}"


ext_modules, cmdclass, torch_requirement = _extensions()
# pyproject.toml declares the dependencies dynamic: the same list, with torch pinned to the build's release
RUNTIME_DEPS = [torch_requirement, "numpy", "safetensors", "tqdm", "pillow", "einops"]
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=RUNTIME_DEPS)
