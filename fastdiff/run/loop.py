"""The one sampling loop: every plan (a `SolverPlan`, whatever the sampler) runs through `Loop.body`.

    body(i, x) = model(x, t_i) → (CFG split) → noise z_i → one fused update → x_{i+1}

The eager loop calls `body` once per model call with callbacks, progress and NaN checks around it; the CUDA-graph
loop captures the same `body` calls once and replays them (sampling.py's cache). Buffers are the loop's own: two
sample buffers it alternates between (an update never writes the tensor it reads, and a fresh 64 MiB output per step
would page-fault on the CPU), the solver's history slots, the timestep table, and the coefficient table on the
device. The caller's x_T is copied in, never written.
"""
from __future__ import annotations

import torch

from fastdiff._util import model_output
from fastdiff.ops import multistep as ms
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
    return split_output(out, x, i, learned, check_nan, channels)


def split_output(out, x, i, learned: bool, check_nan: bool, channels: int | None = None):
    """The checks and the split of call_model on an output already computed."""
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
    (e.g. fastdiff.app.jobs.IndexedNoise: one stream per image), called in the same order: x_T, then each noisy step."""
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

    def __init__(self, plan, model, x, name: str, *, guidance_scale=None, private: bool = False):
        """private: the loop gets its own timestep and coefficient tables (a CUDA graph reloads them in place);
        otherwise they are shared with other eager loops of the same plan, device and batch (read-only)."""
        self.plan, self.model, self.name = plan, model, name
        self.guided, self.guidance_scale = guidance_scale is not None, guidance_scale
        dev = x.device
        vt = plan.options.get("variance_type")
        # learned variances: the model returns 2·C channels; DDPM reads the second half (v), a solver drops it
        self.learned = any(c.var_mode != "scalar" for c in plan.calls)
        self.channels = x.shape[1] if (not self.learned and vt in ("learned", "learned_range")) else None
        self.bufs = [torch.empty_like(x, memory_format=_fmt(x)), torch.empty_like(x, memory_format=_fmt(x))]
        self.hist = torch.empty((plan.num_slots, *x.shape), dtype=x.dtype, device=dev)
        if x.dim() == 4 and _fmt(x) is torch.channels_last:
            self.hist = torch.stack([torch.empty_like(x, memory_format=torch.channels_last)
                                     for _ in range(plan.num_slots)])
        views: dict = {}  # one set of history views per slot pattern (a plan repeats a few patterns)
        for c in plan.calls:
            key = (tuple(c.reads), c.y2_slot, c.d_slot)
            if key not in views:
                views[key] = ([self.hist[s] for s in c.reads], self.hist[c.y2_slot] if c.y2_slot is not None else
                              None, self.hist[c.d_slot] if c.d_slot is not None else None)
        Bm = x.shape[0] * (2 if self.guided else 1)
        self.tb, self.tb_rows, self.coefs, coef_rows = _tables(plan, dev, Bm, guidance_scale, private)
        # per call, what the step body reads: the row, its history views, the op's flags, whether it draws noise
        self.calls = [(c, *views[(tuple(c.reads), c.y2_slot, c.d_slot)], coef_rows[i], ms.flags(c.clip, c.var_mode),
                       c.noise) for i, c in enumerate(plan.calls)]
        self.rngs = None
        self.x0_scratch = None
        self.draw = None  # set by the runner: (i, shape, dtype) -> z, or None for rng-based noise
        self.noise_dtype = plan.noise_dtype
        # the raw op, resolved once: a step after the first (checked) one pays only the kernel's own checks
        self.raw = ms.resolve_op(name, dev)
        # the model returns C channels, unguided: after the first step, one quick check of its output
        self.plain = not self.learned and self.channels is None and not self.guided
        self.x_stride = self.bufs[0].stride()

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
        """(z, rng) of step i (a call that draws noise): a noise tensor, or the Philox [seed, offset] row."""
        if self.rngs is not None:
            return None, self.rngs[i]
        z = self.draw(i, x.shape, self.noise_dtype or x.dtype)
        return (z if z.dtype == x.dtype else z.to(x.dtype)), None

    def body(self, i, x, *, check_nan=False, want_x0=False):
        """One model call and its fused update: x (the current sample) → (x_next, x̂0 or None)."""
        c, hist, out2, d_out, coef, flags, noisy = self.calls[i]
        if self.plain and i and not check_nan:  # the common case: a tensor like x (no dtype diagnosis needed now)
            o = self.model(x, self.tb_rows[i])
            o_cond = v = None
            if not (type(o) is torch.Tensor and o.shape == x.shape and o.dtype == x.dtype and o.device == x.device):
                o, v = split_output(o, x, i, self.learned, check_nan, self.channels)
        else:
            o, o_cond, v = self.model_outputs(i, x, check_nan)
        z, rng = self.noise_for(i, x) if noisy else (None, None)
        bufs = self.bufs
        out = bufs[1] if x.data_ptr() == bufs[0].data_ptr() else bufs[0]
        if want_x0 and d_out is None:
            if self.x0_scratch is None:
                self.x0_scratch = torch.empty_like(x)
            d_out = self.x0_scratch
        if v is not None and c.var_mode == "scalar":
            v = None
        thr = None
        if c.threshold:  # a per-sample reduction, then the fused pass
            opts = self.plan.options
            thr = ms.threshold_scale(x, o, coef, o_cond=o_cond, ratio=opts["dynamic_thresholding_ratio"],
                                     max_value=opts["sample_max_value"])
        xs = self.x_stride
        if self.name != "torch" and (i == 0 or o.stride() != xs or (o_cond is not None and o_cond.stride() != xs)
                                     or (v is not None and v.stride() != xs)):
            # the first step (and a step whose inputs are laid out unlike x) through the checked entry
            ms.multistep_step(x, o, coef, o_cond=o_cond, hist=hist, noise=z, rng=rng, v=v, var_mode=c.var_mode,
                              thr=thr, clip=c.clip, out=out, out2=out2, d_out=d_out, backend=self.name)
        else:  # the raw op (the reference for "torch", also for float64 samples)
            self.raw(x, o, o_cond, hist, z, rng, v, thr, coef, flags, out, out2, d_out)
        return out, (d_out if want_x0 and self.plan.d_is_x0 else None)

    # ---- loading a call's inputs -----------------------------------------------------------------------------
    def start(self, x_T, scale: float = 1.0):
        """Copy x_T (times `scale`) into the first buffer: the caller's tensor is never written."""
        b = self.bufs[0]
        if scale == 1.0:
            b.copy_(x_T)
        else:
            torch.mul(x_T, scale, out=b)
        return b


def _tables(plan, dev, Bm: int, guidance_scale, private: bool):
    """(timesteps (N, Bm), their rows, coefficients (N, NUM_COEF) float64, their rows) on `dev`: kept on the plan per
    device, batch and guidance scale for eager loops (built once, never written); a private copy for a graph."""
    def build():
        tb = torch.tensor([c.t for c in plan.calls], dtype=plan.t_dtype).view(-1, 1).expand(-1, Bm).contiguous()
        coefs = plan.coef_table(guidance_scale).to(dev, copy=True)
        tb = tb.to(dev)
        return tb, list(tb.unbind(0)), coefs, list(coefs.unbind(0))

    if private:
        return build()
    cache = plan.__dict__.setdefault("_device_tables", {})
    key = (str(dev), Bm, guidance_scale)
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _fmt(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def initial_scale(plan) -> float:
    """x_T (randn·init_noise_sigma in diffusers' scale) → the loop's first state (the model's input scale)."""
    return plan.init_noise_sigma / plan.calls[0].scale_in
