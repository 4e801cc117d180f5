"""One DDIM step (η = 0, ε-prediction): the fused step (sampler_step, which runs the one fused op
fastdiff::multistep_step_) vs the reference step vs diffusers' DDIMScheduler.step.

    pytest benchmarks/bench_sampler_step.py --benchmark-only [--benchmark-json=out.json]
    python scripts/bench_summary.py out.json      # median time and GB/s per case

Bytes formula (extra_info["bytes"]): the traffic the step cannot avoid, 3·n·s for n elements of s bytes (read x_t and
the model output, write x_prev), the same figure for every implementation, so GB/s is an *effective* bandwidth and
the ratio of two GB/s is their speed ratio. The reference moves ~12 full tensors (x̂0 = (x − b·o)/a: 3 passes,
√ᾱ_p·x̂0 and √(…)·ε̂: 2, the sum: 1, plus casts), diffusers' step about as many. `copy` is x.clone() (2·n·s bytes):
the memory-bandwidth ceiling the fused step is compared with on a GPU (target: ≥ 85 % of it at ≥ 16M elements).
Sizes: 64×3×32×32 up to 4M elements on the CPU, up to 64M on a GPU (fp32 and fp16).
"""
import pytest
import torch

from benchmarks._harness import measure
from fastdiff._backend import resolve
from fastdiff.ops import sampler_step as ss

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(64, 3, 32, 32), (16, 4, 128, 128), (16, 4, 256, 256)]  # 196,608 / 1,048,576 / 4,194,304 elements
if DEV == "cuda":
    SHAPES += [(64, 4, 256, 256), (64, 4, 512, 512)]  # 16,777,216 / 67,108,864
AT, AP = 0.5, 0.7  # ᾱ_t, ᾱ_p of the step
IMPLS = ["fused", "reference", "diffusers", "copy", "fused_noise", "fused_philox"]
# fused_noise / fused_philox: a DDIM η = 1 step adding σ·z from a noise tensor (4·n·s bytes: z is read too) or from
# in-kernel Philox (3·n·s bytes; z is never written or read, but each element costs a Philox4x32-10 + Box-Muller)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _diffusers_step():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sch.set_timesteps(50)
    t = int(sch.timesteps[10])
    return lambda x, o: sch.step(o, t, x, eta=0.0).prev_sample


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sampler_step(benchmark, shape, dtype, impl):
    g = torch.Generator(DEV).manual_seed(0)
    x = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
    o = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
    n, s = x.numel(), x.element_size()
    coef = torch.tensor(ss.step_coefs("ddim", AT, AP), dtype=torch.float64, device=DEV)
    backend = resolve("multistep_step", "auto", x.device)
    if impl == "fused":
        fn = lambda: ss.sampler_step(x, o, coef)  # noqa: E731
    elif impl == "reference":
        fn = lambda: ss.ddim_step_ref(x, o, AT, AP)  # noqa: E731
    elif impl in ("fused_noise", "fused_philox"):
        c1 = torch.tensor(ss.step_coefs("ddim", AT, AP, sigma=ss.ddim_sigma(AT, AP, 1.0)), dtype=torch.float64,
                          device=DEV)
        if impl == "fused_noise":
            z = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
            fn = lambda: ss.sampler_step(x, o, c1, noise=z)  # noqa: E731
        else:
            rng = torch.tensor([1234, 0], device=DEV)
            fn = lambda: ss.sampler_step(x, o, c1, rng=rng)  # noqa: E731
    elif impl == "diffusers":
        step = _diffusers_step()
        fn = lambda: step(x, o)  # noqa: E731
    else:
        fn = x.clone

    fn()
    # extra_info (benchmarks/_harness.py): bytes, gbs, copy_gbs (x.clone()), of_copy, versions, device, commit
    measure(benchmark, fn, nbytes={"copy": 2, "fused_noise": 4}.get(impl, 3) * n * s, like=x, elements=n,
            backend=backend, impl=impl)


def side_by_side(shapes=((16, 4, 128, 128), (16, 4, 256, 256)), dtypes=(torch.float32, torch.float16), rounds=60):
    """Fused vs reference vs diffusers, interleaved round by round (a shared machine's load hits all alike);
    prints min and median per implementation, and reference/fused as min/min and as the median of the per-round
    ratios (each round times the three back to back, so a loaded machine's slow spells mostly cancel)."""
    import statistics
    import time

    step = _diffusers_step()
    for shape in shapes:
        for dtype in dtypes:
            x = torch.randn(shape, device=DEV).to(dtype)
            o = torch.randn(shape, device=DEV).to(dtype)
            coef = torch.tensor(ss.step_coefs("ddim", AT, AP), dtype=torch.float64, device=DEV)
            fns = {"fused": lambda: ss.sampler_step(x, o, coef), "reference": lambda: ss.ddim_step_ref(x, o, AT, AP),
                   "diffusers": lambda: step(x, o)}
            times = {k: [] for k in fns}
            for _ in range(rounds):
                for k, f in fns.items():
                    _sync()
                    t0 = time.perf_counter()
                    f()
                    _sync()
                    times[k].append(time.perf_counter() - t0)
            n, s = x.numel(), x.element_size()
            line = [f"{tuple(shape)} {str(dtype)[6:]} n={n}"]
            for k, ts in times.items():
                mn, md = min(ts), statistics.median(ts)
                line.append(f"{k}: min {mn * 1e3:.3f} ms, median {md * 1e3:.3f} ms ({3 * n * s / md / 1e9:.1f} GB/s)")
            fmin = min(times["fused"])
            paired = {k: statistics.median(r / f for r, f in zip(times[k], times["fused"]))
                      for k in ("reference", "diffusers")}
            line.append(f"reference/fused: {min(times['reference']) / fmin:.1f}x (min/min), "
                        f"{paired['reference']:.1f}x (median of per-round ratios); diffusers/fused: "
                        f"{min(times['diffusers']) / fmin:.1f}x (min/min), {paired['diffusers']:.1f}x (median ratio)")
            print("\n  ".join(line))


def ddim_ddpm_ratio(shapes=((16, 4, 128, 128),), dtypes=(torch.float32, torch.float16, torch.bfloat16), rounds=40):
    """reference/fused for DDIM and DDPM steps, interleaved round by round: min/min and the median of per-round
    ratios. Uses only the public fastdiff.ops.sampler_step API, so the same function times an older checkout
    (PYTHONPATH=<checkout>).

    Cases: DDIM η = 0; DDIM η = 0 with classifier-free guidance (o_cond, w = 7.5; the reference guides in PyTorch
    first); DDIM η = 1 with a noise tensor z; DDIM η = 1 with in-kernel Philox z (the reference is given the same z
    as a tensor, so it is not charged for drawing it); DDPM fixed_small + z; DDPM learned_range + z (σ per element
    from v). All but the last run the C++ kernel's linear path (csrc/cpu/multistep.cpp linear_tiles: no d buffer);
    "general" times the same call with FASTDIFF_CPU_LINEAR=0 (the general tile path, as before the linear path), in
    the same rounds, so "general/fused" is the linear path's gain measured side by side."""
    import os
    import statistics
    import time

    def timed(f, linear):
        os.environ["FASTDIFF_CPU_LINEAR"] = "1" if linear else "0"
        _sync()
        t0 = time.perf_counter()
        f()
        _sync()
        return time.perf_counter() - t0

    w = 7.5
    s1 = ss.ddim_sigma(AT, AP, 1.0)
    try:
        for shape in shapes:
            for dtype in dtypes:
                g = torch.Generator(DEV).manual_seed(0)
                x, o, oc, z = (torch.randn(shape, generator=g, device=DEV).to(dtype) for _ in range(4))
                v = (torch.rand(shape, generator=g, device=DEV) * 2 - 1).to(dtype)
                rng = torch.tensor([1234, 0], device=DEV)
                zp = ss._philox_like(x, rng).to(dtype)  # the Philox z, for the reference

                def row(*a, **kw):
                    return torch.tensor(ss.step_coefs(*a, **kw), dtype=torch.float64, device=DEV)

                cd, cw = row("ddim", AT, AP), row("ddim", AT, AP, guidance_scale=w)
                c1 = row("ddim", AT, AP, sigma=s1)
                cs = row("ddpm", AT, AP, variance_type="fixed_small")
                cp = row("ddpm", AT, AP, variance_type="learned_range")
                cases = {
                    "DDIM η=0": (lambda: ss.sampler_step(x, o, cd), lambda: ss.ddim_step_ref(x, o, AT, AP)),
                    "DDIM η=0 CFG": (lambda: ss.sampler_step(x, o, cw, o_cond=oc),
                                     lambda: ss.ddim_step_ref(x, (o.float() + w * (oc.float() - o.float())).to(dtype),
                                                              AT, AP)),
                    "DDIM η=1 + z": (lambda: ss.sampler_step(x, o, c1, noise=z),
                                     lambda: ss.ddim_step_ref(x, o, AT, AP, eta=1.0, noise=z)),
                    "DDIM η=1 Philox": (lambda: ss.sampler_step(x, o, c1, rng=rng),
                                        lambda: ss.ddim_step_ref(x, o, AT, AP, eta=1.0, noise=zp)),
                    "DDPM fixed_small + z": (lambda: ss.sampler_step(x, o, cs, noise=z),
                                             lambda: ss.ddpm_step_ref(x, o, AT, AP, noise=z)),
                    "DDPM learned_range + z": (
                        lambda: ss.sampler_step(x, o, cp, noise=z, v=v, var_mode="learned_range"),
                        lambda: ss.ddpm_step_ref(x, o, AT, AP, noise=z, v=v, variance_type="learned_range")),
                }
                for name, (fused, ref) in cases.items():
                    fused(), ref()
                    times = {"fused": [], "general": [], "reference": []}
                    for _ in range(rounds):
                        times["fused"].append(timed(fused, True))
                        times["general"].append(timed(fused, False))
                        times["reference"].append(timed(ref, True))
                    md = {k: statistics.median(ts) for k, ts in times.items()}

                    def ratio(a, b):
                        return statistics.median(p / q for p, q in zip(times[a], times[b]))  # noqa: B023

                    print(f"{name} {tuple(shape)} {str(dtype)[6:]}: median fused {md['fused'] * 1e3:.3f} ms, "
                          f"general {md['general'] * 1e3:.3f} ms, reference {md['reference'] * 1e3:.3f} ms; "
                          f"reference/fused {ratio('reference', 'fused'):.2f}x, reference/general "
                          f"{ratio('reference', 'general'):.2f}x, general/fused {ratio('general', 'fused'):.2f}x "
                          f"(medians of per-round ratios); min/min reference/fused "
                          f"{min(times['reference']) / min(times['fused']):.2f}x", flush=True)
    finally:
        os.environ.pop("FASTDIFF_CPU_LINEAR", None)


if __name__ == "__main__":  # python benchmarks/bench_sampler_step.py: the side-by-side table for docs/benchmarks.md
    import sys

    if "--ddim-ddpm" in sys.argv:  # the "one fused op" figures of docs/benchmarks.md
        ddim_ddpm_ratio()
    else:
        side_by_side()
