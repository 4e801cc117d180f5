"""Samplers: `sample` (every solver), `ddim_sample`, `ddpm_sample` — plain functions over a precomputed plan.

The data path reads top to bottom: schedule → grid → plan (float64 coefficient rows, once: fastdiff.samplers, one
module per family) → one loop (fastdiff.run.loop: eager, or the same step body captured in a CUDA graph) →
model → the one fused update (fastdiff.ops.multistep).
Noise is drawn with `torch.randn(..., generator=generator)` in the order diffusers' pipelines draw it (x_T first, then
one draw per step that adds noise), so a seeded generator reproduces a diffusers scheduler loop.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastdiff.run import graphs
from fastdiff.run.loop import Loop, initial_scale, philox_table, randn
from fastdiff.schedule import NoiseSchedule, diffusers_config, named_schedule


def schedule_and_config(schedule) -> tuple[NoiseSchedule, dict | None]:
    """(NoiseSchedule, the diffusers config or None) of a `schedule=` argument: None (linear β, T = 1000), a name
    ("linear", "cosine", ...), a NoiseSchedule, or a diffusers scheduler or its config."""
    if schedule is None:
        return NoiseSchedule.linear(), None
    schedule = named_schedule(schedule)
    if isinstance(schedule, NoiseSchedule):
        return schedule, None
    cfg = diffusers_config(schedule)
    return NoiseSchedule.from_diffusers(cfg), cfg


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


def _step_backend(x: torch.Tensor, backend: str) -> str:
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
        raise RuntimeError(f"fastdiff.sample: backend {backend!r} runs float32/float16/bfloat16 samples, got "
                           f"{x.dtype}; use backend='torch' (or 'auto') for {x.dtype}")
    return resolve("multistep_step", backend, x.device)


def _progress(it, enabled: bool, desc: str):
    from fastdiff._util import progress

    return progress(it, enabled, desc=desc)


def _check_noise_mode(noise):
    if noise not in ("randn", "philox"):
        raise ValueError(f"noise must be 'randn' (torch.randn with the generator, diffusers' order) or 'philox' "
                         f"(in-kernel, from a seed drawn from the generator), got {noise!r}")


@torch.no_grad()
def run_plan(plan, model: Callable, x: torch.Tensor, *, generator=None, backend="auto", progress=False,
             callback=None, check_nan=False, guidance_scale: float | None = None, noise: str = "randn",
             cuda_graph="auto", scale_x_T: bool = False) -> torch.Tensor:
    """Run `plan` (a SolverPlan of any sampler) from x = x_T; x_T itself is never written.

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
    name = _step_backend(x, backend)
    scale = initial_scale(plan) if scale_x_T else 1.0
    if _use_graph(cuda_graph, x, name, callback=callback, progress=progress, check_nan=check_nan) and \
            _graph_noise_fits(cuda_graph, plan, x, noise):
        try:
            return _graphed(plan, model, x, name, generator, guidance_scale, noise, scale)
        except graphs.CaptureError as e:
            if cuda_graph is True:
                raise
            from fastdiff._backend import _warn_once

            _warn_once("sampling", f"cuda_graph='auto': running eagerly: {e}")
    loop = Loop(plan, model, x, name, guidance_scale=guidance_scale)
    if noise == "philox" and any(plan.noise):
        loop.rngs = philox_table(plan.steps, x, generator).to(x.device)
    loop.draw = lambda i, shape, dtype: randn(shape, generator, x.device, dtype)
    xs = loop.start(x, scale)
    want_x0 = callback is not None
    if want_x0:
        xs = xs.clone()  # the callback's d["x"] of step 0 outlives the loop's buffers
    ts = [c.t for c in plan.calls]
    for i in _progress(range(plan.steps), progress, f"{plan.sampler} {plan.steps} steps"):
        x_prev, x0 = loop.body(i, xs, check_nan=check_nan, want_x0=want_x0)
        if callback is not None:  # a callback may keep what it gets: hand it tensors the loop will not overwrite
            x_prev, x0 = x_prev.clone(), (x0.clone() if x0 is not None else None)
            callback({"i": i, "t": ts[i], "x": xs, "x_prev": x_prev, "x0": x0})
        xs = x_prev
    return xs  # the loop's own buffer (the loop is dropped here), or the callback's copy


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: the whole loop (model calls and fused steps) captured once per structure, replayed per call

GRAPH_CACHE_SIZE = 4  # captured loops kept (each holds its static buffers and the model's activations)
_GRAPHS = graphs.GraphCache(GRAPH_CACHE_SIZE)  # by model, plan structure, sample layout, backend, guidance, noise


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
           f"fastdiff.run.sampling.GRAPH_NOISE_BUDGET_BYTES); pass noise='philox' (in-kernel noise) or cuda_graph=False")
    if cuda_graph is True:
        raise ValueError(f"cuda_graph=True: {msg}")
    from fastdiff._backend import _warn_once

    _warn_once("sampling", f"cuda_graph='auto': running eagerly: {msg}")
    return False


class _GraphedLoop:
    """A captured sampling loop: the eager loop's `Loop.body` calls, recorded once. Static device buffers hold
    everything that changes between calls: x_T, the timesteps fed to the model, the per-step coefficients, the
    Philox [seed, offset] rows or the pre-drawn noise; a call copies the new values in and replays, so a replay
    never sees stale coefficients or noise."""

    def __init__(self, plan, model, x, name, guidance_scale, noise):
        self.model = model
        self.loop = Loop(plan, model, x, name, guidance_scale=guidance_scale, private=True)
        dev = x.device
        self.x_in = torch.empty_like(x)
        self.zidx = []
        k = 0
        for on in plan.noise:
            self.zidx.append(k)
            k += bool(on)
        ndt = plan.noise_dtype or x.dtype
        self.noise_dtype = ndt
        self.znoise = torch.zeros((k, *x.shape), dtype=x.dtype, device=dev) if noise == "randn" and k else None
        if noise == "philox" and k:
            self.loop.rngs = torch.zeros((plan.steps, 2), dtype=torch.long, device=dev)
        self.loop.draw = lambda i, shape, dtype: self.znoise[self.zidx[i]]

    def _run(self):
        x = self.x_in
        for i in range(self.loop.plan.steps):
            x, _ = self.loop.body(i, x)
        return x

    def load(self, plan, x, generator, guidance_scale, scale=1.0):
        """Copy this call's data into the static buffers (host → device copies, outside the graph)."""
        loop = self.loop
        ts = [c.t for c in plan.calls]
        tb = torch.tensor(ts, dtype=loop.tb.dtype).view(-1, 1).expand(-1, loop.tb.shape[1])
        loop.tb.copy_(tb)
        loop.coefs.copy_(plan.coef_table(guidance_scale))
        loop.plan = plan
        if scale == 1.0:
            self.x_in.copy_(x)
        else:
            torch.mul(x, scale, out=self.x_in)
        if self.znoise is not None:
            for j in range(self.znoise.shape[0]):  # diffusers' order: one draw per noisy step
                self.znoise[j].copy_(randn(x.shape, generator, x.device, self.noise_dtype))
        elif loop.rngs is not None:
            loop.rngs.copy_(philox_table(plan.steps, x, generator))

    def capture(self):
        try:
            self.replay, self.out = graphs.capture(self._run)
        except Exception as e:  # noqa: BLE001 - reported with the reason, never swallowed
            raise graphs.CaptureError(
                f"cuda_graph: the sampling loop cannot be captured in a CUDA graph ({type(e).__name__}: {e}). "
                "Common reasons: the model syncs with the host (.item(), .cpu(), printing a tensor, Python branches "
                "on tensor values), allocates CPU tensors, or changes shapes between steps. Pass cuda_graph=False."
            ) from e

    def run(self):
        self.replay()
        return self.out.clone()


def _structure(plan) -> tuple:
    """What a captured loop bakes in besides the buffers it reloads per call (shapes, slots, flags, options)."""
    o = plan.options
    return (plan.sampler, plan.num_slots, plan.t_dtype,
            tuple((tuple(c.reads), c.d_slot, c.y2_slot, c.noise, c.clip, c.threshold, c.var_mode)
                  for c in plan.calls),
            o.get("dynamic_thresholding_ratio"), o.get("sample_max_value"), o.get("variance_type"))


def _graphed(plan, model, x, name, generator, guidance_scale, noise, scale=1.0):
    from fastdiff._graphkey import model_key

    key = (id(model), model_key(model), _structure(plan), tuple(x.shape), x.stride(), x.dtype, str(x.device), name,
           guidance_scale is not None, noise)

    def make():
        loop = _GraphedLoop(plan, model, x, name, guidance_scale, noise)
        loop.load(plan, x, generator, guidance_scale, scale)
        loop.capture()
        return loop

    loop, new = _GRAPHS.get(key, make)
    if not new:
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
    "karras", "uniform"; fastdiff.schedule.grids.make_grid). None of them: the sampler's own grid (None)."""
    from fastdiff.schedule import grids

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
    """DDIM sampling (Song et al. 2021, eq. 12; fastdiff.samplers.ddim) in `steps` steps (default 50): `sample` with
    sampler="ddim". Returns x_0 of shape (B, ...).

    model(x_t, t) -> ε̂ / x̂0 / v (per `prediction_type`), t a LongTensor (B,) of training timesteps; a tensor or an
    object with `.sample`. `schedule`: a NoiseSchedule, a diffusers scheduler or its config (default: linear,
    T = 1000). `options`: diffusers' DDIM settings (prediction_type, clip_sample, timestep_spacing, ...;
    fastdiff.samplers.ddim.OPTIONS). η = 0 is deterministic; η = 1 with use_clipped_model_output is DDPM's
    fixed_small posterior. backend: "auto" runs the fused op for fp32/fp16/bf16 samples, the reference for float64;
    "torch" forces the reference. guidance_scale, noise ("randn" | "philox") and cuda_graph ("auto" | True | False):
    see `run_plan`. timesteps= / sigmas= / time_grid=: the step times as data (`resolve_grid`); the last step then
    goes to ᾱ = 1 (set_alpha_to_one) as usual.
    """
    return _sample("ddim", 50, **_arguments(locals()))


def ddpm_sample(model: Callable, *, steps: int | None = None, shape=None, x_T=None, schedule=None,
                variance: str | None = None, generator: torch.Generator | None = None, backend: str = "auto",
                progress: bool = False, callback: Callable | None = None, dtype: torch.dtype | None = None,
                device=None, check_nan: bool = False, guidance_scale: float | None = None, noise: str = "randn",
                cuda_graph="auto", timesteps=None, sigmas=None, time_grid: str | None = None,
                **options) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2; fastdiff.samplers.ddpm): `sample` with sampler="ddpm";
    `steps=None` runs all T steps, fewer strides the grid.

    variance: "fixed_small" (β̃), "fixed_large" (β, the DDPM CIFAR-10 setting), "learned_range" (the model returns
    2·C channels), ... (default: the schedule's variance_type, else fixed_small). Other arguments as `ddim_sample`.
    """
    if variance is not None:
        options["variance_type"] = variance
    return _sample("ddpm", None, eta=options.pop("eta", None), **_arguments(locals()))


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
    "uniform" (fastdiff.schedule.grids.make_grid). Every sampler then ends at σ = 0 as usual. A grid from
    fastdiff.calibrate is such a timesteps= list.
    Other arguments as `ddim_sample` (eta: DDIM only).
    """
    return _sample(sampler, 20, **_arguments(locals()))


def _arguments(args: dict) -> dict:
    """An entry point's arguments (its locals() on entry) as keywords for `_sample`, its **options spread out."""
    options = args["options"]
    return {**{k: v for k, v in args.items() if k not in ("sampler", "variance", "options")}, **options}


def _sample(sampler, default_steps, *, model, steps, schedule, shape, x_T, generator, eta, backend, progress,
            callback, dtype, device, check_nan, guidance_scale, noise, cuda_graph, timesteps, sigmas, time_grid,
            **options):
    """`sample` with the default number of steps of its entry point (20; DDIM 50; DDPM None = all T)."""
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
        steps = default_steps
    if name == "ddim":
        options["eta"] = _check_eta(0.0 if eta is None else eta)
    elif eta is not None:
        raise ValueError(f"eta applies to sampler='ddim' only (got sampler={name!r}); stochastic solvers: "
                         "'ddpm', 'euler_ancestral', 'sde-dpmsolver++'")
    sched, cfg = schedule_and_config(schedule)
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
    """The plan of any sampler over `schedule` (a NoiseSchedule, a diffusers scheduler or its config, or None) with
    `options` (an option dict such as a checkpoint records: a sampler takes the ones it has, e.g. prediction_type,
    and ignores the DDIM-only ones). timesteps: the model-call times as data (a calibrated grid), `steps` then its
    length or None. Run it with run_plan(..., scale_x_T=True) from x_T ~ N(0, I)."""
    from fastdiff import samplers as S

    S.check_sampler(sampler)
    if sampler == "ddim":
        options = dict(options, eta=_check_eta(eta))
    elif eta:
        raise ValueError(f"eta applies to sampler='ddim' only (got sampler={sampler!r})")
    sched, cfg = schedule_and_config(schedule)
    grid, steps = resolve_grid(sched, steps, timesteps)
    if steps is None and sampler != "ddpm":
        raise ValueError(f"steps: sampler={sampler!r} needs a number of steps")
    if sampler in ("ddim", "ddpm"):  # their options as keywords (an unknown one is an error naming it)
        return S.build_plan(sampler, sched, steps, S.solver_options(sampler, cfg, options), grid)
    return S.build_plan(sampler, sched, steps, S.solver_options(sampler, {**(cfg or {}), **options}, {}), grid)
