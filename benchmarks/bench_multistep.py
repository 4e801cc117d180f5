"""The fused multistep update vs its plain-PyTorch reference, for two solver shapes.

    pytest benchmarks/bench_multistep.py --benchmark-only [--benchmark-json=out.json]
    python scripts/bench_summary.py out.json      # median time and GB/s per case
    python benchmarks/bench_multistep.py          # side by side, interleaved (the docs/benchmarks.md table)

Calls (per model call of the solver, coefficients from a table row; the numbers are arbitrary but nonzero):
  dpmpp2m: DPM-Solver++(2M)-shaped: reads x, o and one history tensor, writes out and d_out (the new x̂0): 5 passes.
  unipc3:  UniPC-3-shaped: reads x, o and four history tensors, writes out and out2 (predictor and corrected
           sample): 8 passes.
  ddpm_lr: DDPM with learned_range variances: reads x, o, a noise tensor z and the variance output v (σ per element
           from v), writes out and d_out in float32 (x̂0): 5 passes of x's size plus the float32 d_out (counted as
           one more pass for fp32).
  ddim:    DDIM-shaped (no history, d_out, clip or learned σ): reads x, o, writes out: 3 passes. The C++ kernel's
           linear path (csrc/cpu/multistep.cpp linear_tiles, no d buffer).
  ddim_cfg_z: the same with classifier-free guidance (o_cond) and a noise tensor z (DDIM η > 0 / DDPM fixed
           variance): reads x, o, o_cond, z, writes out: 5 passes. Linear path.
"general" (side_by_side, C++ backend): the fused call with FASTDIFF_CPU_LINEAR=0, the general tile path, timed in the
same rounds (equal to "fused" for the calls that are not linear).
Bytes formula (extra_info["bytes"]): passes · n · s for n elements of s bytes, the traffic the update cannot avoid;
the same figure for every implementation, so GB/s is an effective bandwidth and the ratio of two GB/s is their speed
ratio. extra_info["copy_gbps"]: buf.copy_(x) (2 passes) timed in the same process right after: the machine's copy
ceiling; "of_copy" = gbps / copy_gbps. The reference materialises every term (~3 passes per term).
"""
import os
import statistics
import sys
import time

import pytest
import torch

from fastdiff._backend import resolve
from fastdiff.ops import multistep as ms

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(64, 3, 32, 32), (16, 4, 128, 128)]  # 196,608 / 1,048,576 elements
CALLS = {
    "dpmpp2m": dict(nh=1, out2=False, d_out=True, passes=5,
                    coef=ms.coef_row(p=1.3, q=-0.4, yx=0.9, yd=0.3, yh0=-0.2)),
    "unipc3": dict(nh=4, out2=True, d_out=False, passes=8,
                   coef=ms.coef_row(p=1.3, q=-0.4, yx=0.9, yd=0.3, yh0=-0.2, yh1=0.1, yh2=0.05, yh3=-0.02,
                                    y2x=0.9, y2d=0.25, y2h0=-0.1, y2h1=0.05, y2h2=0.02, y2h3=-0.01)),
    "ddpm_lr": dict(nh=0, out2=False, d_out=True, passes=6, var_mode="learned_range",
                    coef=ms.coef_row(p=1.3, q=-0.4, yx=0.9, yd=0.3, logmax=-3.9, logmin=-5.2)),
    "ddim": dict(nh=0, out2=False, d_out=False, passes=3, coef=ms.coef_row(p=1.3, q=-0.4, yx=0.9, yd=0.3)),
    "ddim_cfg_z": dict(nh=0, out2=False, d_out=False, passes=5, cfg=True, noise=True,
                       coef=ms.coef_row(p=1.3, q=-0.4, w=7.5, yx=0.9, yd=0.3, yz=0.2)),
}


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _setup(shape, dtype, call):
    g = torch.Generator(DEV).manual_seed(0)
    c = CALLS[call]
    x, o, *hist = (torch.randn(shape, generator=g, device=DEV, dtype=dtype) for _ in range(2 + c["nh"]))
    coef = torch.tensor(c["coef"], dtype=torch.float64, device=DEV)
    out = torch.empty_like(x)
    out2 = torch.empty_like(x) if c["out2"] else None
    var_mode = c.get("var_mode", "scalar")
    z = v = oc = None
    if c.get("cfg"):
        oc = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
    if c.get("noise"):
        z = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
    if var_mode != "scalar":  # the noise tensor and the variance output; x̂0 kept in float32
        z = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
        v = (torch.rand(shape, generator=g, device=DEV) * 2 - 1).to(dtype)
    d_out = torch.empty_like(x, dtype=torch.float32 if var_mode != "scalar" else dtype) if c["d_out"] else None
    fused = ms.resolve_op("auto", x.device)  # the raw op, as the sampling loop calls it after one check
    flags = ms.VAR_MODES[var_mode]

    def run_fused():
        fused(x, o, oc, hist, z, None, v, None, coef, flags, out, out2, d_out)

    def run_general():
        os.environ["FASTDIFF_CPU_LINEAR"] = "0"
        try:
            run_fused()
        finally:
            os.environ.pop("FASTDIFF_CPU_LINEAR")

    def run_ref():
        return ms.multistep_ref(x, o, coef, o_cond=oc, hist=hist, noise=z, v=v, var_mode=var_mode, want_out2=c["out2"],
                                d_dtype=None if d_out is None else d_out.dtype)

    buf = torch.empty_like(x)
    return dict(fused=run_fused, general=run_general, reference=run_ref, copy=lambda: buf.copy_(x)), x


def _median_time(fn, rounds=15):
    ts = []
    for _ in range(rounds):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_multistep(benchmark, shape, call, impl):
    fns, x = _setup(shape, torch.float32, call)
    fn = fns[impl]

    def run():
        out = fn()
        _sync()
        return out

    run()
    benchmark(run)
    n, s = x.numel(), x.element_size()
    nbytes = CALLS[call]["passes"] * n * s
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    copy_gbps = 2 * n * s / _median_time(fns["copy"]) / 1e9
    benchmark.extra_info.update(bytes=nbytes, elements=n, gbps=round(gbps, 2), copy_gbps=round(copy_gbps, 2),
                                of_copy=round(gbps / copy_gbps, 3), backend=resolve("multistep_step", "auto", x.device),
                                threads=torch.get_num_threads(),
                                device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu")


def side_by_side(shapes=SHAPES + [(64, 4, 256, 256)], rounds=40, dtypes=(torch.float32,), calls=tuple(CALLS)):
    """Fused vs general vs reference vs copy (and torch.add(x, o, alpha=c, out=buf), 3 passes) interleaved round by
    round; prints medians, GB/s and the median of the per-round reference/fused ratios. (64, 4, 256, 256) is 16M elements:
    the sampling loop's memory-limit case."""
    for shape, dtype, call in ((s, d, c) for s in shapes for d in dtypes for c in calls):
        fns, x = _setup(shape, dtype, call)
        o, buf = torch.randn_like(x), torch.empty_like(x)
        fns["add"] = lambda: torch.add(x, o, alpha=0.3, out=buf)  # noqa: B023
        passes = dict(fused=CALLS[call]["passes"], general=CALLS[call]["passes"], reference=CALLS[call]["passes"],
                      copy=2, add=3)
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                _sync()
                t0 = time.perf_counter()
                f()
                _sync()
                times[k].append(time.perf_counter() - t0)
        n, s = x.numel(), x.element_size()
        line = [f"{call} {tuple(shape)} {str(dtype)[6:]} n={n} threads={torch.get_num_threads()}"]
        for k, ts in times.items():
            md = statistics.median(ts)
            line.append(f"{k}: median {md * 1e3:.3f} ms, min {min(ts) * 1e3:.3f} ms, "
                        f"{passes[k] * n * s / md / 1e9:.1f} GB/s")
        mins = {k: min(ts) for k, ts in times.items()}
        line.append(f"min-based: reference/fused {mins['reference'] / mins['fused']:.2f}x; fused GB/s / copy GB/s "
                    f"{passes['fused'] / mins['fused'] / (2 / mins['copy']):.2f}; fused GB/s / torch.add GB/s "
                    f"{passes['fused'] / mins['fused'] / (3 / mins['add']):.2f} (on a loaded machine the medians "
                    f"include preemptions of ~4 ms)")
        ratio = statistics.median(r / f for r, f in zip(times["reference"], times["fused"]))
        ratio_g = statistics.median(r / f for r, f in zip(times["reference"], times["general"]))
        gain = statistics.median(g / f for g, f in zip(times["general"], times["fused"]))
        of_copy = statistics.median((passes["fused"] / f) / (2 / c) for f, c in zip(times["fused"], times["copy"]))
        of_add = statistics.median((passes["fused"] / f) / (3 / a) for f, a in zip(times["fused"], times["add"]))
        line.append(f"reference/fused {ratio:.2f}x, reference/general {ratio_g:.2f}x, general/fused {gain:.2f}x; "
                    f"fused GB/s / copy GB/s {of_copy:.2f}; "
                    f"fused GB/s / torch.add GB/s {of_add:.2f} (medians of per-round ratios)")
        print("\n  ".join(line), flush=True)


if __name__ == "__main__":
    # python benchmarks/bench_multistep.py [--dtypes fp32,fp16,bf16] [--calls ddim,ddim_cfg_z] [--shapes 16x4x128x128]
    def _opt(name, default):
        return sys.argv[sys.argv.index(name) + 1].split(",") if name in sys.argv else default

    _dt = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)
    _shapes = [tuple(int(v) for v in s.split("x")) for s in _opt("--shapes", [])]
    side_by_side(shapes=_shapes or SHAPES + [(64, 4, 256, 256)], rounds=int(_opt("--rounds", ["40"])[0]),
                 dtypes=[_dt[d] for d in _opt("--dtypes", ["fp32"])], calls=_opt("--calls", list(CALLS)))
