"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, Alg. 2 and eq. 7) as a plan over the one fused op.

From x_t at ᾱ_t to the previous grid time at ᾱ_p (β′ = 1 − ᾱ_t/ᾱ_p, α′ = ᾱ_t/ᾱ_p: the strided step's own β and α),
the mean of the posterior q(x_p | x_t, x̂0) plus noise:

    x_p = √ᾱ_p·β′/(1 − ᾱ_t) · x̂0 + √α′·(1 − ᾱ_p)/(1 − ᾱ_t) · x_t + σ_t·z      (z only at t > 0, as diffusers)

σ_t² per `variance_type`: fixed_small β̃ = (1 − ᾱ_p)/(1 − ᾱ_t)·β′ (clamped at 1e-20), fixed_large β′, learned (the
model's second C channels are σ² itself), learned_range (Nichol & Dhariwal 2021, eq. 15: σ² = exp(f·log β′ +
(1 − f)·log β̃), f = (v + 1)/2 from the model's v ∈ [−1, 1]). The learned ones are per element: the op reads v and
computes σ from the row's log β′ and log β̃ (`Call.learned_noise`). x̂0 as in DDIM (fastdiff.samplers.ddim, whose
options and time rules DDPM shares); steps=None takes every training step T−1, …, 0.
"""
from __future__ import annotations

import math

from fastdiff.ops.sampler_step import ddpm_variance
from fastdiff.samplers import ddim
from fastdiff.samplers.plan import PlanBuilder
from fastdiff.schedule import NoiseSchedule, grids

DEFAULTS = dict(ddim.OPTIONS)


def step(c, at: float, ap: float, noisy: bool, o: dict):
    """One DDPM step from ᾱ_t = at to ᾱ_p = ap on the plan call `c`; noise when `noisy` (diffusers: t > 0)."""
    vt = o["variance_type"]
    d, _ = ddim.x0_of(c, at, o)
    beta = 1.0 - at / ap
    nxt = (math.sqrt(ap) * beta / (1.0 - at)) * d + (math.sqrt(at / ap) * (1.0 - ap) / (1.0 - at)) * c.x
    if vt.startswith("learned"):
        c.learned_noise(vt, log_max=math.log(beta) if beta > 0 else -46.0,  # log 1e-20
                        log_min=math.log(max((1.0 - ap) / (1.0 - at) * beta, 1e-20)))
    elif noisy:
        nxt = nxt + math.sqrt(ddpm_variance(at, ap, vt)) * c.z
    c.next(nxt)
    c.force_noise = noisy


def plan(schedule: NoiseSchedule, steps: int | None, o: dict, grid_: grids.Grid | None = None):
    """DDPM over `schedule` in `steps` strided steps (None: all T), or over `grid_`'s times."""
    ddim.validate(o)
    ts, abar_t, abar_p, integral = ddim.step_times(schedule, steps, o, grid_, "ddpm")
    b = PlanBuilder("ddpm")
    for t, at, ap in zip(ts, abar_t, abar_p):
        step(b.call(t), at, ap, t > 0, o)  # diffusers' DDPMScheduler draws noise whenever t > 0
    return ddim.finish(b, schedule, ts, abar_t, integral, o)


def rows(steps, o: dict) -> list:
    """One fused-op row per (ᾱ_t, ᾱ_p, noisy) DDPM step, each on its own (fastdiff.samplers.ddim.rows)."""
    return ddim.rows(steps, o, step)
