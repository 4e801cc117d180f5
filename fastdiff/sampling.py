"""DDPM and DDIM samplers: plain functions over a precomputed schedule.

The data path reads top to bottom: schedule → per-step plan (float64, once) → loop { model → fused step }.
Noise is drawn with `torch.randn(..., generator=generator)` in the order diffusers' pipelines draw it (x_T first, then
one draw per step that adds noise), so a seeded generator reproduces a diffusers scheduler loop.
"""
from __future__ import annotations

import collections
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
        # checked only where used: a diffusers config may carry any value for a setting it switches off
        if self.clip_sample and not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if self.thresholding and not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        if self.thresholding and not self.sample_max_value >= 1:
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
    """One noise draw. With a torch.Generator (or None): torch.randn as diffusers' `randn_tensor` draws it, on the
    generator's device, then moved. `generator` may also be a noise source with `draw(shape, device, dtype)`
    (e.g. fastdiff.jobs.IndexedNoise: one stream per image), called in the same order: x_T, then each noisy step."""
    if hasattr(generator, "draw"):
        return generator.draw(shape, device, dtype)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


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
    return _randn(shape, generator, torch.device(device or mdevice or "cpu"), dtype or mdtype or torch.float32)


def _call_model(model, x, t, i, learned: bool, check_nan: bool):
    """model(x, t) checked against x (shape, device, dtype; NaN/inf if `check_nan`): (o, v), v the variance half of a
    2·C-channel output when `learned`, else None. `i` is the step index reported in errors."""
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
        raise RuntimeError(f"fastdiff.sampler_step: backend {backend!r} runs float32/float16/bfloat16 samples, got "
                           f"{x.dtype}; use backend='torch' (or 'auto') for {x.dtype}")
    return resolve("sampler_step", backend, x.device)


def plan_coefs(plan: SamplerPlan, guidance_scale: float | None = None) -> torch.Tensor:
    """(steps, NUM_COEF) float64 table of the fused step's scalars (ss.step_coefs per step), on the CPU."""
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
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bare GPU box may lack it: say so once, then go on
        import warnings
        warnings.warn("progress=True needs tqdm (pip install tqdm); continuing without a bar", stacklevel=3)
        return it
    return tqdm(it, desc=desc)


def _model_outputs(model, x, t, i, learned, check_nan, guided: bool):
    """(o, o_cond, v): with classifier-free guidance the model sees the doubled batch [x, x] and returns the
    unconditional half first (as diffusers pipelines chunk it); v (learned variances) comes from the conditional
    half."""
    if not guided:
        o, v = _call_model(model, x, t, i, learned, check_nan)
        return o, None, v
    o2, v2 = _call_model(model, torch.cat([x, x]), torch.cat([t, t]), i, learned, check_nan)
    o, o_cond = o2.chunk(2)
    return o, o_cond, (v2.chunk(2)[1] if v2 is not None else None)


def _check_noise_mode(noise):
    if noise not in ("randn", "philox"):
        raise ValueError(f"noise must be 'randn' (torch.randn with the generator, diffusers' order) or 'philox' "
                         f"(in-kernel, from a seed drawn from the generator), got {noise!r}")


def _philox_table(plan: SamplerPlan, x: torch.Tensor, generator) -> torch.Tensor:
    """(steps, 2) int64 [seed, offset]: one seed drawn from the generator, step i's counters start at i·numel."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu").item())
    n = x.numel()
    return torch.tensor([[seed, i * n] for i in range(plan.steps)], dtype=torch.long)


@torch.no_grad()
def run_plan(plan: SamplerPlan, model: Callable, x: torch.Tensor, *, generator=None, backend="auto",
             progress=False, callback=None, check_nan=False, guidance_scale: float | None = None,
             noise: str = "randn", cuda_graph="auto") -> torch.Tensor:
    """Run `plan` from x = x_T. `callback(d)` gets a dict with i, t, x (x_t), x_prev and x0 (x̂0) after each step.

    guidance_scale: classifier-free guidance o = o_u + w·(o_c − o_u); the model is called on [x, x] and returns
    (2B, ...) with the unconditional half first. noise: "randn" (torch.randn with `generator`, in diffusers' order)
    or "philox" (in-kernel from a seed drawn once from `generator`; no noise tensor is written or read).
    cuda_graph: "auto" (capture and replay on CUDA when the fused kernels run and no callback, progress bar or NaN
    check needs the host each step), True (capture or raise), False. Ignored on CPU (a one-time note if True).
    """
    _check_noise_mode(noise)
    learned = plan.kind == "ddpm" and plan.options.variance_type.startswith("learned")
    guided = guidance_scale is not None
    name = _step_backend(x, backend)
    if _use_graph(cuda_graph, x, name, callback=callback, progress=progress, check_nan=check_nan) and \
            _graph_noise_fits(cuda_graph, plan, x, noise):
        try:
            return _graphed(plan, model, x, name, generator, guidance_scale, noise, learned)
        except _CaptureError as e:
            if cuda_graph is True:
                raise
            from fastdiff._backend import _warn_once

            _warn_once("sampling", f"cuda_graph='auto': running eagerly: {e}")
    B = x.shape[0]
    tb = [torch.full((B,), int(t), dtype=torch.long, device=x.device) for t in plan.timesteps.tolist()]
    coefs = plan_coefs(plan, guidance_scale).to(x.device) if name != "torch" else None
    rngs = _philox_table(plan, x, generator).to(x.device) if noise == "philox" and any(plan.noise) else None
    for i in _progress(range(plan.steps), progress, f"{plan.kind} {plan.steps} steps"):
        o, o_cond, v = _model_outputs(model, x, tb[i], i, learned, check_nan, guided)
        z = _randn(o.shape, generator, x.device, o.dtype) if plan.noise[i] and rngs is None else None
        x_prev, x0 = _step(plan, i, x, o, z, v, name, o_cond=o_cond, guidance_scale=guidance_scale, coefs=coefs,
                           rng=rngs[i] if rngs is not None and plan.noise[i] else None,
                           want_x0=callback is not None)
        if callback is not None:
            callback({"i": i, "t": int(plan.timesteps[i]), "x": x, "x_prev": x_prev, "x0": x0})
        x = x_prev
    return x


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
    """A captured sampling loop. Static device buffers hold everything that changes between calls: x_T, the
    timesteps fed to the model, the per-step coefficients, the Philox [seed, offset] rows or the pre-drawn noise; a
    call copies the new values in and replays, so a replay never sees stale coefficients or noise."""

    def __init__(self, plan, model, x, name, guidance_scale, noise, learned):
        self.model, self.name, self.guided, self.learned, self.noise = model, name, guidance_scale is not None, \
            learned, noise
        self.kind_noise = list(plan.noise)
        dev, N = x.device, plan.steps
        Bm = x.shape[0] * (2 if self.guided else 1)
        self.x_in = torch.empty_like(x)
        self.tb = torch.empty((N, Bm), dtype=torch.long, device=dev)
        self.coefs = torch.empty((N, ss.NUM_COEF), dtype=torch.float64, device=dev)
        self.rngs = torch.zeros((N, 2), dtype=torch.long, device=dev)
        self.znoise = torch.zeros((sum(plan.noise), *x.shape), dtype=x.dtype, device=dev) \
            if noise == "randn" and any(plan.noise) else None
        self.plan = plan
        self.error: str | None = None

    def _loop(self):
        x, plan, zi = self.x_in, self.plan, 0
        for i in range(plan.steps):
            if self.guided:
                o2, v2 = _call_model(self.model, torch.cat([x, x]), self.tb[i], i, self.learned, False)
                o, o_cond = o2.chunk(2)
                v = v2.chunk(2)[1] if v2 is not None else None
            else:
                (o, v), o_cond = _call_model(self.model, x, self.tb[i], i, self.learned, False), None
            z = rng = None
            if plan.noise[i]:
                if self.znoise is not None:
                    z, zi = self.znoise[zi], zi + 1
                else:
                    rng = self.rngs[i]
            x, _ = _step(plan, i, x, o, z, v, self.name, o_cond=o_cond, coefs=self.coefs, rng=rng, want_x0=False)
        return x

    def load(self, plan, x, generator, guidance_scale):
        """Copy this call's data into the static buffers (host → device copies, outside the graph)."""
        B = x.shape[0]
        ts = plan.timesteps.to(torch.long).view(-1, 1).expand(-1, B)
        if self.guided:
            ts = torch.cat([ts, ts], 1)
        self.tb.copy_(ts)
        self.coefs.copy_(plan_coefs(plan, guidance_scale))
        self.x_in.copy_(x)
        if self.znoise is not None:
            for j in range(self.znoise.shape[0]):  # diffusers' order: one draw per noisy step
                self.znoise[j].copy_(_randn(x.shape, generator, x.device, x.dtype))
        elif any(plan.noise):
            self.rngs.copy_(_philox_table(plan, x, generator))
        self.plan = plan

    def capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy initialisation (cuBLAS, cuDNN, Triton) off the capture
            self._loop()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.out = self._loop()
        except Exception as e:  # noqa: BLE001 - reported with the reason, never swallowed
            raise _CaptureError(
                f"cuda_graph: the sampling loop cannot be captured in a CUDA graph ({type(e).__name__}: {e}). "
                "Common reasons: the model syncs with the host (.item(), .cpu(), printing a tensor, Python branches "
                "on tensor values), allocates CPU tensors, or changes shapes between steps. Pass cuda_graph=False."
            ) from e

    def run(self):
        self.graph.replay()
        return self.out.clone()


def _graphed(plan, model, x, name, generator, guidance_scale, noise, learned):
    opts = plan.options
    key = (id(model), plan.kind, plan.steps, tuple(plan.noise), plan.eta > 0, tuple(x.shape), x.stride(), x.dtype,
           str(x.device), name, guidance_scale is not None, noise, opts.clip_sample, opts.thresholding,
           opts.dynamic_thresholding_ratio, opts.sample_max_value, opts.variance_type)
    loop = _GRAPHS.get(key)
    if loop is None or loop.model is not model:
        loop = _GraphedLoop(plan, model, x, name, guidance_scale, noise, learned)
        _GRAPHS[key] = loop
        while len(_GRAPHS) > GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
        loop.load(plan, x, generator, guidance_scale)
        try:
            loop.capture()
        except _CaptureError as e:
            loop.error, loop.znoise, loop.x_in = str(e), None, None  # remembered: not retried for this structure
            raise
    elif loop.error is not None:
        raise _CaptureError(loop.error)
    else:
        _GRAPHS.move_to_end(key)
        loop.load(plan, x, generator, guidance_scale)
    return loop.run()


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
                check_nan: bool = False, guidance_scale: float | None = None, noise: str = "randn",
                cuda_graph="auto", **options) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) in `steps` steps; returns x_0 of shape (B, ...).

    model(x_t, t) -> ε̂ / x̂0 / v (per `prediction_type`), t a LongTensor (B,) of training timesteps; a tensor or an
    object with `.sample`. `schedule`: a NoiseSchedule, a diffusers scheduler or its config (default: linear,
    T = 1000). `options`: any SamplerOptions field (prediction_type, clip_sample, timestep_spacing, ...).
    η = 0 is deterministic; η = 1 with use_clipped_model_output is DDPM's fixed_small posterior.
    backend: "auto" runs the fused step kernel (fastdiff.ops.sampler_step) for fp32/fp16/bf16 samples, the reference
    for float64; "torch" forces the reference. guidance_scale, noise ("randn" | "philox") and cuda_graph ("auto" |
    True | False): see `run_plan`.
    """
    eta = _check_eta(eta)
    _check_backend(backend)
    sched, opts, _ = resolve_schedule(schedule, options)
    plan = make_plan("ddim", sched, opts, steps, eta)
    x = _initial_sample(model, shape, x_T, generator, dtype, device)
    return run_plan(plan, model, x, generator=generator, backend=backend, progress=progress, callback=callback,
                    check_nan=check_nan, guidance_scale=guidance_scale, noise=noise, cuda_graph=cuda_graph)


def ddpm_sample(model: Callable, *, steps: int | None = None, shape=None, x_T=None, schedule=None,
                variance: str | None = None, generator: torch.Generator | None = None, backend: str = "auto",
                progress: bool = False, callback: Callable | None = None, dtype: torch.dtype | None = None,
                device=None, check_nan: bool = False, guidance_scale: float | None = None, noise: str = "randn",
                cuda_graph="auto", **options) -> torch.Tensor:
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
                    check_nan=check_nan, guidance_scale=guidance_scale, noise=noise, cuda_graph=cuda_graph)
