"""Per-step cost of every fused solver against diffusers' `scheduler.step`, and the sampling loop at the memory limit.

    pytest benchmarks/bench_solvers.py --benchmark-only        # pytest-benchmark rows (extra_info: bytes, GB/s)
    python benchmarks/bench_solvers.py                         # side by side, interleaved: ratios, and the 16M loop

One step = the update after the model call, in steady state (a mid-loop step with the multistep history filled):
fastdiff's `Loop.body` with a model that returns a fixed tensor (so the model costs nothing) against diffusers'
`step(model_output, t, sample)` at the same step index. Bytes are the fused op's traffic (x, o, the history read,
the outputs written), so GB/s is its effective bandwidth; diffusers' step moves several times more.
"""
from __future__ import annotations

import statistics

import pytest
import torch

import fastdiff

try:
    from benchmarks._harness import interleaved, measure
except ImportError:  # run as a script: python benchmarks/bench_solvers.py
    from _harness import interleaved, measure
from fastdiff import samplers as S
from fastdiff.run.loop import Loop

SHAPES = [(64, 3, 32, 32), (16, 4, 128, 128)]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SOLVERS = {  # fastdiff sampler -> (diffusers class, config)
    "dpmsolver++": ("DPMSolverMultistepScheduler", {}),
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
STEPS, AT = 20, 10  # a 20-step schedule, timed at step 10 (Heun: call 10 of 39)


def fastdiff_step(sampler, shape):
    """(a callable doing one steady-state step, bytes it moves)."""
    cls, cfg = SOLVERS[sampler]
    diffusers = pytest.importorskip("diffusers")
    sch = getattr(diffusers, cls)(**cfg)
    plan = S.build_plan(sampler, fastdiff.NoiseSchedule.from_diffusers(sch), STEPS,
                        S.solver_options(sampler, dict(sch.config), {}))
    x = torch.randn(shape, device=DEV)
    o = torch.randn(shape, device=DEV)
    from fastdiff._backend import resolve

    loop = Loop(plan, lambda x, t: o, x, resolve("multistep_step", "auto", x.device))
    loop.draw = lambda i, s, dt: torch.randn(s, dtype=dt, device=DEV)
    xs = loop.start(x)
    for i in range(AT):  # fill the history
        xs, _ = loop.body(i, xs)
    c = plan.calls[AT]
    n_tensors = 2 + len(c.reads) + 1 + (c.y2_slot is not None) + (c.d_slot is not None) + c.noise
    return (lambda: loop.body(AT, xs)), n_tensors * x.numel() * x.element_size()


def diffusers_step(sampler, shape):
    cls, cfg = SOLVERS[sampler]
    diffusers = pytest.importorskip("diffusers")
    sch = getattr(diffusers, cls)(**cfg)
    sch.set_timesteps(STEPS, device=DEV)
    x = torch.randn(shape, device=DEV) * sch.init_noise_sigma
    o = torch.randn(shape, device=DEV)
    g = torch.Generator(DEV).manual_seed(0)
    kw = {"generator": g} if cls in ("DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler") else {}
    for t in sch.timesteps[:AT]:
        x = sch.step(o, t, x, **kw).prev_sample
    state = dict(sch.__dict__)
    t = sch.timesteps[AT]

    def step():
        sch.__dict__.update(state)  # back to step AT (the same history), then one step
        if hasattr(sch, "model_outputs"):
            sch.model_outputs = list(state["model_outputs"])
        if hasattr(sch, "ets"):
            sch.ets = list(state["ets"])
        return sch.step(o, t, x, **kw).prev_sample

    return step


@pytest.mark.parametrize("shape", SHAPES, ids=["64x3x32x32", "16x4x128x128"])
@pytest.mark.parametrize("impl", ["fastdiff", "diffusers"])
@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_solver_step(benchmark, sampler, impl, shape):
    pytest.importorskip("diffusers")
    if DEV == "cpu" and not fastdiff.backends()["cpp"]["available"]:
        pytest.skip("needs fastdiff._C")
    fn, nbytes = fastdiff_step(sampler, shape)
    if impl == "diffusers":
        fn = diffusers_step(sampler, shape)
    # extra_info (benchmarks/_harness.py): bytes (the fused op's traffic), gbs, copy ceiling, versions, device, commit;
    # 20 rounds: bounded, so the GPU check's budget holds
    measure(benchmark, fn, nbytes=nbytes, like=torch.empty(shape, device=DEV), rounds=20, sampler=sampler,
            impl=impl, shape=list(shape))


def side_by_side(rounds=15):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {rounds} interleaved rounds")
    for shape in SHAPES:
        for sampler in SOLVERS:
            fd, nbytes = fastdiff_step(sampler, shape)
            ts = interleaved({"fastdiff": fd, "diffusers": diffusers_step(sampler, shape)}, rounds)
            a, b = statistics.median(ts["fastdiff"]), statistics.median(ts["diffusers"])
            ratio = statistics.median(d / f for f, d in zip(ts["fastdiff"], ts["diffusers"]))
            print(f"{'x'.join(map(str, shape)):14s} {sampler:16s} fastdiff {a * 1e3:7.3f} ms ({nbytes / a / 1e9:5.1f} "
                  f"GB/s)  diffusers {b * 1e3:7.3f} ms  diffusers/fastdiff {ratio:5.2f}x")
    memory_limit_loop(rounds=5)


def memory_limit_loop(n=16 * 1024 * 1024, steps=(10, 30), rounds=5):
    """The DDIM loop (and DPM-Solver++ 2M) at n fp32 elements with a model that returns a fixed tensor: the per-step
    time (difference of two step counts: fixed costs cancel) against torch.add(x, o, alpha=c, out=buf), which moves
    the same 3 tensors as a DDIM step (2 reads, 1 write). Ratio = add time / step time (1.0 = at the add's limit)."""
    x = torch.randn(16, 4, 512, 512)[: max(1, n // (4 * 512 * 512))]
    o = torch.randn_like(x)
    buf = torch.empty_like(x)
    model = lambda x, t: o  # noqa: E731
    forms = {"add": lambda: torch.add(x, o, alpha=0.5, out=buf)}
    for s in steps:
        forms[f"ddim{s}"] = lambda s=s: fastdiff.ddim_sample(model, s, x_T=x)
        forms[f"dpm{s}"] = lambda s=s: fastdiff.sample(model, s, sampler="dpmsolver++", x_T=x)
    ts = {k: min(v) for k, v in interleaved(forms, rounds).items()}
    add = ts["add"]
    nbytes = 3 * x.numel() * x.element_size()
    print(f"{x.numel() / 2**20:.0f}M fp32: torch.add {add * 1e3:.1f} ms ({nbytes / add / 1e9:.1f} GB/s)")
    for name, passes in (("ddim", 3), ("dpm", 5)):
        per = (ts[f"{name}{steps[1]}"] - ts[f"{name}{steps[0]}"]) / (steps[1] - steps[0])
        print(f"  {name} step {per * 1e3:.1f} ms = {passes * x.numel() * 4 / per / 1e9:.1f} GB/s; add/step = "
              f"{add / per:.2f} (the step moves {passes} tensors, the add 3)")
    x_keep = x.clone()
    fastdiff.ddim_sample(model, 3, x_T=x)
    assert torch.equal(x, x_keep), "x_T was modified"


def host_overhead(N=100, rounds=7):
    """Host cost per step at batch 1 with a trivial model, 1 thread: the loop body alone, a bare model + raw op loop,
    and the whole ddim_sample call (plan, coefficient table and buffers included), per step."""
    from fastdiff.run import sampling

    torch.set_num_threads(1)
    x = torch.randn(1, 3, 32, 32)
    model = lambda x, t: x  # noqa: E731
    from fastdiff.ops.multistep import resolve_op

    plan = sampling.plan_for("ddim", None, {}, N)
    rows = list(plan.coef_table().unbind(0))
    op, t = resolve_op("cpp"), torch.zeros(1, dtype=torch.long)

    def bare():
        a, b = x.clone(), torch.empty_like(x)
        for i in range(N):
            o = model(a, t)
            op(a, o, None, [], None, None, None, None, rows[i], 0, b, None, None)
            a, b = b, a

    loop = Loop(plan, model, x, "cpp")

    def body():
        xs = loop.start(x)
        for i in range(N):
            xs, _ = loop.body(i, xs)

    ts = {k: min(v) for k, v in interleaved({"bare model + op": bare, "loop body": body,
                                              "ddim_sample": lambda: fastdiff.ddim_sample(model, N, x_T=x)},
                                             rounds).items()}
    for k, v in ts.items():
        print(f"{k}: {v / N * 1e6:.1f} us/step")


if __name__ == "__main__":
    import sys

    host_overhead() if "--host" in sys.argv else side_by_side()
