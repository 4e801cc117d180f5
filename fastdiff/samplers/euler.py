"""Euler, Euler ancestral and Heun on the σ grid (Karras et al. 2022, arXiv 2206.00364, Alg. 1 and 2).

The probability-flow ODE in the variance-exploding parameterisation x_σ = x/α (Karras et al. eq. 4 with s(t) = 1) is
dx_σ/dσ = (x_σ − x̂0)/σ. Euler takes one step of it (Alg. 1 without the second-order correction); Heun's method
averages the slope at both ends (Alg. 2, the 2nd-order correction; one extra model call per step, none on the last
step to σ = 0); Euler ancestral splits the step into a deterministic part down to σ_down and fresh noise of size
σ_up, σ_up² = σ_to²(σ_from² − σ_to²)/σ_from², σ_down² = σ_to² − σ_up² (as k-diffusion's sample_euler_ancestral with
η = 1). diffusers' Euler/Heun/EulerAncestral schedulers keep x_σ; fastdiff keeps the model's input x = x_σ/√(σ²+1)
(the variance-preserving scale), so no scaling pass runs per step; the coefficients below absorb the √(σ²+1).
Timestep grids, Karras / exponential / beta σ's and the timesteps the model sees follow diffusers' schedulers exactly
(grids.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import prediction
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder

EULER_DEFAULTS = dict(prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
                      use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
                      timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero")
ANCESTRAL_DEFAULTS = dict(prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
HEUN_DEFAULTS = dict(prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False,
                     use_beta_sigmas=False, clip_sample=False, clip_sample_range=1.0,
                     timestep_spacing="linspace", steps_offset=0)


def _check(o, *, karras_ok=True):
    prediction.check(o["prediction_type"], prediction.VP_PREDICTION_TYPES)
    if o.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {o['final_sigmas_type']!r}")
    grids.check_spread(o)
    if o.get("interpolation_type", "linear") not in ("linear", "log_linear"):
        raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {o['interpolation_type']!r}")


def grid(schedule: NoiseSchedule, steps: int, o: dict, *, final: str = "zero", given: grids.Grid | None = None):
    """(model timesteps float32 values, σ's float64 with the final one appended), as EulerDiscreteScheduler builds
    them (Heun and Euler ancestral build the same grid without the options they lack)."""
    a64, a32 = grids.abar_tables(schedule)
    if given is not None:  # a grid given as data (fastdiff.schedule.grids.Grid)
        last = float(grids.sigma_table(a64)[0]) if final == "sigma_min" else 0.0
        return list(given.timesteps), list(given.sigmas) + [last if given.final is None else given.final]
    T = len(a64)
    ts = grids.spaced_timesteps(T, steps, o["timestep_spacing"], o["steps_offset"])
    s32, s64 = grids.sigma_table(a32), grids.sigma_table(a64)
    if o.get("interpolation_type", "linear") == "log_linear":
        sig = list(torch.linspace(math.log(s64[-1]), math.log(s64[0]), steps + 1, dtype=torch.float64).exp().numpy())
        sig32 = list(torch.linspace(np.log(s32[-1]), np.log(s32[0]), steps + 1).exp().numpy())
    else:
        sig = list(np.interp(ts, np.arange(T), s64))
        sig32 = list(np.interp(ts, np.arange(T), s32))
    if any(o.get(k) for k in grids.SPREADS):  # Karras / exponential / beta σ's between the grid's ends
        lo32, hi32 = (o.get("sigma_min") or float(sig32[-1])), (o.get("sigma_max") or float(sig32[0]))
        lo64, hi64 = (o.get("sigma_min") or float(sig[-1])), (o.get("sigma_max") or float(sig[0]))
        k32 = grids.spread(lo32, hi32, steps, o)
        ts = np.array([grids.sigma_to_t(s, np.log(s32)) for s in k32])
        sig = list(grids.spread(lo64, hi64, steps, o))
    last = float(s64[0]) if final == "sigma_min" else 0.0
    ts = np.asarray(ts, dtype=np.float32)
    return [float(t) for t in ts], [float(s) for s in sig] + [last]


def _x0(c, sigma, o, *, clip=None):
    """x̂0 from the model output at the VE noise level σ, by the VP coefficients at (α, σ_t) = grids.vp(σ) on
    x = x_σ/√(σ² + 1): diffusers' Euler/Heun σ-scale forms (x_σ − σ·o for ε, x_σ/(σ² + 1) − σ/√(σ² + 1)·o for v)
    to rounding."""
    a, s, _ = grids.vp(sigma)
    p, q = prediction.x0_coefs(o["prediction_type"], a, s, types=prediction.VP_PREDICTION_TYPES)
    return c.convert(p * c.x + q * c.o, clip=clip)


def _init_sigma(o, sig):
    smax = max(sig)
    return smax if o["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(smax**2 + 1)


def _scale(s):
    return math.sqrt(s * s + 1.0)


def euler_plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    _check(o)
    ts, sig = grid(schedule, steps, o, final=o["final_sigmas_type"], given=grid_)
    b = PlanBuilder("euler")
    N = len(ts)
    for i in range(N):
        s, sn = sig[i], sig[i + 1]
        c = b.call(ts[i], scale_in=_scale(s))
        sample = _scale(s) * c.x
        d = _x0(c, s, o)
        deriv = (sample - d) / s
        out_scale = _scale(sn) if i < N - 1 else 1.0
        c.next(sample + deriv * (sn - s), scale_out=out_scale)
    return b.build(t_dtype=torch.float32, init_noise_sigma=_init_sigma(o, sig), sigmas=sig, timesteps=ts,
                   options=dict(o))


def ancestral_plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    _check(o)
    if o["prediction_type"] == "sample":
        raise ValueError("prediction_type='sample' is not implemented by diffusers' EulerAncestralDiscreteScheduler; "
                         "fastdiff does not offer it for euler_ancestral either")
    ts, sig = grid(schedule, steps, o, given=grid_)
    b = PlanBuilder("euler_ancestral")
    N = len(ts)
    for i in range(N):
        s, sn = sig[i], sig[i + 1]
        c = b.call(ts[i], scale_in=_scale(s))
        sample = _scale(s) * c.x
        d = _x0(c, s, o)
        up = math.sqrt(sn**2 * (s**2 - sn**2) / s**2)
        down = math.sqrt(max(sn**2 - up**2, 0.0))
        deriv = (sample - d) / s
        out_scale = _scale(sn) if i < N - 1 else 1.0
        c.force_noise = True  # diffusers draws every step, the last (σ_up = 0) too
        c.next(sample + deriv * (down - s) + up * c.z, scale_out=out_scale)
    return b.build(t_dtype=torch.float32, init_noise_sigma=_init_sigma(o, sig), sigmas=sig, timesteps=ts,
                   options=dict(o))


def heun_plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    _check(o)
    ts0, sig0 = grid(schedule, steps, o, given=grid_)
    # diffusers: σ = [σ0, σ1, σ1, …, σ_{N−1}, σ_{N−1}, 0], timesteps [t0, t1, t1, …]: 2N − 1 model calls
    S = sig0[:1] + [s for s in sig0[1:-1] for _ in (0, 1)] + sig0[-1:]
    Ts = ts0[:1] + [t for t in ts0[1:] for _ in (0, 1)]
    clip = float(o["clip_sample_range"]) if o["clip_sample"] else None
    b = PlanBuilder("heun")
    first, dt, s1 = True, None, None
    for k in range(len(Ts)):
        c = b.call(Ts[k], scale_in=_scale(S[k]))
        sample = _scale(S[k]) * c.x
        if first:
            s, sn = S[k], S[k + 1]
            d = _x0(c, s, o, clip=clip)
            dt, s1 = sn - s, s
            nxt = sample + ((sample - d) / s) * dt
            if k < len(Ts) - 1:
                c.put("sample", sample)  # y2
                c.put("x0", d)  # the d slot; the first slope is (sample − x̂0)/σ
        else:
            sn = S[k]
            d = _x0(c, sn, o, clip=clip)
            deriv = ((c.get("sample") - c.get("x0")) / s1 + (sample - d) / sn) / 2
            nxt = c.get("sample") + deriv * dt
            c.drop("sample")
            c.drop("x0")
        out_scale = _scale(S[k + 1]) if k < len(Ts) - 1 else 1.0
        c.next(nxt, scale_out=out_scale)
        first = not first
    return b.build(t_dtype=torch.float32, init_noise_sigma=_init_sigma(o, S), sigmas=S, timesteps=Ts,
                   options=dict(o))
