"""Compile every fastdiff Triton kernel for real GPUs (sm_80, sm_90) on a machine with no GPU.

The CPU interpreter (TRITON_INTERPRET=1) accepts code the GPU compiler rejects (tl.dot shapes, dtype mixes, constexpr
misuse), so interpreter tests alone do not prove a kernel builds on the GPU. This script:
  1. runs the Triton tests under the interpreter (in a subprocess) and records each fastdiff kernel launch's
     specialization: argument types (tensors as *fp32/*bf16/..., ints as i32/i64, None and tl.constexpr arguments
     as constexpr) and num_warps;
  2. compiles each distinct specialization with triton.compile(..., target=GPUTarget("cuda", cc, 32)) down to a cubin
     (Triton's bundled ptxas; no driver or device needed), for each compute capability asked.
Exit status 1 if any compile fails. Usage (from the repo root):
  python scripts/triton_aot_check.py [--cc 80 90] [-- <pytest args, default: tests/ops -k triton>]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
           "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _arg_type(v) -> tuple[str, object]:
    """Triton signature type of one runtime argument, and the constexpr value when it is specialized away."""
    if v is None:
        return "constexpr", None
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        return "*" + _DTYPES[str(v.dtype).replace("torch.", "")], None
    if isinstance(v, bool):
        return "i1", None
    if isinstance(v, int):
        return ("i32" if -2**31 <= v < 2**31 else "i64"), None
    if isinstance(v, float):
        return "fp32", None
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


def install_recorder(specs: dict) -> None:
    """Record every fastdiff kernel launch's specialization into `specs` (its JSON → the spec) from now on in this
    process (TRITON_INTERPRET=1). tests/conftest.py installs it for the whole test run when FASTDIFF_TRITON_RECORD
    names a file, so scripts/test.sh compiles what the suite launched without running the Triton tests twice."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        if not fn.__module__.startswith("fastdiff."):  # a test's own helper kernel
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        params = inspect.signature(fn).parameters
        bound = dict(zip(self.arg_names, args))
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update({k: v for k, v in kwargs.items() if k in params})
        sig, consts = {}, {}
        for name, p in params.items():
            if name not in bound:  # a default value
                if p.default is inspect.Parameter.empty:
                    continue
                bound[name] = p.default
            v = bound[name]
            if "constexpr" in str(p.annotation):
                sig[name], consts[name] = "constexpr", (v.value if hasattr(v, "value") else v)
            else:
                sig[name], c = _arg_type(v)
                if sig[name] == "constexpr":
                    consts[name] = c
        spec = {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": consts,
                "options": options}
        specs.setdefault(json.dumps(spec, sort_keys=True), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def write_record(specs: dict, out_path: str) -> None:
    with open(out_path, "w") as f:
        json.dump(list(specs.values()), f)


def record(out_path: str, pytest_args: list[str]) -> int:
    """Phase 1 (TRITON_INTERPRET=1): run pytest in-process, write the distinct launch specializations as JSON."""
    import pytest

    specs: dict[str, dict] = {}
    install_recorder(specs)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args])
    write_record(specs, out_path)
    return int(rc)


# Largest shared memory one block can opt in to (bytes), per compute capability: A100, H100 (CUDA programming guide).
_SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _gpu_variants(spec: dict) -> list[dict]:
    """The tiles the launchers pick on a GPU, which the interpreter runs never use (they take small CPU tiles).

    Mirrors the `gpu=True` branches: attention's `_blocks(D, Dv, Lq, Lk, gpu=True)` at long sequences, for the
    tested head widths and 64..512, with tensor-core dots for fp16/bf16 (IEEE only for fp32); group_norm_silu's
    4096-element tiles and a wide split.
    """
    c, name = spec["constexprs"], spec["name"]
    out = []
    if name == "_attn_fwd_kernel":
        from fastdiff.ops.attention import _blocks, _num_stages
        ieee = spec["signature"]["q_ptr"] == "*fp32"
        for d, dv in {(c["BLOCK_D"], c["BLOCK_DV"]), (64, 64), (128, 128), (256, 256), (512, 512)}:
            bm, bn, bd, bdv, warps = _blocks(d, dv, 4096, 4096, gpu=True)
            out.append({**spec, "constexprs": {**c, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DV": bdv,
                                               "IEEE": ieee},
                        "options": {**spec["options"], "num_warps": warps, "num_stages": _num_stages(bd, bdv, ieee)}})
    elif name in ("_gns_stats_kernel", "_gns_apply_kernel"):
        extra = {"SPLIT_P2": 512} if "SPLIT_P2" in c else {}
        out.append({**spec, "constexprs": {**c, "BLOCK_P": max(1, 4096 // c["BLOCK_C"]), **extra}})
    return [v for v in out if v != spec]


def compile_all(spec_path: str, ccs: list[int]) -> int:
    """Phase 2 (no interpreter): triton.compile each recorded specialization (and its GPU tiles) per capability."""
    import triton
    from triton.backends.compiler import GPUTarget

    specs = json.load(open(spec_path))
    seen = {json.dumps(s, sort_keys=True) for s in specs}
    for s in list(specs):
        for v in _gpu_variants(s):
            if json.dumps(v, sort_keys=True) not in seen:
                seen.add(json.dumps(v, sort_keys=True))
                specs.append(v)
    failed = 0
    t0 = time.time()
    for cc in ccs:
        for s in specs:
            fn = getattr(importlib.import_module(s["module"]), s["name"])
            what = f"sm_{cc} {s['name']} {s['signature']} {s['constexprs']} {s['options']}"
            try:
                src = triton.compiler.ASTSource(fn=fn, signature=s["signature"], constexprs=s["constexprs"])
                k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=s["options"])
                if not k.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
                smem = getattr(k.metadata, "shared", 0)
                if smem > _SMEM_LIMIT.get(cc, 48 * 1024):
                    raise RuntimeError(f"needs {smem} bytes of shared memory, sm_{cc} allows {_SMEM_LIMIT.get(cc)}")
            except Exception as e:  # report every failing specialization, then fail
                failed += 1
                print(f"FAIL {what}\n  {type(e).__name__}: {str(e).strip()[:2000]}")
    kernels = sorted({s["name"] for s in specs})
    print(f"triton_aot_check: triton {triton.__version__}: {len(specs)} specialization(s) of {len(kernels)} kernel(s) "
          f"({', '.join(kernels)}) x sm_{'/sm_'.join(map(str, ccs))}: {len(specs) * len(ccs) - failed} compiled, "
          f"{failed} failed ({time.time() - t0:.0f}s)")
    return 1 if failed or not specs else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--record", metavar="JSON", help=argparse.SUPPRESS)  # phase 1, run in a subprocess
    ap.add_argument("--from-record", metavar="JSON", help="compile the specializations a test run already recorded "
                    "(FASTDIFF_TRITON_RECORD=JSON pytest ...; scripts/test.sh does this) instead of running the "
                    "Triton tests again")
    ap.add_argument("pytest_args", nargs="*", default=["tests/ops", "-k", "triton"])
    a = ap.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    sys.path.insert(0, os.getcwd())  # as `python -m pytest` does: tests import tests.conftest
    if a.record:
        return record(a.record, a.pytest_args)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if a.from_record:
        if not os.path.exists(a.from_record):
            print(f"triton_aot_check: no record at {a.from_record}")
            return 1
        return _compile_in_subprocess(a.from_record, a.cc, env)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "specs.json")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        rc = subprocess.call([sys.executable, __file__, "--record", path, "--", *a.pytest_args], env=env)
        if rc != 0:
            print(f"triton_aot_check: the interpreter test run failed (pytest exit {rc}); compiling what it launched")
        if not os.path.exists(path):
            return 1
        return _compile_in_subprocess(path, a.cc, env) or (1 if rc not in (0, 5) else 0)


def _compile_in_subprocess(path: str, ccs: list[int], env: dict) -> int:
    """Phase 2 in a fresh process without TRITON_INTERPRET (the real compiler)."""
    return subprocess.call([sys.executable, "-c", "import sys, runpy; sys.argv = sys.argv[1:]; "
                            "sys.exit(runpy.run_path(sys.argv[0], run_name='compile')['compile_all']"
                            "(sys.argv[1], [int(c) for c in sys.argv[2:]]))", __file__, path,
                            *map(str, ccs)], env=env)


if __name__ == "__main__":
    sys.exit(main())
