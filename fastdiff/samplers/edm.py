"""EDM Euler: Euler's method on the σ-view probability-flow ODE with EDM's preconditioning (Karras et al. 2022, arXiv
2206.00364, Alg. 1 without churn, Table 1 "preconditioning", eq. 5 for the σ's). diffusers' EDMEulerScheduler.

The model is a raw network F on EDM's scaled input: D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise) with
c_in = 1/√(σ² + σ_d²), c_skip = σ_d²/(σ² + σ_d²), c_out = ±σ·σ_d/√(σ² + σ_d²) (minus for v_prediction) and
c_noise = ¼·log σ, the timestep the network sees. The σ's come from the config alone (no β table): Karras' ramp
(σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ or log-uniform, then 0 (or σ_min). One Euler step
x′ = x + (σ′ − σ)·(x − D)/σ per call. fastdiff keeps the network's input c_in·x, so each step is one row of the fused
op with d = D.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.samplers import grids
from fastdiff.samplers.plan import PlanBuilder
from fastdiff.schedule import NoiseSchedule

DEFAULTS = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", prediction_type="epsilon",
                rho=7.0, final_sigmas_type="zero", init_ramp=False)


def sigmas(o: dict, steps: int) -> tuple[list[float], np.ndarray]:
    """(σ's float64, σ's as diffusers' float32 tensor gives them) for `steps` calls, without the final σ; with
    o["init_ramp"] the T + 1 σ's diffusers' __init__ builds (its ramp arange(T + 1)/T, steps = T)."""
    lo, hi, rho = float(o["sigma_min"]), float(o["sigma_max"]), float(o["rho"])
    if o.get("init_ramp"):
        ramp = torch.arange(steps + 1, dtype=torch.float64) / steps
        steps += 1
    else:
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if o["sigma_schedule"] == "karras":
        s64 = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        s32 = s64.to(torch.float32)
    elif o["sigma_schedule"] == "exponential":
        s64 = torch.linspace(math.log(lo), math.log(hi), steps, dtype=torch.float64).exp().flip(0)
        s32 = torch.linspace(math.log(lo), math.log(hi), steps).exp().flip(0)
    else:
        raise ValueError(f"sigma_schedule must be 'karras' or 'exponential', got {o['sigma_schedule']!r}")
    return [float(v) for v in s64], s32.numpy()


def euler_plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    if o["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {o['prediction_type']!r}")
    if o["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {o['final_sigmas_type']!r}")
    if grid_ is not None:
        sig, s32 = list(grid_.sigmas), np.asarray(grid_.sigmas, dtype=np.float32)
    else:
        sig, s32 = sigmas(o, steps)
    ts = [float(t) for t in (0.25 * torch.from_numpy(s32).log())]  # c_noise, float32 as diffusers forms it
    sig = sig + [float(s32[-1]) if o["final_sigmas_type"] == "sigma_min" else 0.0]
    sd = float(o["sigma_data"])
    sign = 1.0 if o["prediction_type"] == "epsilon" else -1.0
    b = PlanBuilder("edm_euler")
    N = len(ts)
    for i in range(N):
        s, sn = sig[i], sig[i + 1]
        scale = math.sqrt(s * s + sd * sd)  # 1/c_in: the sample is scale·(the network's input)
        c = b.call(ts[i], scale_in=scale)
        sample = scale * c.x
        d = c.convert(sd * sd / (s * s + sd * sd) * sample + sign * s * sd / scale * c.o)
        c.next(sample + (sample - d) * ((sn - s) / s),
               scale_out=math.sqrt(sn * sn + sd * sd) if i < N - 1 else 1.0)
    return b.build(t_dtype=torch.float32, init_noise_sigma=math.sqrt(float(o["sigma_max"]) ** 2 + 1), sigmas=sig,
                   timesteps=ts, options=dict(o))
