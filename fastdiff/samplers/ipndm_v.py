"""diffusers' IPNDMScheduler: iPNDM (Zhang & Chen 2023, arXiv 2204.13902, §5 and App. B; the Adams–Bashforth
weights of PNDM, Liu et al. 2022, eq. 12) on the angle parameterisation of v-diffusion models (Salimans & Ho 2022,
§4: x_φ = cos φ·x0 + sin φ·ε, the model predicting v). Not fastdiff's VP "ipndm" (fastdiff.samplers.ipndm): the grid
and the model's timesteps are diffusers' own and the step is taken in (α, β) = (cos φ, sin φ)-like coordinates.

diffusers builds, for N steps, s_i = 1 − i/N and β_i = sin²(s_i·π/2), α_i = √(1 − β_i²) (sic: the sine squared),
the model seeing t_i = atan2(β_i, α_i)·2/π, then per step

    e_i = β_i·x + α_i·v̂,   E = AB_k(e_i, e_{i−1}, …)  (k = min(4, i + 1), weights 1; 3/2, −1/2; 23/12, …; 55/24, …)
    x̂0 = (x − β_i·E)/max(α_i, 1e−8),   x_{i+1} = α_{i+1}·x̂0 + β_{i+1}·E,

linear in x, the current output and the stored e's: one row of the fused op per step (e_i kept by its second output).

diffusers' history (`ets`) is emptied by set_timesteps only: a pass started again without it (`_step_index = None`,
a begin index) goes on from the e's of the earlier steps. `carry=c` plans such a pass: the c newest earlier e's
(c ≤ 3, what AB_4 reads) wait in slots 0..c−1, newest first; every plan keeps its last step's e as well, and
`plan.kept[j]` names the slots holding e_newest, ... after call j, so the caller can hand them on.
"""
from __future__ import annotations

import math

import torch

from fastdiff import prediction
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.ipndm import WEIGHTS
from fastdiff.samplers.plan import PlanBuilder

DEFAULTS = dict(trained_betas=None)


def tables(steps: int):
    """(β, α) float64 for the N + 1 points and the N model timesteps (float32 as diffusers forms them)."""
    s32 = torch.cat([torch.linspace(1, 0, steps + 1)[:-1], torch.tensor([0.0])])
    b32 = torch.sin(s32 * math.pi / 2) ** 2
    a32 = (1.0 - b32**2) ** 0.5
    ts = [float(t) for t in (torch.atan2(b32, a32) / math.pi * 2)[:-1]]
    s64 = s32.double()
    b64 = torch.sin(s64 * math.pi / 2) ** 2
    a64 = (1.0 - b64**2).clamp(min=0) ** 0.5
    return [float(v) for v in b64], [float(v) for v in a64], ts


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None, *, start: int = 0,
         carry: int = 0):
    """start=k: the run diffusers makes from step k with an empty history (its warm-up orders from k); carry=c: the
    same run after earlier steps, their c newest e's in slots 0..c−1 (newest first) and taken as diffusers takes them
    (AB of order min(4, c + steps so far + 1))."""
    if not 0 <= carry <= 3:
        raise ValueError(f"ipndm_v: carry is the number of earlier e's read (0..3), got {carry}")
    if o.get("trained_betas") is not None:
        raise ValueError("trained_betas: diffusers' IPNDMScheduler uses them as its per-step β's (one more than the "
                         "steps); fastdiff does not offer that")
    if grid_ is not None:
        raise ValueError("ipndm_v: a grid given as data is not offered (diffusers' grid is its own angle schedule)")
    beta, alpha, ts = tables(steps)
    names = ["e1", "e2", "e3"]  # the previous e's, e1 the newest
    b = PlanBuilder("ipndm_v")
    for j in range(carry):  # the earlier pass's e's, where the caller puts them
        b.store[names[j]], b.refs[j] = {j: 1.0}, 1
    b.num_slots = carry
    kept = []  # per call: the slots of e1, e2, e3 after it

    def kept_now():
        got = [b.store[n] for n in names if n in b.store]
        if any(len(m) != 1 or next(iter(m.values())) != 1.0 for m in got):
            raise AssertionError("ipndm_v: each kept e is one slot")
        return [next(iter(m)) for m in got]

    for i, t in enumerate(ts):
        if i < start:
            continue
        c = b.call(t)
        if i > start:
            kept.append(kept_now())
        r, q = prediction.eps_coefs("v_prediction", alpha[i], beta[i])  # the angle schedule's v → ε: β·x + α·o
        e_xo = r * c.x + q * c.o
        e = c.convert(e_xo)  # d = e_i, kept for the next steps
        past = [c.get(n) for n in names if c.has(n)]
        k = min(4, len(past) + 1)
        # E with the current e written in x and o (not d): the coefficients on x combine on the host, so the first
        # step's α = 0 (diffusers: (x − 1·x)/1e−8 = 0) stays an exact 0 instead of a float32 cancellation of 1e8's
        E = sum(w * v for w, v in zip(WEIGHTS[k], [e_xo] + past[:k - 1]))
        x0 = (c.x - beta[i] * E) / max(alpha[i], 1e-8)
        c.shift(names)  # the last step's e too: a later pass without set_timesteps reads it
        c.put(names[0], e)
        c.next(alpha[i + 1] * x0 + beta[i + 1] * E)
    out = b.build(t_dtype=torch.float32, init_noise_sigma=1.0, timesteps=ts[start:], options=dict(o), sigmas=None,
                  d_is_x0=False)
    out.kept = kept + [kept_now()]
    return out
