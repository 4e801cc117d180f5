"""Trajectory consistency distillation sampling (Zheng et al. 2024, arXiv 2402.19159, §3.3, "strategic stochastic
sampling"). diffusers' TCDScheduler.

From x_t the model's data and noise predictions (x̂0, ε̂) give the point of the trajectory at an intermediate time
s = ⌊(1 − γ)·t′⌋ (t′ the next grid timestep, 0 after the last; γ = `gamma`, diffusers' step argument `eta`):
x̂_s = √ᾱ_s·x̂0 + √(1 − ᾱ_s)·ε̂ (diffusers' `pred_noised_sample`); then forward noise takes it to t′:

    x_{t′} = √(ᾱ_{t′}/ᾱ_s)·x̂_s + √(1 − ᾱ_{t′}/ᾱ_s)·z,          γ = 0 or the last step: x_{t′} = x̂_s.

γ = 0 is deterministic (a DDIM-like jump to t′), γ = 1 jumps to the data and re-noises (LCM's sampling). Each step
is one row of the fused op with d = x̂_s. The grid is LCM's (fastdiff.samplers.lcm.timesteps); an explicit
`original_inference_steps` argument of diffusers' set_timesteps selects from all T timesteps instead.
"""
from __future__ import annotations

import math

import torch

from fastdiff.samplers import lcm
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder

DEFAULTS = dict(prediction_type="epsilon", original_inference_steps=50, set_alpha_to_one=True, gamma=0.3, strength=1.0,
                all_timesteps=False)


def timesteps(T: int, steps: int, o: dict) -> list[int]:
    if not o["all_timesteps"]:
        return lcm.timesteps(T, steps, int(o["original_inference_steps"]), float(o["strength"]))
    origin = list(range(int(T * float(o["strength"]))))  # diffusers: set_timesteps(original_inference_steps=…)
    if steps > T or len(origin) // steps < 1:
        raise ValueError(f"steps={steps} must be at most num_train_timesteps × strength (diffusers refuses it too)")
    return lcm.select(origin, steps)


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    eta = float(o["gamma"])  # diffusers' step(eta=…); `eta` is DDIM's in fastdiff.sample
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"gamma (diffusers' eta) must be in [0, 1], got {eta}")
    ts = [int(t) for t in grid_.timesteps] if grid_ is not None else timesteps(len(schedule), steps, o)
    final = 1.0 if o["set_alpha_to_one"] else grids.abar_at(schedule, 0)
    b, N = PlanBuilder("tcd"), len(ts)
    for i, t in enumerate(ts):
        c = b.call(t)
        x0, eps = lcm.predictions(c, o["prediction_type"], grids.abar_at(schedule, t))
        t_prev = ts[i + 1] if i + 1 < N else 0
        t_s = int(torch.floor((1 - eta) * torch.tensor(t_prev)))  # in torch's float32, as diffusers rounds it
        ab_s = grids.abar_at(schedule, t_s)
        d = c.convert(math.sqrt(ab_s) * x0 + math.sqrt(1.0 - ab_s) * eps)  # diffusers' pred_noised_sample
        if eta > 0 and i < N - 1:
            ab_prev = grids.abar_at(schedule, t_prev) if t_prev >= 0 else final
            c.next(math.sqrt(ab_prev / ab_s) * d + math.sqrt(max(1.0 - ab_prev / ab_s, 0.0)) * c.z)
            c.force_noise = True
        else:
            c.next(1.0 * d)
    return b.build(t_dtype=torch.int64, init_noise_sigma=1.0, timesteps=ts, options=dict(o), sigmas=None)
