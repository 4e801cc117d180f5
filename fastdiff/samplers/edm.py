"""EDM Euler: Euler's method on the σ-view probability-flow ODE with EDM's preconditioning (Karras et al. 2022, arXiv
2206.00364, Alg. 1 without churn, Table 1 "preconditioning", eq. 5 for the σ's). diffusers' EDMEulerScheduler.

The model is a raw network F on EDM's scaled input: D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise) with
c_in = 1/√(σ² + σ_d²), c_skip = σ_d²/(σ² + σ_d²), c_out = ±σ·σ_d/√(σ² + σ_d²) (minus for v_prediction) and
c_noise = ¼·log σ, the timestep the network sees. The σ's come from the config alone (no β table): Karras' ramp
(σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ or log-uniform, then 0 (or σ_min). One Euler step
x′ = x + (σ′ − σ)·(x − D)/σ per call. fastdiff keeps the network's input c_in·x, so each step is one row of the fused
op with d = D.

EDM DPM-Solver++ (`dpmsolver_plan`, diffusers' EDMDPMSolverMultistepScheduler): DPM-Solver++ multistep (Lu et al.
2022b, arXiv 2211.01095), orders 1–3, ODE and SDE, midpoint/heun, on the same σ's and the same D: in EDM's σ-view
α = 1, σ_t = σ and λ = −log σ, so each call is dpm_solver._update on x̂0 = D (thresholded if asked).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.samplers import dpm_solver
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder, PlanError

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
    # EDM preconditioning x̂0 = c_skip·x_σ ± c_out·o (σ_data), not fastdiff.prediction's ε/x0/v conversion: the
    # network's raw output F (Karras et al. 2022, eq. 7), which diffusers' EDM classes call "epsilon" / "v_prediction"
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


DPM_DEFAULTS = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", prediction_type="epsilon",
                    rho=7.0, solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, final_sigmas_type="zero")


def _ve(sigma: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) of EDM's σ-view: α = 1, σ_t = σ, λ = −log σ (+∞ at σ = 0)."""
    return 1.0, sigma, (-math.log(sigma) if sigma > 0 else math.inf)


def dpmsolver_plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    """diffusers' EDMDPMSolverMultistepScheduler: its σ's (set_timesteps; final σ 0 or the config's σ_min), the model
    called on c_in·x at c_noise = ¼·log σ, x̂0 = D(x, σ), then DPM-Solver++ with diffusers' warm-up, lower_order_final
    (below 15 steps), euler_at_final and a first-order last step onto σ = 0."""
    if o["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction' (EDM preconditioning; diffusers "
                         f"raises for 'sample' at its first step), got {o['prediction_type']!r}")
    if o["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {o['final_sigmas_type']!r}")
    if o["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError(f"algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++' (diffusers' EDM DPM-Solver has "
                         f"no other), got {o['algorithm_type']!r}")
    if o["solver_type"] not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {o['solver_type']!r}")
    if o["solver_order"] not in (1, 2, 3) or isinstance(o["solver_order"], bool):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {o['solver_order']!r}")
    if grid_ is not None:
        sig, s32 = list(grid_.sigmas), np.asarray(grid_.sigmas, dtype=np.float32)
    else:
        sig, s32 = sigmas(o, steps)
        if o["sigma_schedule"] == "karras":  # this class forms its Karras σ's in float32 (a float32 ramp)
            lo, hi, rho = float(o["sigma_min"]), float(o["sigma_max"]), float(o["rho"])
            s32 = ((hi ** (1 / rho) + torch.linspace(0, 1, steps) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho).numpy()
    ts = [float(t) for t in (0.25 * torch.from_numpy(s32).log())]  # c_noise, float32 as diffusers forms it
    last = 0.0
    if o["final_sigmas_type"] == "sigma_min":
        # diffusers appends the config's σ_min, which its float32 grid ends on too (a last step of h = 0: x′ = x);
        # the float64 grid ends within rounding of it, kept so that h is 0, not ±1 ulp (√(1 − e^{−2h}) of h < 0)
        last = float(o["sigma_min"])
        if abs(last - sig[-1]) <= 1e-6 * last:
            last = sig[-1]
    sig = sig + [last]
    sd = float(o["sigma_data"])
    sign = 1.0 if o["prediction_type"] == "epsilon" else -1.0  # EDM preconditioning, as in euler_plan
    alg, order = o["algorithm_type"], o["solver_order"]
    b = PlanBuilder("edm_dpmsolver++")
    N = len(ts)
    names = [f"m{k}" for k in range(order - 1)]  # the previous order−1 x̂0's, m0 the newest
    lower_nums = 0
    for i in range(N):
        s = sig[i]
        scale = math.sqrt(s * s + sd * sd)  # 1/c_in: the sample is scale·(the network's input)
        c = b.call(ts[i], scale_in=scale)
        sample = scale * c.x
        d = c.convert(sd * sd / (s * s + sd * sd) * sample + sign * s * sd / scale * c.o, threshold=o["thresholding"])
        ms = [d] + [c.get(n) for n in names if c.has(n)]
        k = dpm_solver.step_order(i, N, order, lower_nums, o)
        if k == 3 and alg == "sde-dpmsolver++":
            raise PlanError("algorithm_type='sde-dpmsolver++' with solver_order=3: diffusers' "
                            "EDMDPMSolverMultistepScheduler has no order-3 SDE update (its step fails with an "
                            "UnboundLocalError at the first order-3 step); use solver_order=2")
        if sig[i + 1] == s:  # final σ = σ_min: a step of h = 0, x′ = x at every order (diffusers: 0/0 = NaN
            x_next = 1.0 * sample  # in float32 for heun and order 3, the order-1 update ≈ x otherwise)
        else:
            x_next = dpm_solver._update(alg, o["solver_type"], k, sample, ms, sig[i + 1],
                                        [sig[i - j] for j in range(k)], c.z, _ve)
        c.shift(names)
        if names and i < N - 1:
            c.put(names[0], d)
        c.force_noise = alg.startswith("sde")  # diffusers draws every step's noise, the last (σ_t = 0) too
        sn = sig[i + 1]
        c.next(x_next, scale_out=math.sqrt(sn * sn + sd * sd) if i < N - 1 else 1.0)
        lower_nums = min(lower_nums + 1, order)
    return b.build(t_dtype=torch.float32, init_noise_sigma=math.sqrt(float(o["sigma_max"]) ** 2 + 1), sigmas=sig,
                   timesteps=ts, options=dict(o), noise_dtype=torch.float32, d_is_x0=True)
