"""DPM-Solver-2 on the σ grid, as k-diffusion's `sample_dpm_2` / `sample_dpm_2_ancestral` (Lu et al. 2022a,
arXiv 2206.00927, Alg. 1 "DPM-Solver-2" with the midpoint in log σ; Karras et al. 2022, arXiv 2206.00364, §3 for the
σ-view ODE). diffusers' KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler.

In the σ view dx_σ/dσ = (x_σ − x̂0)/σ. A step from σ_k to σ_{k+1} takes an Euler half step to the geometric midpoint
σ_mid = √(σ_k·σ_{k+1}) and then the full step with the slope found there (the explicit midpoint rule, in log σ):

    x̃ = x + (σ_mid − σ_k)·(x − x̂0(x, σ_k))/σ_k,      x_{k+1} = x + (σ_{k+1} − σ_k)·(x̃ − x̂0(x̃, σ_mid))/σ_mid.

The ancestral variant aims the full step at σ_down and adds σ_up·z (σ_up² = σ_{k+1}²(σ_k² − σ_{k+1}²)/σ_k²,
σ_down² = σ_{k+1}² − σ_up², as Euler ancestral) with the midpoint √(σ_k·σ_down). The last step (to σ = 0) is one
Euler step: 2N − 1 model calls. diffusers interleaves the grid's timesteps with those of the midpoints (σ → t by
interpolating log σ over the training table, in float32 as diffusers does, so the model sees its timesteps exactly);
fastdiff keeps the model's input x = x_σ/√(σ²+1), every call one row of the fused op (the step's start x_σ kept in a
history slot between its two calls).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.samplers import euler
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder

DEFAULTS = dict(prediction_type="epsilon", use_karras_sigmas=False, timestep_spacing="linspace", steps_offset=0)
ANCESTRAL_DEFAULTS = dict(DEFAULTS)


def _check(o, name):
    if o["prediction_type"] == "sample":
        raise NotImplementedError(f"prediction_type='sample' is not implemented by diffusers' {name}; fastdiff does "
                                  "not offer it either")
    euler._check(o)


def _sigma_to_t32(sig: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t` as KDPM2's set_timesteps runs it (on float32 torch tensors): log σ interpolated over
    the float32 table, every operation in float32 (the index weights too), for all σ's at once."""
    ls = np.log(np.maximum(sig, 1e-10))
    low = np.cumsum(ls[None, :] - log_s[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(log_s) - 2)
    lo, hi = log_s[low], log_s[low + 1]
    w = np.clip((lo - ls) / (lo - hi), 0, 1)
    return (np.float32(1) - w) * low.astype(np.float32) + w * (low + 1).astype(np.float32)


def grid(schedule: NoiseSchedule, steps: int, o: dict, *, ancestral: bool, given: grids.Grid | None = None):
    """(calls, t_dtype, σ's): one (model t, σ of the model input, kind, the σ's of its step (σ_k, σ_mid, σ_to, σ_up),
    diffusers computes NaN there) per call, kind "first" (at σ_k) or "second" (at σ_mid), as diffusers'
    set_timesteps builds the interleaved grid: σ's in float64, timesteps from diffusers' float32 σ's."""
    ts, sig = euler.grid(schedule, steps, o, given=given)
    sig = np.asarray(sig, dtype=np.float64)  # N + 1, the last 0
    t_dtype = torch.float32
    nan_mid = []
    if given is None:
        _, a32 = grids.abar_tables(schedule)
        s32 = grids.sigma_table(a32)
        if o["use_karras_sigmas"]:
            k = euler.grid(schedule, steps, dict(o, use_karras_sigmas=False))[0]
            lo, hi = np.interp([k[-1], k[0]], np.arange(len(s32)), s32)
            sig32 = grids.karras(float(lo), float(hi), steps)
            ts = [float(t) for t in np.array([grids.sigma_to_t(s, np.log(s32)) for s in sig32]).round()]
            t_dtype = torch.float64  # diffusers' rounded Karras timesteps are a float64 array
        else:
            sig32 = np.interp(np.asarray(ts, dtype=np.float32), np.arange(len(s32)), s32)
        s = torch.from_numpy(np.concatenate([sig32, [0.0]]).astype(np.float32))
        if ancestral:
            nxt = s.roll(-1)
            nxt[-1] = 0.0
            up = (nxt**2 * (s**2 - nxt**2) / s**2) ** 0.5
            down = (nxt**2 - up**2) ** 0.5
            down[-1] = 0.0
            mid32 = s.log().lerp(down.log(), 0.5).exp()
            mid32[-2:] = 0.0
            mid32 = mid32[:-1]
        else:
            mid32 = s.log().lerp(s.roll(1).log(), 0.5).exp()[1:]
        log_s = np.log(s32)
        t_mid = [float(t) for t in _sigma_to_t32(mid32.numpy(), log_s)]
        # diffusers' float32 σ_down = √(σ_next² − σ_up²) cancels where σ_next ≪ σ (σ_max ≈ 2e4 on
        # squaredcos_cap_v2): a NaN or far-off midpoint (σ_down 0.0028 for 0.0016) and its timestep; fastdiff's σ's
        # are float64 (below), and where diffusers' midpoint is off them by > 1% the model sees the timestep of the
        # float64 midpoint (`nan_calls`: the calls where fastdiff departs from diffusers' float32 numbers)
        nan_mid = [k for k, m in enumerate(mid32.tolist()) if not math.isfinite(m)]
    calls = []
    N = len(ts)
    for k in range(N):
        s_k, s_n = float(sig[k]), float(sig[k + 1])
        if ancestral:
            up = math.sqrt(s_n**2 * (s_k**2 - s_n**2) / s_k**2)
            to = math.sqrt(max(s_n**2 - up**2, 0.0))
        else:
            up, to = 0.0, s_n
        mid = math.sqrt(s_k * to) if k < N - 1 else 0.0
        if given is not None:
            t_m = float(grids.times_for_sigmas(schedule, [mid])[0]) if k < N - 1 else 0.0
        elif k < N - 1 and (k in nan_mid or abs(float(mid32[k]) - mid) > 1e-2 * mid):
            nan_mid.append(k)
            t_m = float(_sigma_to_t32(np.array([mid], dtype=np.float32), log_s)[0])
        else:
            t_m = t_mid[k]
        calls.append((ts[k], s_k, "first", (s_k, mid, to, up), False))
        if k < N - 1:
            calls.append((t_m, mid, "second", (s_k, mid, to, up), k in nan_mid))
    return calls, t_dtype, [float(v) for v in sig]


def _plan(name, schedule, steps, o, grid_, ancestral):
    _check(o, name)
    calls, t_dtype, sig = grid(schedule, steps, o, ancestral=ancestral, given=grid_)
    b = PlanBuilder("kdpm2_ancestral" if ancestral else "kdpm2")
    for j, (t, s_in, kind, (s_k, mid, to, up), _) in enumerate(calls):
        last = j == len(calls) - 1
        c = b.call(t, scale_in=euler._scale(s_in))
        sample = euler._scale(s_in) * c.x
        d = euler._x0(c, s_in, o)
        slope = (sample - d) / s_in
        if kind == "first":
            nxt = sample + slope * (mid - s_k)
            if not last:
                c.put("start", sample)
        else:
            nxt = c.get("start") + slope * (to - s_k)
            if ancestral:
                nxt = nxt + up * c.z
                c.force_noise = True  # diffusers draws at every second call (σ_up may be 0)
            c.drop("start")
        c.next(nxt, scale_out=1.0 if last else euler._scale(calls[j + 1][1]))
    # diffusers' `sigmas`: [σ_0, σ_1, σ_1, …, σ_N, σ_N, σ_N] (σ_N = 0), the σ add_noise reads at each call
    expanded = sig[:1] + [v for v in sig[1:] for _ in (0, 1)] + sig[-1:]
    p = b.build(t_dtype=t_dtype, init_noise_sigma=euler._init_sigma(o, sig), sigmas=expanded,
                timesteps=[cl[0] for cl in calls], options=dict(o))
    p.nan_calls = [j for j, cl in enumerate(calls) if cl[4]]  # where diffusers' float32 grid fails (see `grid`)
    return p


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    return _plan("KDPM2DiscreteScheduler", schedule, steps, o, grid_, ancestral=False)


def ancestral_plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    return _plan("KDPM2AncestralDiscreteScheduler", schedule, steps, o, grid_, ancestral=True)
