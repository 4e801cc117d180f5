"""The one sampling loop: every plan (DDIM/DDPM `SamplerPlan`, solver `SolverPlan`) runs through `Loop.body`.

    body(i, x) = model(x, t_i) → (CFG split) → noise z_i → one fused update → x_{i+1}

The eager loop calls `body` once per model call with callbacks, progress and NaN checks around it; the CUDA-graph
loop captures the same `body` calls once and replays them (sampling.py's cache). Buffers are the loop's own: two
sample buffers it alternates between (an update never writes the tensor it reads, and a fresh 64 MiB output per step
would page-fault on the CPU), the solver's history slots, the timestep table, and the coefficient table on the
device. The caller's x_T is copied in, never written.
"""
from __future__ import annotations

import torch

from fastdiff.ops import sampler_step as ss
from fastdiff.samplers.plan import SolverPlan
from fastdiff._util import model_output
from fastdiff.validate import check_model_output


def call_model(model, x, t, i, learned: bool, check_nan: bool, channels: int | None = None):
    """model(x, t) checked against x (fastdiff.validate.check_model_output: shape, device, dtype; NaN/inf if
    `check_nan`): (o, v), v the variance half of a 2·C-channel output when `learned` (DDPM; v None otherwise).
    `channels`: a solver that ignores a learned variance (diffusers' DPM-Solver with variance_type learned*) takes a
    2·C-channel output and keeps the first C channels. `i`: the step, for errors."""
    try:
        out = model(x, t)
    except RuntimeError as e:  # a module of another dtype than the sample: say so (fastdiff.validate)
        from fastdiff.validate import model_dtype_error

        err = model_dtype_error(model, x)
        if err is None:
            raise
        raise err from e
    if channels:
        o = check_model_output(out, x, channels_factor=2, step=i, check_finite=check_nan) \
            if _channels(out) != x.shape[1] else check_model_output(out, x, step=i, check_finite=check_nan)
        return (o[:, : x.shape[1]].contiguous() if o.shape[1] != x.shape[1] else o), None
    try:
        o = check_model_output(out, x, channels_factor=2 if learned else 1, step=i, check_finite=check_nan)
    except ValueError as e:
        if learned and "expected" in str(e):
            raise ValueError(f"{e} (variance_type learned* expects 2·C channels: prediction and variance)") from None
        raise
    if learned:
        return o.split(x.shape[1], dim=1)
    return o, None


def _channels(out):
    o = model_output(out)
    if isinstance(o, (tuple, list)) and o:
        o = model_output(o[0])
    return o.shape[1] if torch.is_tensor(o) and o.dim() > 1 else None


def randn(shape, generator, device, dtype):
    """One noise draw. With a torch.Generator (or None): torch.randn as diffusers' `randn_tensor` draws it, on the
    generator's device, then moved. `generator` may also be a noise source with `draw(shape, device, dtype)`
    (e.g. fastdiff.jobs.IndexedNoise: one stream per image), called in the same order: x_T, then each noisy step."""
    if hasattr(generator, "draw"):
        return generator.draw(shape, device, dtype)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def philox_table(steps: int, x: torch.Tensor, generator) -> torch.Tensor:
    """(steps, 2) int64 [seed, offset]: one seed drawn from the generator, step i's counters start at i·numel."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu").item())
    n = x.numel()
    return torch.tensor([[seed, i * n] for i in range(steps)], dtype=torch.long)


class Loop:
    """Buffers and the shared step body for one plan on one sample shape. `name`: the resolved update backend
    ("torch" for the reference, or a fused backend). The noise for step i comes from `draw(i, shape, dtype)`:
    the eager loop draws from the generator; a graphed loop reads a static buffer filled before each replay."""

    def __init__(self, plan, model, x, name: str, *, guidance_scale=None):
        self.plan, self.model, self.name = plan, model, name
        self.solver = isinstance(plan, SolverPlan)
        self.guided, self.guidance_scale = guidance_scale is not None, guidance_scale
        dev, B = x.device, x.shape[0]
        self.learned = (not self.solver and plan.kind == "ddpm" and plan.options.variance_type.startswith("learned"))
        vt = plan.options.get("variance_type") if self.solver else None
        self.channels = x.shape[1] if (self.solver and vt in ("learned", "learned_range")) else None
        self.bufs = [torch.empty_like(x, memory_format=_fmt(x)), torch.empty_like(x, memory_format=_fmt(x))]
        n = plan.steps
        if self.solver:
            self.hist = torch.empty((plan.num_slots, *x.shape), dtype=x.dtype, device=dev)
            if x.dim() == 4 and _fmt(x) is torch.channels_last:
                self.hist = torch.stack([torch.empty_like(x, memory_format=torch.channels_last)
                                         for _ in range(plan.num_slots)])
            self._views = [([self.hist[s] for s in c.reads], self.hist[c.y2_slot] if c.y2_slot is not None else None,
                            self.hist[c.d_slot] if c.d_slot is not None else None) for c in plan.calls]
            t_dtype = plan.t_dtype
            ts = [c.t for c in plan.calls]
        else:
            fractional = plan.timesteps.is_floating_point()  # a grid given as data may hold fractional times
            t_dtype = torch.float32 if fractional else torch.long
            ts = plan.timesteps.tolist()
        Bm = B * (2 if self.guided else 1)
        self.tb = torch.tensor(ts, dtype=t_dtype).view(-1, 1).expand(-1, Bm).contiguous().to(dev)
        self.tb_rows = list(self.tb.unbind(0))
        self.coefs = coef_table(plan, guidance_scale).to(dev, copy=True)  # the loop's own (a graph reloads it)
        self.coef_rows = list(self.coefs.unbind(0))
        self.rngs = None
        self.x0_scratch = None
        self.draw = None  # set by the runner: (i, shape, dtype) -> z, or None for rng-based noise
        self.noise_flags = list(plan.noise)
        self.noise_dtype = getattr(plan, "noise_dtype", None) if self.solver else None
        # the raw ops, resolved once: a step after the first (checked) one pays only the kernel's own checks
        if self.solver:
            from fastdiff.ops import multistep as ms

            self.raw = ms.resolve_op(name, dev)
            self.flag_clip = ms.FLAG_CLIP
            self.check_layout = True  # inputs laid out unlike x (a split 2·C output) go through the copying entry
        elif name != "torch":
            opts = plan.options
            self.raw = ss.raw_op(name, dev)  # the one fused op (multistep_step_) on the step's 16-row
            var_mode = opts.variance_type if self.learned else "scalar"
            self.ss_flags = (ss.FLAG_CLIP if opts.clip_sample and not opts.thresholding else 0) | \
                (ss.VAR_MODES[var_mode] << 1)
            self.check_layout = True

    # ---- the step body ----------------------------------------------------------------------------------------
    def model_outputs(self, i, x, check_nan=False):
        """(o, o_cond, v): with classifier-free guidance the model sees the doubled batch [x, x] and returns the
        unconditional half first (as diffusers pipelines chunk it); v (learned variances) from the conditional half."""
        t = self.tb_rows[i]
        if not self.guided:
            o, v = call_model(self.model, x, t, i, self.learned, check_nan, self.channels)
            return o, None, v
        o2, v2 = call_model(self.model, torch.cat([x, x]), t, i, self.learned, check_nan, self.channels)
        o, o_cond = o2.chunk(2)
        return o, o_cond, (v2.chunk(2)[1] if v2 is not None else None)

    def noise_for(self, i, x):
        """(z, rng) of step i: a noise tensor, or the Philox [seed, offset] row; (None, None) when it draws none."""
        if not self.noise_flags[i]:
            return None, None
        if self.rngs is not None:
            return None, self.rngs[i]
        z = self.draw(i, x.shape, self.noise_dtype or x.dtype)
        return (z if z.dtype == x.dtype else z.to(x.dtype)), None

    def body(self, i, x, *, check_nan=False, want_x0=False):
        """One model call and its fused update: x (the current sample) → (x_next, x̂0 or None)."""
        o, o_cond, v = self.model_outputs(i, x, check_nan)
        z, rng = self.noise_for(i, x)
        out = self.bufs[1] if x.data_ptr() == self.bufs[0].data_ptr() else self.bufs[0]
        if self.solver:
            return self._solver_update(i, x, o, o_cond, z, rng, out, want_x0)
        return self._sstep_update(i, x, o, o_cond, v, z, rng, out, want_x0)

    def _solver_update(self, i, x, o, o_cond, z, rng, out, want_x0):
        from fastdiff.ops import multistep as ms

        c = self.plan.calls[i]
        hist, out2, d_out = self._views[i]
        if want_x0 and d_out is None:
            if self.x0_scratch is None:
                self.x0_scratch = torch.empty_like(x)
            d_out = self.x0_scratch
        coef = self.coef_rows[i]
        thr = None
        if c.threshold:
            opts = self.plan.options
            thr = ms.threshold_scale(x, o, coef, o_cond=o_cond, ratio=opts["dynamic_thresholding_ratio"],
                                     max_value=opts["sample_max_value"])
        if self.name != "torch" and (i == 0 or (self.check_layout and (
                o.stride() != x.stride() or (o_cond is not None and o_cond.stride() != x.stride())))):
            # the first step (and a Triton step whose inputs are laid out unlike x) through the checked entry
            ms.multistep_step(x, o, coef, o_cond=o_cond, hist=hist, noise=z, rng=rng, thr=thr, clip=c.clip, out=out,
                              out2=out2, d_out=d_out, backend=self.name)
        else:  # the raw op (the reference for "torch", also for float64 samples)
            self.raw(x, o, o_cond, hist, z, rng, None, thr, coef, self.flag_clip if c.clip else 0, out, out2, d_out)
        return out, (d_out if want_x0 and self.plan.d_is_x0 else None)

    def _sstep_update(self, i, x, o, o_cond, v, z, rng, out, want_x0):
        from fastdiff.sampling import _step

        plan = self.plan
        if self.name == "torch":
            x_prev, x0 = _step(plan, i, x, o, z, v, "torch", o_cond=o_cond, guidance_scale=self.guidance_scale,
                               rng=rng)
            out.copy_(x_prev)
            return out, x0
        opts = plan.options
        coef = self.coef_rows[i]
        adds_noise = plan.noise[i] and (plan.kind == "ddpm" or plan.eta > 0)
        var_mode = opts.variance_type if self.learned else "scalar"
        thr = None
        if opts.thresholding:  # a per-sample reduction, then the fused pass
            thr = ss.threshold_scale(x, o, coef, o_cond=o_cond, ratio=opts.dynamic_thresholding_ratio,
                                     max_value=opts.sample_max_value)
        x0_out = None
        if want_x0:
            if self.x0_scratch is None:
                self.x0_scratch = torch.empty_like(x, dtype=torch.float32)
            x0_out = self.x0_scratch
        z = z if adds_noise and rng is None else None
        rng = rng if adds_noise else None
        v = v if self.learned else None
        if i == 0 or (self.check_layout and any(t is not None and t.stride() != x.stride() for t in (o, o_cond, v))):
            ss.sampler_step(x, o, coef, o_cond=o_cond, noise=z, rng=rng, v=v, thr=thr,
                            clip=opts.clip_sample and not opts.thresholding, var_mode=var_mode, backend=self.name,
                            out=out, x0_out=x0_out)
        else:
            self.raw(x, o, o_cond, z, rng, v, thr, coef, self.ss_flags, out, x0_out)
        return out, x0_out

    # ---- loading a call's inputs -----------------------------------------------------------------------------
    def start(self, x_T, scale: float = 1.0):
        """Copy x_T (times `scale`) into the first buffer: the caller's tensor is never written."""
        b = self.bufs[0]
        if scale == 1.0:
            b.copy_(x_T)
        else:
            torch.mul(x_T, scale, out=b)
        return b


def coef_table(plan, guidance_scale=None) -> torch.Tensor:
    """The (calls, NUM_COEF) float64 coefficient table of any plan, on the CPU (guidance_scale fills `w`)."""
    if isinstance(plan, SolverPlan):
        return plan.coef_table(guidance_scale)
    from fastdiff.sampling import plan_coefs

    return plan_coefs(plan, guidance_scale)


def _fmt(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def initial_scale(plan) -> float:
    """x_T (randn·init_noise_sigma in diffusers' scale) → the loop's first state (the model's input scale)."""
    if isinstance(plan, SolverPlan):
        return plan.init_noise_sigma / plan.calls[0].scale_in
    return 1.0
