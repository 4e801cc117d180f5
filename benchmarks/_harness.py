"""The one benchmark harness: what every benchmarks/bench_*.py records, and the side-by-side timer.

    from benchmarks._harness import measure, interleaved

    measure(benchmark, fn, nbytes=3 * x.numel() * x.element_size(), like=x, flops=None, rounds=None, **info)
        Times fn with pytest-benchmark (pedantic: `rounds`, default 10 on CPU / 50 on CUDA, one warm-up; CUDA
        synchronized inside the timed call) and fills benchmark.extra_info with
          bytes      nbytes, the traffic the operation cannot avoid (the bench file states its formula)
          gbs        nbytes / median time, in GB/s (1e9 bytes/s): an effective bandwidth, so ratios of two rows are
                     their speed ratio
          copy_gbs   the copy ceiling: GB/s of `like.clone()` (2 · numel · itemsize bytes) on the same device, timed
                     in this process right after the benchmark, same rounds; of_copy = gbs / copy_gbs
          tflops     flops / median / 1e12, when flops is given
          torch, triton, diffusers, python, device, threads, commit   (environment())
        plus any **info given (shape, dtype, backend, form, ...). Returns fn's result.

    interleaved(fns, rounds=7, device="cpu") -> {name: [seconds per round]}
        The side-by-side timer for ratios on a shared, noisy machine: every round runs each callable once, in an
        order shuffled per round (the form timed right after another can inherit its allocator or cache state).

Used by: bench_attention.py (more to follow; benchmarks/bench_multistep.py may use it: keep this API small).
"""
from __future__ import annotations

import functools
import os
import platform
import random
import statistics
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@functools.lru_cache(maxsize=None)
def environment(device: str = "cuda" if torch.cuda.is_available() else "cpu") -> dict:
    """Versions, device and commit: what a number needs to be reproduced (and compared only with its peers)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return dict(torch=torch.__version__, triton=_version("triton"), diffusers=_version("diffusers"),
                python=platform.python_version(), device=f"{dev.type}: {name}", threads=torch.get_num_threads(),
                commit=commit)


def _median_s(fn, device, rounds: int) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_gbs(like: torch.Tensor, rounds: int = 10) -> float:
    """GB/s of like.clone() (read + write) on like's device: the bandwidth ceiling for a pass over it. Timed anew
    on every call, right after the benchmark it is the ceiling of (the load of a shared machine drifts)."""
    return 2 * like.numel() * like.element_size() / _median_s(like.clone, like.device, rounds) / 1e9


def measure(benchmark, fn, *, nbytes: int, like: torch.Tensor | None = None, flops: int | None = None,
            rounds: int | None = None, **info):
    device = like.device if like is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.device(device).type == "cuda"

    def run():
        out = fn()
        if gpu:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(environment(str(torch.device(device).type)))
    benchmark.extra_info.update(info)
    benchmark.extra_info["bytes"] = int(nbytes)
    out = benchmark.pedantic(run, rounds=rounds or (50 if gpu else 10), warmup_rounds=1, iterations=1)
    med = benchmark.stats.stats.median
    gbs = nbytes / med / 1e9
    benchmark.extra_info["gbs"] = round(gbs, 3)
    if like is not None:
        ceiling = copy_gbs(like, rounds or (50 if gpu else 10))
        benchmark.extra_info["copy_gbs"] = round(ceiling, 3)
        benchmark.extra_info["of_copy"] = round(gbs / ceiling, 3)
    if flops:
        benchmark.extra_info["flops"] = int(flops)
        benchmark.extra_info["tflops"] = round(flops / med / 1e12, 4)
    return out


def interleaved(fns: dict, rounds: int = 7, device="cpu", seed: int = 0) -> dict:
    order = list(fns)
    rng = random.Random(seed)
    times = {k: [] for k in order}
    for f in fns.values():  # warm-up, outside the timing
        f()
    _sync(device)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times
