"""Per-call host cost of dispatch: `_backend.resolve`, and each op's Python wrapper against the raw registered op.

    python benchmarks/bench_dispatch.py [--old-backend PATH] [--loop]   # docs/benchmarks.md, "Dispatch cost"

Tiny tensors (batch 1, 3×8×8) so that the kernel itself costs little and what is timed is the host path. Each
measurement is `timeit` of N calls, repeated in rounds; the implementations are interleaved round by round, so a
loaded machine's slow spells hit all of them alike; reported: the median over rounds of µs per call.
`--old-backend PATH` loads another copy of fastdiff/_backend.py (e.g. `git show REV:fastdiff/_backend.py > PATH`)
as a separate module and times its `resolve` in the same rounds (a before/after comparison in one process).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import timeit

import torch
import torch.nn.functional as F

from fastdiff import _backend
from fastdiff.ops import attention as att
from fastdiff.ops import group_norm_silu as gns
from fastdiff.ops import sampler_step as ss


def cases(old=None):
    cpu = torch.device("cpu")
    x = torch.randn(1, 3, 8, 8)
    o = torch.randn(1, 3, 8, 8)
    coef = torch.tensor(ss.step_coefs("ddim", 0.5, 0.7), dtype=torch.float64)
    flags = 0
    h = torch.randn(1, 32, 8, 8)
    q = torch.randn(1, 1, 64, 32)
    fns = {
        "resolve(sampler_step, auto, cpu)": lambda: _backend.resolve("sampler_step", "auto", cpu),
        "resolve(group_norm_silu, cpp, cpu)": lambda: _backend.resolve("group_norm_silu", "cpp", cpu),
    }
    if old is not None:
        fns["old resolve(sampler_step, auto, cpu)"] = lambda: old.resolve("sampler_step", "auto", cpu)
        fns["old resolve(group_norm_silu, cpp, cpu)"] = lambda: old.resolve("group_norm_silu", "cpp", cpu)
    fns.update({
        "sampler_step wrapper": lambda: ss.sampler_step(x, o, coef),
        "sampler_step raw op": lambda: torch.ops.fastdiff.sampler_step(x, o, None, None, None, None, None, coef,
                                                                       flags, False),
        "group_norm_silu wrapper": lambda: gns.group_norm_silu(h, None, None, 8),
        "group_norm_silu raw op": lambda: torch.ops.fastdiff.group_norm_silu(h, None, None, None, 8, 1e-5, True),
        "attention wrapper": lambda: att.attention(q, q, q),
        "attention raw SDPA": lambda: F.scaled_dot_product_attention(q, q, q),
    })
    return fns


def loop_cases(steps=50):
    """Eager `fastdiff.ddim_sample` at batch 1 with a trivial model, against the bare loop it replaces (the same
    model call and the raw fused op per step, coefficients precomputed): per-step cost of the sampler's host path."""
    import fastdiff
    from fastdiff.ops.multistep import resolve_op
    from fastdiff.run.sampling import plan_for

    x0 = torch.randn(1, 3, 8, 8)

    def model(x, t):
        return x

    plan = plan_for("ddim", None, {}, steps)
    coefs = list(plan.coef_table().unbind(0))
    ts = [torch.full((1,), int(t), dtype=torch.long) for t in plan.timesteps]
    op = resolve_op("cpp")

    def bare():
        x, out = x0, [torch.empty_like(x0), torch.empty_like(x0)]
        for i in range(steps):
            o = model(x, ts[i])
            y = out[i % 2]
            op(x, o, None, [], None, None, None, None, coefs[i], 0, y, None, None)
            x = y
        return x

    return {"ddim_sample (eager, 50 steps)": lambda: fastdiff.ddim_sample(model, steps, x_T=x0),
            "bare model + raw op loop (50 steps)": bare}


def run(fns, rounds=15, number=2000):
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                times[k].append(timeit.timeit(f, number=number) / number * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-backend", help="path of another copy of fastdiff/_backend.py to time side by side")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--loop", action="store_true", help="also time eager ddim_sample against the bare loop")
    args = ap.parse_args()
    old = None
    if args.old_backend:
        spec = importlib.util.spec_from_file_location("fastdiff_old_backend", args.old_backend)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    torch.set_num_threads(1)
    res = run(cases(old), rounds=args.rounds)
    for k, us in res.items():
        print(f"{k:45s} {us:8.3f} µs/call")
    if args.loop:
        res = run(loop_cases(), rounds=args.rounds, number=20)
        for k, us in res.items():
            print(f"{k:45s} {us:8.1f} µs/loop = {us / 50:6.2f} µs/step")


if __name__ == "__main__":
    main()
