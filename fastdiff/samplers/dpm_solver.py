"""DPM-Solver and DPM-Solver++ multistep (Lu et al. 2022a, arXiv 2206.00927; Lu et al. 2022b, arXiv 2211.01095).

In λ_t = log(α_t/σ_t) the probability-flow ODE has the exact solution of the variation-of-constants form (2022b,
eq. 8); DPM-Solver++ integrates the data prediction x̂0 with a Taylor expansion of order k in λ, the multistep
variant reusing earlier x̂0's for the derivatives (2022b, Alg. 2 for order 2; the order-3 and the SDE variants as
diffusers' DPMSolverMultistepScheduler writes them, which this module follows term by term, incl. its warm-up,
`lower_order_final` and `final_sigmas_type`). With h = λ_t − λ_s and D0 = x̂0(s):

    order 1 (= DDIM):       x_t = (σ_t/σ_s)·x_s − α_t(e^{−h} − 1)·D0                         (2022b, eq. 9)
    order 2 (midpoint):     … − ½·α_t(e^{−h} − 1)·D1,  D1 = (D0 − D_{−1})/r0,  r0 = h_{−1}/h  (2022b, Alg. 2)
    sde-dpmsolver++:        x_t = (σ_t/σ_s)e^{−h}·x_s + α_t(1 − e^{−2h})·D0 + … + σ_t√(1 − e^{−2h})·z

docs/math.md ("DPM-Solver++") has the derivation in fastdiff's notation. Every update is linear in x_s, the current
x̂0 (or ε̂ for the non-++ variants) and the stored ones, which is what `PlanBuilder` compiles.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import prediction
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import PlanBuilder, PlanError

DEFAULTS = dict(solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                euler_at_final=False, use_karras_sigmas=False, final_sigmas_type="zero",
                lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing="linspace", steps_offset=0,
                use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential", mu=None)
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


def validate(o: dict):
    if o["solver_order"] not in (1, 2, 3) or isinstance(o["solver_order"], bool):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {o['solver_order']!r}")
    if o["algorithm_type"] not in ALGORITHMS:
        raise ValueError(f"algorithm_type must be one of {ALGORITHMS}, got {o['algorithm_type']!r}")
    if o["solver_type"] not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {o['solver_type']!r}")
    if o["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {o['final_sigmas_type']!r}")
    if o["algorithm_type"] in ("dpmsolver", "sde-dpmsolver") and o["final_sigmas_type"] == "zero":
        raise ValueError(f"final_sigmas_type='zero' is not supported for algorithm_type={o['algorithm_type']!r} "
                         "(as in diffusers): use final_sigmas_type='sigma_min'")
    if o["variance_type"] not in (None, "learned", "learned_range"):
        raise ValueError(f"variance_type must be None, 'learned' or 'learned_range', got {o['variance_type']!r}")
    validate_sigmas(o, "dpmsolver++")
    if o["prediction_type"] == "flow_prediction" and not o["algorithm_type"].endswith("++"):
        raise ValueError(f"prediction_type='flow_prediction' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++' "
                         f"(as in diffusers), got {o['algorithm_type']!r}")


def validate_sigmas(o: dict, sampler: str):
    """The σ-grid options of DPM-Solver++ and UniPC: one spreading at a time, flow σ's alone (the combinations diffusers'
    if-chain silently drops or runs on VP σ's with flow α's), prediction_type='flow_prediction' with flow σ's."""
    grids.check_spread(o)
    on = [k for k in (*grids.SPREADS, "use_lu_lambdas") if o.get(k)]
    if len(on) > 1:
        raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas can "
                         f"be set, got {on}")
    flow_ok = ("use_karras_sigmas",) if sampler == "unipc" else ()  # UniPC maps Karras σ's to σ/(σ + 1)
    if o.get("use_flow_sigmas") and set(on) - set(flow_ok):
        raise ValueError(f"use_flow_sigmas=True with {on[0]}=True is not a flow grid in diffusers' {sampler} either "
                         "(VP σ's under flow α's); set one of them")
    if o["prediction_type"] == "flow_prediction" and not o.get("use_flow_sigmas"):
        raise ValueError("prediction_type='flow_prediction' (a velocity model) needs use_flow_sigmas=True (σ ∈ (0, 1], "
                         "x = (1 − σ)·x0 + σ·ε); or sample it with sampler='flow_euler'")
    for k in ("flow_shift",):
        if isinstance(o[k], bool) or not isinstance(o[k], (int, float)) or not o[k] > 0:
            raise ValueError(f"{k} must be a number > 0, got {o[k]!r}")
    if o.get("mu") is not None and not o.get("use_dynamic_shifting"):
        raise ValueError("mu applies with use_dynamic_shifting=True only")
    if o.get("use_dynamic_shifting"):
        if not o.get("use_flow_sigmas"):
            raise ValueError("use_dynamic_shifting=True shifts flow σ's: it needs use_flow_sigmas=True")
        if o.get("mu") is None:
            raise ValueError("mu: use_dynamic_shifting=True needs mu= (the pipelines compute it from the image "
                             "sequence length)")
        if sampler != "unipc" and o["time_shift_type"] != "exponential":
            raise ValueError(f"time_shift_type must be 'exponential' for {sampler} (diffusers: flow_shift = e^mu), got "
                             f"{o['time_shift_type']!r}")
    if o.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {o['time_shift_type']!r}")


def flow_grid(schedule: NoiseSchedule, steps: int, o: dict, *, unipc: bool = False):
    """(model timesteps int64, flow σ's float64 with the final one appended) of use_flow_sigmas, as diffusers 0.42's
    DPMSolverMultistepScheduler (σ = shift(1 − linspace(1, 1/T, N + 1)), flipped, last dropped; flow_shift = e^mu
    with dynamic shifting) and UniPCMultistepScheduler (σ = linspace(1, 1/T, N + 1)[:-1] or the given sigmas=, flow
    or dynamic time shift, shift_terminal, the first σ kept 1e-6 below 1; Karras σ's mapped to σ/(σ + 1)) build it."""
    from fastdiff.samplers import flow

    T = len(schedule)
    a64, a32 = grids.abar_tables(schedule)
    s32_tab, s64_tab = grids.sigma_table(a32), grids.sigma_table(a64)
    dynamic = bool(o.get("use_dynamic_shifting"))
    if not unipc:
        shift = math.exp(float(o["mu"])) if dynamic else float(o["flow_shift"])
        sig = np.flip(flow.shift_sigmas(1.0 - np.linspace(1, 1 / T, steps + 1), shift))[:-1].copy()
        ts = (sig * T).astype(np.int64)
        last = float(s64_tab[0]) if o["final_sigmas_type"] == "sigma_min" else 0.0
        return [int(t) for t in ts], _as_f32(list(sig) + [last])
    if o.get("use_karras_sigmas"):
        lo32 = float(o["sigma_min"]) if o.get("sigma_min") is not None else float(s32_tab[0])
        hi32 = float(o["sigma_max"]) if o.get("sigma_max") is not None else float(s32_tab[-1])
        lo64 = float(o["sigma_min"]) if o.get("sigma_min") is not None else float(s64_tab[0])
        hi64 = float(o["sigma_max"]) if o.get("sigma_max") is not None else float(s64_tab[-1])
        k32, sig = grids.karras(lo32, hi32, steps), grids.karras(lo64, hi64, steps)
        k32, sig = k32 / (k32 + 1), sig / (sig + 1)
        ts = (k32 * T).astype(np.int64)
    else:
        if o.get("sigmas") is not None:
            sig = flow._values("sigmas", o["sigmas"])
            if len(sig) != steps:
                raise ValueError(f"sigmas: {len(sig)} values but steps={steps}")
        else:
            sig = np.linspace(1, 1 / T, steps + 1)[:-1]
        if dynamic:
            sig = flow.time_shift(sig, float(o["mu"]), o["time_shift_type"])
        else:
            sig = flow.shift_sigmas(sig, float(o["flow_shift"]))
        if o.get("shift_terminal"):
            sig = flow.stretch_to_terminal(sig, float(o["shift_terminal"]))
        sig = np.array(sig, dtype=np.float64)
        if abs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6  # diffusers: λ = log(1 − σ) − log σ is −∞ at σ = 1
        ts = (sig * T).astype(np.int64)
    last = float(sig[-1]) if o["final_sigmas_type"] == "sigma_min" else 0.0
    return [int(t) for t in ts], _as_f32(list(sig) + [last])


def _as_f32(sig) -> list:
    """Flow σ's as diffusers' float32 table holds them (the solver's math stays float64): near σ = 1, α = 1 − σ is a
    difference of nearly equal numbers (UniPC's first σ is 1 − 10⁻⁶, α = 10⁻⁶, and float32 rounds σ by up to
    3·10⁻⁸, i.e. 3% of α), so α and λ = log(α/σ) follow the σ's the model's scheduler really uses."""
    return [float(np.float32(v)) for v in sig]


def grid(schedule: NoiseSchedule, steps: int, o: dict, *, unipc: bool = False):
    """(model timesteps as int64 values, σ's float64 with the final one appended) as DPMSolverMultistepScheduler
    builds them (unipc=True: UniPCMultistepScheduler's variant: no λ clipping, Karras timesteps always rounded,
    config sigma_min/sigma_max honoured, final σ_min = the last Karras σ)."""
    if o.get("use_flow_sigmas"):
        return flow_grid(schedule, steps, o, unipc=unipc)
    a64, a32 = grids.abar_tables(schedule)
    T = len(a64)
    last_t = T
    if not unipc and o["lambda_min_clipped"] > -math.inf:
        lam32 = (torch.log(torch.from_numpy(a32).sqrt()) - torch.log((1 - torch.from_numpy(a32)).sqrt()))
        last_t = T - int(torch.searchsorted(torch.flip(lam32, [0]), float(o["lambda_min_clipped"])))
    ts = grids.spaced_timesteps(T, steps, o["timestep_spacing"], o["steps_offset"], plus_one=True,
                                last_timestep=last_t)
    s32, s64 = grids.sigma_table(a32), grids.sigma_table(a64)
    lu = not unipc and o.get("use_lu_lambdas")
    spread = o.get("use_karras_sigmas") or o.get("use_exponential_sigmas") or o.get("use_beta_sigmas") or lu
    if spread:  # Karras / exponential / beta σ's, or Lu et al.'s λ-uniform grid, over the table's σ range
        lo32, hi32, lo64, hi64 = float(s32[0]), float(s32[-1]), float(s64[0]), float(s64[-1])
        if unipc:
            if o.get("sigma_min") is not None:
                lo32 = lo64 = float(o["sigma_min"])
            if o.get("sigma_max") is not None:
                hi32 = hi64 = float(o["sigma_max"])
        make = (lambda lo, hi: grids.exponential_sigmas(lo, hi, steps)) if lu else \
            (lambda lo, hi: grids.spread(lo, hi, steps, o))  # λ uniform (Lu et al. 2022a) = log σ uniform
        # diffusers' λ grid runs between the float32 logs of its σ table (the model's timesteps depend on them)
        k32 = np.exp(np.linspace(float(np.log(s32)[-1]), float(np.log(s32)[0]), steps)) if lu else make(lo32, hi32)
        tf = np.array([grids.sigma_to_t(s, np.log(s32)) for s in k32])
        if (o["use_karras_sigmas"] or lu) and (unipc or schedule.name != "cosine"):
            tf = tf.round()
        ts = tf.astype(np.int64)  # diffusers: .to(torch.int64) truncates what was not rounded
        sig = [float(v) for v in make(lo64, hi64)]
    else:
        sig = [float(v) for v in np.interp(ts, np.arange(T), s64)]
    for i in range(len(sig) - 1):
        if sig[i] == sig[i + 1]:
            raise ValueError(f"steps={steps} with timestep_spacing={o['timestep_spacing']!r} repeats timestep "
                             f"{int(ts[i])}: a multistep solver divides by the step size λ_t − λ_s = 0 there "
                             "(diffusers: NaN); use fewer steps or another spacing")
    if o["final_sigmas_type"] == "sigma_min":  # a spread grid ends on σ_min itself: UniPC's final σ is its last σ,
        # DPM-Solver's the table's σ_min, equal to it in diffusers' float32 (a step of h = 0, see _update); in float64
        # Karras' (σ_min^{1/ρ})^ρ is off by an ulp, and a step of h = ±1e-16 is not one diffusers takes
        last = sig[-1] if spread else float(s64[0])
    else:
        last = 0.0
    return [int(t) for t in ts], sig + [last]


def convert(c, sig: float, o: dict, *, to_x0: bool):
    """The model output as x̂0 (DPM-Solver++) or ε̂ (DPM-Solver), thresholded as diffusers' convert_model_output."""
    a, s, _ = alpha_sigma(o)(sig)
    pt = o["prediction_type"]
    if to_x0:  # flow_prediction: x̂0 = x − σ·v with the grid's σ as diffusers (= σ_t on flow σ's; DEIS and the
        # singlestep solver also take it on VP σ's, with the VE σ, as diffusers' do)
        p, q = prediction.x0_coefs(pt, a, sig if pt == "flow_prediction" else s)
        return c.convert(p * c.x + q * c.o, threshold=o["thresholding"])
    if o["thresholding"]:
        raise PlanError("thresholding with the noise-prediction algorithm types (dpmsolver, sde-dpmsolver) is not "
                        "supported by fastdiff: use algorithm_type='dpmsolver++' or 'sde-dpmsolver++'")
    r, u = prediction.eps_coefs(pt, a, s, types=prediction.VP_PREDICTION_TYPES)  # diffusers' ε forms have no flow
    return c.convert(r * c.x + u * c.o)


def alpha_sigma(o: dict):
    """σ → (α_t, σ_t, λ_t): the VP map, or the flow path's with use_flow_sigmas (diffusers' _sigma_to_alpha_sigma_t)."""
    return grids.flow_vp if o.get("use_flow_sigmas") else grids.vp


def _update(alg, solver_type, order, x, ms, sig_t, sigs, z, ab=grids.vp):
    """x_t from x_s and the outputs ms = [m0, m1, m2] (newest first) at σ's sigs = [σ_s0, σ_s1, σ_s2]; `ab` maps σ to
    (α_t, σ_t, λ_t) (alpha_sigma)."""
    a_t, s_t, l_t = ab(sig_t)
    a0, s0, l0 = ab(sigs[0])
    h = l_t - l0
    if h == 0:  # σ_t = σ_s (a spread grid's final σ_min): the step's limit x_t = x_s at every order. diffusers divides
        # in float32: r0 = h_{-1}/0 = ∞ makes D1 = 0, so orders 1-2 midpoint give x_s too; heun and order 3 take
        # (e^{−h} − 1)/h = 0/0 (NaN): zero_step_nan says where
        return 1.0 * x
    em, ep = math.exp(-h), (math.exp(h) if h < math.inf else math.inf)
    ratio = s_t / s0
    if order == 1:
        if alg == "dpmsolver++":
            return ratio * x - (a_t * (em - 1.0)) * ms[0]
        if alg == "dpmsolver":
            return (a_t / a0) * x - (s_t * (ep - 1.0)) * ms[0]
        if alg == "sde-dpmsolver++":
            return (ratio * em) * x + (a_t * (1 - math.exp(-2 * h))) * ms[0] + s_t * math.sqrt(1 - math.exp(-2 * h)) * z
        return (a_t / a0) * x - 2.0 * (s_t * (ep - 1.0)) * ms[0] + s_t * math.sqrt(math.exp(2 * h) - 1.0) * z
    _, _, l1 = ab(sigs[1])
    h0 = l0 - l1
    r0 = h0 / h
    m0, m1 = ms[0], ms[1]
    if order == 2:
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if alg == "dpmsolver++":
            if solver_type == "midpoint":
                return ratio * x - (a_t * (em - 1.0)) * D0 - 0.5 * (a_t * (em - 1.0)) * D1
            return ratio * x - (a_t * (em - 1.0)) * D0 + (a_t * ((em - 1.0) / h + 1.0)) * D1
        if alg == "dpmsolver":
            if solver_type == "midpoint":
                return (a_t / a0) * x - (s_t * (ep - 1.0)) * D0 - 0.5 * (s_t * (ep - 1.0)) * D1
            return (a_t / a0) * x - (s_t * (ep - 1.0)) * D0 - (s_t * ((ep - 1.0) / h - 1.0)) * D1
        noise = s_t * math.sqrt(1.0 - math.exp(-2 * h)) * z if alg == "sde-dpmsolver++" else \
            s_t * math.sqrt(math.exp(2 * h) - 1.0) * z
        if alg == "sde-dpmsolver++":
            e2 = 1 - math.exp(-2.0 * h)
            if solver_type == "midpoint":
                return (ratio * em) * x + (a_t * e2) * D0 + 0.5 * (a_t * e2) * D1 + noise
            return (ratio * em) * x + (a_t * e2) * D0 + (a_t * (e2 / (-2.0 * h) + 1.0)) * D1 + noise
        if solver_type == "midpoint":
            return (a_t / a0) * x - 2.0 * (s_t * (ep - 1.0)) * D0 - (s_t * (ep - 1.0)) * D1 + noise
        return (a_t / a0) * x - 2.0 * (s_t * (ep - 1.0)) * D0 - 2.0 * (s_t * ((ep - 1.0) / h - 1.0)) * D1 + noise
    _, _, l2 = ab(sigs[2])
    h1 = l1 - l2
    r1 = h1 / h
    m2 = ms[2]
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    if alg == "dpmsolver++":
        return (ratio * x - (a_t * (em - 1.0)) * D0 + (a_t * ((em - 1.0) / h + 1.0)) * D1
                - (a_t * ((em - 1.0 + h) / h**2 - 0.5)) * D2)
    if alg == "dpmsolver":
        return ((a_t / a0) * x - (s_t * (ep - 1.0)) * D0 - (s_t * ((ep - 1.0) / h - 1.0)) * D1
                - (s_t * ((ep - 1.0 - h) / h**2 - 0.5)) * D2)
    if alg == "sde-dpmsolver++":
        e2 = 1.0 - math.exp(-2.0 * h)
        return ((ratio * em) * x + (a_t * e2) * D0 + (a_t * (e2 / (-2.0 * h) + 1.0)) * D1
                + (a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2 + s_t * math.sqrt(e2) * z)
    raise PlanError("solver_order=3 with algorithm_type='sde-dpmsolver' is not implemented by diffusers either")


def grid_sigmas(schedule: NoiseSchedule, g: grids.Grid, o: dict):
    """(timesteps, σ's with the final one appended, the model's t dtype) of a given Grid (fastdiff.schedule.grids)."""
    last = 0.0 if o["final_sigmas_type"] == "zero" else float(np.exp(grids.log_sigma_table(schedule)[0]))
    if g.final is not None:
        last = g.final
    if g.integral:
        return [int(t) for t in g.timesteps], list(g.sigmas) + [last], torch.int64
    return list(g.timesteps), list(g.sigmas) + [last], torch.float32


def no_grid_with(o: dict, grid_):
    """A grid given as data (timesteps=, sigmas=, time_grid=) replaces the sampler's σ options: fastdiff.sample
    refuses it with them, as diffusers' set_timesteps does (the drop-in classes hand their tails over as grids)."""
    on = [k for k in (*grids.SPREADS, "use_lu_lambdas", "use_flow_sigmas") if o.get(k)]
    if grid_ is not None and on:
        raise ValueError(f"timesteps: a grid given as data (timesteps=, sigmas=, time_grid=) cannot be used with "
                         f"{on[0]}=True (diffusers refuses it too)")


def zero_step_nan(solver_type: str, order: int) -> bool:
    """Whether diffusers' update of this order computes NaN over a step of h = 0 (σ_t = σ_s, see _update): its heun
    forms and order 3 take 0/0 there; order 1 and the order-2 midpoint give x_s, the step's limit."""
    return order == 3 or (order == 2 and solver_type == "heun")


def step_order(i: int, N: int, order: int, lower_nums: int, o: dict) -> int:
    """The order of step i of N in diffusers' DPM-Solver(++) multistep: the warm-up (as many earlier outputs as
    exist), then `lower_order_final` / `euler_at_final` / a final σ of 0 lowering the last steps."""
    lof = i == N - 1 and (o["euler_at_final"] or (o["lower_order_final"] and N < 15) or o["final_sigmas_type"] == "zero")
    los = i == N - 2 and o["lower_order_final"] and N < 15
    if order == 1 or lower_nums < 1 or lof:
        return 1
    if order == 2 or lower_nums < 2 or los:
        return 2
    return 3


def plan(schedule: NoiseSchedule, steps: int, o: dict, grid_: grids.Grid | None = None):
    validate(o)
    if grid_ is None:
        ts, sig = grid(schedule, steps, o)
        t_dtype = torch.int64
    else:
        ts, sig, t_dtype = grid_sigmas(schedule, grid_, o)
    N = len(ts)
    alg, order = o["algorithm_type"], o["solver_order"]
    b = PlanBuilder("dpmsolver++" if alg.endswith("++") else "dpmsolver")
    lower_nums = 0
    names = [f"m{k}" for k in range(order - 1)]  # the previous order−1 outputs, m0 the newest
    nan_calls = []  # the calls where diffusers computes NaN and the plan the step's limit (zero_step_nan)
    for i in range(N):
        c = b.call(ts[i])
        d = convert(c, sig[i], o, to_x0=alg.endswith("++"))
        ms = [d] + [c.get(n) for n in names if c.has(n)]
        k = step_order(i, N, order, lower_nums, o)
        if sig[i + 1] == sig[i] and zero_step_nan(o["solver_type"], k):
            nan_calls.append(i)
        x_next = _update(alg, o["solver_type"], k, c.x, ms, sig[i + 1], [sig[i - j] for j in range(k)], c.z,
                         alpha_sigma(o))
        c.shift(names)
        if names and i < N - 1:
            c.put(names[0], d)
        c.force_noise = alg.startswith("sde")  # diffusers draws every step's noise, the last (σ_t = 0) too
        c.next(x_next)
        lower_nums = min(lower_nums + 1, order)
    p = b.build(t_dtype=t_dtype, init_noise_sigma=1.0, sigmas=sig, timesteps=ts, options=dict(o),
                noise_dtype=torch.float32, d_is_x0=alg.endswith("++"))
    p.nan_calls = nan_calls
    return p
