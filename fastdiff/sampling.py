"""Samplers: `sample` (every solver), `ddim_sample`, `ddpm_sample` — plain functions over a precomputed plan.

The data path reads top to bottom: schedule → plan (float64 coefficient rows, once; DDIM/DDPM here, the other
solvers in fastdiff.samplers) → one loop (fastdiff.samplers.loop: eager, or the same step body captured in a CUDA
graph) → model → fused update (fastdiff.ops.sampler_step for DDIM/DDPM, fastdiff.ops.multistep for the rest).
Noise is drawn with `torch.randn(..., generator=generator)` in the order diffusers' pipelines draw it (x_T first, then
one draw per step that adds noise), so a seeded generator reproduces a diffusers scheduler loop.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastdiff.ops import sampler_step as ss
from fastdiff.samplers.loop import Loop, coef_table, initial_scale, philox_table, randn
from fastdiff.samplers.plan import SolverPlan
from fastdiff.schedule import SPACINGS, NoiseSchedule, diffusers_config, named_schedule, timesteps


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
        from fastdiff.validate import check_scheduler_config

        for k, v in check_scheduler_config(dataclasses.asdict(self), None).items():  # types, named
            setattr(self, k, v)
        if self.prediction_type not in ss.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {ss.PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.variance_type not in ss.VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {ss.VARIANCE_TYPES}, got {self.variance_type!r}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {self.timestep_spacing!r}")
        if self.prev_timestep not in ("grid", "diffusers"):
            raise ValueError(f"prev_timestep must be 'grid' or 'diffusers', got {self.prev_timestep!r}")
        # checked only where used: a diffusers config may carry any value for a setting it switches off
        if self.clip_sample and not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if self.thresholding and not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        if self.thresholding and not self.sample_max_value >= 1:
            raise ValueError(f"sample_max_value must be >= 1, got {self.sample_max_value}")
        return self


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SamplerOptions))


def _schedule_and_config(schedule) -> tuple[NoiseSchedule, dict | None]:
    """(NoiseSchedule, the diffusers config or None) of a `schedule=` argument (None: linear β, T = 1000)."""
    if schedule is None:
        return NoiseSchedule.linear(), None
    schedule = named_schedule(schedule)
    if isinstance(schedule, NoiseSchedule):
        return schedule, None
    cfg = diffusers_config(schedule)
    return NoiseSchedule.from_diffusers(cfg), cfg


def resolve_schedule(schedule: Any, options: dict[str, Any]) -> tuple[NoiseSchedule, SamplerOptions]:
    """(NoiseSchedule, SamplerOptions) from `schedule=` and the caller's option overrides.

    A diffusers scheduler (or its config) contributes every setting that changes the math; explicit options win.
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid options: {list(OPTION_NAMES)}")
    base: dict[str, Any] = {}
    sched, cfg = _schedule_and_config(schedule)
    if cfg is not None:
        base = {k: cfg[k] for k in OPTION_NAMES if k in cfg}
        base["prev_timestep"] = "diffusers"
        for k in ("clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"):
            if k in base:
                base[k] = float(base[k])
    base.update(options)
    return sched, SamplerOptions(**base).validate()


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

    @property
    def steps(self) -> int:
        return len(self.abar_t)


_PLANS: "collections.OrderedDict[tuple, SamplerPlan]" = collections.OrderedDict()  # built plans (read-only)


def make_plan(kind: str, schedule: NoiseSchedule, opts: SamplerOptions, steps: int | None, eta: float = 0.0,
              grid=None):
    """The DDIM/DDPM plan (cached by kind, schedule content, options, steps, η and grid: a sampling call reuses it).
    grid: the step times as data (fastdiff.samplers.grids.Grid); None: the spacing's grid."""
    if opts.timestep_spacing == "quad" and grid is None:  # its repeated-timestep warning is said on every call
        return _make_plan(kind, schedule, opts, steps, eta)
    from fastdiff.samplers import _fingerprint

    key = (kind, _fingerprint(schedule), dataclasses.astuple(opts), steps, float(eta),
           grid.key() if grid is not None else None)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _make_plan(kind, schedule, opts, steps, eta, grid)
        while len(_PLANS) > 64:
            _PLANS.popitem(last=False)
    return plan


def _make_plan(kind: str, schedule: NoiseSchedule, opts: SamplerOptions, steps: int | None, eta: float = 0.0,
               grid=None):
    from fastdiff.samplers.grids import abar_at

    T = len(schedule)
    if grid is not None:  # the step times as data: whole numbers stay int64 timesteps, fractional ones float64
        ts = torch.tensor(grid.timesteps, dtype=torch.long if grid.integral else torch.float64)
    elif kind == "ddpm" and steps is None:
        ts = torch.arange(T - 1, -1, -1, dtype=torch.long)
    else:
        ts = timesteps(T, steps, opts.timestep_spacing, opts.steps_offset)
    n = ts.numel()
    abar = schedule.alphas_cumprod
    tl = ts.tolist()
    if kind == "ddim" and opts.prev_timestep == "diffusers" and grid is None:
        prev = [t - T // n for t in tl]
    else:
        prev = tl[1:] + [-1]
    final = 1.0 if (kind == "ddpm" or opts.set_alpha_to_one) else float(abar[0])
    abar_t = [abar_at(schedule, t) for t in tl]
    abar_p = [abar_at(schedule, p) if p >= 0 else final for p in prev]
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

def _model_dtype_device(model):
    if isinstance(model, torch.nn.Module):
        p = next(iter(model.parameters()), None)
        if p is not None:
            return p.dtype, p.device
    return None, None


def sample_hw(size) -> tuple[int, int]:
    """(H, W) of a model config's sample_size: an int (square) or an (H, W) pair, as diffusers allows."""
    if isinstance(size, (int, float)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


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
        size = getattr(cfg, "sample_size", None)
        if size is None or not hasattr(cfg, "in_channels"):
            raise ValueError("shape: pass shape=(B, ...) or x_T (the model does not say its sample size)")
        shape = (1, cfg.in_channels, *sample_hw(size))
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
    return randn(shape, generator, torch.device(device or mdevice or "cpu"), dtype or mdtype or torch.float32)


def _step_backend(x: torch.Tensor, backend: str, solver: bool = False) -> str:
    """The backend of the per-step update: "torch" (the reference step functions) or a fused-kernel backend.

    float64 samples run the reference in float64 under backend="auto" (the fused kernels are fp32/fp16/bf16);
    an explicitly requested fused backend with float64 raises.
    """
    from fastdiff._backend import resolve

    if backend == "torch":
        return "torch"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        if backend == "auto":
            return "torch"
        raise RuntimeError(f"fastdiff.sampler_step: backend {backend!r} runs float32/float16/bfloat16 samples, got "
                           f"{x.dtype}; use backend='torch' (or 'auto') for {x.dtype}")
    return resolve("multistep_step" if solver else "sampler_step", backend, x.device)


def plan_coefs(plan: SamplerPlan, guidance_scale: float | None = None) -> torch.Tensor:
    """(steps, NUM_COEF) float64 table of the fused step's scalars (ss.step_coefs per step), on the CPU; kept with the
    plan per guidance scale (callers copy it before writing)."""
    cache = plan.__dict__.setdefault("_coef_cache", {})
    if guidance_scale not in cache:
        cache[guidance_scale] = _plan_coefs(plan, guidance_scale)
    return cache[guidance_scale]


def _plan_coefs(plan: SamplerPlan, guidance_scale: float | None = None) -> torch.Tensor:
    opts = plan.options
    rows = [ss.step_coefs(plan.kind, plan.abar_t[i], plan.abar_p[i], prediction_type=opts.prediction_type,
                          sigma=0.0 if math.isnan(plan.sigma[i]) else plan.sigma[i],
                          use_clipped_model_output=opts.use_clipped_model_output,
                          clip_sample_range=opts.clip_sample_range,
                          guidance_scale=1.0 if guidance_scale is None else guidance_scale,
                          variance_type=opts.variance_type) for i in range(plan.steps)]
    return torch.tensor(rows, dtype=torch.float64)


def _guide_ref(o, o_cond, w):
    return o if o_cond is None else o + w * (o_cond - o)


def _step(plan: SamplerPlan, i: int, x, o, z, v, backend: str, *, o_cond=None, guidance_scale=None, coefs=None,
          rng=None, want_x0: bool = True):
    """x_t → (x_{t−1}, x̂0 float32 or None) for step i of the plan.

    backend (resolved by _step_backend): "torch" runs the reference step functions (diffusers' order of operations);
    a fused backend runs the fused op with row i of `coefs` (plan_coefs, on x's device). o_cond: the conditional
    model output for classifier-free guidance o = o + w·(o_cond − o). z: a noise tensor, or rng: int64
    [seed, offset] for in-kernel Philox noise. x̂0 is computed only when `want_x0` (callbacks) on the fused path.
    """
    opts = plan.options
    if backend == "torch":
        o = _guide_ref(o, o_cond, guidance_scale)
        if rng is not None:
            z = ss._philox_like(x, rng).to(x.dtype)
        kw = dict(prediction_type=opts.prediction_type, clip_sample=opts.clip_sample,
                  clip_sample_range=opts.clip_sample_range, thresholding=opts.thresholding,
                  dynamic_thresholding_ratio=opts.dynamic_thresholding_ratio, sample_max_value=opts.sample_max_value)
        if plan.kind == "ddim":
            return ss.ddim_step_ref(x, o, plan.abar_t[i], plan.abar_p[i], eta=plan.eta, noise=z,
                                    use_clipped_model_output=opts.use_clipped_model_output, **kw)
        return ss.ddpm_step_ref(x, o, plan.abar_t[i], plan.abar_p[i], noise=z, variance_type=opts.variance_type,
                                v=v, **kw)
    coef = coefs[i]
    adds_noise = plan.noise[i] and (plan.kind == "ddpm" or plan.eta > 0)
    var_mode = "scalar"
    if plan.kind == "ddpm" and opts.variance_type.startswith("learned"):
        var_mode = opts.variance_type
    else:
        v = None
    thr = None
    if opts.thresholding:  # a per-sample reduction, then the fused pass
        thr = ss.threshold_scale(x, o, coef, o_cond=o_cond, ratio=opts.dynamic_thresholding_ratio,
                                 max_value=opts.sample_max_value)
    return ss.sampler_step(x, o, coef, o_cond=o_cond, noise=z if adds_noise and rng is None else None,
                           rng=rng if adds_noise else None, v=v, thr=thr,
                           clip=opts.clip_sample and not opts.thresholding, var_mode=var_mode, write_x0=want_x0,
                           backend=backend)


def _progress(it, enabled: bool, desc: str):
    from fastdiff._util import progress

    return progress(it, enabled, desc=desc)


def _check_noise_mode(noise):
    if noise not in ("randn", "philox"):
        raise ValueError(f"noise must be 'randn' (torch.randn with the generator, diffusers' order) or 'philox' "
                         f"(in-kernel, from a seed drawn from the generator), got {noise!r}")


def _philox_table(plan, x: torch.Tensor, generator) -> torch.Tensor:
    return philox_table(plan.steps, x, generator)


def _plan_name(plan) -> str:
    return plan.sampler if isinstance(plan, SolverPlan) else plan.kind


@torch.no_grad()
def run_plan(plan, model: Callable, x: torch.Tensor, *, generator=None, backend="auto", progress=False,
             callback=None, check_nan=False, guidance_scale: float | None = None, noise: str = "randn",
             cuda_graph="auto", scale_x_T: bool = False) -> torch.Tensor:
    """Run `plan` (a DDIM/DDPM SamplerPlan or a solver SolverPlan) from x = x_T; x_T itself is never written.

    `callback(d)` gets a dict with i, t, x (the model's input), x_prev (the next one) and x0 (x̂0, or None for a
    solver that keeps ε̂) after each model call. guidance_scale: classifier-free guidance o = o_u + w·(o_c − o_u);
    the model is called on [x, x] and returns (2B, ...) with the unconditional half first. noise: "randn"
    (torch.randn with `generator`, in diffusers' order) or "philox" (in-kernel from a seed drawn once from
    `generator`; no noise tensor is written or read). cuda_graph: "auto" (capture and replay on CUDA when the fused
    kernels run and no callback, progress bar or NaN check needs the host each step), True (capture or raise), False.
    scale_x_T: x_T is in diffusers' scale (multiplied by the plan's init_noise_sigma and brought to the model's
    input scale here, as pipelines scale given latents).
    """
    _check_noise_mode(noise)
    from fastdiff.validate import check_plan_alpha_bar

    check_plan_alpha_bar(plan, x.dtype)  # an ᾱ outside the sample dtype's range: an error, not a NaN sample
    solver = isinstance(plan, SolverPlan)
    name = _step_backend(x, backend, solver)
    scale = initial_scale(plan) if scale_x_T else 1.0
    if _use_graph(cuda_graph, x, name, callback=callback, progress=progress, check_nan=check_nan) and \
            _graph_noise_fits(cuda_graph, plan, x, noise):
        try:
            return _graphed(plan, model, x, name, generator, guidance_scale, noise, scale)
        except _CaptureError as e:
            if cuda_graph is True:
                raise
            from fastdiff._backend import _warn_once

            _warn_once("sampling", f"cuda_graph='auto': running eagerly: {e}")
    loop = Loop(plan, model, x, name, guidance_scale=guidance_scale)
    if noise == "philox" and any(plan.noise):
        loop.rngs = _philox_table(plan, x, generator).to(x.device)
    loop.draw = lambda i, shape, dtype: randn(shape, generator, x.device, dtype)
    xs = loop.start(x, scale)
    want_x0 = callback is not None
    if want_x0:
        xs = xs.clone()  # the callback's d["x"] of step 0 outlives the loop's buffers
    ts = [c.t for c in plan.calls] if solver else plan.timesteps.tolist()
    for i in _progress(range(plan.steps), progress, f"{_plan_name(plan)} {plan.steps} steps"):
        x_prev, x0 = loop.body(i, xs, check_nan=check_nan, want_x0=want_x0)
        if callback is not None:  # a callback may keep what it gets: hand it tensors the loop will not overwrite
            x_prev, x0 = x_prev.clone(), (x0.clone() if x0 is not None else None)
            callback({"i": i, "t": ts[i], "x": xs, "x_prev": x_prev, "x0": x0})
        xs = x_prev
    return xs  # the loop's own buffer (the loop is dropped here), or the callback's copy


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: the whole loop (model calls and fused steps) captured once per structure, replayed per call

_GRAPHS: "collections.OrderedDict[tuple, _GraphedLoop]" = collections.OrderedDict()
GRAPH_CACHE_SIZE = 4  # captured loops kept (each holds its static buffers and the model's activations)


def _use_graph(cuda_graph, x, name, *, callback, progress, check_nan) -> bool:
    from fastdiff._backend import _warn_once

    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is False:
        return False
    if x.device.type != "cuda":
        if cuda_graph is True:
            _warn_once("sampling", f"cuda_graph=True ignored: the sample is on {x.device}, CUDA graphs need CUDA")
        return False
    host = [n for n, on in (("callback", callback is not None), ("progress", progress), ("check_nan", check_nan))
            if on]
    if name == "torch" or host:
        if cuda_graph is True:
            why = (f"{', '.join(host)} needs the host at every step" if host else
                   "the reference backend ('torch') is not captured; use a fused backend")
            raise ValueError(f"cuda_graph=True: {why}; pass cuda_graph=False")
        return False
    return True


GRAPH_NOISE_BUDGET_BYTES = 1 << 30  # a graphed loop with noise="randn" pre-draws every step's noise up to this size


def _graph_noise_fits(cuda_graph, plan, x, noise) -> bool:
    """noise="randn" under a graph pre-draws all steps' noise (diffusers' order) into one static buffer; past
    GRAPH_NOISE_BUDGET_BYTES "auto" runs eagerly and True raises (noise="philox" needs no buffer)."""
    need = sum(plan.noise) * x.numel() * x.element_size() if noise == "randn" else 0
    if need <= GRAPH_NOISE_BUDGET_BYTES:
        return True
    msg = (f"a CUDA graph with noise='randn' pre-draws {sum(plan.noise)} noise tensors ({need / 2**30:.1f} GiB > "
           f"fastdiff.sampling.GRAPH_NOISE_BUDGET_BYTES); pass noise='philox' (in-kernel noise) or cuda_graph=False")
    if cuda_graph is True:
        raise ValueError(f"cuda_graph=True: {msg}")
    from fastdiff._backend import _warn_once

    _warn_once("sampling", f"cuda_graph='auto': running eagerly: {msg}")
    return False


class _CaptureError(RuntimeError):
    """The loop could not be captured; the message names the reason (cuda_graph=True raises it, "auto" warns once
    and runs eagerly)."""


class _GraphedLoop:
    """A captured sampling loop: the eager loop's `Loop.body` calls, recorded once. Static device buffers hold
    everything that changes between calls: x_T, the timesteps fed to the model, the per-step coefficients, the
    Philox [seed, offset] rows or the pre-drawn noise; a call copies the new values in and replays, so a replay
    never sees stale coefficients or noise."""

    def __init__(self, plan, model, x, name, guidance_scale, noise, learned=None):
        self.model = model  # (learned: read off the plan; the argument is accepted for older callers)
        self.loop = Loop(plan, model, x, name, guidance_scale=guidance_scale)
        dev = x.device
        self.x_in = torch.empty_like(x)
        self.zidx = []
        k = 0
        for on in plan.noise:
            self.zidx.append(k)
            k += bool(on)
        ndt = (getattr(plan, "noise_dtype", None) if isinstance(plan, SolverPlan) else None) or x.dtype
        self.noise_dtype = ndt
        self.znoise = torch.zeros((k, *x.shape), dtype=x.dtype, device=dev) if noise == "randn" and k else None
        if noise == "philox" and k:
            self.loop.rngs = torch.zeros((plan.steps, 2), dtype=torch.long, device=dev)
        self.loop.draw = lambda i, shape, dtype: self.znoise[self.zidx[i]]
        self.error: str | None = None

    def _run(self):
        x = self.x_in
        for i in range(self.loop.plan.steps):
            x, _ = self.loop.body(i, x)
        return x

    _loop = _run  # the captured body, run eagerly (tests)

    def load(self, plan, x, generator, guidance_scale, scale=1.0):
        """Copy this call's data into the static buffers (host → device copies, outside the graph)."""
        loop = self.loop
        ts = [c.t for c in plan.calls] if isinstance(plan, SolverPlan) else plan.timesteps.tolist()
        tb = torch.tensor(ts, dtype=loop.tb.dtype).view(-1, 1).expand(-1, loop.tb.shape[1])
        loop.tb.copy_(tb)
        loop.coefs.copy_(coef_table(plan, guidance_scale))
        loop.plan = plan
        if scale == 1.0:
            self.x_in.copy_(x)
        else:
            torch.mul(x, scale, out=self.x_in)
        if self.znoise is not None:
            for j in range(self.znoise.shape[0]):  # diffusers' order: one draw per noisy step
                self.znoise[j].copy_(randn(x.shape, generator, x.device, self.noise_dtype))
        elif loop.rngs is not None:
            loop.rngs.copy_(_philox_table(plan, x, generator))

    def capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy initialisation (cuBLAS, cuDNN, Triton) off the capture
            self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.out = self._run()
        except Exception as e:  # noqa: BLE001 - reported with the reason, never swallowed
            raise _CaptureError(
                f"cuda_graph: the sampling loop cannot be captured in a CUDA graph ({type(e).__name__}: {e}). "
                "Common reasons: the model syncs with the host (.item(), .cpu(), printing a tensor, Python branches "
                "on tensor values), allocates CPU tensors, or changes shapes between steps. Pass cuda_graph=False."
            ) from e

    def run(self):
        self.graph.replay()
        return self.out.clone()


def _structure(plan) -> tuple:
    """What a captured loop bakes in besides the buffers it reloads per call (shapes, slots, flags, options)."""
    if isinstance(plan, SolverPlan):
        o = plan.options
        return ("solver", plan.sampler, plan.num_slots, plan.t_dtype,
                tuple((tuple(c.reads), c.d_slot, c.y2_slot, c.noise, c.clip, c.threshold) for c in plan.calls),
                o.get("dynamic_thresholding_ratio"), o.get("sample_max_value"), o.get("variance_type"))
    opts = plan.options
    return ("sstep", plan.kind, plan.steps, tuple(plan.noise), plan.eta > 0, opts.clip_sample, opts.thresholding,
            opts.dynamic_thresholding_ratio, opts.sample_max_value, opts.variance_type)


def _graphed(plan, model, x, name, generator, guidance_scale, noise, scale=1.0):
    from fastdiff._graphkey import model_key

    key = (id(model), model_key(model), _structure(plan), tuple(x.shape), x.stride(), x.dtype, str(x.device), name,
           guidance_scale is not None, noise)
    loop = _GRAPHS.get(key)
    if loop is None or loop.model is not model:
        loop = _GraphedLoop(plan, model, x, name, guidance_scale, noise)
        _GRAPHS[key] = loop
        while len(_GRAPHS) > GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
        loop.load(plan, x, generator, guidance_scale, scale)
        try:
            loop.capture()
        except _CaptureError as e:
            loop.error, loop.znoise, loop.x_in = str(e), None, None  # remembered: not retried for this structure
            raise
    elif loop.error is not None:
        raise _CaptureError(loop.error)
    else:
        _GRAPHS.move_to_end(key)
        loop.load(plan, x, generator, guidance_scale, scale)
    return loop.run()


def _check_backend(backend):
    from fastdiff._backend import BACKENDS

    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")


def _check_eta(eta):
    from fastdiff.validate import check_number

    try:
        return check_number("eta", eta, min=0)
    except TypeError as e:  # a string or None where η belongs: the same ValueError as a bad number
        raise ValueError(str(e)) from None


def _check_args(steps=None, *, shape=None, generator=None, dtype=None, guidance_scale=None, device=None):
    """The public samplers' common arguments, named in every error (fastdiff.validate); steps by one rule."""
    from fastdiff.validate import check_sampler_args

    return check_sampler_args(steps=steps, shape=shape, generator=generator, dtype=dtype,
                              guidance_scale=guidance_scale, device=device)


def resolve_grid(schedule: NoiseSchedule, steps, timesteps=None, sigmas=None, time_grid=None):
    """(Grid or None, steps) from the grid arguments of the samplers: `timesteps=` (model-call times, fractional
    allowed), `sigmas=` (VE noise levels), or `time_grid=` (a named grid: "logsnr", "exponential", "quadratic",
    "karras", "uniform"; fastdiff.samplers.grids.make_grid). None of them: the sampler's own grid (None)."""
    from fastdiff.samplers import grids

    given = [n for n, v in (("timesteps", timesteps), ("sigmas", sigmas), ("time_grid", time_grid)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass only one of timesteps=, sigmas= and time_grid= (got {', '.join(given)})")
    if timesteps is not None or sigmas is not None:
        g = grids.custom_grid(schedule, timesteps=timesteps, sigmas=sigmas)
        if steps is not None and steps != len(g):
            raise ValueError(f"{given[0]}: the grid has {len(g)} times but steps={steps}; pass steps={len(g)} or "
                             "leave steps out")
        return g, len(g)
    if time_grid is not None:
        if not isinstance(time_grid, str):
            raise TypeError(f"time_grid must be a name, one of {grids.TIME_GRIDS}, got {time_grid!r}")
        if steps is None:
            raise ValueError("steps: a named time_grid needs a number of steps")
        if not 1 <= steps <= len(schedule):
            raise ValueError(f"steps must be in [1, num_train_timesteps={len(schedule)}], got {steps}")
        return grids.make_grid(schedule, steps, time_grid), steps
    return None, steps


def ddim_sample(model: Callable, steps: int | None = None, *, shape=None, x_T=None, schedule=None, eta: float = 0.0,
                generator: torch.Generator | None = None, backend: str = "auto", progress: bool = False,
                callback: Callable | None = None, dtype: torch.dtype | None = None, device=None,
                check_nan: bool = False, guidance_scale: float | None = None, noise: str = "randn",
                cuda_graph="auto", timesteps=None, sigmas=None, time_grid: str | None = None,
                **options) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) in `steps` steps (default 50); returns x_0 of shape (B, ...).

    model(x_t, t) -> ε̂ / x̂0 / v (per `prediction_type`), t a LongTensor (B,) of training timesteps; a tensor or an
    object with `.sample`. `schedule`: a NoiseSchedule, a diffusers scheduler or its config (default: linear,
    T = 1000). `options`: any SamplerOptions field (prediction_type, clip_sample, timestep_spacing, ...).
    η = 0 is deterministic; η = 1 with use_clipped_model_output is DDPM's fixed_small posterior.
    backend: "auto" runs the fused step kernel (fastdiff.ops.sampler_step) for fp32/fp16/bf16 samples, the reference
    for float64; "torch" forces the reference. guidance_scale, noise ("randn" | "philox") and cuda_graph ("auto" |
    True | False): see `run_plan`. timesteps= / sigmas= / time_grid=: the step times as data (`resolve_grid`);
    the last step then goes to ᾱ = 1 (set_alpha_to_one) as usual.
    """
    eta = _check_eta(eta)
    steps = _check_args(steps, shape=shape, generator=generator, dtype=dtype, guidance_scale=guidance_scale,
                        device=device).get("steps", steps)
    _check_backend(backend)
    sched, opts = resolve_schedule(schedule, options)
    grid, steps = resolve_grid(sched, steps, timesteps, sigmas, time_grid)
    steps = 50 if steps is None else steps
    plan = make_plan("ddim", sched, opts, steps, eta, grid)
    x = _initial_sample(model, shape, x_T, generator, dtype, device)
    return run_plan(plan, model, x, generator=generator, backend=backend, progress=progress, callback=callback,
                    check_nan=check_nan, guidance_scale=guidance_scale, noise=noise, cuda_graph=cuda_graph)


def ddpm_sample(model: Callable, *, steps: int | None = None, shape=None, x_T=None, schedule=None,
                variance: str | None = None, generator: torch.Generator | None = None, backend: str = "auto",
                progress: bool = False, callback: Callable | None = None, dtype: torch.dtype | None = None,
                device=None, check_nan: bool = False, guidance_scale: float | None = None, noise: str = "randn",
                cuda_graph="auto", timesteps=None, sigmas=None, time_grid: str | None = None,
                **options) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2); `steps=None` runs all T steps, fewer strides the grid.

    variance: "fixed_small" (β̃), "fixed_large" (β, the DDPM CIFAR-10 setting), "learned_range" (the model returns
    2·C channels), ... (default: the schedule's variance_type, else fixed_small). Other arguments as `ddim_sample`.
    """
    if variance is not None:
        options["variance_type"] = variance
    steps = _check_args(steps, shape=shape, generator=generator, dtype=dtype, guidance_scale=guidance_scale,
                        device=device).get("steps", steps)
    _check_backend(backend)
    sched, opts = resolve_schedule(schedule, options)
    grid, steps = resolve_grid(sched, steps, timesteps, sigmas, time_grid)
    plan = make_plan("ddpm", sched, opts, steps, grid=grid)
    x = _initial_sample(model, shape, x_T, generator, dtype, device)
    return run_plan(plan, model, x, generator=generator, backend=backend, progress=progress, callback=callback,
                    check_nan=check_nan, guidance_scale=guidance_scale, noise=noise, cuda_graph=cuda_graph)


# fastdiff.sample's sampler when neither sampler= nor a diffusers schedule= says: the best measured few-step
# sampler on a model-blind grid (iPNDM, 3rd-order weights, on the time-quadratic grid): on the bundled model it
# reaches DDIM-50's error in ~12 model calls, where DPM-Solver++ 2M on diffusers' default grid needs ~34
# (docs/benchmarks.md, "Calls to reach DDIM-50's quality").
DEFAULT_SAMPLER = "ipndm"


def sample(model: Callable, steps: int | None = None, *, sampler: str | None = None, schedule=None, shape=None,
           x_T=None, generator: torch.Generator | None = None, eta: float | None = None, backend: str = "auto",
           progress: bool = False, callback: Callable | None = None, dtype: torch.dtype | None = None, device=None,
           check_nan: bool = False, guidance_scale: float | None = None, noise: str = "randn", cuda_graph="auto",
           timesteps=None, sigmas=None, time_grid: str | None = None, **options) -> torch.Tensor:
    """Sample with any solver in `steps` steps; returns x_0 of shape (B, ...).

    sampler: "ddim", "ddpm", "dpmsolver++" (orders 1–3 via solver_order; algorithm_type "dpmsolver++" or
    "sde-dpmsolver++"; "sde-dpmsolver++" is also a sampler name), "unipc" (solver_type bh1/bh2, orders 1–3, the
    corrector), "euler", "euler_ancestral", "heun" (2·steps − 1 model calls), "pndm" (PRK warm-up then PLMS;
    "plms" = skip_prk_steps), "lms" (linear multistep on the σ grid, option order=, default 4; diffusers'
    LMSDiscreteScheduler), "dpmsolver_singlestep" (DPM-Solver singlestep, orders 1–3, diffusers'
    DPMSolverSinglestepScheduler), "kdpm2" / "kdpm2_ancestral" (DPM-Solver-2 on the σ grid, 2·steps − 1 model
    calls; diffusers' KDPM2DiscreteScheduler / KDPM2AncestralDiscreteScheduler), "deis" (DEIS ρAB multistep, orders
    1–3; diffusers' DEISMultistepScheduler), "lcm" (latent consistency sampling; diffusers' LCMScheduler),
    "tcd" (trajectory consistency sampling, option gamma = diffusers' step eta; diffusers' TCDScheduler), "edm_euler"
    (EDM-preconditioned Euler on config σ's; diffusers' EDMEulerScheduler), "edm_dpmsolver++" (DPM-Solver++ 1–3,
    ODE/SDE, on EDM's σ's with its preconditioning; diffusers' EDMDPMSolverMultistepScheduler), "ipndm_v"
    (diffusers' IPNDMScheduler: iPNDM on its angle schedule),
    "ipndm" (iPNDM: Adams–Bashforth on ε̂, orders 1–4, default 3; its default grid is
    time-quadratic), "flow_euler" / "flow_heun" (flow-matching velocity models, diffusers' FlowMatchEuler/Heun:
    shift, use_dynamic_shifting with mu= or image_seq_len=, time_shift_type, shift_terminal, invert_sigmas,
    stochastic_sampling, Karras/exponential/beta σ's; sigmas= in (0, 1] and timesteps= as diffusers' set_timesteps
    takes them; fastdiff.samplers.flow). Default: the sampler of a diffusers `schedule`, else "ipndm"
    (DEFAULT_SAMPLER, the best measured few-step sampler on a model-blind grid).
    schedule: a NoiseSchedule, or a diffusers scheduler (instance or config) of DDIMScheduler, DDPMScheduler,
    DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler, PNDMScheduler, LMSDiscreteScheduler,
    DPMSolverSinglestepScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, DEISMultistepScheduler,
    LCMScheduler, TCDScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler, IPNDMScheduler,
    FlowMatchEulerDiscreteScheduler or FlowMatchHeunDiscreteScheduler:
    its β schedule and every setting that changes the math are adopted
    (solver_order, algorithm_type, solver_type, use_karras_sigmas, final_sigmas_type, lower_order_final,
    timestep_spacing, steps_offset, prediction_type, thresholding and its settings, ...); `options` override them.
    An option the chosen sampler does not have is an error naming it.
    Same seed, same result as a diffusers pipeline: x_T = randn(shape, generator) · init_noise_sigma (a given x_T is
    scaled by init_noise_sigma too, as pipelines scale given latents); the model sees diffusers' scale_model_input(x)
    and t as diffusers passes it (float32 for the σ-grid solvers, shape (B,)); per-step noise in diffusers' order.
    steps: the number of steps (default 20), or the length of a grid given as data:
    timesteps= (model-call times in [0, T−1], strictly decreasing, fractional allowed: the model is called with
    them and the σ's follow by log-σ interpolation of the schedule), sigmas= (VE noise levels σ = √((1−ᾱ)/ᾱ),
    mapped to times as diffusers' σ samplers do), or time_grid= "logsnr" | "exponential" | "quadratic" | "karras" |
    "uniform" (fastdiff.samplers.grids.make_grid). Every sampler then ends at σ = 0 as usual. A grid from
    fastdiff.calibrate is such a timesteps= list.
    Other arguments as `ddim_sample` (eta: DDIM only).
    """
    from fastdiff import samplers as S

    schedule = named_schedule(schedule)  # "linear", "cosine", ...: a NoiseSchedule, before any config question
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        diffusers_config(schedule)  # neither a schedule nor a scheduler/config: said before asking for sampler=
    steps = _check_args(steps, shape=shape, generator=generator, dtype=dtype, guidance_scale=guidance_scale,
                        device=device).get("steps", steps)
    if sampler is None and schedule is not None and not isinstance(schedule, NoiseSchedule) and \
            S.scheduler_class_name(schedule) is None:
        raise ValueError("sampler: schedule= is a config without '_class_name', so it does not say which solver it "
                         f"configures; pass sampler= (one of {S.SAMPLERS})")
    name = S.check_sampler(sampler) if sampler is not None else (S.sampler_for(schedule) or DEFAULT_SAMPLER)
    if sampler is not None and schedule is not None:
        S.sampler_for(schedule)  # a scheduler class without an equivalent is an error even when sampler= is given
    _check_backend(backend)
    grid_kw = dict(timesteps=timesteps, sigmas=sigmas, time_grid=time_grid)
    if steps is None and timesteps is None and sigmas is None:
        steps = 20
    if name == "ddim":
        return ddim_sample(model, steps, shape=shape, x_T=x_T, schedule=schedule, eta=0.0 if eta is None else eta,
                           generator=generator, backend=backend, progress=progress, callback=callback, dtype=dtype,
                           device=device, check_nan=check_nan, guidance_scale=guidance_scale, noise=noise,
                           cuda_graph=cuda_graph, **grid_kw, **options)
    if eta is not None:
        raise ValueError(f"eta applies to sampler='ddim' only (got sampler={name!r}); stochastic solvers: "
                         "'ddpm', 'euler_ancestral', 'sde-dpmsolver++'")
    if name == "ddpm":
        return ddpm_sample(model, steps=steps, shape=shape, x_T=x_T, schedule=schedule, generator=generator,
                           backend=backend, progress=progress, callback=callback, dtype=dtype, device=device,
                           check_nan=check_nan, guidance_scale=guidance_scale, noise=noise, cuda_graph=cuda_graph,
                           **grid_kw, **options)
    sched, cfg = _schedule_and_config(schedule)
    if S.flow.on_flow_sigmas(name, cfg, options):  # σ ∈ (0, 1]: the grid is built from flow σ's, not from β
        options, steps = S.flow.grid_options(name, steps, options, **grid_kw)
        grid = None
    else:
        grid, steps = resolve_grid(sched, steps, **grid_kw)
    opts = S.solver_options(name, cfg, options)
    if grid is not None and name in ("dpmsolver++", "sde-dpmsolver++", "unipc"):
        S.dpm_solver.no_grid_with(opts, grid)  # a grid as data with Karras/exponential/beta/λ/flow σ's: refused
    plan = S.build_plan(name, sched, steps, opts, grid)
    x = _initial_sample(model, shape, x_T, generator, dtype, device)
    return run_plan(plan, model, x, generator=generator, backend=backend, progress=progress, callback=callback,
                    check_nan=check_nan, guidance_scale=guidance_scale, noise=noise, cuda_graph=cuda_graph,
                    scale_x_T=True)


def plan_for(sampler: str, schedule, options: dict, steps: int | None, eta: float = 0.0, timesteps=None):
    """The plan of any sampler: a SamplerPlan (ddim, ddpm) or a SolverPlan (the others) over `schedule` (a
    NoiseSchedule, a diffusers scheduler or its config, or None) with `options` (a DDIM/DDPM option dict such as a
    checkpoint records: a solver takes the ones it has, e.g. prediction_type, and ignores the DDIM-only ones).
    timesteps: the model-call times as data (a calibrated grid), `steps` then its length or None.
    Run it with run_plan(..., scale_x_T=True) from x_T ~ N(0, I)."""
    from fastdiff import samplers as S

    S.check_sampler(sampler)
    if sampler in ("ddim", "ddpm"):
        sched, opts = resolve_schedule(schedule, dict(options))
        grid, steps = resolve_grid(sched, steps, timesteps)
        return make_plan(sampler, sched, opts, steps, eta, grid)
    if eta:
        raise ValueError(f"eta applies to sampler='ddim' only (got sampler={sampler!r})")
    sched, cfg = _schedule_and_config(schedule)
    grid, steps = resolve_grid(sched, steps, timesteps)
    if steps is None:
        raise ValueError(f"steps: sampler={sampler!r} needs a number of steps")
    return S.build_plan(sampler, sched, steps, S.solver_options(sampler, {**(cfg or {}), **options}, {}), grid)

