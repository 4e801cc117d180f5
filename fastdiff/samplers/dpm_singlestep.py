"""DPM-Solver singlestep, orders 1–3 (Lu et al. 2022a, arXiv 2206.00927, Alg. 1 and 2 — DPM-Solver-2/-3 — with the
data-prediction forms of Lu et al. 2022b, arXiv 2211.01095, §4). diffusers' DPMSolverSinglestepScheduler.

A singlestep method of order k spends k model calls on one step from σ_u to σ_{u+k}: the first call at the step's
start, the others at the intermediate grid points, every call of the step updating from the *same* start sample x_u.
diffusers lays the N grid points out in groups by its `order_list` ([1, 2, 3, 1, 2, 3, …], shorter groups at the end
with lower_order_final), and the i-th call of a group (order j) moves from the group's start u = i − j + 1 straight to
σ_{i+1} with the outputs m_u … m_i (newest m0 = m_i). With λ = log(α/σ), h = λ_{i+1} − λ_u and, for DPM-Solver++,

    order 1:  x = (σ_{i+1}/σ_u)·x_u − α_{i+1}(e^{−h} − 1)·m0
    order 2:  … − α_{i+1}(e^{−h} − 1)·D0 − ½·α_{i+1}(e^{−h} − 1)·D1,   D0 = m1, D1 = (m0 − m1)/r0, r0 = (λ_i − λ_u)/h
    order 3:  … − α_{i+1}(e^{−h} − 1)·D0 + α_{i+1}((e^{−h} − 1)/h + 1)·D1_1,  D0 = m2, D1_1 = (m0 − m2)/r0

(the "heun" solver type and the ε-prediction and SDE algorithm types as diffusers writes them: docs/math.md). Each is
linear in x_u (a stored sample), the current output and the stored ones: one row of the fused op per call. A run
started at step s > 0 (img2img) takes diffusers' orders from the absolute step index, lowered to the outputs this run
has (`plan(..., start=s)`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.samplers import dpm_solver
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder, PlanError

DEFAULTS = dict(solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
                use_karras_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None)
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")


_CHOICES = {"solver_order": (1, 2, 3), "algorithm_type": ALGORITHMS, "solver_type": ("midpoint", "heun"),
            "final_sigmas_type": ("zero", "sigma_min"), "variance_type": (None, "learned", "learned_range")}


def validate(o: dict):
    for k, allowed in _CHOICES.items():
        if isinstance(o[k], bool) or o[k] not in allowed:
            raise ValueError(f"{k} must be one of {allowed}, got {o[k]!r}")
    if o["algorithm_type"] == "dpmsolver" and o["final_sigmas_type"] == "zero":
        raise ValueError("final_sigmas_type='zero' is not supported for algorithm_type='dpmsolver' (as in diffusers): "
                         "use final_sigmas_type='sigma_min'")


def lower_order_final(o: dict, steps: int) -> bool:
    """diffusers' set_timesteps switches lower_order_final on (in its config) when the steps are not a multiple of
    the order, or the last σ is 0."""
    return bool(o["lower_order_final"]) or steps % o["solver_order"] != 0 or o["final_sigmas_type"] == "zero"


def order_list(o: dict, steps: int) -> list[int]:
    """The order of every call, as diffusers' get_order_list (with lower_order_final as set_timesteps leaves it)."""
    k = o["solver_order"]
    if lower_order_final(o, steps):
        if k == 3:
            tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
            orders = [1, 2, 3] * (steps // 3 - (1 if steps % 3 == 0 else 0)) + tail
        elif k == 2:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        else:
            orders = [1] * steps
    else:
        orders = [1, 2, 3][:k] * (steps // k)
    if o["final_sigmas_type"] == "zero":
        orders[-1] = 1
    return orders


def grid(schedule: NoiseSchedule, steps: int, o: dict, *, spacing: bool = False):
    """diffusers' DPMSolverSinglestepScheduler grid: DPMSolverMultistep's linspace grid (λ clipping included), its
    Karras timesteps always rounded (spacing=True: with o's timestep_spacing / steps_offset, as DEIS)."""
    opts = dict(o) if spacing else dict(o, timestep_spacing="linspace", steps_offset=0)
    ts, sig = dpm_solver.grid(schedule, steps, opts)
    if o["use_karras_sigmas"] and schedule.name == "cosine":  # the multistep class leaves these unrounded
        _, a32 = grids.abar_tables(schedule)
        s32 = grids.sigma_table(a32)
        k32 = grids.karras(float(s32[0]), float(s32[-1]), steps)
        ts = [int(t) for t in np.array([grids.sigma_to_t(s, np.log(s32)) for s in k32]).round().astype(np.int64)]
    return ts, sig


def _exp(v):
    return math.exp(v) if v < 700 else math.inf


def _update(alg, solver_type, order, S, ms, sig_t, sig_u, sig_mid):
    """x at σ_t from the group's start sample S at σ_u = sig_u, the outputs ms = [m0, m1, m2] (newest first) and the
    σ's of the intermediate calls sig_mid = [σ_i, σ_{i−1}] (orders 2, 3). Returns (deterministic part, noise coef)."""
    a_t, s_t, l_t = grids.vp(sig_t)
    a_u, s_u, l_u = grids.vp(sig_u)
    h = l_t - l_u
    em, ep, e2 = _exp(-h), _exp(h), _exp(-2.0 * h)
    if alg == "dpmsolver++":
        lead = (s_t / s_u) * S
    elif alg == "dpmsolver":
        lead = (a_t / a_u) * S
    else:
        lead = (s_t / s_u * em) * S
    noise = s_t * math.sqrt(1.0 - e2) if alg == "sde-dpmsolver++" else 0.0
    if order == 2:
        r0 = (grids.vp(sig_mid[0])[2] - l_u) / h
        D0, D1 = ms[1], (1.0 / r0) * (ms[0] - ms[1])
        D1_1, D2 = D1, None
    elif order == 3:
        l0, l1 = grids.vp(sig_mid[0])[2], grids.vp(sig_mid[1])[2]
        r0, r1 = (l0 - l_u) / h, (l1 - l_u) / h
        D0 = ms[2]
        D1_0, D1_1 = (1.0 / r1) * (ms[1] - ms[2]), (1.0 / r0) * (ms[0] - ms[2])
        D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
        D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
    else:
        D0 = ms[0]
    if alg == "dpmsolver++":
        out = lead - (a_t * (em - 1.0)) * D0
        if order == 2:
            out = out - 0.5 * (a_t * (em - 1.0)) * D1 if solver_type == "midpoint" else \
                out + (a_t * ((em - 1.0) / h + 1.0)) * D1
        elif order == 3:
            if solver_type == "midpoint":
                out = out + (a_t * ((em - 1.0) / h + 1.0)) * D1_1
            else:
                out = out + (a_t * ((em - 1.0) / h + 1.0)) * D1 - (a_t * ((em - 1.0 + h) / h**2 - 0.5)) * D2
    elif alg == "dpmsolver":
        out = lead - (s_t * (ep - 1.0)) * D0
        if order == 2:
            out = out - 0.5 * (s_t * (ep - 1.0)) * D1 if solver_type == "midpoint" else \
                out - (s_t * ((ep - 1.0) / h - 1.0)) * D1
        elif order == 3:
            if solver_type == "midpoint":
                out = out - (s_t * ((ep - 1.0) / h - 1.0)) * D1_1
            else:
                out = out - (s_t * ((ep - 1.0) / h - 1.0)) * D1 - (s_t * ((ep - 1.0 - h) / h**2 - 0.5)) * D2
    else:
        out = lead + (a_t * (1.0 - e2)) * D0
        g1 = a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
        if order == 2:
            out = out + 0.5 * (a_t * (1.0 - e2)) * D1 if solver_type == "midpoint" else out + g1 * D1
        elif order == 3:
            if solver_type == "midpoint":
                out = out + g1 * D1_1
            else:
                out = out + g1 * D1 + (a_t * ((1.0 - e2 + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)) * D2
    return out, noise


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None, *, start: int = 0):
    """The plan of diffusers' grid (or `grid_`, model-call times as data; whole numbers are handed to the model as
    int64); start=k: the run diffusers makes from step k (img2img)."""
    validate(o)
    if grid_ is not None:
        last = float(grids.sigma_table(grids.abar_tables(schedule)[0])[0]) \
            if o["final_sigmas_type"] == "sigma_min" else 0.0
        if getattr(grid_, "final", None) is not None:  # a grid that carries its own final σ
            last = grid_.final
        ts = [int(t) for t in grid_.timesteps] if grid_.integral else list(grid_.timesteps)
        sig = list(grid_.sigmas) + [last]
    else:
        ts, sig = grid(schedule, steps, o)
    N = len(ts)
    alg, k_max = o["algorithm_type"], o["solver_order"]
    to_x0 = alg != "dpmsolver"
    if o["thresholding"] and not to_x0:
        raise PlanError("thresholding with algorithm_type='dpmsolver' is not supported (diffusers' step fails there "
                        "too): use 'dpmsolver++' or 'sde-dpmsolver++'")
    wanted = order_list(o, N)
    orders = []  # diffusers: lowered while an output it needs is missing (a run's first calls)
    for i in range(start, N):
        orders.append(min(wanted[i], i - start + 1))
    b = PlanBuilder("dpmsolver_singlestep")
    for n, i in enumerate(range(start, N)):
        order = orders[n]
        c = b.call(ts[i])
        d = dpm_solver.convert(c, sig[i], o, to_x0=to_x0)
        ms = [d] + [c.get(f"m{j}") for j in (1, 2) if c.has(f"m{j}")]
        S = c.x if order == 1 else c.get("S")
        nxt, zc = _update(alg, o["solver_type"], order, S, ms, sig[i + 1], sig[i - order + 1],
                          [sig[i], sig[i - 1]])
        if alg == "sde-dpmsolver++":
            nxt = nxt + zc * c.z
            c.force_noise = True  # diffusers draws every step (the last's coefficient is 0)
        if n + 1 < len(orders):
            if order == 1 and orders[n + 1] > 1:
                c.put("S", c.x)
            elif order == 1 and c.has("S"):
                c.drop("S")
            if k_max > 2 and c.has("m1"):
                c.put("m2", c.get("m1"))
            if k_max > 1:
                c.put("m1", d)
        c.next(nxt)
    return b.build(t_dtype=torch.int64 if all(isinstance(t, int) for t in ts) else torch.float32,
                   init_noise_sigma=1.0, sigmas=sig, timesteps=ts[start:], options=dict(o), d_is_x0=to_x0)
