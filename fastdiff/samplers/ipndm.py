"""iPNDM: the improved pseudo-numerical multistep method (Zhang & Chen 2023, DEIS, arXiv 2204.13902, §5 and App. B;
the Adams–Bashforth weights of PNDM's PLMS, Liu et al. 2022, eq. 12).

In the variance-exploding scale x̄ = x/α the probability-flow ODE of an ε-prediction model is dx̄/dσ = ε̂(x, t)
(σ = √((1 − ᾱ)/ᾱ); the DDIM step is exactly its Euler step). iPNDM advances x̄ with the linear-multistep
combination of the last k model outputs and fixed Adams–Bashforth weights,

    x̄_{i+1} = x̄_i + (σ_{i+1} − σ_i)·E_k,   E_1 = ε_0,   E_2 = (3ε_0 − ε_1)/2,   E_3 = (23ε_0 − 16ε_1 + 5ε_2)/12,
    E_4 = (55ε_0 − 59ε_1 + 37ε_2 − 9ε_3)/24            (ε_0 the newest),

with k = min(order, i + 1): the warm-up uses the lower orders and no extra model calls (PNDM spends three extra calls
per warm-up step on a Runge–Kutta start). The weights are the fixed-step ones on any grid, as DEIS and GITS (Chen et
al. 2024) use them, so on a non-uniform grid the method is of 2nd order globally (measured on the exact mixture:
error ∝ calls^−2.0, DDIM's ∝ calls^−1.0, tests/schedule/test_grids.py), with a small constant; its final step to
σ = 0 is of full order too. Default order 3: on the bundled model it beats order 4 at every budget from 6 to 14
calls (docs/benchmarks.md). One model call per step; the state is kept in the
model's input scale x = α·x̄, so a step is one row of the fused op: x_{i+1} = (α_{i+1}/α_i)·x + α_{i+1}(σ_{i+1} − σ_i)·E.

No diffusers scheduler computes this on a VP model (diffusers' IPNDMScheduler is a different, VE-only variant), so
its default grid is fastdiff's own choice (`DEFAULT_GRID`); a grid given as data (timesteps=, time_grid=, a
calibrated grid) replaces it.
"""
from __future__ import annotations

import torch

from fastdiff import prediction
from fastdiff.samplers import dpm_solver
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder

DEFAULTS = dict(solver_order=3, prediction_type="epsilon")  # 3: measured better than 4 (docs/benchmarks.md)
DEFAULT_GRID = "quadratic"
WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def validate(o: dict):
    if isinstance(o["solver_order"], bool) or o["solver_order"] not in WEIGHTS:
        raise ValueError(f"solver_order must be 1, 2, 3 or 4 for ipndm, got {o['solver_order']!r}")
    prediction.check(o["prediction_type"], prediction.VP_PREDICTION_TYPES)


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    validate(o)
    g = grid_ if grid_ is not None else grids.make_grid(schedule, steps, DEFAULT_GRID)
    sig = list(g.sigmas) + [0.0 if g.final is None else g.final]
    ts = [int(t) for t in g.timesteps] if g.integral else list(g.timesteps)
    order = o["solver_order"]
    names = [f"e{k}" for k in range(order - 1)]  # the previous ε̂'s, e0 the newest
    b = PlanBuilder("ipndm")
    for i in range(len(ts)):
        c = b.call(ts[i])
        a_i, _, _ = grids.vp(sig[i])
        a_n = grids.vp(sig[i + 1])[0] if sig[i + 1] > 0 else 1.0
        eps = dpm_solver.convert(c, sig[i], dict(o, thresholding=False), to_x0=False)  # d = ε̂
        past = [c.get(n) for n in names if c.has(n)]
        k = min(order, len(past) + 1)
        E = sum(w * e for w, e in zip(WEIGHTS[k], [eps] + past[:k - 1]))
        c.shift(names)
        if names and i < len(ts) - 1:
            c.put(names[0], eps)
        c.next((a_n / a_i) * c.x + (a_n * (sig[i + 1] - sig[i])) * E)
    return b.build(t_dtype=torch.int64 if g.integral else torch.float32, init_noise_sigma=1.0, sigmas=sig,
                   timesteps=ts, options=dict(o), d_is_x0=False)
