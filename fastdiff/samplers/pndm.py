"""PNDM: pseudo numerical methods (Liu et al. 2022, arXiv 2202.09778) — PLMS, with PRK warm-up or without.

The transfer part φ (eq. 9 of the paper) moves x_t to x_{t−δ} along the DDIM direction for a given ε:
x_{t−δ} = √(ᾱ_{t−δ}/ᾱ_t)·x_t − (ᾱ_{t−δ} − ᾱ_t)·ε / (ᾱ_t√(1−ᾱ_{t−δ}) + √(ᾱ_t(1−ᾱ_t)ᾱ_{t−δ})). The gradient part
combines the ε's of past steps: pseudo Runge-Kutta (PRK, eq. 13: four evaluations per step, weights 1/6, 1/3, 1/3,
1/6) for the first three steps, then the linear multistep PLMS (eq. 12: (55ε₀ − 59ε₁ + 37ε₂ − 9ε₃)/24, with the
lower orders while fewer ε's exist). With `skip_prk_steps` (Stable Diffusion's setting) the warm-up is diffusers'
PLMS-only start, which repeats the second timestep once (a Heun-like correction). This module follows diffusers'
PNDMScheduler counter by counter (its timesteps, `set_alpha_to_one`, v-prediction converted after combining).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import prediction
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder

DEFAULTS = dict(prediction_type="epsilon", skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading",
                steps_offset=0)


def timesteps(T: int, n: int, o: dict):
    """(prk timesteps, plms timesteps) as PNDMScheduler.set_timesteps builds them."""
    sp = o["timestep_spacing"]
    if sp == "linspace":
        ts = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif sp == "leading":
        ts = (np.arange(0, n) * (T // n)).round() + o["steps_offset"]
    elif sp == "trailing":
        ts = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of ('linspace', 'leading', 'trailing'), got {sp!r}")
    if o["skip_prk_steps"]:
        prk = np.array([], dtype=np.int64)
        plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
    else:
        prk = np.array(ts[-4:]).repeat(2) + np.tile(np.array([0, T // n // 2]), 4)  # pndm_order = 4
        prk = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
        plms = ts[:-3][::-1].copy()
    return [int(t) for t in prk], [int(t) for t in plms]


def grid_timesteps(g: list, o: dict):
    """(prk, plms) call times over a grid given as data (descending `g`): the same structure as `timesteps`, with
    the PRK midpoints halfway between grid points."""
    if o["skip_prk_steps"]:
        return [], g[:2] + g[1:]  # diffusers' PLMS start: the second time twice
    prk = []
    for k in range(3):
        m = (g[k] + g[k + 1]) / 2
        prk += [g[k], m, m, g[k + 1]]
    return prk, list(g[3:])


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_=None, *, plms_tail: list | None = None):
    """PNDM/PLMS over diffusers' grid, a grid given as data (`grid_`), or `plms_tail`: the PLMS call times from a
    later start (diffusers' PNDMScheduler restarted mid-schedule, img2img: a fresh counter on timesteps[k:])."""
    if o["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction' for pndm, got {o['prediction_type']!r}")
    T = len(schedule)
    if not o["skip_prk_steps"] and steps < 4:
        raise ValueError(f"steps: PNDM with PRK warm-up needs steps >= 4, got {steps}")
    if o["skip_prk_steps"] and steps < 2:
        raise ValueError(f"steps: PLMS (skip_prk_steps) needs steps >= 2, got {steps}")
    final = 1.0 if o["set_alpha_to_one"] else grids.abar_at(schedule, 0)
    if grid_ is None:
        prk, plms = timesteps(T, steps, o) if plms_tail is None else ([], list(plms_tail))
        ratio = T // steps
        down, up = (lambda t: t - ratio), (lambda t: t + ratio)  # noqa: E731 (diffusers' t ∓ T//N)
    else:  # a grid given as data: the neighbours on the grid (below the last one: the final ᾱ)
        g = [int(t) for t in grid_.timesteps] if grid_.integral else list(grid_.timesteps)
        prk, plms = grid_timesteps(g, o)
        nxt = {g[k]: (g[k + 1] if k + 1 < len(g) else -1) for k in range(len(g))}
        prv = {g[k + 1]: g[k] for k in range(len(g) - 1)}
        down, up = nxt.__getitem__, prv.__getitem__
    calls = prk + plms

    def prev_sample(sample, t, pt, mo):
        at = grids.abar_at(schedule, t)
        ap = grids.abar_at(schedule, pt) if pt >= 0 else final
        if o["prediction_type"] == "v_prediction":  # ε̂ = σ·x + α·v
            r, u = prediction.eps_coefs("v_prediction", math.sqrt(at), math.sqrt(1 - at))
            mo = u * mo + r * sample
        denom = at * math.sqrt(1 - ap) + math.sqrt(at * (1 - at) * ap)
        return math.sqrt(ap / at) * sample - ((ap - at) / denom) * mo

    b = PlanBuilder("pndm")
    counter, ets, cmo = 0, [], None  # ets: names of the stored raw model outputs, oldest first
    for k, t in enumerate(calls):
        c = b.call(t)
        e = c.convert(1.0 * c.o)  # d = the raw model output
        if counter < len(prk):
            # even calls step to the midpoint / the next grid time: diffusers' t − ⌊⌊T/N⌋/2⌋ (not always the next
            # listed time when T/N is odd), the next listed time on a given grid; odd calls re-evaluate there
            pt = t if counter % 2 else (t - T // steps // 2 if grid_ is None else prk[counter + 1])
            tt = prk[counter // 4 * 4]
            r = counter % 4
            mo = e
            if r == 0:
                cmo = e / 6
                ets.append(f"e{counter}")
                c.put(ets[-1], e)
                c.put("cur_sample", c.x)
            elif r in (1, 2):
                cmo = c.get("cmo") + e / 3
            else:
                mo = c.get("cmo") + e / 6
                cmo = None
            cur = c.x if r == 0 else c.get("cur_sample")
            nxt = prev_sample(cur, tt, pt, mo)
            if cmo is not None:
                c.put("cmo", cmo)
            elif c.has("cmo"):
                c.drop("cmo")
        else:
            pt = down(t)
            sample = c.x
            if counter != 1:
                for old in ets[:-3]:
                    c.drop(old)
                ets = ets[-3:] + [f"e{counter}"]
                c.put(ets[-1], e)
                vals = [c.get(n) for n in ets[:-1]] + [e]  # oldest first, the newest is this call's
            else:
                pt, t = t, up(t)
                vals = [c.get(n) for n in ets]
            if c.has("cmo"):
                c.drop("cmo")
            if len(ets) == 1 and counter == 0:
                mo = e
                c.put("cur_sample", c.x)
            elif len(ets) == 1 and counter == 1:
                mo = (e + vals[-1]) / 2
                sample = c.get("cur_sample")
                c.drop("cur_sample")
            elif len(ets) == 2:
                mo = (3 * vals[-1] - vals[-2]) / 2
            elif len(ets) == 3:
                mo = (23 * vals[-1] - 16 * vals[-2] + 5 * vals[-3]) / 12
            else:
                mo = (1 / 24) * (55 * vals[-1] - 59 * vals[-2] + 37 * vals[-3] - 9 * vals[-4])
            if counter >= 2 and c.has("cur_sample"):
                c.drop("cur_sample")
            nxt = prev_sample(sample, t, pt, mo)
        c.next(nxt)
        counter += 1
    t_dtype = torch.int64 if all(float(t).is_integer() for t in calls) else torch.float32
    return b.build(t_dtype=t_dtype, init_noise_sigma=1.0, timesteps=calls, options=dict(o), d_is_x0=False)
