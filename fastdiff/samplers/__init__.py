"""Solver plans, one module per family, each citing its paper (docs/math.md has the formulas in one place).

    dpm_solver  DPM-Solver / DPM-Solver++ multistep, orders 1–3, ODE and SDE (Lu et al. 2022a, 2022b)
    unipc       UniPC predictor-corrector, bh1/bh2, orders 1–3 (Zhao et al. 2023)
    euler       Euler, Euler ancestral, Heun on the σ grid (Karras et al. 2022)
    pndm        PLMS with PRK warm-up or without (Liu et al. 2022)
    dpm_singlestep  DPM-Solver singlestep, orders 1–3, ODE and SDE (Lu et al. 2022a, 2022b)
    kdpm2       DPM-Solver-2 on the σ grid (midpoint in log σ), plain and ancestral (k-diffusion; Lu et al. 2022a)
    deis        DEIS ρAB multistep, orders 1–3, Lagrange in log ρ (Zhang & Chen 2023)
    lcm         latent consistency sampling: consistency jump, then re-noise (Luo et al. 2023)
    ddim        DDIM, η-stochastic (Song et al. 2021)
    ddpm        DDPM ancestral sampling, fixed or learned variances (Ho et al. 2020; Nichol & Dhariwal 2021)
    tcd         trajectory consistency sampling, γ-stochastic (Zheng et al. 2024)
    edm         EDM Euler and EDM DPM-Solver++: EDM preconditioning, Karras/exponential σ's from the config
                (Karras et al. 2022; Lu et al. 2022b)
    ipndm_v     diffusers' IPNDMScheduler: iPNDM on its angle (v-diffusion) schedule, not the VP ipndm
    lms         linear multistep on the σ grid, Lagrange-integral weights, order 4 (Karras et al. 2022; k-diffusion)
    ipndm       iPNDM, Adams–Bashforth on ε̂ with a lower-order warm-up, on any grid (Zhang & Chen 2023, DEIS)
    flow        flow-matching Euler (deterministic or re-noising) and Heun on a velocity model's σ ∈ (0, 1] grid
                (Lipman et al. 2023; Liu et al. 2023; the SD3 shift of Esser et al. 2024)

`build_plan(sampler, schedule, steps, options)` compiles a solver to a `SolverPlan` (plan.py) that the one loop
(loop.py) runs on the fused op fastdiff.ops.multistep. `resolve(sampler, schedule, options)` turns the user's
`sampler=`/`schedule=`/keyword options (or a diffusers scheduler and its config) into (sampler, NoiseSchedule,
options), with clear errors for unknown samplers, options that do not apply and schedulers without an equivalent.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from fastdiff.samplers import (ddim, ddpm, deis, dpm_singlestep, dpm_solver, edm, euler, flow, ipndm, ipndm_v, kdpm2,
                               lcm, lms, pndm, tcd, unipc)
from fastdiff.schedule.grids import TIME_GRIDS, Grid, custom_grid, make_grid
from fastdiff.samplers.plan import COEF, NUM_COEF, Lin, PlanBuilder, PlanError, SolverPlan

# name -> (plan function, diffusers defaults of the matching scheduler class, fixed settings)
_FAMILIES = {
    "ddim": (ddim.plan, ddim.DEFAULTS, {}),
    "ddpm": (ddpm.plan, ddpm.DEFAULTS, {}),
    "dpmsolver++": (dpm_solver.plan, dpm_solver.DEFAULTS, {}),
    "sde-dpmsolver++": (dpm_solver.plan, dpm_solver.DEFAULTS, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (unipc.plan, unipc.DEFAULTS, {}),
    "euler": (euler.euler_plan, euler.EULER_DEFAULTS, {}),
    "euler_ancestral": (euler.ancestral_plan, euler.ANCESTRAL_DEFAULTS, {}),
    "heun": (euler.heun_plan, euler.HEUN_DEFAULTS, {}),
    "pndm": (pndm.plan, pndm.DEFAULTS, {}),
    "plms": (pndm.plan, pndm.DEFAULTS, {"skip_prk_steps": True}),
    "ipndm": (ipndm.plan, ipndm.DEFAULTS, {}),
    "flow_euler": (flow.euler_plan, flow.EULER_DEFAULTS, {}),
    "flow_heun": (flow.heun_plan, flow.HEUN_DEFAULTS, {}),
    "lms": (lms.plan, lms.DEFAULTS, {}),
    "dpmsolver_singlestep": (dpm_singlestep.plan, dpm_singlestep.DEFAULTS, {}),
    "kdpm2": (kdpm2.plan, kdpm2.DEFAULTS, {}),
    "kdpm2_ancestral": (kdpm2.ancestral_plan, kdpm2.ANCESTRAL_DEFAULTS, {}),
    "deis": (deis.plan, deis.DEFAULTS, {}),
    "lcm": (lcm.plan, lcm.DEFAULTS, {}),
    "tcd": (tcd.plan, tcd.DEFAULTS, {}),
    "edm_euler": (edm.euler_plan, edm.DEFAULTS, {}),
    "edm_dpmsolver++": (edm.dpmsolver_plan, edm.DPM_DEFAULTS, {}),
    "ipndm_v": (ipndm_v.plan, ipndm_v.DEFAULTS, {}),
}
FLOW_SAMPLERS = ("flow_euler", "flow_heun")  # velocity models: σ ∈ (0, 1], no β table (fastdiff.samplers.flow)
SAMPLERS = tuple(_FAMILIES)

# diffusers scheduler class -> sampler
SCHEDULER_CLASSES = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmsolver++",
    "UniPCMultistepScheduler": "unipc", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral", "HeunDiscreteScheduler": "heun",
    "PNDMScheduler": "pndm", "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "FlowMatchHeunDiscreteScheduler": "flow_heun", "LMSDiscreteScheduler": "lms",
    "DPMSolverSinglestepScheduler": "dpmsolver_singlestep", "KDPM2DiscreteScheduler": "kdpm2",
    "KDPM2AncestralDiscreteScheduler": "kdpm2_ancestral", "DEISMultistepScheduler": "deis",
    "LCMScheduler": "lcm", "TCDScheduler": "tcd", "EDMEulerScheduler": "edm_euler",
    "EDMDPMSolverMultistepScheduler": "edm_dpmsolver++",
    "IPNDMScheduler": "ipndm_v",
}

# Settings of diffusers' schedulers that change the math: an error when set to anything but the value that leaves
# the math alone, unless the chosen sampler has the setting (its defaults name it).
_UNSUPPORTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                "use_flow_sigmas": False, "use_dynamic_shifting": False, "timestep_type": "discrete",
                "solver_p": None, "shift_terminal": None}


def scheduler_class_name(schedule: Any) -> str | None:
    """The diffusers class a `schedule=` argument names: a scheduler instance, or a config with `_class_name`."""
    if schedule is None:
        return None
    cfg = getattr(schedule, "config", None)
    if cfg is not None and type(schedule).__module__.startswith("diffusers"):
        return type(schedule).__name__
    src = cfg if cfg is not None else schedule
    if hasattr(src, "get"):
        return src.get("_class_name")
    return None


def sampler_for(schedule: Any) -> str | None:
    """The sampler a diffusers scheduler (or config) stands for; an error for a class without an equivalent."""
    name = scheduler_class_name(schedule)
    if name is None:
        return None
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"schedule: diffusers' {name} has no fastdiff equivalent; supported: "
                         f"{sorted(SCHEDULER_CLASSES)}")
    return SCHEDULER_CLASSES[name]


def check_sampler(sampler: Any) -> str:
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


def solver_options(sampler: str, config: dict | None, options: dict) -> dict:
    """The full option dict of a solver: diffusers' defaults for its class, then the settings a diffusers config
    carries (those the solver has), then the caller's keywords; unknown keywords are an error naming them."""
    _, defaults, fixed = _FAMILIES[sampler]
    bad = sorted(set(options) - set(defaults))
    if bad:
        raise TypeError(f"unknown option(s): {bad} do not apply to sampler={sampler!r}; its options: "
                        f"{sorted(defaults)}")
    for k, v in fixed.items():
        if k in options and options[k] != v:
            raise ValueError(f"sampler={sampler!r} fixes {k}={v!r}; got {k}={options[k]!r}")
    o = dict(defaults)
    if config:
        for k, v in config.items():
            if k in _UNSUPPORTED and k not in defaults and v != _UNSUPPORTED[k] and \
                    not (v is False and _UNSUPPORTED[k] is None):
                has = f" for sampler={sampler!r} (samplers that have it: {_HAS[k]})" if k in _HAS else ""
                raise ValueError(f"schedule: the diffusers setting {k}={v!r} has no fastdiff equivalent{has}")
            if k == "variance_type" and defaults.get(k) is None and v not in ("learned", "learned_range"):
                v = None  # DDPM's fixed variances: nothing for a solver to ignore
            if k in o:
                o[k] = v
    if config is not None and "prev_timestep" in defaults:
        o["prev_timestep"] = "diffusers"  # DDIM from a diffusers config: its class's previous-timestep rule
    o.update(fixed)
    o.update(options)
    for k in ("dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range"):
        if k in o and o[k] is not None:
            _number(k, o[k])
            o[k] = float(o[k])
    for k in ("solver_order", "steps_offset"):
        if k in o and (isinstance(o[k], bool) or not isinstance(o[k], numbers.Integral)):
            raise TypeError(f"{k} must be an int, got {o[k]!r}")
        if k in o:
            o[k] = int(o[k])
    if o.get("thresholding"):
        if not 0 < o["dynamic_thresholding_ratio"] <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {o['dynamic_thresholding_ratio']}")
        if not o["sample_max_value"] >= 1:
            raise ValueError(f"sample_max_value must be >= 1, got {o['sample_max_value']}")
    if o.get("clip_sample") and not o["clip_sample_range"] > 0:
        raise ValueError(f"clip_sample_range must be > 0, got {o['clip_sample_range']}")
    if "disable_corrector" in o:
        o["disable_corrector"] = tuple(o["disable_corrector"] or ())
    return o


def _number(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite number, got {v!r}")


def build_plan(sampler: str, schedule, steps: int, options: dict, grid: Grid | None = None) -> SolverPlan:
    """Compile `sampler` over `schedule` (a NoiseSchedule) in `steps` steps with the full `options` dict
    (solver_options) to a SolverPlan. `grid`: the model-call times as data (fastdiff.schedule.grids.Grid: a named
    grid, a user's timesteps/σ's, a calibrated grid); None builds the sampler's own (diffusers') grid."""
    if steps is None and sampler == "ddpm" and grid is None:
        pass  # DDPM: every training step, T−1 … 0
    elif isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    elif not 1 <= steps <= len(schedule):
        raise ValueError(f"steps must be in [1, num_train_timesteps={len(schedule)}], got {steps}")
    if grid is not None and len(grid) != steps:
        raise ValueError(f"timesteps: the grid has {len(grid)} times but steps={steps}")
    key = (sampler, _fingerprint(schedule), steps, tuple(sorted((k, repr(v)) for k, v in options.items())),
           grid.key() if grid is not None else None)
    p = _PLANS.get(key)
    if p is None:
        fn, _, _ = _FAMILIES[sampler]
        p = fn(schedule, steps, options) if grid is None else fn(schedule, steps, options, grid)
        p.sampler = sampler
        _PLANS[key] = p
        while len(_PLANS) > 64:
            _PLANS.pop(next(iter(_PLANS)))
    return p


_PLANS: dict = {}  # compiled plans (read-only once built), by sampler, schedule content, steps and options


def _fingerprint(schedule) -> tuple:
    """The content of a NoiseSchedule, hashable (plans depend on its β's, not on the object)."""
    spec = tuple(v if not torch.is_tensor(v) else v.numpy().tobytes() for v in schedule._f32)
    return (schedule.betas.numpy().tobytes(), schedule.rescale_zero_snr, spec, schedule.name)


# which samplers have a setting that others lack (for the error above)
_HAS = {k: [n for n, (_, d, _) in _FAMILIES.items() if k in d] for k in _UNSUPPORTED}
_HAS = {k: v for k, v in _HAS.items() if v}

__all__ = ["COEF", "FLOW_SAMPLERS", "NUM_COEF", "Lin", "PlanBuilder", "PlanError", "SAMPLERS", "SCHEDULER_CLASSES",
           "SolverPlan", "build_plan", "check_sampler", "sampler_for", "solver_options"]
