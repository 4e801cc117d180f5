"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12) as a plan over the one fused op.

From x_t at ᾱ_t to the previous time at ᾱ_p, with x̂0 and ε̂ the model output converted per prediction type:

    x_p = √ᾱ_p · x̂0 + √(1 − ᾱ_p − σ²) · ε̂ + σ·z,      σ = η·√((1 − ᾱ_p)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_p)

η = 0 is the deterministic sampler (the Euler step of the probability-flow ODE in σ = √((1−ᾱ)/ᾱ)); η = 1 with
`use_clipped_model_output` is DDPM's fixed_small posterior. x̂0 may be clipped to ±clip_sample_range or dynamically
thresholded (Saharia et al. 2022); with `use_clipped_model_output` ε̂ is recomputed from the clipped x̂0, as diffusers
does. In the op's terms one call is one row: d = x̂0 = p·x + q·o, ε̂ = r·x + s·o + u·d, and the next sample is
A·d + B·ε̂ + σ·z (no history).

The options are diffusers' DDIMScheduler config (`OPTIONS`, shared with DDPM in fastdiff.samplers.ddpm), except
clip_sample (False here: samples need not be images in [−1, 1]). `prev_timestep`: "grid" steps to the next time of
the grid; "diffusers" to t − ⌊T/N⌋ whatever the spacing (DDIMScheduler's rule, adopted with a diffusers config; equal
to "grid" for leading spacing).
"""
from __future__ import annotations

import math

import torch

from fastdiff import prediction
from fastdiff.ops.multistep import NUM_COEF
from fastdiff.ops.sampler_step import ddim_sigma
from fastdiff.samplers.plan import PlanBuilder, PlanError
from fastdiff.schedule import SPACINGS, NoiseSchedule, grids, timesteps

# diffusers' DDIM/DDPM config keys that change the math (shared with fastdiff.samplers.ddpm)
OPTIONS = dict(prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0, thresholding=False,
               dynamic_thresholding_ratio=0.995, sample_max_value=1.0, set_alpha_to_one=True, steps_offset=0,
               timestep_spacing="leading", variance_type="fixed_small", use_clipped_model_output=False,
               prev_timestep="grid")
DEFAULTS = dict(OPTIONS, eta=0.0)
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


def validate(o: dict):
    """The DDIM/DDPM options' values, each error naming its option."""
    from fastdiff.validate import check_scheduler_config

    o.update(check_scheduler_config({k: o[k] for k in OPTIONS}, None))  # types, named
    for name, allowed in (("prediction_type", prediction.VP_PREDICTION_TYPES), ("variance_type", VARIANCE_TYPES),
                          ("timestep_spacing", SPACINGS), ("prev_timestep", ("grid", "diffusers"))):
        if o[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {o[name]!r}")
    # clip_sample_range and the thresholding settings: checked by fastdiff.samplers.solver_options where used


def step_times(schedule: NoiseSchedule, steps: int | None, o: dict, grid_: grids.Grid | None, kind: str):
    """(model-call times, their ᾱ's, the ᾱ each step goes to, whole-number times?) of a DDIM/DDPM plan."""
    T = len(schedule)
    if grid_ is not None:
        ts, integral = list(grid_.timesteps), grid_.integral
        ts = [int(t) for t in ts] if integral else [float(t) for t in ts]
    elif steps is None:  # DDPM: every training step
        ts, integral = list(range(T - 1, -1, -1)), True
    else:
        ts, integral = timesteps(T, steps, o["timestep_spacing"], o["steps_offset"]).tolist(), True
    n = len(ts)
    if kind == "ddim" and o["prev_timestep"] == "diffusers" and grid_ is None:
        prev = [t - T // n for t in ts]
    else:
        prev = ts[1:] + [-1]
    final = 1.0 if (kind == "ddpm" or o["set_alpha_to_one"]) else float(schedule.alphas_cumprod[0])
    abar_t = [grids.abar_at(schedule, t) for t in ts]
    abar_p = [grids.abar_at(schedule, p) if p >= 0 else final for p in prev]
    if o["prediction_type"] == "epsilon" and min(abar_t) <= 0.0:
        bad = ts[abar_t.index(min(abar_t))]
        raise ValueError(f"prediction_type='epsilon' cannot sample timestep {bad}, where ᾱ_t = 0 (zero terminal SNR): "
                         "use prediction_type='v_prediction' or 'sample', or a spacing that skips it")
    return ts, abar_t, abar_p, integral


def convert(abar_t: float, prediction_type: str):
    """(p, q, r, s): x̂0 = p·x + q·o and ε̂ = r·x + s·o for a model output o of `prediction_type` at ᾱ_t."""
    a, b = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    types = prediction.VP_PREDICTION_TYPES
    return (*prediction.x0_coefs(prediction_type, a, b, types=types),
            *prediction.eps_coefs(prediction_type, a, b, types=types))


def x0_of(c, abar_t: float, o: dict):
    """d = x̂0 of this call (clipped or thresholded per the options) and ε̂ as Lin values."""
    p, q, r, s = convert(abar_t, o["prediction_type"])
    clip = o["clip_sample_range"] if o["clip_sample"] and not o["thresholding"] else None
    d = c.convert(p * c.x + q * c.o, clip=clip, threshold=o["thresholding"])
    return d, r * c.x + s * c.o


def finish(b: PlanBuilder, schedule: NoiseSchedule, ts, abar_t, integral: bool, o: dict):
    """The plan of a DDIM/DDPM builder: int64 times (float32 for fractional ones), x_T unscaled, the VE σ of each
    call (and the last step's target, 0), the options."""
    sig = [math.sqrt((1.0 - a) / a) if a > 0 else math.inf for a in abar_t] + [0.0]
    return b.build(t_dtype=torch.int64 if integral else torch.float32, init_noise_sigma=1.0, sigmas=sig,
                   timesteps=list(ts), options=dict(o), d_is_x0=True)


def step(c, at: float, ap: float, eta: float, o: dict):
    """One DDIM step from ᾱ_t = at to ᾱ_p = ap on the plan call `c`."""
    d, eps = x0_of(c, at, o)
    if o["use_clipped_model_output"]:  # ε̂ recomputed from the (clipped) x̂0: "sample"'s ε̂ with o = d
        r, s = prediction.eps_coefs("sample", math.sqrt(at), math.sqrt(1.0 - at))
        eps = r * c.x + s * d
    sig = ddim_sigma(at, ap, eta)  # eq. 16
    B = math.sqrt(max(1.0 - ap - sig * sig, 0.0))
    c.next(math.sqrt(ap) * d + (B * eps if B > 0 else 0) + sig * c.z)  # B = 0: no ε̂ term (ᾱ_p = 1)
    c.force_noise = eta > 0  # diffusers draws a noise tensor at every step when η > 0


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    """DDIM over `schedule` in `steps` steps (or over `grid_`'s times), η = o["eta"]."""
    validate(o)
    ts, abar_t, abar_p, integral = step_times(schedule, steps, o, grid_, "ddim")
    b = PlanBuilder("ddim")
    for t, at, ap in zip(ts, abar_t, abar_p):
        step(b.call(t), at, ap, o["eta"], o)
    return finish(b, schedule, ts, abar_t, integral, o)


def rows(steps, o: dict, step_fn=step) -> list:
    """One fused-op row per step (ᾱ_t, ᾱ_p, extra arguments of `step_fn`), each on its own, as the drop-in
    classes (fastdiff.diffusers) step from whatever timestep they are given. A step whose row is not finite in
    float64 (ε-prediction at ᾱ_t = 0, zero terminal SNR) gives a row of NaN: the caller runs diffusers' arithmetic
    there."""
    out = []
    for args in steps:
        b = PlanBuilder("row")
        try:
            step_fn(b.call(0), *args, o)
            out.append(b.build(t_dtype=torch.int64, init_noise_sigma=1.0).calls[0].coef)
        except (PlanError, ZeroDivisionError):
            out.append([math.nan] * NUM_COEF)
    return out
