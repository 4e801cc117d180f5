"""group_norm_silu (fused, per backend) against eager GroupNorm + SiLU and torch.compile of the same pair.

    pytest benchmarks/bench_group_norm_silu.py --benchmark-only [-k cifar]
    python benchmarks/bench_group_norm_silu.py [--threads 2] [--rounds 9]   # side by side, CPU, see below

Sizes: the DDPM U-Nets' GroupNorm inputs — CIFAR-10 (128 ch × 32², batch 64 on CPU / 256 on GPU), CelebA-HQ first level
(128 ch × 256², batch 1 / 8) and the 512-channel 16² level. 32 groups, eps 1e-6, fp32 and bf16 (fp16 on GPU).
bytes = 2 · numel · itemsize: the minimum traffic (read x, write y) of any implementation, so GB/s compares the three
forms directly (eager GroupNorm + SiLU moves ~2.5× this). On GPU the timed callable synchronizes.
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks._harness import measure
from fastdiff import _backend
from fastdiff.ops.group_norm_silu import group_norm_silu

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
SIZES = {
    "cifar": (256 if GPU else 64, 128, 32, 32),
    "celebahq": (8 if GPU else 1, 128, 256, 256),
    "c512": (64 if GPU else 8, 512, 16, 16),
    "celebahq64": (8 if GPU else 1, 256, 64, 64),
}
DTYPES = [torch.float32, torch.float16 if GPU else torch.bfloat16]
FORMS = ["eager", "compiled", "fused"]


def _sync():
    if GPU:
        torch.cuda.synchronize()


def _eager(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-6))


_compiled = None


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("form", FORMS)
def test_group_norm_silu(benchmark, form, size, dtype, layout):
    global _compiled
    shape = SIZES[size]
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEV, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device=DEV, dtype=dtype)
    b = torch.randn(shape[1], device=DEV, dtype=dtype)
    if form == "eager":
        f = _eager
    elif form == "compiled":
        if _compiled is None:
            _compiled = torch.compile(_eager, dynamic=False)
        f = _compiled
    else:
        backend = _backend.resolve("group_norm_silu", "auto", x.device, ("torch", "triton", "cpp"))
        if backend == "torch":
            pytest.skip("no fused backend available here")
        benchmark.extra_info["backend"] = backend

        def f(x, w, b):
            return group_norm_silu(x, w, b, 32, 1e-6, True, backend=backend)

    f(x, w, b)
    f(x, w, b)
    # extra_info (benchmarks/_harness.py): bytes, gbs, copy_gbs (x.clone()), of_copy, versions, device, commit
    measure(benchmark, lambda: f(x, w, b), nbytes=2 * x.numel() * x.element_size(), like=x,
            shape="x".join(map(str, shape)), form=form, layout=layout)


def side_by_side(threads, rounds, isas=("auto",)):
    """Eager vs fused in one process, interleaved round by round in a shuffled order (so load from other jobs and the
    allocator's state hit every form alike); prints the
    median times and the median of the per-round ratios eager/fused. Each call allocates its output, as in a model.
    isas: builds of the C++ kernels to time side by side (FASTDIFF_CPU_ISA: auto, avx512, avx2, base)."""
    import os
    import random
    import statistics
    import time

    torch.set_num_threads(threads)
    sizes = [(64, 128, 32, 32), (1, 128, 256, 256), (1, 256, 64, 64), (4, 512, 16, 16), (8, 256, 16, 16)]
    print(f"threads {threads}, {rounds} interleaved rounds, 32 groups, eps 1e-6, SiLU, affine; fused builds {isas}")
    print("dtype    shape          layout  eager ms  " + "  ".join(f"{i + ' ms':>10s} {'ratio':>6s}" for i in isas))

    def fused_for(isa):
        def f(x, w, b):
            os.environ["FASTDIFF_CPU_ISA"] = isa
            return group_norm_silu(x, w, b, 32, 1e-6, True, backend="cpp")
        return f

    forms = [("eager", _eager)] + [(isa, fused_for(isa)) for isa in isas]
    rng = random.Random(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in sizes:
            for layout in ("nchw", "channels_last"):
                torch.manual_seed(0)
                x = torch.randn(shape, dtype=dtype)
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
                for name, f in forms[1:]:
                    torch.testing.assert_close(f(x, w, b).float(), _eager(x.float(), w.float(), b.float()),
                                               atol=5e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2)
                times = {name: [] for name, _ in forms}
                for name, f in forms * 2:
                    f(x, w, b)
                order = list(forms)
                for _ in range(rounds):
                    rng.shuffle(order)  # no form always runs right after another (allocator state, caches)
                    for name, f in order:
                        t0 = time.perf_counter()
                        f(x, w, b)
                        times[name].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                cols = []
                for isa in isas:
                    ratio = statistics.median(a / b for a, b in zip(times["eager"], times[isa]))
                    cols.append(f"{med[isa]:10.3f} {ratio:6.2f}")
                print(f"{str(dtype)[6:]:8s} {'x'.join(map(str, shape)):14s} {layout[:7]:7s} {med['eager']:8.3f}  "
                      + "  ".join(cols), flush=True)
    os.environ.pop("FASTDIFF_CPU_ISA", None)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--isa", default="auto", help="comma-separated C++ kernel builds to compare: auto,avx512,avx2,base")
    a = ap.parse_args()
    side_by_side(a.threads, a.rounds, tuple(a.isa.split(",")))
