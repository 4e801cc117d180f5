"""DDPM and DDIM samplers: plain functions over a precomputed schedule.

The data path reads top to bottom: schedule → per-step plan (float64, once) → loop { model → fused step }.
Noise is drawn with `torch.randn(..., generator=generator)` in the order diffusers' pipelines draw it (x_T first, then
one draw per step that adds noise), so a seeded generator reproduces a diffusers scheduler loop.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastdiff.ops import sampler_step as ss
from fastdiff.schedule import SPACINGS, NoiseSchedule, diffusers_config, timesteps


@dataclass
class SamplerOptions:
    """Every setting that changes the math of a step. Names and defaults follow diffusers' scheduler config,
    except `clip_sample` (False here: samples need not be images in [−1, 1])."""

    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    set_alpha_to_one: bool = True  # DDIM: ᾱ after the last step is 1 (else ᾱ_0)
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    variance_type: str = "fixed_small"  # DDPM
    use_clipped_model_output: bool = False  # DDIM: recompute ε̂ from the clipped x̂0
    # DDIM's previous timestep: "grid" = the next timestep of the grid; "diffusers" = t − ⌊T/N⌋ whatever the
    # spacing (diffusers' DDIMScheduler; equal to "grid" for leading spacing). Adopted from a diffusers scheduler.
    prev_timestep: str = "grid"

    def validate(self) -> "SamplerOptions":
        if self.prediction_type not in ss.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {ss.PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.variance_type not in ss.VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {ss.VARIANCE_TYPES}, got {self.variance_type!r}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {self.timestep_spacing!r}")
        if self.prev_timestep not in ("grid", "diffusers"):
            raise ValueError(f"prev_timestep must be 'grid' or 'diffusers', got {self.prev_timestep!r}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        if not self.sample_max_value >= 1:
            raise ValueError(f"sample_max_value must be >= 1, got {self.sample_max_value}")
        return self


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SamplerOptions))


def resolve_schedule(schedule: Any, options: dict[str, Any]) -> tuple[NoiseSchedule, SamplerOptions, bool]:
    """(NoiseSchedule, SamplerOptions, from_diffusers) from `schedule=` and the caller's option overrides.

    A diffusers scheduler (or its config) contributes every setting that changes the math; explicit options win.
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid options: {list(OPTION_NAMES)}")
    from_diffusers = False
    base: dict[str, Any] = {}
    if schedule is None:
        sched = NoiseSchedule.linear()
    elif isinstance(schedule, NoiseSchedule):
        sched = schedule
    else:
        cfg = diffusers_config(schedule)
        sched = NoiseSchedule.from_diffusers(cfg)
        from_diffusers = True
        base = {k: cfg[k] for k in OPTION_NAMES if k in cfg}
        base["prev_timestep"] = "diffusers"
        for k in ("clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"):
            if k in base:
                base[k] = float(base[k])
    base.update(options)
    return sched, SamplerOptions(**base).validate(), from_diffusers


@dataclass
class SamplerPlan:
    """Everything a loop needs, computed once on the host in float64.

    Step i goes from timestep `timesteps[i]` (cumulative ᾱ_t = abar_t[i]) to ᾱ_p = abar_p[i]; it draws noise iff
    `noise[i]`; `sigma[i]` is its noise scale (DDPM learned variances: computed per element in the step).
    """

    kind: str  # "ddim" | "ddpm"
    schedule: NoiseSchedule
    options: SamplerOptions
    timesteps: torch.Tensor  # (N,) int64, descending
    abar_t: list[float]
    abar_p: list[float]
    sigma: list[float]
    noise: list[bool]
    eta: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.abar_t)


def make_plan(kind: str, schedule: NoiseSchedule, opts: SamplerOptions, steps: int | None, eta: float = 0.0):
    T = len(schedule)
    if kind == "ddpm" and steps is None:
        ts = torch.arange(T - 1, -1, -1, dtype=torch.long)
    else:
        ts = timesteps(T, steps, opts.timestep_spacing, opts.steps_offset)
    n = ts.numel()
    abar = schedule.alphas_cumprod
    tl = ts.tolist()
    if kind == "ddim" and opts.prev_timestep == "diffusers":
        prev = [t - T // n for t in tl]
    else:
        prev = tl[1:] + [-1]
    final = 1.0 if (kind == "ddpm" or opts.set_alpha_to_one) else float(abar[0])
    abar_t = [float(abar[t]) for t in tl]
    abar_p = [float(abar[p]) if p >= 0 else final for p in prev]
    if opts.prediction_type == "epsilon" and min(abar_t) <= 0.0:
        bad = tl[abar_t.index(min(abar_t))]
        raise ValueError(f"prediction_type='epsilon' cannot sample timestep {bad}, where ᾱ_t = 0 (zero terminal SNR): "
                         "use prediction_type='v_prediction' or 'sample', or a spacing that skips it")
    if kind == "ddim":
        sigma = [ss.ddim_sigma(a, p, eta) for a, p in zip(abar_t, abar_p)]
        noise = [eta > 0] * n
    else:
        sigma = [math.sqrt(ss.ddpm_variance(a, p, opts.variance_type)) if not opts.variance_type.startswith("learned")
                 else float("nan") for a, p in zip(abar_t, abar_p)]
        noise = [t > 0 for t in tl]  # diffusers' DDPMScheduler adds noise whenever t > 0
    return SamplerPlan(kind, schedule, opts, ts, abar_t, abar_p, sigma, noise, eta)


# ---------------------------------------------------------------------------------------------------------------
# the loop

def _randn(shape, generator, device, dtype):
    """torch.randn as diffusers' `randn_tensor` draws it: on the generator's device, then moved."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _model_dtype_device(model):
    if isinstance(model, torch.nn.Module):
        p = next(iter(model.parameters()), None)
        if p is not None:
            return p.dtype, p.device
    return None, None


def _initial_sample(model, shape, x_T, generator, dtype, device):
    if x_T is not None:
        if not torch.is_tensor(x_T) or not x_T.is_floating_point():
            raise TypeError("x_T must be a floating-point tensor")
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} disagrees with x_T.shape {tuple(x_T.shape)}")
        if x_T.dim() < 1 or x_T.shape[0] < 1:
            raise ValueError(f"x_T must have shape (B, ...) with B >= 1, got {tuple(x_T.shape)}")
        return x_T.to(device=device or x_T.device, dtype=dtype or x_T.dtype)
    mdtype, mdevice = _model_dtype_device(model)
    if shape is None:
        cfg = getattr(model, "config", None)
        try:
            shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        except AttributeError:
            raise ValueError("shape: pass shape=(B, ...) or x_T (the model does not say its sample size)") from None
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
    return _randn(shape, generator, torch.device(device or mdevice or "cpu"), dtype or mdtype or torch.float32)


def _call_model(model, x, t, i, learned: bool, check_nan: bool):
    out = model(x, t)
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise TypeError(f"model output must be a tensor or have .sample, got {type(out).__name__}")
    want = list(x.shape)
    if learned:
        want[1] *= 2
    if list(out.shape) != want:
        hint = " (variance_type learned* expects 2·C channels: prediction and variance)" if learned else ""
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(want)}{hint}")
    if out.device != x.device:
        raise ValueError(f"model output is on {out.device}, the sample on {x.device}")
    if out.dtype != x.dtype:
        raise TypeError(f"model output has dtype {out.dtype}, the sample {x.dtype}: cast the model or pass dtype=")
    if check_nan and not torch.isfinite(out).all():
        raise FloatingPointError(f"model produced NaN/inf at step {i} (timestep {int(t[0])})")
    if learned:
        return out.split(x.shape[1], dim=1)
    return out, None


def _step(plan: SamplerPlan, i: int, x, o, z, v, backend: str):
    """x_t → (x_{t−1}, x̂0) for step i of the plan."""
    opts = plan.options
    kw = dict(prediction_type=opts.prediction_type, clip_sample=opts.clip_sample,
              clip_sample_range=opts.clip_sample_range, thresholding=opts.thresholding,
              dynamic_thresholding_ratio=opts.dynamic_thresholding_ratio, sample_max_value=opts.sample_max_value)
    if plan.kind == "ddim":
        return ss.ddim_step_ref(x, o, plan.abar_t[i], plan.abar_p[i], eta=plan.eta, noise=z,
                                use_clipped_model_output=opts.use_clipped_model_output, **kw)
    return ss.ddpm_step_ref(x, o, plan.abar_t[i], plan.abar_p[i], noise=z, variance_type=opts.variance_type, v=v, **kw)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bare GPU box may lack it: say so once, then go on
        import warnings
        warnings.warn("progress=True needs tqdm (pip install tqdm); continuing without a bar", stacklevel=3)
        return it
    return tqdm(it, desc=desc)


@torch.no_grad()
def run_plan(plan: SamplerPlan, model: Callable, x: torch.Tensor, *, generator=None, backend="auto",
             progress=False, callback=None, check_nan=False) -> torch.Tensor:
    """Run `plan` from x = x_T. `callback(d)` gets a dict with i, t, x (x_t), x_prev and x0 (x̂0) after each step."""
    learned = plan.kind == "ddpm" and plan.options.variance_type.startswith("learned")
    B = x.shape[0]
    tb = [torch.full((B,), int(t), dtype=torch.long, device=x.device) for t in plan.timesteps.tolist()]
    for i in _progress(range(plan.steps), progress, f"{plan.kind} {plan.steps} steps"):
        o, v = _call_model(model, x, tb[i], i, learned, check_nan)
        z = _randn(o.shape, generator, x.device, o.dtype) if plan.noise[i] else None
        x_prev, x0 = _step(plan, i, x, o, z, v, backend)
        if callback is not None:
            callback({"i": i, "t": int(plan.timesteps[i]), "x": x, "x_prev": x_prev, "x0": x0})
        x = x_prev
    return x


def _check_backend(backend):
    from fastdiff._backend import BACKENDS

    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")


def _check_eta(eta):
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or math.isnan(eta) or eta < 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    return float(eta)


def ddim_sample(model: Callable, steps: int = 50, *, shape=None, x_T=None, schedule=None, eta: float = 0.0,
                generator: torch.Generator | None = None, backend: str = "auto", progress: bool = False,
                callback: Callable | None = None, dtype: torch.dtype | None = None, device=None,
                check_nan: bool = False, **options) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) in `steps` steps; returns x_0 of shape (B, ...).

    model(x_t, t) -> ε̂ / x̂0 / v (per `prediction_type`), t a LongTensor (B,) of training timesteps; a tensor or an
    object with `.sample`. `schedule`: a NoiseSchedule, a diffusers scheduler or its config (default: linear,
    T = 1000). `options`: any SamplerOptions field (prediction_type, clip_sample, timestep_spacing, ...).
    η = 0 is deterministic; η = 1 with use_clipped_model_output is DDPM's fixed_small posterior.
    """
    eta = _check_eta(eta)
    _check_backend(backend)
    sched, opts, _ = resolve_schedule(schedule, options)
    plan = make_plan("ddim", sched, opts, steps, eta)
    x = _initial_sample(model, shape, x_T, generator, dtype, device)
    return run_plan(plan, model, x, generator=generator, backend=backend, progress=progress, callback=callback,
                    check_nan=check_nan)


def ddpm_sample(model: Callable, *, steps: int | None = None, shape=None, x_T=None, schedule=None,
                variance: str | None = None, generator: torch.Generator | None = None, backend: str = "auto",
                progress: bool = False, callback: Callable | None = None, dtype: torch.dtype | None = None,
                device=None, check_nan: bool = False, **options) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2); `steps=None` runs all T steps, fewer strides the grid.

    variance: "fixed_small" (β̃), "fixed_large" (β, the DDPM CIFAR-10 setting), "learned_range" (the model returns
    2·C channels), ... (default: the schedule's variance_type, else fixed_small). Other arguments as `ddim_sample`.
    """
    if variance is not None:
        options["variance_type"] = variance
    _check_backend(backend)
    sched, opts, _ = resolve_schedule(schedule, options)
    plan = make_plan("ddpm", sched, opts, steps)
    x = _initial_sample(model, shape, x_T, generator, dtype, device)
    return run_plan(plan, model, x, generator=generator, backend=backend, progress=progress, callback=callback,
                    check_nan=check_nan)
