"""Latent consistency model sampling (Luo et al. 2023, arXiv 2310.04378, Alg. 1 — multistep consistency sampling of
Song et al. 2023, arXiv 2303.01469, Alg. 1). diffusers' LCMScheduler.

A consistency model maps a noisy sample at t straight to the data: f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t), with
the boundary-condition scalings c_skip = σ_d²/(s² + σ_d²), c_out = s/√(s² + σ_d²), s = t·timestep_scaling, σ_d = ½
(x̂0 the model output turned into a data prediction, clipped or thresholded when asked). Multistep sampling alternates
that jump with re-noising to the next timestep t′ of the grid:

    x_{t′} = √ᾱ_{t′}·f(x_t, t) + √(1 − ᾱ_{t′})·z,          the last step returns f(x_t, t) itself.

Each step is one row of the fused op: d = f (a combination of x and the model output) when nothing is clipped — what
diffusers' step returns as `denoised` — else d = the clipped x̂0 and f = c_skip·x + c_out·d. The grid is diffusers':
`original_inference_steps` evenly spaced training timesteps (times `strength`), of which N are taken.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import prediction
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder

DEFAULTS = dict(prediction_type="epsilon", original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                set_alpha_to_one=True, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                timestep_scaling=10.0, strength=1.0)
SIGMA_DATA = 0.5


def timesteps(T: int, steps: int, original_steps: int, strength: float = 1.0) -> list[int]:
    """diffusers' LCM grid: the distillation schedule k·j − 1 (k = T // original_steps, j = 1 … original_steps ×
    strength), N of them taken at evenly spaced indices from the top."""
    if original_steps > T:
        raise ValueError(f"original_inference_steps ({original_steps}) cannot be larger than num_train_timesteps ({T})")
    k = T // original_steps
    origin = np.arange(1, int(original_steps * strength) + 1) * k - 1
    if len(origin) // steps < 1 or steps > original_steps:
        raise ValueError(f"steps={steps} must be at most original_inference_steps × strength = "
                         f"{original_steps} × {strength} (diffusers' LCMScheduler refuses it too)")
    return select(origin, steps)


def select(origin, steps: int) -> list[int]:
    """diffusers' pick of `steps` timesteps from an ascending schedule: evenly spaced indices from the top."""
    origin = np.asarray(origin)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


def scalings(t: float, scaling: float) -> tuple[float, float]:
    s = t * scaling
    return SIGMA_DATA**2 / (s * s + SIGMA_DATA**2), s / math.sqrt(s * s + SIGMA_DATA**2)


def predictions(c, pt: str, ab: float):
    """(x̂0, ε̂) from the model output at ᾱ = ab, as diffusers' LCM/TCD steps form them."""
    a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
    p, q = prediction.x0_coefs(pt, a, s, types=prediction.VP_PREDICTION_TYPES)
    r, u = prediction.eps_coefs(pt, a, s, types=prediction.VP_PREDICTION_TYPES)
    return p * c.x + q * c.o, r * c.x + u * c.o


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    ts = list(grid_.timesteps) if grid_ is not None else \
        timesteps(len(schedule), steps, int(o["original_inference_steps"]), float(o["strength"]))
    final = 1.0 if o["set_alpha_to_one"] else grids.abar_at(schedule, 0)
    clip = float(o["clip_sample_range"]) if o["clip_sample"] and not o["thresholding"] else None
    b = PlanBuilder("lcm")
    N = len(ts)
    for i, t in enumerate(ts):
        c = b.call(t)
        x0, _ = predictions(c, o["prediction_type"], grids.abar_at(schedule, t))
        c_skip, c_out = scalings(t, float(o["timestep_scaling"]))
        if clip is None and not o["thresholding"]:
            f = c.convert(c_out * x0 + c_skip * c.x)  # d = diffusers' `denoised`
        else:
            f = c_out * c.convert(x0, clip=clip, threshold=o["thresholding"]) + c_skip * c.x
        if i < N - 1:
            t_prev = ts[i + 1]
            ab_prev = grids.abar_at(schedule, t_prev) if t_prev >= 0 else final
            c.next(math.sqrt(ab_prev) * f + math.sqrt(1.0 - ab_prev) * c.z)
        else:
            c.next(f)
    return b.build(t_dtype=torch.int64 if all(float(t).is_integer() for t in ts) else torch.float32,
                   init_noise_sigma=1.0, timesteps=[int(t) if float(t).is_integer() else t for t in ts],
                   options=dict(o), sigmas=None)
