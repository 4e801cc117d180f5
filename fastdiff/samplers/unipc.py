"""UniPC: unified predictor-corrector (Zhao et al. 2023, arXiv 2302.04867), B(h) variants bh1 and bh2.

The predictor UniP-p (Alg. 2 of the paper, the multistep form) and the corrector UniC-p (Alg. 1) both write
x_t = (σ_t/σ_s)·x_s − α_t·h·φ₁(h)·m0 − α_t·B(h)·Σ_k ρ_k·D_k (data prediction; the ε form swaps α and σ), with
D_k = (m_k − m0)/r_k, r_k = (λ_{s_k} − λ_s)/h, and ρ solving the order conditions R·ρ = b (eq. 8 and Thm. 3.1;
B(h) = h for bh1, e^h − 1 for bh2). The corrector reuses the model evaluation at the predicted x_t (no extra call):
with m_t the new output, D_t = m_t − m0 joins the sum. Both are linear in the stored outputs, so one call of the
fused op does corrector (its result is kept as the next call's `last_sample`, output y2) and predictor (output y).
This module follows diffusers' UniPCMultistepScheduler (warm-up orders, `lower_order_final`, `disable_corrector`,
its σ grids) term by term; ρ is solved in float64 (diffusers: float32).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.samplers import dpm_solver
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder, PlanError

DEFAULTS = dict(solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True,
                disable_corrector=(), use_karras_sigmas=False, timestep_spacing="linspace", steps_offset=0,
                final_sigmas_type="zero", sigma_min=None, sigma_max=None, use_exponential_sigmas=False,
                use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False,
                time_shift_type="exponential", shift_terminal=None, mu=None, sigmas=None)


def validate(o: dict):
    if o["solver_order"] not in (1, 2, 3) or isinstance(o["solver_order"], bool):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {o['solver_order']!r}")
    if o["solver_type"] not in ("bh1", "bh2"):
        raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {o['solver_type']!r}")
    if o["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {o['final_sigmas_type']!r}")
    if o["final_sigmas_type"] == "zero" and o["solver_type"] == "bh1":
        raise ValueError("unipc: solver_type='bh1' with final_sigmas_type='zero' is NaN in diffusers (B(h) = h = −∞ "
                         "times a zero correction on the last step); use solver_type='bh2' or "
                         "final_sigmas_type='sigma_min'")
    if o["final_sigmas_type"] == "zero" and not o["predict_x0"]:
        raise ValueError("unipc: predict_x0=False with final_sigmas_type='zero' is NaN in diffusers (σ_t·(e^h − 1) = "
                         "0·∞ on the last step); use predict_x0=True or final_sigmas_type='sigma_min'")
    dpm_solver.validate_sigmas(o, "unipc")
    if o.get("shift_terminal") is not None and not o.get("use_flow_sigmas"):
        raise ValueError("shift_terminal is only supported with use_flow_sigmas=True (as in diffusers)")
    if o.get("sigmas") is not None and not o.get("use_flow_sigmas"):
        raise ValueError("sigmas: custom σ's need use_flow_sigmas=True for unipc (as in diffusers); a VP grid is "
                         "given as timesteps= or sigmas= of fastdiff.sample instead")
    dc = o["disable_corrector"]
    if not isinstance(dc, (list, tuple)) or not all(isinstance(k, (int, np.integer)) for k in dc):
        raise ValueError(f"disable_corrector must be a list of step indices, got {dc!r}")


def _coeffs(order: int, h: float, lams_k: list, predict_x0: bool, solver_type: str, corrector: bool):
    """(h·φ₁(h), B(h), ρ) of UniP (corrector=False) or UniC of `order` at one step, in float64."""
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    B_h = hh if solver_type == "bh1" else math.expm1(hh)
    if corrector and order == 1:
        return h_phi_1, B_h, [0.5]
    if not corrector and order <= 2:
        return h_phi_1, B_h, [] if order == 1 else [0.5]
    if hh == 0 or math.isinf(hh):
        raise PlanError(f"unipc: order {order} over a step of h = {h} (σ_t = σ_s or σ_t = 0) has no finite "
                        "coefficients (diffusers gives NaN): use lower_order_final=True")
    rks = [lam / h for lam in lams_k] + [1.0]  # lams_k: λ_{s_k} − λ_{s0}
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = np.array(R, dtype=np.float64), np.array(b, dtype=np.float64)
    rhos = np.linalg.solve(R, b) if corrector else np.linalg.solve(R[:-1, :-1], b[:-1])
    return h_phi_1, B_h, [float(r) for r in rhos]


def _step(o, order, x, m0, ms, sig_t, sig_s0, sig_ks, *, corrector: bool, model_t=None):
    """UniP (corrector=False) from x at σ_s0 with m0 and the older outputs ms (newest first, at σ's sig_ks), or UniC
    (corrector=True) with the new output model_t at σ_t."""
    ab = dpm_solver.alpha_sigma(o)
    a_t, s_t, l_t = ab(sig_t)
    a0, s0, l0 = ab(sig_s0)
    h = l_t - l0
    if h == 0:  # σ_t = σ_s (the flow grid with final_sigmas_type="sigma_min" ends on its last σ): h·φ₁ = B(h) = 0,
        return 1.0 * x  # the step is the identity (diffusers: the same, its D's are (m − m0)/∞ = 0)
    lams = [ab(s)[2] - l0 for s in sig_ks]
    h_phi_1, B_h, rhos = _coeffs(order, h, lams, o["predict_x0"], o["solver_type"], corrector)
    D1s = [(m - m0) / (lam / h) for m, lam in zip(ms, lams)]
    if o["predict_x0"]:
        base, scale = (s_t / s0) * x - (a_t * h_phi_1) * m0, a_t * B_h
    else:
        base, scale = (a_t / a0) * x - (s_t * h_phi_1) * m0, s_t * B_h
    res = 0
    if corrector:
        for r, D in zip(rhos[:-1], D1s):
            res = res + r * D
        res = res + rhos[-1] * (model_t - m0)
    else:
        for r, D in zip(rhos, D1s):
            res = res + r * D
    if isinstance(res, int):  # no correction terms (order-1 predictor)
        return base
    return base - scale * res


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    validate(o)
    o = dict(o, lambda_min_clipped=-math.inf)
    if grid_ is None:
        ts, sig = dpm_solver.grid(schedule, steps, o, unipc=True)
        t_dtype = torch.int64
    else:
        ts, sig, t_dtype = dpm_solver.grid_sigmas(schedule, grid_, o)
    N, order = len(ts), o["solver_order"]
    b = PlanBuilder("unipc")
    names = [f"m{k}" for k in range(order)]  # the previous outputs, m0 the newest
    lower_nums, this_order = 0, None
    disabled = {int(k) for k in o["disable_corrector"]}
    for i in range(N):
        c = b.call(ts[i])
        d = dpm_solver.convert(c, sig[i], o, to_x0=o["predict_x0"])
        x = c.x
        if i > 0 and (i - 1) not in disabled and c.has("last"):
            prev = [c.get(n) for n in names if c.has(n)]
            x = _step(o, this_order, c.get("last"), prev[0], prev[1:this_order], sig[i], sig[i - 1],
                      [sig[i - 1 - k] for k in range(1, this_order)], corrector=True, model_t=d)
        # shift the outputs: m_{k} <- m_{k-1}, m0 <- d
        stored = [c.get(n) for n in names if c.has(n)]
        outs = [d] + stored
        c.shift(names)
        c.put(names[0], d)
        k = min(order, N - i) if o["lower_order_final"] else order
        this_order = min(k, lower_nums + 1)
        if i < N - 1:
            c.put("last", x, materialize=True)  # one slot (the next corrector reads it with up to 3 outputs)
        x_next = _step(o, this_order, x, outs[0], outs[1:this_order], sig[i + 1], sig[i],
                       [sig[i - k] for k in range(1, this_order)], corrector=False)
        c.next(x_next)
        lower_nums = min(lower_nums + 1, order)
    return b.build(t_dtype=t_dtype, init_noise_sigma=1.0, sigmas=sig, timesteps=ts, options=dict(o),
                   d_is_x0=bool(o["predict_x0"]))


__all__ = ["plan", "DEFAULTS", "PlanError"]
