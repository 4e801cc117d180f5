"""Linear multistep (LMS) on the σ grid: Adams–Bashforth with Lagrange-integral weights (Karras et al. 2022,
arXiv 2206.00364, §3 and k-diffusion's `sample_lms`; the classical method: Hairer, Nørsett, Wanner, Solving ODEs I,
§III.1). diffusers' LMSDiscreteScheduler.

The probability-flow ODE in the σ view is dx_σ/dσ = D(σ) with the slope D = (x_σ − x̂0)/σ. LMS keeps the last k
slopes D_0 (newest, at σ_i), D_1 (at σ_{i−1}), … and integrates their Lagrange interpolating polynomial over the step:

    x_σ(σ_{i+1}) = x_σ(σ_i) + Σ_j c_j·D_j,   c_j = ∫_{σ_i}^{σ_{i+1}} Π_{m≠j} (τ − σ_{i−m})/(σ_{i−j} − σ_{i−m}) dτ,

with k = min(order, i + 1) (order 4 by default, the `order` argument of diffusers' step). The weights are integrals
of cubic (at most) polynomials, computed here exactly, once per plan, in float64 on the host (diffusers integrates
them numerically in every step, with scipy's quad on its float32 σ's). When a run starts mid-schedule at step k
(img2img) diffusers still takes the order from the step index, min(order, i + 1), but has only the slopes of this
run: it uses the first of them (zip truncates); `plan(..., start=k)` builds that run.

fastdiff keeps the model's input x = x_σ/√(σ²+1); each step is one row of the fused op: d = x̂0, the new slope
(x_σ − x̂0)/σ kept as the op's second output, the older ones read from history slots.
"""
from __future__ import annotations

import torch

from fastdiff.samplers import euler
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import MAX_HIST, PlanBuilder

DEFAULTS = dict(prediction_type="epsilon", use_karras_sigmas=False, timestep_spacing="linspace", steps_offset=0,
                order=4)


def weights(sig, i: int, k: int) -> list[float]:
    """c_0 … c_{k−1}: the Lagrange basis polynomials through σ_i, σ_{i−1}, …, σ_{i−k+1}, integrated exactly from σ_i
    to σ_{i+1} (float64). A σ equal to a newer one (a grid that repeats a timestep; diffusers divides by 0 there:
    NaN) is left out: its weight is 0 and the others are those of the distinct σ's."""
    s0, h = float(sig[i]), float(sig[i + 1]) - float(sig[i])
    nodes = [float(sig[i - m]) - s0 for m in range(k)]  # in u = τ − σ_i (the step is u ∈ [0, h])
    keep = [j for j in range(k) if nodes[j] not in nodes[:j]]
    out = []
    for j in range(k):
        if j not in keep:
            out.append(0.0)
            continue
        poly, den = [1.0], 1.0  # Π_{m≠j} (u − u_m), coefficients by ascending power
        for m in keep:
            if m != j:
                poly = [(poly[p - 1] if p else 0.0) - nodes[m] * (poly[p] if p < len(poly) else 0.0)
                        for p in range(len(poly) + 1)]
                den *= nodes[j] - nodes[m]
        out.append(sum(a * h ** (p + 1) / (p + 1) for p, a in enumerate(poly)) / den)
    return out


def validate(o: dict):
    euler._check(o)
    if isinstance(o["order"], bool) or not isinstance(o["order"], int) or not 1 <= o["order"] <= MAX_HIST + 1:
        raise ValueError(f"order must be an int in [1, {MAX_HIST + 1}] for lms (the order − 1 earlier slopes are "
                         f"history tensors of the fused op, which reads at most {MAX_HIST}), got {o['order']!r}")


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None, *, start: int = 0):
    """The LMS plan of diffusers' grid (or `grid_`); start=k: the run diffusers makes from step k (img2img)."""
    validate(o)
    ts, sig = euler.grid(schedule, steps, o, given=grid_)
    N, order = len(ts), o["order"]
    names = [f"D{j}" for j in range(1, order)]  # D1 the previous slope, D2 the one before, …
    b = PlanBuilder("lms")
    repeats = []  # calls whose σ's repeat (diffusers: NaN; see `weights`)
    for i in range(start, N):
        s, sn = sig[i], sig[i + 1]
        c = b.call(ts[i], scale_in=euler._scale(s))
        sample = euler._scale(s) * c.x
        x0 = euler._x0(c, s, o)
        slope = (sample - x0) / s
        k = min(i + 1, order)  # diffusers: the order from the step index
        have = [slope] + [c.get(n) for n in names if c.has(n)]
        w = weights(sig, i, k)
        if len({sig[i - m] for m in range(k)}) < k:
            repeats.append(i - start)
        nxt = sample + sum(cj * Dj for cj, Dj in zip(w, have))  # zip: only the slopes this run has
        if i < N - 1:
            c.shift(names)
            if names:
                c.put(names[0], slope)
        c.next(nxt, scale_out=euler._scale(sn) if i < N - 1 else 1.0)
    p = b.build(t_dtype=torch.float32, init_noise_sigma=euler._init_sigma(o, sig), sigmas=sig,
                timesteps=ts[start:], options=dict(o))
    p.nan_calls = repeats
    return p
