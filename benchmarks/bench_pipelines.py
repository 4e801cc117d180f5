"""diffusers pipelines on fastdiff (issue 14): per-step scheduler cost and kernels per step, fastdiff.diffusers'
classes against diffusers' own; tiny pipelines end to end; the CPU compile option.

    pytest benchmarks/bench_pipelines.py --benchmark-only          # per-step cost, pytest-benchmark table
    python benchmarks/bench_pipelines.py [--rounds R] [--threads T] [--shape 1,4,64,64] [--compile]

The side-by-side mode (the figures in docs/benchmarks.md) times both implementations in one process, interleaved
round by round (the order shuffled each round), and reports medians and the ratio diffusers/fastdiff, so that the
load of a shared machine hits both alike. "Per step" is a whole N-step loop (scale_model_input + step, fixed
model outputs, N = 20) divided by N; kernels per step are the aten ops torch.profiler records at the top level of one
step (excluding views and empty allocations), the same counting for both.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 20
CLASSES = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler", "PNDMScheduler"]
SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
VIEWS = {"aten::view", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::select", "aten::slice",
         "aten::as_strided", "aten::reshape", "aten::expand", "aten::unsqueeze", "aten::lift_fresh", "aten::detach",
         "aten::alias", "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg"}


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _scheduler(lib: str, name: str):
    import diffusers

    mod = diffusers if lib == "diffusers" else __import__("fastdiff.diffusers", fromlist=["x"])
    cfg = dict(SD_CONFIG)
    if name == "PNDMScheduler":
        cfg["skip_prk_steps"] = True  # Stable Diffusion's PNDM setting
    if name in ("DDIMScheduler", "DDPMScheduler"):
        cfg["clip_sample"] = False
    return getattr(mod, name)(**cfg)


def _loop(sched, x0, outs, generator, set_timesteps=True):
    """One sampling loop over fixed model outputs: scale_model_input + step per timestep → last sample."""
    if set_timesteps:
        sched.set_timesteps(STEPS, device=x0.device)
    x = x0
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(x, t)
        kw = {"generator": generator} if "generator" in sched.step.__code__.co_varnames else {}
        x = sched.step(outs[i % len(outs)], t, x, return_dict=False, **kw)[0]
    return x


def _inputs(shape):
    g = torch.Generator(DEV).manual_seed(0)
    x = torch.randn(shape, generator=g, device=DEV)
    outs = [torch.randn(shape, generator=g, device=DEV) for _ in range(4)]
    return x, outs


@pytest.mark.parametrize("lib", ["diffusers", "fastdiff"])
@pytest.mark.parametrize("name", CLASSES)
def test_scheduler_loop(benchmark, name, lib):
    pytest.importorskip("diffusers")
    x, outs = _inputs((1, 4, 64, 64))
    sched = _scheduler(lib, name)
    benchmark.extra_info["steps"] = STEPS

    def run():
        _loop(sched, x, outs, torch.Generator(DEV).manual_seed(1))
        _sync()
    benchmark(run)


def kernels_per_step(lib: str, name: str, shape=(1, 4, 64, 64)) -> float:
    """Mean number of top-level aten ops per step (scale_model_input + step) that launch work, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    x, outs = _inputs(shape)
    sched = _scheduler(lib, name)
    _loop(sched, x, outs, torch.Generator(DEV).manual_seed(1))  # warm-up (first-call caches)
    sched.set_timesteps(STEPS, device=x.device)
    g = torch.Generator(DEV).manual_seed(1)
    xs = x
    n = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, t in enumerate(sched.timesteps):
            sched.scale_model_input(xs, t)
            kw = {"generator": g} if "generator" in sched.step.__code__.co_varnames else {}
            xs = sched.step(outs[i % 4], t, xs, return_dict=False, **kw)[0]
            n += 1
    top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith(("aten::", "fastdiff::"))
           and e.name not in VIEWS]
    return len(top) / n


def _timed(fn, reps=1):
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


def side_by_side(shape, rounds: int):
    rows = []
    for name in CLASSES:
        x, outs = _inputs(shape)
        impls = {lib: _scheduler(lib, name) for lib in ("diffusers", "fastdiff")}
        times = {lib: [] for lib in impls}
        for lib, s in impls.items():  # warm-up
            _loop(s, x, outs, torch.Generator(DEV).manual_seed(1))
        sets = {lib: [] for lib in impls}
        for _ in range(rounds):
            order = list(impls)
            random.shuffle(order)
            for lib in order:
                s = impls[lib]
                sets[lib].append(_timed(lambda: s.set_timesteps(STEPS, device=x.device)))
                g = torch.Generator(DEV).manual_seed(1)
                times[lib].append(_timed(lambda: _loop(s, x, outs, g, set_timesteps=False)) / STEPS)
        med = {lib: statistics.median(v) * 1e6 for lib, v in times.items()}
        st = {lib: statistics.median(v) * 1e6 for lib, v in sets.items()}
        k = {lib: kernels_per_step(lib, name, shape) for lib in impls}
        rows.append((name, med["diffusers"], med["fastdiff"], med["diffusers"] / med["fastdiff"], k["diffusers"],
                     k["fastdiff"], st["diffusers"], st["fastdiff"]))
    print(f"\nper-step scheduler cost, latents {tuple(shape)} fp32 on {DEV}, {STEPS}-step loops, median of {rounds} "
          f"interleaved rounds, torch threads {torch.get_num_threads()}")
    print("| scheduler | diffusers µs/step | fastdiff µs/step | ratio | kernels/step diffusers | fastdiff | "
          "set_timesteps µs diffusers | fastdiff (repeat call) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.2f}x | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.0f} | {r[7]:.0f} |")
    return rows


def pipelines_end_to_end(rounds: int, steps: int = 20):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "diffusers"))
    import diffusers as hf
    import tiny_pipes as tp

    import fastdiff.diffusers as fd
    import fastdiff.optimize

    cases = []
    for cls in ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDIMScheduler"):
        base = tp.sd_pipe()
        cfg = base.scheduler.config
        p_hf = tp.sd_pipe()
        p_hf.scheduler = getattr(hf, cls).from_config(cfg)
        p_fd = tp.sd_pipe()
        p_fd.scheduler = getattr(fd, cls).from_config(cfg)
        p_opt = tp.sd_pipe()
        for n in ("unet", "vae", "text_encoder"):
            setattr(p_opt, n, copy.deepcopy(getattr(p_opt, n)))
        p_opt.scheduler = getattr(hf, cls).from_config(cfg)
        fastdiff.optimize(p_opt)
        kw = dict(num_inference_steps=steps, height=tp.SD_SIZE, width=tp.SD_SIZE, output_type="latent")
        cases.append((f"tiny SD text2img, {cls}", {"diffusers": p_hf, "fastdiff scheduler": p_fd,
                                                   "fastdiff.optimize": p_opt},
                      lambda p: p("a tiny photo", generator=torch.Generator().manual_seed(0), **kw)))
    for cls in ("DDPMScheduler", "DDIMScheduler"):
        pipes = {}
        for label in ("diffusers", "fastdiff scheduler", "fastdiff.optimize"):
            p = tp.unet_pipe("ddpm", hf.DDPMScheduler())
            p.unet = copy.deepcopy(p.unet)
            p.scheduler = getattr(fd if label == "fastdiff scheduler" else hf, cls).from_config(p.scheduler.config)
            if label == "fastdiff.optimize":
                fastdiff.optimize(p)
            pipes[label] = p
        cases.append((f"tiny UNet2DModel DDPMPipeline, {cls}", pipes,
                      lambda p: p(batch_size=4, generator=torch.Generator().manual_seed(0),
                                  num_inference_steps=steps, output_type="np")))
    print(f"\ntiny pipelines end to end ({steps} steps, CPU, torch threads {torch.get_num_threads()}), ms per call, "
          f"median of {rounds} interleaved rounds")
    print("| pipeline | diffusers | fastdiff scheduler | fastdiff.optimize | ratio (diffusers / optimize) |")
    print("|---|---:|---:|---:|---:|")
    for label, pipes, call in cases:
        with torch.no_grad():
            for p in pipes.values():
                call(p)
            times = {k: [] for k in pipes}
            for _ in range(rounds):
                order = list(pipes)
                random.shuffle(order)
                for k in order:
                    times[k].append(_timed(lambda: call(pipes[k])) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {label} | {med['diffusers']:.1f} | {med['fastdiff scheduler']:.1f} | {med['fastdiff.optimize']:.1f} "
              f"| {med['diffusers'] / med['fastdiff.optimize']:.2f}x |")


def cifar_compile(rounds: int):
    """The CIFAR-10 DDPM U-Net (google/ddpm-cifar10-32's config, random weights), batch 1 fp32: diffusers eager,
    fastdiff.optimize (fused GroupNorm+SiLU), and optimize(compile=True) (inductor with weight freezing)."""
    from diffusers import UNet2DModel

    import fastdiff.optimize

    torch.manual_seed(0)
    cfg = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
               block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    eager = UNet2DModel(**cfg).eval()
    fused = copy.deepcopy(eager)
    fastdiff.optimize(fused)
    comp = copy.deepcopy(eager)
    t0 = time.perf_counter()
    fastdiff.optimize(comp, compile=True)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with torch.no_grad():
        y_ref = eager(x, t).sample
        y_c = comp(x, t).sample
        compile_s = time.perf_counter() - t0
        err = float((y_c - y_ref).abs().max() / y_ref.abs().max())
        models = {"diffusers eager": eager, "optimize": fused, "optimize(compile=True)": comp}
        times = {k: [] for k in models}
        for _ in range(rounds):
            order = list(models)
            random.shuffle(order)
            for k in order:
                times[k].append(_timed(lambda: models[k](x, t), reps=3) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nCIFAR-10 U-Net batch 1 fp32 on CPU, torch threads {torch.get_num_threads()}, ms per forward, median of "
          f"{rounds} interleaved rounds (3 calls each); compile + first call {compile_s:.0f} s; compiled vs eager "
          f"max error {err:.1e} of max|y|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {med['diffusers eager'] / v:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shape", default="1,4,64,64")
    ap.add_argument("--compile", action="store_true", help="also time the CIFAR U-Net with optimize(compile=True)")
    ap.add_argument("--no-pipelines", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    random.seed(0)
    side_by_side(tuple(int(s) for s in a.shape.split(",")), a.rounds)
    if not a.no_pipelines:
        pipelines_end_to_end(a.rounds)
    if a.compile:
        cifar_compile(a.rounds)


if __name__ == "__main__":
    main()
