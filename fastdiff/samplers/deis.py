"""DEIS multistep, the "ρAB" (log-ρ Adams–Bashforth) variant, orders 1–3 (Zhang & Chen 2023, arXiv 2204.13902,
§4 and eq. 15). diffusers' DEISMultistepScheduler.

With ρ = σ_t/α_t (the VE noise level σ of fastdiff's grids) and ε̂ the noise prediction, the exponential integrator
of the probability-flow ODE is x_t/α_t = x_s/α_s + ∫_{ρ_s}^{ρ_t} ε̂ dρ. DEIS interpolates ε̂ through the last k outputs
by a Lagrange polynomial in log ρ and integrates it exactly:

    x_t = α_t·(x_s/α_s + Σ_j c_j·ε_j),   c_j = ∫_{ρ_s}^{ρ_t} Π_{m≠j} (log ρ − log ρ_m)/(log ρ_j − log ρ_m) dρ,

where the integrals have the closed forms diffusers' `ind_fn` writes (order 2: ρ(log ρ − log ρ_m − 1)/(log ρ_j −
log ρ_m); order 3 likewise with a quadratic). Order 1 is the DDIM step. The warm-up uses the lower orders, and with
lower_order_final the last two steps of a run under 15 steps drop to orders 1 and 2 (as diffusers). The model output
is converted to x̂0 (thresholded when asked) and then to ε̂ = (x − α·x̂0)/σ_t; the update is linear in x, ε̂ and the
stored ε̂'s: one fused row per call. diffusers' grid ends at σ_min (the table's first σ), not at 0.
"""
from __future__ import annotations

import math

import torch

from fastdiff import prediction
from fastdiff.samplers import dpm_singlestep, dpm_solver
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder

DEFAULTS = dict(solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, algorithm_type="deis", solver_type="logrho", lower_order_final=True,
                use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                timestep_spacing="linspace", steps_offset=0)


def validate(o: dict):
    if isinstance(o["solver_order"], bool) or o["solver_order"] not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {o['solver_order']!r}")
    # diffusers maps the other algorithm/solver names of its family to these (register_to_config)
    if o["algorithm_type"] not in ("deis", "dpmsolver", "dpmsolver++"):
        raise ValueError(f"algorithm_type must be 'deis', got {o['algorithm_type']!r}")
    if o["solver_type"] not in ("logrho", "midpoint", "heun", "bh1", "bh2"):
        raise ValueError(f"solver_type must be 'logrho', got {o['solver_type']!r}")


def grid(schedule: NoiseSchedule, steps: int, o: dict):
    """diffusers' DEIS grid: DPM-Solver multistep's (spacings, Karras/exponential/beta σ's) ending at σ_min, without λ
    clipping; Karras timesteps always rounded; the spread grids end at their own last σ."""
    opts = dict(o, final_sigmas_type="sigma_min", lambda_min_clipped=-math.inf, use_lu_lambdas=False,
                use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False, mu=None,
                time_shift_type="exponential")
    ts, sig = dpm_singlestep.grid(schedule, steps, opts, spacing=True)
    if o["use_karras_sigmas"] or o["use_exponential_sigmas"] or o["use_beta_sigmas"]:
        sig[-1] = sig[-2]  # diffusers ends these grids at their own last σ (σ_min from 2 steps on; σ_max for 1 step)
    return ts, sig


def _ind2(t, b, c):
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _ind3(t, b, c, d):
    lt, lc, ld = math.log(t), math.log(c), math.log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return num / ((math.log(b) - lc) * (math.log(b) - ld))


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None, *, start: int = 0):
    """The plan of diffusers' grid (or `grid_`, whose final σ is σ_min unless it carries one); start=k: the run
    diffusers makes from step k (img2img: its warm-up orders from k)."""
    validate(o)
    if grid_ is not None:
        last = grid_.final if getattr(grid_, "final", None) is not None else \
            float(grids.sigma_table(grids.abar_tables(schedule)[0])[0])
        ts = [int(t) for t in grid_.timesteps] if grid_.integral else list(grid_.timesteps)
        sig = list(grid_.sigmas) + [last]
    else:
        ts, sig = grid(schedule, steps, o)
    N, k_max = len(ts), o["solver_order"]
    lof = o["lower_order_final"] and N < 15
    b = PlanBuilder("deis")
    for n, i in enumerate(range(start, N)):
        c = b.call(ts[i])
        a_s, s_s, _ = grids.vp(sig[i])
        d = dpm_solver.convert(c, sig[i], dict(o, algorithm_type="dpmsolver++"), to_x0=True)
        r, u = prediction.eps_coefs("sample", a_s, s_s)  # ε̂ = (x − α·x̂0)/σ from the (thresholded) x̂0 = d
        eps = r * c.x + u * d
        ms = [eps] + [c.get(f"m{j}") for j in (1, 2) if c.has(f"m{j}")]
        if k_max == 1 or n < 1 or (lof and i == N - 1):
            order = 1
        elif k_max == 2 or n < 2 or (lof and i == N - 2):
            order = 2
        else:
            order = 3
        a_t, s_t, l_t = grids.vp(sig[i + 1])
        r = [sig[i + 1], sig[i], sig[i - 1] if order > 1 else None, sig[i - 2] if order > 2 else None]
        if order == 1:
            nxt = (a_t / a_s) * c.x - (s_t * math.expm1(l_t - grids.vp(sig[i])[2])) * eps
        elif order == 2:
            c1 = _ind2(r[0], r[1], r[2]) - _ind2(r[1], r[1], r[2])
            c2 = _ind2(r[0], r[2], r[1]) - _ind2(r[1], r[2], r[1])
            nxt = a_t * ((1.0 / a_s) * c.x + c1 * ms[0] + c2 * ms[1])
        else:
            c1 = _ind3(r[0], r[1], r[2], r[3]) - _ind3(r[1], r[1], r[2], r[3])
            c2 = _ind3(r[0], r[2], r[3], r[1]) - _ind3(r[1], r[2], r[3], r[1])
            c3 = _ind3(r[0], r[3], r[1], r[2]) - _ind3(r[1], r[3], r[1], r[2])
            nxt = a_t * ((1.0 / a_s) * c.x + c1 * ms[0] + c2 * ms[1] + c3 * ms[2])
        if i < N - 1 and k_max > 1:
            if k_max > 2 and c.has("m1"):
                c.put("m2", c.get("m1"))
            c.put("m1", eps)
        c.next(nxt)
    return b.build(t_dtype=torch.int64 if all(isinstance(t, int) for t in ts) else torch.float32,
                   init_noise_sigma=1.0, sigmas=sig, timesteps=ts[start:], options=dict(o), d_is_x0=True)
