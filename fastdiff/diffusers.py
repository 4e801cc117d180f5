"""Drop-in diffusers schedulers that run every step as one fused fastdiff kernel.

    import fastdiff.diffusers as fd
    pipe.scheduler = fd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, UniPCMultistepScheduler, PNDMScheduler and the rest of diffusers' solver family —
LMSDiscreteScheduler, DPMSolverSinglestepScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
DEISMultistepScheduler, LCMScheduler, TCDScheduler (plans of fastdiff.samplers.lms, dpm_singlestep, kdpm2, deis, lcm,
tcd; LMS and KDPM2 usable before set_timesteps as diffusers'; LCM/TCD return `denoised` / `pred_noised_sample` from
the same fused pass) — carry diffusers' names, `__init__` parameters and
defaults (taken from the installed diffusers' classes, so `from_config`, `save_config` and `_compatibles` behave as
diffusers'), `order`, `timesteps` (int64; float32 for the Euler family), `sigmas`, `init_noise_sigma`,
`scale_model_input`, `add_noise`, `set_begin_index` / `begin_index` / `step_index` / `index_for_timestep` (where
diffusers' class has them), and `set_timesteps` / `step` with the signatures of diffusers' classes (pipelines inspect
them). Also as diffusers': the Euler family is usable before set_timesteps (the full training grid; Heun runs
set_timesteps(T) in __init__), its init_noise_sigma a float32 0-d tensor; PNDM's `prk_timesteps`, `plms_timesteps`
and the explicit `step_prk` / `step_plms` with their public state (`ets`, `counter`, `cur_model_output`,
`cur_sample`); DDIM/DDPM `_get_variance`; DDPM `previous_timestep` typed as diffusers'; prev_sample in the dtype
diffusers returns for a sample and model output of different dtypes.

Flow matching (SD3, Flux, ...: `FLOW_SCHEDULERS`): FlowMatchEulerDiscreteScheduler (every option: shift, dynamic
shifting with set_timesteps(mu=), time_shift_type, shift_terminal, invert_sigmas, Karras/exponential/beta σ's,
stochastic_sampling; set_timesteps(sigmas=, timesteps=); set_shift; scale_noise for img2img) and
FlowMatchHeunDiscreteScheduler, on fastdiff.samplers.flow's plans: one fused op per step, no host sync (diffusers'
FlowMatch step locates its index with a device read on its first call). DPM-Solver and UniPC take flow σ's
(use_flow_sigmas, flow_shift, prediction_type="flow_prediction", mu=, UniPC's sigmas=) and the exponential / beta / λ
σ grids fused.

Every configuration diffusers' class takes is taken. One the fused step refuses (where diffusers computes NaN:
repeated timesteps of a multistep grid, √ of a negative number) or lacks (flow σ's with exponential/beta σ's,
`algorithm_type="deis"`, the `exp` β schedule, trained_betas of another length than num_train_timesteps, β > 1,
unknown variance_type strings, `mu=` without flow σ's) is run by an instance of diffusers' own class built from the
live config, with a warning naming the reason (once per scheduler and reason); a config diffusers refuses too raises
diffusers' error. The next set_timesteps of a config the fused step runs (a pipeline rewrote it) returns to the fused
step.
`fastdiff.sample` stays strict about the same settings.

How a step runs. `set_timesteps` reads the config (pipelines rewrite `steps_offset` / `clip_sample` after
construction, so nothing is cached from `__init__`) and computes every coefficient of the run once, in float64:
the σ-grid and multistep solvers compile to a `fastdiff.samplers` plan (one row of `fastdiff.ops.multistep` per
model call, rows in diffusers' sample scale: `SolverPlan.diffusers_rows`), DDIM and DDPM to a table of
the same op's rows (fastdiff.samplers.ddim / ddpm) over the timesteps they may be given (they step from the timestep passed, as
diffusers' do: img2img starts mid-schedule). The tables live on the sample's device. `step` is then one fused kernel
over the sample, the model output, the history slots this scheduler owns and the noise; it returns a freshly
allocated `prev_sample` (pipelines keep references to latents). Where the step is depends on no tensor value: a
timestep taken from `self.timesteps` (as every pipeline passes it) is located by its address in that tensor, a
Python number by value; only a foreign timestep tensor falls back to reading it, on the first step, exactly where
diffusers reads it too. No host sync, no host-side tensor math per step (tests/diffusers/test_syncs.py counts).

Noise is drawn with diffusers' `randn_tensor` (lists of generators included), only where diffusers draws it: DDIM
when η > 0, DDPM when t > 0, Euler ancestral every step, the SDE DPM-Solvers every step.

Starting mid-schedule (img2img: `set_begin_index(k)`, or the first timestep passed): the Euler family steps on from
row k; DPM-Solver, UniPC and PLMS restart their history there, as diffusers' do (its warm-up orders from step k),
from a plan of the remaining grid. Custom grids where diffusers' class takes them: `timesteps=` (DDPM, DPM-Solver,
Euler, Heun) and `sigmas=` (Euler), planned with diffusers' σ's for them (Euler's `interpolation_type="log_linear"`
included). Step arguments not offered (a clear error; the run has started, so nothing is handed over): `s_churn` > 0
and PNDM's PRK warm-up started mid-schedule.

`pred_original_sample`: written (one extra output of the fused pass) when `step(..., return_dict=True)`; the tuple
form (`return_dict=False`, what pipelines use) returns `(prev_sample, None)` where diffusers returns x̂0, to keep
one write per step.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import torch

import diffusers as _hf  # the real library (absolute import; this module is fastdiff.diffusers)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from fastdiff import prediction as _prediction, samplers as S
from fastdiff.ops import multistep as M
from fastdiff.samplers import deis as _deis, dpm_singlestep as _singlestep, flow as _flow, ipndm_v as _ipndm_v
from fastdiff.samplers import lms as _lms
from fastdiff.schedule import NoiseSchedule, grids as _grids

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler", "PNDMScheduler",
           "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
           "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler", "EDMEulerScheduler",
           "EDMDPMSolverMultistepScheduler", "IPNDMScheduler",
           "LMSDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "SCHEDULERS",
           "FLOW_SCHEDULERS", "equivalent"]


# ---------------------------------------------------------------------------------------------------------------
# shared machinery

def _init_like(hf_cls):
    """An `__init__` with exactly the parameters and defaults of diffusers' `hf_cls.__init__` (so ConfigMixin
    records the same config), decorated with register_to_config."""
    sig = inspect.signature(hf_cls.__init__)

    def __init__(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self._setup(dict(list(bound.arguments.items())[1:]))

    __init__.__signature__ = sig
    __init__.__doc__ = f"The parameters and defaults of diffusers' {hf_cls.__name__}."
    return register_to_config(__init__)


# what fastdiff's checks raise for a configuration they refuse (diffusers' class may still accept it)
_REFUSALS = (ValueError, TypeError, NotImplementedError)


class GridError(ValueError):
    """A bad grid for fastdiff's own extension (UniPC's and DDIM's set_timesteps(timesteps=), which diffusers'
    classes lack): raised as is, never handed to diffusers' class."""


# the public methods that diffusers' own instance answers while it runs a scheduler (see _Base._to_diffusers): bound
# to the instance (no wrapper on the fused path)
_HANDED = ("step", "add_noise", "get_velocity", "scale_model_input", "set_begin_index", "previous_timestep",
           "_get_variance", "step_prk", "step_plms", "index_for_timestep")


def _set_timesteps(fn):
    """set_timesteps: fastdiff's plan of the live config when it can run it, else diffusers' class runs the run
    (diffusers' error when diffusers refuses it too)."""

    @functools.wraps(fn)
    def set_timesteps(self, *args, **kwargs):
        try:
            out = fn(self, *args, **kwargs)
        except GridError:
            raise
        except _REFUSALS as e:
            out = []
            self._to_diffusers(e, run=lambda impl: out.append(impl.set_timesteps(*args, **kwargs)))
            return out[0]
        if self._hf_impl is not None:  # the live config runs fused again (a pipeline rewrote it)
            self._hf_impl = None
            for name in _HANDED:
                self.__dict__.pop(name, None)
            self.betas = self._schedule.betas.to(torch.float32)
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = self._schedule.alphas_cumprod_f32()
        return out
    return set_timesteps


def _user_level() -> int:
    """warnings.warn's stacklevel, for the function that calls this, of the first frame outside this module and
    the diffusers package (the user's or the pipeline's call)."""
    inside = (__file__, os.path.dirname(_hf.__file__) + os.sep)
    f, level = sys._getframe(1), 1
    while f.f_back is not None and (f.f_code.co_filename == inside[0] or f.f_code.co_filename.startswith(inside[1])):
        f, level = f.f_back, level + 1
    return level


def _checkable(cfg):
    """(the config as fastdiff's checks see it, the values they would refuse that diffusers takes and computes
    finitely). Dynamic thresholding: diffusers clamps the per-sample scale into [1, sample_max_value], which for a
    sample_max_value in (0, 1) is sample_max_value itself (torch.clamp with min > max gives max), and a ratio of 0
    takes the quantile 0, the minimum; fastdiff.sample refuses both as likely mistakes, the drop-in classes run
    them as diffusers does (fastdiff.ops.multistep.linear_threshold_scale clamps the same way)."""
    cfg, real = dict(cfg), {}
    if cfg.get("timestep_type") == "continuous":  # Euler: only the model's timestep values change (see _set)
        real["timestep_type"], cfg["timestep_type"] = "continuous", "discrete"
    if cfg.get("thresholding") is True:
        r, m = cfg.get("dynamic_thresholding_ratio"), cfg.get("sample_max_value")
        if type(r) in (int, float) and r == 0:
            real["dynamic_thresholding_ratio"], cfg["dynamic_thresholding_ratio"] = 0.0, 1.0
        if type(m) in (int, float) and 0 < m < 1:
            real["sample_max_value"], cfg["sample_max_value"] = float(m), 1.0
    return cfg, real


def _check_steps(n, T):
    if n is None:
        raise ValueError("num_inference_steps: pass the number of steps (got None)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {type(n).__name__}")
    n = int(n)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {n}")
    return n


class _Base(SchedulerMixin, ConfigMixin):
    """What every fastdiff scheduler shares: config reading, the timestep → position rule, add_noise tables."""

    _hf_class: type
    order = 1

    def __init_subclass__(cls, **kw):
        """A public drop-in class takes diffusers' class of the same name: its constructor (parameters and defaults,
        so ConfigMixin records the same config), order and _compatibles."""
        super().__init_subclass__(**kw)
        if not cls.__name__.startswith("_"):
            cls._hf_class = hf_cls = getattr(_hf, cls.__name__)
            cls._compatibles, cls.order = list(hf_cls._compatibles), hf_cls.order
            cls.__init__ = _init_like(hf_cls)

    def _no_index_timestep(self, timestep):
        """diffusers' σ-grid schedulers refuse an integer index where a timestep value belongs."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")

    def _x0_output(self, prev, x0, return_dict: bool):
        """diffusers' step result with x̂0: (prev, None) as its tuple, else its <Class>Output."""
        if not return_dict:
            return prev, None
        out = getattr(sys.modules[self._hf_class.__module__], f"{self._hf_class.__name__}Output")
        return out(prev_sample=prev, pred_original_sample=x0)

    def _setup(self, args: dict):
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._host_ts: list = []
        self._dev_cache: dict = {}
        self._planned_cfg = None
        self._hf_impl = None
        T = args["num_train_timesteps"]
        self.timesteps = torch.from_numpy(np.arange(0, T)[::-1].copy())
        try:
            self._check_config(args)
            self._schedule = NoiseSchedule.from_diffusers(_checkable(args)[0])
        except _REFUSALS as e:  # diffusers' class may take it: then it runs this config (else its error is raised)
            self._to_diffusers(e, args)
            return
        self.betas = self._schedule.betas.to(torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = self._schedule.alphas_cumprod_f32()

    # ---- configurations the fused step does not run: diffusers' own class runs them, never refused ----
    def _to_diffusers(self, why, cfg=None, run=None):
        """Hand this scheduler's work to diffusers' own class, built from the live config: for a configuration that
        fastdiff refuses (where diffusers computes NaN, or a setting fastdiff's solvers lack) but diffusers' class
        accepts. A configuration (or `run`, the set_timesteps call) diffusers refuses too raises diffusers' error
        here, and nothing changes. Warned once per reason."""
        cfg = dict(self.config) if cfg is None else dict(cfg)
        params = inspect.signature(self._hf_class.__init__).parameters
        impl = self._hf_class(**{k: v for k, v in cfg.items() if k in params and k != "self"})
        if run is not None:
            run(impl)
        self._hf_impl, self._hf_why = impl, str(why)
        for name in _HANDED:
            if hasattr(impl, name):
                self.__dict__[name] = getattr(impl, name)
        self._mirror()
        if str(why) == "math domain error":  # a plan's float64 math met √(negative), where diffusers computes NaN
            why = ("the step's float64 math takes √ of a negative number on this grid (e.g. a σ grid that is not "
                   "decreasing); diffusers computes NaN on that step")
        elif cfg.get("variance_type") == "fixed_large_log" and "fixed_large_log" in str(why):
            why = f"{why} (diffusers' step takes √(log β) of it: NaN samples)"
        said = self.__dict__.setdefault("_hf_said", set())
        if str(why) not in said:
            said.add(str(why))
            warnings.warn(f"fastdiff.diffusers.{type(self).__name__}: {why}; this configuration runs on diffusers' "
                          f"own {self._hf_class.__name__} (unfused)", stacklevel=_user_level())
        return impl

    _MIRRORED = ("betas", "alphas", "alphas_cumprod", "timesteps", "sigmas", "num_inference_steps", "prk_timesteps",
                 "plms_timesteps", "custom_timesteps")

    def _mirror(self):
        """The public attributes of the diffusers instance that runs this scheduler, copied here (pipelines read
        them from this object)."""
        for k in self._MIRRORED:
            if hasattr(self._hf_impl, k):
                self.__dict__[k] = getattr(self._hf_impl, k)

    def _warn_nan(self, what):
        """Where diffusers computes NaN (or fastdiff, to stay finite, not diffusers' number): said once per
        scheduler and case, never refused."""
        said = self.__dict__.setdefault("_hf_said", set())
        if what not in said:
            said.add(what)
            warnings.warn(f"fastdiff.diffusers.{type(self).__name__}.step: {what}", stacklevel=_user_level())

    def __getattr__(self, name):
        impl = self.__dict__.get("_hf_impl")
        if impl is not None and not name.startswith("__"):
            try:
                return getattr(impl, name)
            except AttributeError:
                pass
        return super().__getattr__(name)

    def _check_config(self, cfg: dict):
        """Refuse, at construction, settings this class cannot run (the same check runs at set_timesteps)."""

    def __len__(self):
        return self.config.num_train_timesteps

    def _position(self, timestep):
        """(index into self.timesteps, host value) of a timestep without reading the device: a view into
        self.timesteps (what pipelines pass) is located by address; a Python number is its own value; otherwise
        (None, None)."""
        ts = self.timesteps
        if torch.is_tensor(timestep):
            if timestep.numel() == 1 and timestep.dtype == ts.dtype and timestep.device == ts.device \
                    and ts.dim() == 1 and ts.numel() == len(self._host_ts) and ts.is_contiguous() \
                    and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr():
                off, size = timestep.data_ptr() - ts.data_ptr(), ts.element_size()
                if off % size == 0 and 0 <= off // size < len(self._host_ts):
                    p = off // size
                    return p, self._host_ts[p]
            return None, None
        if isinstance(timestep, (int, float, np.integer, np.floating)):
            return None, timestep
        raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")

    def _timestep_value(self, timestep):
        """The host value of a timestep: without a device read where _position can tell, else read (the read
        diffusers makes too)."""
        p, v = self._position(timestep)
        if v is None:
            v = timestep.reshape(-1)[0].item()
        return p, v

    def _index_for_value(self, v, missing_last: bool = True) -> int:
        """diffusers' index_for_timestep on the host list: the second match when there are several, the only one
        otherwise, the last index when none (DPM/UniPC) or an error (Euler family)."""
        hits = [i for i, t in enumerate(self._host_ts) if t == v]
        if not hits:
            if missing_last:
                return len(self._host_ts) - 1
            raise ValueError(f"timestep {v} is not one of this scheduler's timesteps {self._host_ts}")
        return hits[1] if len(hits) > 1 else hits[0]

    # ---- what set_timesteps computes, kept per (config, grid): a pipeline calls set_timesteps on every call ----
    _MEMO_SIZE = 8

    def _memo(self, grid_key):
        """The dict of plans / device tables for the current config and `grid_key` (kept across set_timesteps
        calls, the 8 most recent)."""
        memo = self.__dict__.setdefault("_memo_store", {})
        key = (repr(sorted(dict(self.config).items())), grid_key)
        entry = memo.pop(key, None)
        if entry is None:
            entry = {}
            while len(memo) >= self._MEMO_SIZE:
                memo.pop(next(iter(memo)))
        memo[key] = entry
        return entry

    # ---- device tables ----
    def _cached(self, key, make):
        t = self._dev_cache.get(key)
        if t is None:
            t = self._dev_cache[key] = make()
        return t

    def _abar_sqrt(self, device, dtype):
        """(√ᾱ_t, √(1 − ᾱ_t)) over all training timesteps, float64 math, on `device` in `dtype`."""
        def make():
            a = self._schedule.alphas_cumprod
            return a.sqrt().to(device=device, dtype=dtype), (1 - a).sqrt().to(device=device, dtype=dtype)
        return self._cached(("abar", str(device), dtype), make)

    def _bcast(self, v, like):
        v = v.flatten()
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    def _vp_add_noise(self, original_samples, noise, timesteps):
        """√ᾱ_t·x0 + √(1 − ᾱ_t)·ε at training timesteps (DDIM/DDPM/PNDM), indexed on the device."""
        a, b = self._abar_sqrt(original_samples.device, original_samples.dtype)
        idx = timesteps.to(original_samples.device).long().reshape(-1)
        return self._bcast(a.index_select(0, idx), original_samples) * original_samples + \
            self._bcast(b.index_select(0, idx), original_samples) * noise

    def get_velocity(self, sample, noise, timesteps):
        a, b = self._abar_sqrt(sample.device, sample.dtype)
        idx = timesteps.to(sample.device).long().reshape(-1)
        a_t, b_t = self._bcast(a.index_select(0, idx), sample), self._bcast(b.index_select(0, idx), sample)
        return a_t * noise - b_t * sample

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample


def _draw(shape, generator, device, dtype):
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _model_output(model_output, sample, variance_type):
    """The prediction half of a learned-variance output (diffusers takes the first C channels), in x's dtype."""
    if model_output.dim() == sample.dim() and model_output.shape[1] == 2 * sample.shape[1] and \
            variance_type in ("learned", "learned_range"):
        model_output = model_output[:, : sample.shape[1]]
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)}, sample {tuple(sample.shape)}")
    return model_output if model_output.dtype == sample.dtype else model_output.to(sample.dtype)


def _as_result(prev, sample, model_output, rule: str):
    """prev_sample in the dtype diffusers' class returns for a sample and model output of different dtypes: the model
    output's ("model": Euler, Euler ancestral cast their float32 result to it), the sample's ("sample": UniPC), else
    the promotion of the two (the others' arithmetic)."""
    if sample.dtype == model_output.dtype == prev.dtype:  # the usual case: nothing to decide (no torch call)
        return prev
    dt = model_output.dtype if rule == "model" else sample.dtype if rule == "sample" else \
        torch.promote_types(sample.dtype, model_output.dtype)
    return prev if prev.dtype == dt else prev.to(dt)


def _fast_layout(x, *ts):
    """True when the raw op may run unchecked: x dense contiguous, every tensor of x's shape/dtype/strides."""
    if not x.is_contiguous():
        return False
    return all(t is None or (t.shape == x.shape and t.dtype == x.dtype and t.stride() == x.stride()
                             and t.device == x.device) for t in ts)


# ---------------------------------------------------------------------------------------------------------------
# the solver-plan schedulers (DPM-Solver, UniPC, Euler, Euler ancestral, Heun, PNDM)


class _PlanScheduler(_Base):
    _sampler = ""  # the fastdiff sampler of this class
    _result_dtype = "promote"  # the dtype diffusers returns prev_sample in (see _as_result)
    _restarts = True  # history restarts at the first step (multistep solvers); False: rows are per step
    _euler_family = False

    def _check_config(self, cfg):
        S.solver_options(self._sampler, _checkable(cfg)[0], {})

    def _setup(self, args):
        self._plans: dict = {}
        self._start = 0
        self._slots: list = []
        self.sigmas = None
        self._checked = False
        self._running = False
        self._init_grid_active = False
        super()._setup(args)
        if self._euler_family and self._hf_impl is None:
            try:
                self._init_grid()
            except _REFUSALS as e:
                self._to_diffusers(e)

    _INIT_GRID = dict(timestep_spacing="linspace", use_karras_sigmas=False, final_sigmas_type="zero",
                      interpolation_type="linear")

    def _init_grid(self):
        """The Euler family is usable before set_timesteps, as in diffusers: Euler and Euler ancestral on the full
        training grid (T linspace timesteps, σ's of the table, final σ 0; num_inference_steps stays None), Heun on
        set_timesteps(T) of its config (what diffusers' HeunDiscreteScheduler.__init__ runs)."""
        T = self.config.num_train_timesteps
        if self._sampler in ("heun", "lms", "kdpm2", "kdpm2_ancestral"):  # diffusers' __init__: set_timesteps(T)
            self._set(T, None)
        else:
            self._set(T, None, overrides={k: v for k, v in self._INIT_GRID.items() if k in self.config})
            self.num_inference_steps = None
        self._init_grid_active = True

    # ---- step position (DDIM/DDPM have none in diffusers) ----
    @property
    def step_index(self):
        return self._hf_impl.step_index if self._hf_impl is not None else self._step_index

    @property
    def begin_index(self):
        return self._hf_impl.begin_index if self._hf_impl is not None else self._begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """diffusers' rule: the position of `timestep` in the schedule, the second match when there are several; no
        match: the last position (DPM-Solver, UniPC) or an error (the Euler family)."""
        if schedule_timesteps is not None:
            ts = [t for t in torch.as_tensor(schedule_timesteps).reshape(-1).tolist()]
            v = timestep.reshape(-1)[0].item() if torch.is_tensor(timestep) else timestep
            hits = [i for i, t in enumerate(ts) if t == v]
            if not hits:
                if self._euler_family:
                    raise IndexError(f"timestep {v} is not in schedule_timesteps")
                return len(ts) - 1
            return hits[1] if len(hits) > 1 else hits[0]
        _, v = self._timestep_value(timestep)
        try:
            return self._index_for_value(v, missing_last=not self._euler_family)
        except ValueError as e:
            raise IndexError(str(e)) from None

    # ---- set_timesteps ----
    def _set(self, num_inference_steps, device, timesteps=None, sigmas=None, overrides=None):
        cfg = dict(self.config)
        cfg.update(overrides or {})
        T = cfg["num_train_timesteps"]
        custom = None
        if timesteps is not None or sigmas is not None:
            custom = self._check_custom(num_inference_steps, timesteps, sigmas, cfg)
            n = len(custom[1]) - (1 if custom[0] == "sigmas" else 0)
        else:
            n = _check_steps(num_inference_steps, T)
        self._init_grid_active = False
        memo = self._memo((n, custom, tuple(sorted((overrides or {}).items()))))
        if "plans" not in memo:
            checked, real = _checkable(cfg)
            sched = NoiseSchedule.from_diffusers(checked)
            opts = S.solver_options(self._sampler, checked, {})
            opts.update({k: v for k, v in real.items() if k != "timestep_type"})  # the model's t: see below
            plan = S.build_plan(self._sampler, sched, n, opts) if custom is None else \
                self._custom_plan(sched, opts, n, custom)
            memo.update(schedule=sched, opts=opts, plans={0: plan}, dev={})
        self._schedule, self._opts = memo["schedule"], memo["opts"]
        # the SDE DPM-Solvers draw noise every step in diffusers, the last (σ_t = 0) too
        self._draws_every_step = str(self._opts.get("algorithm_type", "")).startswith("sde")
        plan = memo["plans"][0]
        if len(plan.timesteps) != len(plan.calls):
            raise AssertionError("plan has one call per timestep")
        self._planned_cfg = self._internal_dict
        self.num_inference_steps = n
        self._plans = memo["plans"]  # start index -> plan (tails added by set_begin_index / a mid-schedule start)
        self._host_ts = [type(t)(t) for t in plan.timesteps]
        self.timesteps = torch.tensor(plan.timesteps, dtype=plan.t_dtype).to(device)
        self.sigmas = torch.tensor(plan.sigmas, dtype=torch.float32) if plan.sigmas is not None else None
        if cfg.get("timestep_type") == "continuous" and cfg.get("prediction_type") == "v_prediction":
            # Euler's EDM-style timesteps: the model sees 0.25·log σ (float32, as diffusers forms them); the plan's
            # rows depend on the σ's only
            cont = 0.25 * self.sigmas[:-1].log()
            self._host_ts = [float(t) for t in cont.tolist()]
            self.timesteps = cont.to(device)
        self._init_sigma = float(plan.init_noise_sigma)
        self._step_index = None
        self._begin_index = None
        self._start = 0
        self._running = False
        self._dev_cache = memo["dev"]
        self._checked = False
        if device is not None:
            self._rows(0, torch.device(device))

    @property
    def init_noise_sigma(self):
        """diffusers' value and type: 1.0 (DPM-Solver, UniPC, PNDM); the Euler family's a float32 0-d tensor from
        its σ's, max σ for linspace/trailing spacing, else √(max σ² + 1)."""
        if self._hf_impl is not None:
            return self._hf_impl.init_noise_sigma
        if not self._euler_family:
            return 1.0
        smax = self.sigmas.max()
        return smax if self.config.timestep_spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5

    def _rows(self, start, device):
        return self._cached(("rows", start, str(device)), lambda: self._plans[start].diffusers_rows().to(device))

    # ---- custom grids (timesteps= / sigmas=, where diffusers' class takes them) ----
    _custom_ok: tuple = ()  # which of "timesteps", "sigmas" this class plans

    def _check_custom(self, n, timesteps, sigmas, cfg):
        name = type(self).__name__
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if n is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        kind, vals = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
        if kind == "timesteps" and cfg.get("timestep_type") == "continuous" and \
                cfg.get("prediction_type") == "v_prediction":
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
        if kind not in self._custom_ok:
            raise NotImplementedError(f"{name}.set_timesteps: custom {kind}= is not supported by fastdiff; pass "
                                      f"num_inference_steps, or use diffusers' {name} for a custom grid")
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            if kind == "timesteps" and cfg.get(k):
                raise ValueError(f"Cannot set `timesteps` with `config.{k} = True`.")
        vals = [float(v) for v in (vals.tolist() if hasattr(vals, "tolist") else vals)]
        T = cfg["num_train_timesteps"]
        if len(vals) < (2 if kind == "sigmas" else 1) or not all(math.isfinite(v) for v in vals):
            need = ">= 2, the last the final σ" if kind == "sigmas" else ">= 1"
            raise ValueError(f"{name}.set_timesteps: {kind} must be finite numbers ({need}), got {vals}")
        if kind == "timesteps" and not all(0 <= v <= T - 1 for v in vals):
            raise ValueError(f"{name}.set_timesteps: timesteps must lie in [0, {T - 1}], got {vals}")
        if kind == "sigmas" and any(v < 0 for v in vals):
            raise ValueError(f"{name}.set_timesteps: sigmas must be >= 0, got {vals}")
        return kind, tuple(vals)

    def _custom_plan(self, sched, opts, n, custom):
        """The plan of a custom grid: diffusers' σ's for it (interpolated in float64 over the training σ table, or the
        given σ's with their model timesteps interpolated in log σ as diffusers does), compiled by the family's plan
        function with its grid function swapped for this one."""
        kind, vals = custom
        a64, a32 = _grids.abar_tables(sched)
        s64, s32 = _grids.sigma_table(a64), _grids.sigma_table(a32)
        T = len(a64)
        if kind == "sigmas":
            sig = [float(np.float32(v)) for v in vals]
            ts = [float(t) for t in np.asarray([_grids.sigma_to_t(np.float32(v), np.log(s32)) for v in sig[:-1]],
                                             np.float32)]
        else:
            int_ts = self._sampler in ("dpmsolver++", "unipc")
            ts_arr = np.asarray(vals, dtype=np.int64 if int_ts else np.float32)
            ts = [int(t) for t in ts_arr] if int_ts else [float(t) for t in ts_arr]
            final = opts.get("final_sigmas_type", "zero")
            if opts.get("interpolation_type", "linear") == "log_linear":  # diffusers: σ's of the grid, not of `ts`
                sig = [float(v) for v in torch.linspace(math.log(s64[-1]), math.log(s64[0]), len(ts) + 1,
                                                        dtype=torch.float64).exp()]
            else:
                sig = [float(v) for v in np.interp(ts_arr, np.arange(T), s64)]
            sig.append(float(s64[0]) if final == "sigma_min" else 0.0)

        return self._build_uncached(n, opts, grid=_grids.Grid(ts, sig[:-1], final=sig[-1]))

    # ---- plans of a partial grid (history restarted at call k) ----
    def _tail_plan(self, k: int):
        n = self.num_inference_steps if self.num_inference_steps is not None else len(self._host_ts)  # an init grid
        o = dict(self._opts)
        if self._sampler == "pndm":
            if not o["skip_prk_steps"]:
                raise NotImplementedError("PNDMScheduler: starting mid-schedule (img2img) with the PRK warm-up "
                                          "(skip_prk_steps=False) is not supported by fastdiff; set "
                                          "skip_prk_steps=True")
            return self._build_uncached(n, o, plms_tail=self._plans[0].timesteps[k:])
        if self._sampler in ("dpmsolver++", "edm_dpmsolver++") and n >= 15:
            o["lower_order_final"] = False  # diffusers' "len(timesteps) < 15" is about the full grid
        if self._sampler == "unipc":
            o["disable_corrector"] = tuple(int(j) - k for j in o["disable_corrector"])
        full = self._plans[0]  # its grid (custom or not): timesteps and σ's with the final one appended
        tail = _grids.Grid(full.timesteps[k:], full.sigmas[k:-1], final=full.sigmas[-1])
        return self._build_uncached(len(tail), o, grid=tail)

    def _build_uncached(self, n, o, **grid):
        """The plan function itself, over the class's grid or a given one (`grid=` a Grid: a custom grid or the tail
        of the full one; `plms_tail=`: PNDM's restart); build_plan's cache is keyed for fastdiff.sample's calls."""
        fn = S._FAMILIES[self._sampler][0]
        plan = fn(self._schedule, n, o, grid["grid"]) if "grid" in grid else fn(self._schedule, n, o, **grid)
        plan.sampler = self._sampler
        return plan

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index
        if self._plans and self._restarts and 0 < begin_index < len(self._host_ts) and begin_index not in self._plans:
            self._plans[begin_index] = self._tail_plan(begin_index)  # built here, off the denoising loop
            self._rows(begin_index, self.timesteps.device)

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            i = int(self._begin_index)
        else:
            p, v = self._timestep_value(timestep)
            i = p if self._sampler == "pndm" and p is not None else \
                self._index_for_value(v, missing_last=not self._euler_family)
        if not 0 <= i < len(self._host_ts):
            raise IndexError(f"{type(self).__name__}: step index {i} is outside the {len(self._host_ts)} timesteps")
        self._step_index = i
        self._start = i if self._restarts else 0
        if self._start and self._start not in self._plans:
            self._plans[self._start] = self._tail_plan(self._start)
        if not self._restarts and self._sampler in ("heun", "kdpm2", "kdpm2_ancestral") and i % 2 == 1:
            raise NotImplementedError(f"{type(self).__name__}: starting at a second-order call (odd step index "
                                      f"{i}) is not supported by fastdiff")

    def _require_plan(self):
        if self._init_grid_active and self._internal_dict is not self._planned_cfg:
            self._init_grid()  # the config changed before set_timesteps: the training grid of the live config
        if not self._plans:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before step (num_inference_steps is None)")
        if self._internal_dict is not self._planned_cfg:
            raise RuntimeError(f"{type(self).__name__}: the config changed after set_timesteps; call set_timesteps "
                               "again")

    # ---- the step ----
    def _fused_step(self, model_output, timestep, sample, generator=None, variance_noise=None, want_x0=False):
        self._require_plan()
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        plan = self._plans[self._start]
        k = i - self._start
        if k >= len(plan.calls):
            raise IndexError(f"{type(self).__name__}.step: called {i + 1} times for {len(self._host_ts)} timesteps; "
                             "call set_timesteps to start a new run")
        row = plan.calls[k]
        x = sample if M._dense_format(sample) is not None else sample.contiguous()  # outputs take x's layout
        o = _model_output(model_output, x, self._opts.get("variance_type"))
        coef = self._cached(("row_views", self._start, str(x.device)),  # one view per call, made once per run
                            lambda: self._rows(self._start, x.device).unbind(0))[k]
        if not self._running:  # the history slots of this run (owned here; a call never writes a slot it reads)
            self._slots = [torch.empty_like(x) for _ in range(plan.num_slots)]
            self._running = True
        elif self._slots and (self._slots[0].shape != x.shape or self._slots[0].device != x.device
                              or self._slots[0].stride() != x.stride()):
            raise RuntimeError(f"{type(self).__name__}.step: the sample's shape/device changed mid-run; call "
                               "set_timesteps to start a new run")
        elif self._slots and self._slots[0].dtype != x.dtype:  # a prev_sample promoted by a wider model output
            self._slots = [h.to(x.dtype) for h in self._slots]
        noise = None
        if row.noise or self._draws_every_step:
            noise = variance_noise if variance_noise is not None else \
                _draw(o.shape, generator, o.device, plan.noise_dtype or o.dtype)
            if noise.dtype != x.dtype:
                noise = noise.to(x.dtype)
            if not row.noise:  # diffusers draws it (generator state) where its coefficient is 0
                noise = None
        thr = None
        if row.threshold:
            thr = M.threshold_scale(x, o, coef, ratio=self._opts["dynamic_thresholding_ratio"],
                                    max_value=self._opts["sample_max_value"])
        hist = [self._slots[s] for s in row.reads]
        out = torch.empty_like(x)
        out2 = self._slots[row.y2_slot] if row.y2_slot is not None else None
        d_out = self._slots[row.d_slot] if row.d_slot is not None else None
        x0 = None
        if want_x0 and d_out is None:
            x0 = d_out = torch.empty_like(out)
        backend = "torch" if x.dtype == torch.float64 else "auto"  # float64: the reference, in float64
        if backend == "torch" or (self._checked and _fast_layout(x, o, noise)):
            op = self._cached(("op", backend, str(x.device), os.environ.get("FASTDIFF_BACKEND")),
                              lambda: M.resolve_op(backend, x.device))
            op(x, o, None, hist, noise, None, None, thr, coef, M.flags(row.clip), out, out2, d_out)
        else:
            M.multistep_step(x, o, coef, hist=hist, noise=noise, thr=thr, clip=row.clip, out=out, out2=out2,
                             d_out=d_out, backend=backend)
            self._checked = True
        if want_x0 and x0 is None and plan.d_is_x0:
            x0 = d_out.clone()
        self._step_index += 1
        return _as_result(out, sample, model_output, self._result_dtype), (x0 if plan.d_is_x0 else None)


def _scaled_input(self, sample, timestep):
    """Euler family: sample / √(σ² + 1) at the current step (σ in float64, divided once)."""
    self._require_plan()
    if self._step_index is None:
        self._init_step_index(timestep)
    k = self._step_index - self._start
    self.is_scale_input_called = True
    return sample / self._plans[self._start].calls[k].scale_in


def _sigma_noise(self, original_samples, noise, timesteps, vp: bool, flow: bool = False):
    """add_noise of the σ schedulers: x0 + σ·ε (Euler family) or α·x0 + σ_t·ε (vp: DPM/UniPC; flow: the FlowMatch
    schedulers' scale_noise and use_flow_sigmas, (1 − σ)·x0 + σ·ε), σ at the step
    diffusers would pick: begin_index / step_index when set, else each timestep's position (found on the device)."""
    self._require_plan()
    dev, dt = original_samples.device, original_samples.dtype
    sig = torch.tensor(self._plans[0].sigmas, dtype=torch.float64)
    B = timesteps.shape[0] if torch.is_tensor(timesteps) and timesteps.dim() else 1
    if self._begin_index is not None:  # diffusers: the current step (inpainting), else the begin index (img2img)
        i = self._step_index if self._step_index is not None else self._begin_index
        s = sig[i].reshape(1).expand(B).to(device=dev)
    else:  # each timestep's position, as index_for_timestep finds it, on the device
        sched = self._cached(("ts", str(dev)), lambda: self.timesteps.to(dev))
        t = timesteps.to(dev).reshape(-1, 1).to(sched.dtype)
        eq = sched.reshape(1, -1) == t
        cnt = eq.sum(1)
        first = eq.to(torch.int32).argmax(1)
        second = (eq & (eq.cumsum(1) == 2)).to(torch.int32).argmax(1)
        pos = torch.where(cnt > 1, second, torch.where(cnt > 0, first, torch.full_like(first, len(self._host_ts) - 1)))
        s = self._cached(("sig", str(dev)), lambda: sig.to(dev)).index_select(0, pos)
    if flow:
        return self._bcast((1.0 - s).to(dt), original_samples) * original_samples + \
            self._bcast(s.to(dt), original_samples) * noise
    if vp:
        a = 1.0 / torch.sqrt(s * s + 1.0)
        return self._bcast(a.to(dt), original_samples) * original_samples + \
            self._bcast((s * a).to(dt), original_samples) * noise
    return original_samples + noise * self._bcast(s.to(dt), original_samples)


def _vp_sigma_add_noise(self, original_samples, noise, timesteps):
    """diffusers' add_noise of the VP σ-grid solvers (DPM-Solver, UniPC, DEIS, singlestep): α_t·x0 + σ_t·ε."""
    return _sigma_noise(self, original_samples, noise, timesteps, vp=True)


def _ve_sigma_add_noise(self, original_samples, noise, timesteps):
    """diffusers' add_noise of the σ-scaled solvers (Euler, Heun, LMS, KDPM2, EDM): x0 + σ·ε."""
    return _sigma_noise(self, original_samples, noise, timesteps, vp=False)


def _mu(mu) -> dict:
    """set_timesteps(mu=) of the multistep solvers as a plan option (flow σ's with dynamic shifting)."""
    return {} if mu is None else {"mu": float(mu)}


class DPMSolverMultistepScheduler(_PlanScheduler):
    """diffusers' DPMSolverMultistepScheduler (DPM-Solver(++) 1–3, ODE and SDE) on fastdiff's fused multistep op."""

    _sampler = "dpmsolver++"

    _custom_ok = ("timesteps",)

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None):
        if mu is not None and not (self.config.use_dynamic_shifting and self.config.use_flow_sigmas):
            raise NotImplementedError("DPMSolverMultistepScheduler.set_timesteps: mu= without use_dynamic_shifting "
                                      "and use_flow_sigmas (a flow_shift = e^mu that no σ uses) is not planned by "
                                      "fastdiff")
        self._set(num_inference_steps, device, timesteps=timesteps, overrides=_mu(mu))
        if getattr(self._plans[0], "nan_calls", None):  # said here, so that step pays nothing for it
            self._warn_nan("its last step goes from σ_min to σ_min (final_sigmas_type='sigma_min' after a Karras / "
                           "exponential / beta / λ grid, h = 0), where diffusers' solver_type='heun' and order-3 "
                           "updates divide 0 by 0 (NaN); fastdiff takes the step's limit, prev_sample = sample")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        prev, _ = self._fused_step(model_output, timestep, sample, generator, variance_noise)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    add_noise = _vp_sigma_add_noise


class UniPCMultistepScheduler(_PlanScheduler):
    """diffusers' UniPCMultistepScheduler (bh1/bh2 predictor + corrector) on fastdiff's fused multistep op."""

    _sampler = "unipc"
    _result_dtype = "sample"

    _custom_ok = ("timesteps",)

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas: list[float] | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None):
        """diffusers' set_timesteps; `timesteps=` is fastdiff's extension (diffusers' UniPC has none): integer
        model-call times such as a rounded fastdiff.calibrate grid, as DPMSolverMultistepScheduler takes them."""
        over = _mu(mu)
        if mu is not None and not (self.config.use_dynamic_shifting and self.config.use_flow_sigmas):
            raise NotImplementedError("UniPCMultistepScheduler.set_timesteps: mu= without use_dynamic_shifting and "
                                      "use_flow_sigmas is not planned by fastdiff")
        if sigmas is not None and timesteps is None and self.config.use_flow_sigmas:  # flow σ's before the shift
            over["sigmas"] = tuple(float(v) for v in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas))
            num_inference_steps, sigmas = len(over["sigmas"]), None  # diffusers: N = len(sigmas)
        if timesteps is not None:  # the extension's checks, raised as they are (GridError)
            ts = [float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            T = self.config.num_train_timesteps
            if num_inference_steps is not None or sigmas is not None:
                raise GridError("Can only pass one of `num_inference_steps`, `timesteps` or `sigmas`.")
            if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] > T - 1 or ts[-1] < 0 or \
                    any(t != int(t) for t in ts):
                raise GridError(f"`timesteps` must be strictly decreasing integers in [0, {T}), got {ts}")
        self._set(num_inference_steps, device, sigmas=sigmas, timesteps=timesteps, overrides=over)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        prev, _ = self._fused_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    add_noise = _vp_sigma_add_noise


class EulerDiscreteScheduler(_PlanScheduler):
    """diffusers' EulerDiscreteScheduler (Karras et al. 2022, Alg. 1 without churn) on fastdiff's fused op."""

    _sampler = "euler"
    _restarts = False
    _euler_family = True
    _result_dtype = "model"
    is_scale_input_called = False

    _custom_ok = ("timesteps", "sigmas")

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps: list[int] | None = None,
                      sigmas: list[float] | None = None):
        self._set(num_inference_steps, device, timesteps=timesteps, sigmas=sigmas)
        self.is_scale_input_called = False

    scale_model_input = _scaled_input

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        self._no_index_timestep(timestep)
        if s_churn != 0.0:
            raise NotImplementedError("EulerDiscreteScheduler.step: s_churn > 0 (stochastic churn) is not supported "
                                      "by fastdiff")
        prev, x0 = self._fused_step(model_output, timestep, sample, generator, want_x0=return_dict)
        return self._x0_output(prev, x0, return_dict)

    add_noise = _ve_sigma_add_noise


class EulerAncestralDiscreteScheduler(_PlanScheduler):
    """diffusers' EulerAncestralDiscreteScheduler (σ_up noise each step) on fastdiff's fused multistep op."""

    _sampler = "euler_ancestral"
    _restarts = False
    _euler_family = True
    _result_dtype = "model"
    is_scale_input_called = False

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int, device=None):
        self._set(num_inference_steps, device)
        self.is_scale_input_called = False

    scale_model_input = _scaled_input

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        self._no_index_timestep(timestep)
        prev, x0 = self._fused_step(model_output, timestep, sample, generator, want_x0=return_dict)
        return self._x0_output(prev, x0, return_dict)

    add_noise = _ve_sigma_add_noise


def _same_train_T(self, num_train_timesteps):
    """set_timesteps(num_train_timesteps=) of the Heun/KDPM2 classes: only the config's."""
    if num_train_timesteps is not None and num_train_timesteps != self.config.num_train_timesteps:
        raise NotImplementedError(f"{type(self).__name__}.set_timesteps: num_train_timesteps other than the config's "
                                  "is not supported by fastdiff")


# the two-call steps (Heun, KDPM2): diffusers' state_in_first_order, from the step index
_first_order_state = property(lambda self: self._step_index is None or (self._step_index - self._start) % 2 == 0)


class HeunDiscreteScheduler(_PlanScheduler):
    """diffusers' HeunDiscreteScheduler (Karras et al. 2022, Alg. 2; 2N − 1 model calls) on fastdiff's fused op."""

    _sampler = "heun"
    _restarts = False
    _euler_family = True

    _custom_ok = ("timesteps",)

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_train_timesteps: int | None = None,
                      timesteps: list[int] | None = None):
        _same_train_T(self, num_train_timesteps)
        self._set(num_inference_steps, device, timesteps=timesteps)

    scale_model_input = _scaled_input
    state_in_first_order = _first_order_state

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        prev, x0 = self._fused_step(model_output, timestep, sample, want_x0=return_dict)
        if not return_dict:
            return (prev,)
        return _hf.schedulers.scheduling_heun_discrete.HeunDiscreteSchedulerOutput(prev_sample=prev,
                                                                                 pred_original_sample=x0)

    add_noise = _ve_sigma_add_noise


class PNDMScheduler(_PlanScheduler):
    """diffusers' PNDMScheduler (PLMS, with PRK warm-up or skip_prk_steps) on fastdiff's fused multistep op."""

    _sampler = "pndm"

    def _setup(self, args):
        self._explicit_reset()
        self.prk_timesteps = self.plms_timesteps = None
        super()._setup(args)

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int, device=None):
        self._set(num_inference_steps, device)
        ts = np.asarray(self._host_ts, dtype=np.int64)
        k = 0 if self.config.skip_prk_steps else len(ts) - (self.num_inference_steps - 3)  # the PRK warm-up calls
        self.prk_timesteps = ts[:k] if k else np.array([])
        self.plms_timesteps = ts[k:]
        self._explicit_reset()

    # ---- diffusers' explicit PRK / PLMS calls (the fused `step` runs the same updates from its plan) ----
    def _explicit_reset(self):
        """The public state of step_prk / step_plms: past ε's, call counter, the PRK partial sum and its sample."""
        self.ets, self.counter, self.cur_model_output, self.cur_sample = [], 0, 0, None

    def _transfer(self, sample, eps, t, t_prev):
        """The PNDM transfer φ (Liu et al. 2022, eq. 11) from t to t_prev with the combined model output `eps`
        (ε, or v turned into ε with the sample), coefficients in float64."""
        abar = self._schedule.alphas_cumprod
        at = float(abar[int(t)])
        ap = float(abar[int(t_prev)]) if t_prev >= 0 else (1.0 if self.config.set_alpha_to_one else float(abar[0]))
        pt = self.config.prediction_type
        if pt not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type given as {pt} must be one of `epsilon` or `v_prediction`")
        eps = _prediction.to_eps(sample, eps, at**0.5, (1 - at) ** 0.5, pt)
        c_eps = (ap - at) / (at * (1 - ap) ** 0.5 + (at * (1 - at) * ap) ** 0.5)
        return (ap / at) ** 0.5 * sample - c_eps * eps

    def _explicit_ready(self):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One pseudo-Runge-Kutta call (4 per warm-up step: ε weights 1/6, 1/3, 1/3, 1/6; half steps between), as
        diffusers' step_prk, with its public state (ets, counter, cur_model_output, cur_sample)."""
        self._explicit_ready()
        T, n, c = self.config.num_train_timesteps, self.num_inference_steps, self.counter
        t_prev = int(timestep) - (0 if c % 2 else T // n // 2)
        t_from = int(self.prk_timesteps[c // 4 * 4])
        stage = c % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + model_output / 6
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + model_output / 3
        else:
            model_output = self.cur_model_output + model_output / 6
            self.cur_model_output = 0
        base = self.cur_sample if self.cur_sample is not None else sample
        prev = self._transfer(base, model_output, t_from, t_prev)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # Adams–Bashforth weights of the linear multistep method over the last k ε's, newest first
    _AB = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One pseudo-linear-multistep call, as diffusers' step_plms: with skip_prk_steps the first two calls are a
        2-stage warm-up at the same timestep (ε, then the mean of both ε's), then Adams–Bashforth of order up to 4
        over the stored ε's."""
        self._explicit_ready()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(f"{type(self)} can only be run AFTER scheduler has been run in 'prk' mode for at least "
                             "12 iterations (step_prk over prk_timesteps first)")
        step = self.config.num_train_timesteps // self.num_inference_steps
        t = int(timestep)
        t_prev = t - step
        if self.counter == 1:  # the warm-up's second call repeats the first's step from t + step
            t_prev, t = t, t + step
        else:
            self.ets = self.ets[-3:] + [model_output]
        k = len(self.ets)
        if k == 1 and self.counter == 0:
            self.cur_sample = sample
        elif k == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:
            w, d = self._AB[min(k, 4)]
            model_output = sum(wi * e for wi, e in zip(w, reversed(self.ets[-len(w):]))) / d
        prev = self._transfer(sample, model_output, t, t_prev)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # diffusers' PNDMScheduler has no begin index (pipelines check hasattr): the start is the first timestep passed
    set_begin_index = property(doc="not offered, as in diffusers' PNDMScheduler")  # hasattr(...) is False

    def _init_step_index(self, timestep):
        self._begin_index = None
        super()._init_step_index(timestep)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        prev, _ = self._fused_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    add_noise = _Base._vp_add_noise


def _replan(self, key, value):
    """A step argument that changes the plan (LMS's `order`, TCD's `eta`): this run's plans rebuilt for it before its
    first step (diffusers takes it per step; a run that changes it midway is not offered)."""
    self._require_plan()
    if self._running:
        raise NotImplementedError(f"{type(self).__name__}.step: changing `{key}` in the middle of a run is not "
                                  f"supported by fastdiff; pass the same value at every step")
    self._opts = dict(self._opts, **{key: value})
    self._plans = {0: self._build_uncached(self.num_inference_steps, self._opts)}
    if self._start:
        self._plans[self._start] = self._tail_plan(self._start)
    self._dev_cache = {}


class LCMScheduler(_PlanScheduler):
    """diffusers' LCMScheduler (multistep consistency sampling; samplers.lcm) on fastdiff's fused op: one row per step,
    `denoised` (what LCM pipelines decode) written by the same pass. Custom timesteps=, clip_sample and thresholding run
    on diffusers' own class (their `denoised` is not the fused pass's d)."""

    _sampler = "lcm"
    _restarts = False

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      original_inference_steps: int | None = None, timesteps: list[int] | None = None,
                      strength: float = 1.0):
        if timesteps is not None or self._unfused():
            raise NotImplementedError(f"{type(self).__name__}: custom timesteps= (and LCM's clip_sample, thresholding) "
                                      "are not run by fastdiff's fused step")
        ois = original_inference_steps or self.config.original_inference_steps
        self._set(num_inference_steps, device, overrides={"original_inference_steps": ois, "strength": strength,
                                                           **self._grid_extra(original_inference_steps)})

    def _unfused(self):
        return self.config.clip_sample or self.config.thresholding  # `denoised` would not be the fused pass's d

    def _grid_extra(self, original_inference_steps):
        return {}

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        prev, denoised = self._fused_step(model_output, timestep, sample, generator, want_x0=True)
        if not return_dict:
            return prev, denoised
        return _hf.schedulers.scheduling_lcm.LCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    add_noise = _Base._vp_add_noise


class TCDScheduler(LCMScheduler):
    """diffusers' TCDScheduler (trajectory consistency sampling with γ = step's `eta`; samplers.tcd) on fastdiff's
    fused op: one row per step, `pred_noised_sample` written by the same pass. The plans are built for the eta of the
    run's first step (diffusers takes it per step; changing it midway is not offered). Custom timesteps= run on
    diffusers' own class. (LCM's set_timesteps and add_noise; TCD's own grid branch and step.)"""

    _sampler = "tcd"

    def _unfused(self):
        return False  # TCD's step has no clipping or thresholding

    def _grid_extra(self, original_inference_steps):
        return {"all_timesteps": original_inference_steps is not None}  # diffusers' branch: all T timesteps

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3, generator=None,
             return_dict: bool = True):
        if eta != self._opts.get("gamma"):
            _replan(self, "gamma", eta)
        prev, noised = self._fused_step(model_output, timestep, sample, generator, want_x0=True)
        if not return_dict:
            return prev, noised
        return _hf.schedulers.scheduling_tcd.TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=noised)


class EDMEulerScheduler(_PlanScheduler):
    """diffusers' EDMEulerScheduler (Euler with EDM preconditioning on Karras/exponential σ's from the config;
    samplers.edm) on fastdiff's fused op, usable before set_timesteps as diffusers'; s_churn > 0 and a caller-given
    pred_original_sample are not offered."""

    _sampler = "edm_euler"
    _restarts = False
    _euler_family = True
    _result_dtype = "model"
    is_scale_input_called = False

    @property
    def init_noise_sigma(self):
        return (self.config.sigma_max**2 + 1) ** 0.5

    def _init_grid(self):
        """Usable before set_timesteps, as diffusers': the T + 1 σ's its __init__ builds."""
        self._set(self.config.num_train_timesteps, None, overrides={"init_ramp": True})
        self.num_inference_steps = None
        self._init_grid_active = True

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int = None, device=None, sigmas=None):
        if sigmas is not None:
            raise NotImplementedError("EDMEulerScheduler.set_timesteps: sigmas= is not run by fastdiff's fused step")
        self._set(num_inference_steps, device)
        self.is_scale_input_called = False

    scale_model_input = _scaled_input

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, pred_original_sample: torch.Tensor | None = None):
        self._no_index_timestep(timestep)
        if s_churn != 0.0 or pred_original_sample is not None:
            raise NotImplementedError("EDMEulerScheduler.step: s_churn > 0 and pred_original_sample= are not "
                                      "supported by fastdiff")
        prev, x0 = self._fused_step(model_output, timestep, sample, generator, want_x0=return_dict)
        return self._x0_output(prev, x0, return_dict)

    add_noise = _ve_sigma_add_noise


class EDMDPMSolverMultistepScheduler(_PlanScheduler):
    """diffusers' EDMDPMSolverMultistepScheduler (DPM-Solver++ orders 1–3, ODE and SDE, on EDM's Karras/exponential
    σ's with EDM preconditioning; samplers.edm.dpmsolver_plan) on fastdiff's fused op. As diffusers', step needs
    set_timesteps first; a mid-schedule start (begin_index, img2img) restarts the history as diffusers' does."""

    _sampler = "edm_dpmsolver++"
    is_scale_input_called = False

    @property
    def init_noise_sigma(self):
        return (self.config.sigma_max**2 + 1) ** 0.5

    def _setup(self, args):
        super()._setup(args)
        if self._hf_impl is None:
            try:
                self._init_grid()
            except _REFUSALS as e:
                self._to_diffusers(e)

    def _init_grid(self):
        """diffusers' __init__ builds the T σ's of set_timesteps(T) (final σ 0) and their c_noise timesteps:
        scale_model_input and the timesteps work before set_timesteps; step does not (num_inference_steps is None)."""
        self._set(self.config.num_train_timesteps, None, overrides={"final_sigmas_type": "zero"})
        self.num_inference_steps = None
        self._init_grid_active = True

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int = None, device=None):
        self._set(num_inference_steps, device)

    scale_model_input = _scaled_input

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        prev, _ = self._fused_step(model_output, timestep, sample, generator)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    add_noise = _ve_sigma_add_noise


class IPNDMScheduler(_PlanScheduler):
    """diffusers' IPNDMScheduler (iPNDM on its angle schedule β = sin²(s·π/2), α = √(1 − β²); samplers.ipndm_v, not
    fastdiff's VP "ipndm") on fastdiff's fused op. Usable before set_timesteps as diffusers' (its __init__ runs
    set_timesteps(T)); trained_betas (diffusers' per-step β's) run on diffusers' own class."""

    _sampler = "ipndm_v"

    def _setup(self, args):
        super()._setup(args)
        self._new_history()
        if self._hf_impl is None:
            try:  # diffusers' __init__ runs set_timesteps(num_train_timesteps)
                self._set(args["num_train_timesteps"], None)
                self._new_history()
            except _REFUSALS as e:
                self._to_diffusers(e)

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int, device=None):
        self._set(num_inference_steps, device)
        self._new_history()

    # diffusers empties its history (ets) in set_timesteps only: a pass started again without it (`_step_index =
    # None`, a begin index) goes on from the e's of the steps before, up to the 3 newest (AB_4), as diffusers' does
    def _new_history(self):
        self._ets_n, self._carry, self._kept = 0, 0, []  # e's since set_timesteps; carried into this pass; their slots
        self._base = (self._plans, getattr(self, "_dev_cache", {}))  # the plans of passes with no earlier e's

    def _tail_plan(self, k: int):
        plan = _ipndm_v.plan(self._schedule, self.num_inference_steps, self._opts, start=k, carry=self._carry)
        plan.sampler = self._sampler
        return plan

    def _init_step_index(self, timestep):
        c = min(3, self._ets_n)
        if c != self._carry:  # the plans of passes carrying c e's (kept with the device tables of this grid)
            plans, dev = self._base
            self._carry = c
            if c:
                sets = dev.setdefault("carried", {})
                if c not in sets:
                    sets[c] = ({0: self._tail_plan(0)}, {})
                plans, dev = sets[c]
            self._plans, self._dev_cache = plans, dev
        if c:  # the c newest e's into slots 0..c-1 (newest first), where the carrying plans read them
            first = self._kept[:c]
            self._slots = [self._slots[j] for j in first] + [h for j, h in enumerate(self._slots) if j not in first]
            self._kept = list(range(c))
        super()._init_step_index(timestep)
        extra = self._plans[self._start].num_slots - len(self._slots)
        if self._slots and extra > 0:
            self._slots += [torch.empty_like(self._slots[0]) for _ in range(extra)]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        prev, _ = self._fused_step(model_output, timestep, sample)
        self._kept = self._plans[self._start].kept[self._step_index - 1 - self._start]
        self._ets_n += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class DEISMultistepScheduler(_PlanScheduler):
    """diffusers' DEISMultistepScheduler (DEIS ρAB, orders 1–3; samplers.deis) on fastdiff's fused op. A run started
    mid-schedule (img2img) restarts the warm-up orders there, as diffusers' does."""

    _sampler = "deis"

    def _setup(self, args):
        super()._setup(args)
        # diffusers' __init__ maps the other names of its family to DEIS's own
        if args.get("algorithm_type") in ("dpmsolver", "dpmsolver++"):
            self.register_to_config(algorithm_type="deis")
        if args.get("solver_type") in ("midpoint", "heun", "bh1", "bh2"):
            self.register_to_config(solver_type="logrho")

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None):
        if mu is not None:
            raise NotImplementedError("DEISMultistepScheduler.set_timesteps: mu= (dynamic shifting) is not supported "
                                      "by fastdiff")
        self._set(num_inference_steps, device)

    def _tail_plan(self, k: int):
        full = self._plans[0]
        plan = _deis.plan(self._schedule, self.num_inference_steps, self._opts, start=k,
                          grid_=_grids.Grid(full.timesteps, full.sigmas[:-1], final=full.sigmas[-1]))
        plan.sampler = self._sampler
        return plan

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        prev, _ = self._fused_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    add_noise = _vp_sigma_add_noise


class DPMSolverSinglestepScheduler(_PlanScheduler):
    """diffusers' DPMSolverSinglestepScheduler (DPM-Solver singlestep 1–3, ODE and SDE; samplers.dpm_singlestep)
    on fastdiff's fused op. set_timesteps switches `lower_order_final` on in the config where diffusers' does (steps
    not a multiple of the order, or a final σ of 0) and sets `order_list`; a run started mid-schedule (img2img) takes
    diffusers' orders, lowered to the outputs the run has."""

    _sampler = "dpmsolver_singlestep"

    _custom_ok = ("timesteps",)

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None):
        if mu is not None:
            raise NotImplementedError("DPMSolverSinglestepScheduler.set_timesteps: mu= (dynamic shifting) is not "
                                      "supported by fastdiff")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of  `num_inference_steps` or `timesteps`.")
        n = num_inference_steps or len(timesteps)
        o = {k: self.config[k] for k in ("lower_order_final", "solver_order", "final_sigmas_type")}
        if isinstance(n, int) and not o["lower_order_final"] and _singlestep.lower_order_final(o, n):
            self.register_to_config(lower_order_final=True)  # as diffusers' set_timesteps does (it logs why)
        self._set(num_inference_steps, device, timesteps=timesteps)
        self.order_list = _singlestep.order_list(self._opts, self.num_inference_steps)

    def _custom_plan(self, sched, opts, n, custom):
        """timesteps= as diffusers takes them: int64 (truncated), σ's interpolated over the training table."""
        ts = np.asarray(custom[1], dtype=np.float64).astype(np.int64)
        sig = _grids.sigma_at(sched, ts)
        plan = _singlestep.plan(sched, n, opts, grid_=_grids.Grid(ts, sig))
        plan.sampler = self._sampler
        return plan

    def _tail_plan(self, k: int):
        full = self._plans[0]
        plan = _singlestep.plan(self._schedule, self.num_inference_steps, self._opts, start=k,
                                grid_=_grids.Grid(full.timesteps, full.sigmas[:-1]))
        plan.sampler = self._sampler
        return plan

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        prev, _ = self._fused_step(model_output, timestep, sample, generator)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    add_noise = _vp_sigma_add_noise


def _warn_plan_nan(self, what):
    """After a step: said once where diffusers' own class computes NaN (or numbers off its own math) on that call and
    fastdiff's plan does not (the plan's `nan_calls`)."""
    if self._step_index - 1 - self._start in getattr(self._plans[self._start], "nan_calls", ()):
        self._warn_nan(what)


_KDPM2_NAN = ("diffusers' float32 σ_down = √(σ_next² − σ_up²) cancels on this step (σ_next ≪ σ, e.g. σ_max ≈ 2e4 on "
              "squaredcos_cap_v2): its midpoint is NaN or far off; fastdiff's float64 σ's and the timestep of their "
              "midpoint are used")


class KDPM2DiscreteScheduler(_PlanScheduler):
    """diffusers' KDPM2DiscreteScheduler (DPM-Solver-2 on the σ grid, midpoint in log σ; 2N − 1 model calls;
    fastdiff.samplers.kdpm2) on fastdiff's fused op. Usable before set_timesteps (diffusers runs set_timesteps(T) in
    __init__)."""

    _sampler = "kdpm2"
    _restarts = False
    _euler_family = True

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None):
        _same_train_T(self, num_train_timesteps)
        self._set(num_inference_steps, device)

    scale_model_input = _scaled_input
    state_in_first_order = _first_order_state

    def _kdpm2_step(self, model_output, timestep, sample, generator, return_dict, out):
        prev, x0 = self._fused_step(model_output, timestep, sample, generator, want_x0=return_dict)
        _warn_plan_nan(self, _KDPM2_NAN)
        return out(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, None)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        out = _hf.schedulers.scheduling_k_dpm_2_discrete.KDPM2DiscreteSchedulerOutput
        return self._kdpm2_step(model_output, timestep, sample, None, return_dict, out)

    add_noise = _ve_sigma_add_noise


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler (DPM-Solver-2 aimed at σ_down, then σ_up·z at every second call)
    on fastdiff's fused op."""

    _sampler = "kdpm2_ancestral"

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        out = _hf.schedulers.scheduling_k_dpm_2_ancestral_discrete.KDPM2AncestralDiscreteSchedulerOutput
        return self._kdpm2_step(model_output, timestep, sample, generator, return_dict, out)


class LMSDiscreteScheduler(_PlanScheduler):
    """diffusers' LMSDiscreteScheduler (linear multistep on the σ grid, Lagrange-integral weights; samplers.lms)
    on fastdiff's fused op: the weights of every step computed once per set_timesteps in float64 (diffusers integrates
    them with scipy in every step). Usable before set_timesteps (diffusers runs set_timesteps(T) in __init__); a run
    started mid-schedule (img2img) takes diffusers' orders min(order, step index + 1) with the slopes of this run."""

    _sampler = "lms"
    _euler_family = True
    is_scale_input_called = False

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int, device=None):
        self._set(num_inference_steps, device)
        self.is_scale_input_called = False

    scale_model_input = _scaled_input

    def _tail_plan(self, k: int):
        plan = _lms.plan(self._schedule, self.num_inference_steps, self._opts, start=k)
        plan.sampler = self._sampler
        return plan

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True):
        if not self.is_scale_input_called:
            warnings.warn("The `scale_model_input` function should be called before `step` to ensure correct "
                          "denoising. See `StableDiffusionPipeline` for a usage example.")
        if order != self._opts.get("order", 4):
            _replan(self, "order", order)
        prev, x0 = self._fused_step(model_output, timestep, sample, want_x0=return_dict)
        _warn_plan_nan(self, "this step's σ's repeat (a grid that repeats a timestep): diffusers' Lagrange "
                             "weights divide by 0 (NaN); fastdiff leaves the repeated σ out (the weights of the "
                             "distinct σ's)")
        return self._x0_output(prev, x0, return_dict)

    add_noise = _ve_sigma_add_noise


# ---------------------------------------------------------------------------------------------------------------
# DDIM and DDPM: fused-op rows indexed by the timestep (fastdiff.samplers.ddim / ddpm)


class _StepScheduler(_Base):
    _kind = ""

    def _resolve(self, cfg):
        """(NoiseSchedule, options) of a config, every setting that changes the math validated by the sampler's
        own checks (fastdiff.samplers.ddim.validate; errors name the setting)."""
        from fastdiff.run.sampling import schedule_and_config

        sched, cfg = schedule_and_config(cfg)
        o = S.solver_options(self._kind, cfg, {})
        S.ddim.validate(o)
        return sched, o

    def _check_config(self, cfg):
        self._resolve(_checkable(cfg)[0])

    def _options(self):
        memo = self._memo("options")
        if "opts" not in memo:
            checked, real = _checkable(self.config)
            sched, o = self._resolve(checked)
            o.update(real)
            memo.update(schedule=sched, opts=SimpleNamespace(**o), abar=sched.alphas_cumprod.tolist())
        self._schedule, self._abar_host = memo["schedule"], memo["abar"]
        return memo["opts"]

    def _require(self):
        if self._kind == "ddim" and self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before step (num_inference_steps is None)")
        if self._internal_dict is not self._planned_cfg:  # a pipeline rewrote the config: re-read it
            self._opts = self._options()
            self._planned_cfg = self._internal_dict
            self._dev_cache = self._memo((self.num_inference_steps, tuple(self._host_ts),
                                          *(("custom",) if getattr(self, "_prev_custom", None) else ())))

    def _diffusers_step(self, t, model_output, timestep, sample, **kw):
        """One step by diffusers' own class (built from the live config, on this grid): ε-prediction at ᾱ_t = 0
        (zero terminal SNR) divides by √ᾱ_t = 0, which diffusers' arithmetic turns into ±∞ (then ±range under
        clip_sample) or NaN; the fused step's coefficient form cannot. DDIM and DDPM steps keep no state, so this
        one step is diffusers' exactly (same generator draws)."""
        self._warn_nan(f"prediction_type='epsilon' at timestep {t}, where ᾱ_t = 0 (zero terminal SNR), divides by "
                       "√ᾱ_t = 0 (x̂0 = ±∞, clipped when clip_sample, else NaN): this step runs on diffusers' own "
                       f"{self._hf_class.__name__}")
        key = ("hf_step", tuple(self._host_ts), self.num_inference_steps)
        impl = self._dev_cache.get(key)
        if impl is None:
            params = inspect.signature(self._hf_class.__init__).parameters
            impl = self._hf_class(**{k: v for k, v in dict(self.config).items() if k in params and k != "self"})
            if getattr(self, "custom_timesteps", False):
                impl.set_timesteps(timesteps=list(self._host_ts))
            elif self.num_inference_steps:
                impl.set_timesteps(self.num_inference_steps)
            self._dev_cache[key] = impl
        return impl.step(model_output, timestep, sample, **kw)

    def _finish_set(self, ts, device):
        self._host_ts = [int(t) for t in ts]
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.int64).copy()).to(device)
        self._planned_cfg = self._internal_dict
        self._dev_cache = self._memo((self.num_inference_steps, tuple(self._host_ts)))
        self._pos_of = {}
        for j, t in enumerate(self._host_ts):
            self._pos_of.setdefault(t, j)

    def _table(self, key_extra, device, fill):
        """(rows, fastdiff.ops.multistep.NUM_COEF) float64 coefficient rows on `device`, built once."""
        return self._cached(("tab", key_extra, str(device)),
                            lambda: torch.tensor(fill(), dtype=torch.float64).to(device))

    def _run(self, x, o, coef, noise, v, opts, want_x0):
        """One fused step with `coef` (a fastdiff.ops.multistep row of this class's table); x̂0 in float32 when
        want_x0."""
        thr = None
        if opts.thresholding:
            thr = M.threshold_scale(x, o, coef, ratio=opts.dynamic_thresholding_ratio, max_value=opts.sample_max_value)
        var_mode = opts.variance_type if (self._kind == "ddpm" and opts.variance_type.startswith("learned")
                                          and v is not None) else "scalar"  # v only where noise is added
        v = v if var_mode != "scalar" else None
        clip = opts.clip_sample and not opts.thresholding
        if M._dense_format(x) is None:
            x = x.contiguous()
        out = torch.empty_like(x)  # x's (dense) layout, as the fused op's out= requires
        x0 = torch.empty_like(x, dtype=torch.float32) if want_x0 else None
        if x.dtype == torch.float64:
            y, _, d = M.multistep_ref(x, o, coef, noise=noise, v=v, var_mode=var_mode, thr=thr, clip=clip)
            return out.copy_(y), (x0.copy_(d) if want_x0 else None)
        if self._step_checked and _fast_layout(x, o, noise, v):
            # the raw op multistep_step calls, without its per-call checks (done on the first step)
            op = self._cached(("raw", str(x.device)), lambda: M.resolve_op("auto", x.device))
            op(x, o, None, [], noise, None, v, thr, coef, M.flags(clip, var_mode),
               out, None, x0)
            return out, x0
        M.multistep_step(x, o, coef, noise=noise, v=v, var_mode=var_mode, thr=thr, clip=clip, out=out, d_out=x0)
        self._step_checked = True
        return out, x0

    _step_checked = False


class DDIMScheduler(_StepScheduler):
    """diffusers' DDIMScheduler (Song et al. 2021, eq. 12) on fastdiff's fused op (fastdiff.samplers.ddim rows)."""

    _kind = "ddim"
    init_noise_sigma = 1.0

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps: list[int] | None = None):
        """diffusers' set_timesteps; `timesteps=` is fastdiff's extension (diffusers' DDIM has none): integer
        step times, descending (a rounded fastdiff.calibrate grid), each step going to the next one (the last to
        ᾱ = 1 with set_alpha_to_one, else ᾱ_0)."""
        self._opts = self._options()
        T = self.config.num_train_timesteps
        self._prev_custom = None
        if timesteps is not None:
            if num_inference_steps is not None:
                raise GridError("Can only pass one of `num_inference_steps` or `timesteps`.")
            ts = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= T or ts[-1] < 0:
                raise GridError(f"`timesteps` must be strictly decreasing integers in [0, {T}), got {ts}")
            self.num_inference_steps = len(ts)
            self._prev_custom = dict(zip(ts, ts[1:] + [-1]))
            self._finish_set(np.asarray(ts, dtype=np.int64), device)
            self._dev_cache = self._memo((self.num_inference_steps, tuple(self._host_ts), "custom"))
        else:
            if num_inference_steps is not None and num_inference_steps > T:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                                 f"`self.config.train_timesteps`: {T}")
            n = _check_steps(num_inference_steps, T)
            self.num_inference_steps = n
            o = self._opts
            self._finish_set(_grids.spaced_timesteps(T, n, o.timestep_spacing, o.steps_offset, dtype=np.int64), device)
        if device is not None:
            self._coefs(0.0, False, torch.device(device))

    _prev_custom = None

    def _coefs(self, eta, ucmo, device):
        opts, T, n = self._opts, self.config.num_train_timesteps, self.num_inference_steps
        prev_of = self._prev_custom

        def fill():  # row t: the DDIM step from training timestep t (fastdiff.samplers.ddim)
            abar = self._abar_host
            final = 1.0 if opts.set_alpha_to_one else abar[0]
            steps = []
            for t in range(T):
                p = t - T // n if prev_of is None else prev_of.get(t, t - 1)
                steps.append((abar[t], abar[p] if p >= 0 else final, eta))
            return S.ddim.rows(steps, dict(vars(opts), use_clipped_model_output=ucmo))
        return self._table((float(eta), bool(ucmo)), device, fill)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        self._require()
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or math.isnan(eta) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        if eta > 1:
            self._warn_nan(f"eta={eta} > 1 makes 1 − ᾱ_p − σ_t² negative: diffusers' DDIMScheduler takes its √ (NaN); "
                           "fastdiff clamps it at 0")
        x = sample
        o = _model_output(model_output, x, None)
        table = self._coefs(float(eta), bool(use_clipped_model_output), x.device)
        _, t = self._position(timestep)
        if t is not None:
            t = int(t)
            if not 0 <= t < table.shape[0]:
                raise ValueError(f"timestep {t} is outside [0, num_train_timesteps={table.shape[0]})")
            coef = table[t]
            if math.isnan(self._host_nan(t)):
                return self._diffusers_step(t, model_output, timestep, sample, eta=eta,
                                            use_clipped_model_output=use_clipped_model_output, generator=generator,
                                            variance_noise=variance_noise, return_dict=return_dict)
        else:  # a timestep tensor from elsewhere: indexed on the device (no read)
            coef = table.index_select(0, timestep.to(table.device).long().reshape(1)).reshape(-1)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise = variance_noise if variance_noise is not None else _draw(o.shape, generator, o.device, o.dtype)
            noise = noise.to(x.dtype)
        prev, x0 = self._run(x, o, coef, noise, None, self._opts, return_dict)
        prev = _as_result(prev, sample, model_output, "promote")
        return self._x0_output(prev, x0, return_dict)

    def _get_variance(self, timestep, prev_timestep):
        """σ_t²/η² of DDIM (eq. 16): (1 − ᾱ_p)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_p), from the float64 ᾱ table (ᾱ_p of a
        negative prev_timestep: 1 with set_alpha_to_one, else ᾱ_0), as a float32 tensor like diffusers'."""
        abar = self._schedule.alphas_cumprod
        final = 1.0 if self.config.set_alpha_to_one else float(abar[0])
        t, p = torch.as_tensor(timestep).cpu().long(), torch.as_tensor(prev_timestep).cpu().long()
        at = abar[t]
        ap = torch.where(p >= 0, abar[p.clamp(min=0)], torch.full_like(at, final))
        return ((1 - ap) / (1 - at) * (1 - at / ap)).to(torch.float32)

    def _host_nan(self, t):
        a = self._abar_host[t]
        return math.nan if (a <= 0.0 and self._opts.prediction_type == "epsilon") else 0.0

    add_noise = _Base._vp_add_noise


class DDPMScheduler(_StepScheduler):
    """diffusers' DDPMScheduler (Ho et al. 2020, Alg. 2; strided grids, learned variances) on fastdiff's fused op
    (fastdiff.samplers.ddpm rows)."""

    _kind = "ddpm"
    init_noise_sigma = 1.0

    def _setup(self, args):
        super()._setup(args)
        self.custom_timesteps = False
        self.variance_type = args["variance_type"]
        self._host_ts = [int(t) for t in self.timesteps.tolist()]
        self._pos_of = {t: j for j, t in enumerate(self._host_ts)}
        self._opts = None

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps: list[int] | None = None):
        self._opts = self._options()
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(ts[i] >= ts[i - 1] for i in range(1, len(ts))):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if not ts or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"`timesteps` must be in [0, num_train_timesteps={T}), descending, got {ts}")
            self.custom_timesteps = True
            grid = np.array(ts, dtype=np.int64)
        else:
            if num_inference_steps is not None and num_inference_steps > T:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                                 f"`self.config.train_timesteps`: {T}")
            self.num_inference_steps = _check_steps(num_inference_steps, T)
            self.custom_timesteps = False
            grid = _grids.spaced_timesteps(T, self.num_inference_steps, self._opts.timestep_spacing,
                                           self._opts.steps_offset, dtype=np.int64)
        self._finish_set(grid, device)
        if device is not None:
            self._coefs(torch.device(device))

    def _coefs(self, device):
        """Rows for the grid's timesteps, in grid order (the previous timestep of each is the next on the grid)."""
        opts = self._opts

        def fill():  # the DDPM steps of the grid (fastdiff.samplers.ddpm)
            abar, ts = self._abar_host, self._host_ts
            steps = [(abar[t], abar[ts[j + 1]] if j + 1 < len(ts) else 1.0, True) for j, t in enumerate(ts)]
            return S.ddpm.rows(steps, vars(opts))
        return self._table("ddpm", device, fill)

    def previous_timestep(self, timestep):
        """The next timestep of the grid (-1 after the last), typed as diffusers' returns it: a tensor once
        set_timesteps has run (an element of the grid), else t − 1 in the timestep's own type."""
        _, t = self._timestep_value(timestep)
        j = self._pos_of.get(int(t))
        if j is None:
            raise IndexError(f"timestep {t} is not one of the scheduler's timesteps")
        p = self._host_ts[j + 1] if j + 1 < len(self._host_ts) else -1
        if self.custom_timesteps or self.num_inference_steps:
            return torch.tensor(p, device=self.timesteps.device)
        return timestep - 1

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """The DDPM variance term in diffusers' form, from the float64 ᾱ table (a float32 tensor): β̃ (fixed_small,
        clamped at 1e-20), its square root (fixed_small_log), β′ = 1 − ᾱ_t/ᾱ_p (fixed_large), log β′
        (fixed_large_log), the model's v (learned), or the log-variance f·log β′ + (1 − f)·log β̃ with
        f = (v + 1)/2 (learned_range)."""
        variance_type = variance_type or self.config.variance_type
        abar = self._schedule.alphas_cumprod
        p = self.previous_timestep(int(t))
        at = float(abar[int(t)])
        ap = float(abar[p]) if p >= 0 else 1.0
        beta = 1.0 - at / ap
        small = max((1.0 - ap) / (1.0 - at) * beta, 1e-20)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            f = (predicted_variance + 1) / 2
            return f * math.log(beta) + (1 - f) * math.log(small)
        value = {"fixed_small": small, "fixed_small_log": math.sqrt(small), "fixed_large": beta,
                 "fixed_large_log": math.log(beta) if beta > 0 else -math.inf}.get(variance_type, small)
        return torch.tensor(value, dtype=torch.float32)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if self._opts is None:
            self._opts = self._options()
        self._require()
        x, opts = sample, self._opts
        v = None
        learned = opts.variance_type.startswith("learned")
        if learned:
            if model_output.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"variance_type={opts.variance_type!r}: the model must return 2·C = "
                                 f"{2 * x.shape[1]} channels (prediction and variance), got {model_output.shape[1]}")
            model_output, v = torch.split(model_output, x.shape[1], dim=1)
            v = v.to(x.dtype)
        o = _model_output(model_output, x, None)
        _, t = self._timestep_value(timestep)  # DDPM adds noise iff t > 0: diffusers reads t here too
        t = int(t)
        j = self._pos_of.get(t)
        if j is None:
            raise ValueError(f"DDPMScheduler.step: timestep {t} is not one of the scheduler's timesteps")
        if opts.prediction_type == "epsilon" and self._abar_host[t] <= 0.0:
            return self._diffusers_step(t, model_output, timestep, sample, generator=generator,
                                        return_dict=return_dict)
        coef = self._coefs(x.device)[j]
        noise = _draw(o.shape, generator, o.device, o.dtype).to(x.dtype) if t > 0 else None
        prev, x0 = self._run(x, o, coef, noise, v if noise is not None else None, opts, return_dict)
        prev = _as_result(prev, sample, model_output, "promote")
        return self._x0_output(prev, x0, return_dict)

    add_noise = _Base._vp_add_noise


# ---------------------------------------------------------------------------------------------------------------
# flow matching (fastdiff.samplers.flow): SD3, Flux, ... pipelines' schedulers

class _FlowScheduler(_PlanScheduler):
    """What FlowMatchEuler/Heun share: diffusers' state before set_timesteps (the shifted training σ's), shift,
    sigma_min/sigma_max, scale_noise (img2img), steps per row (no history to restart)."""

    _restarts = False
    _result_dtype = "model"

    def _setup(self, args):
        super()._setup(args)
        if self._hf_impl is not None:
            return
        T = int(args["num_train_timesteps"])
        sig = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T  # diffusers' __init__
        if not args.get("use_dynamic_shifting", False):
            sig = _flow.shift_sigmas(sig, float(args["shift"]))
        self.timesteps, self.sigmas = sig * T, sig
        self._shift = float(args["shift"])
        self.sigma_min, self.sigma_max = float(sig[-1]), float(sig[0])

    @property
    def shift(self):
        return self._hf_impl.shift if self._hf_impl is not None else self._shift

    def set_shift(self, shift: float):
        """diffusers' set_shift: the shift of the next set_timesteps."""
        if self._hf_impl is not None:
            return self._hf_impl.set_shift(shift)
        self._shift = float(shift)

    def _flow_set(self, num_inference_steps, device, sigmas=None, mu=None, timesteps=None):
        def values(v):
            return None if v is None else tuple(float(x) for x in (v.tolist() if hasattr(v, "tolist") else v))

        sigmas, timesteps = values(sigmas), values(timesteps)
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        given = sigmas if sigmas is not None else timesteps
        if num_inference_steps is None:
            if given is None:
                raise ValueError("num_inference_steps: pass the number of steps, sigmas= or timesteps=")
            num_inference_steps = len(given)
        elif given is not None and len(given) != num_inference_steps:
            raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps, if "
                             "`num_inference_steps` is provided")
        over = {"sigmas": sigmas, "timesteps": timesteps, "mu": None if mu is None else float(mu)}
        if self._shift != float(self.config.shift):  # set_shift: the constructor's σ range, the new shift
            over["shift"] = self._shift
            if sigmas is None and timesteps is None:
                T = self.config.num_train_timesteps
                over["sigmas"] = tuple(np.linspace(self.sigma_max * T, self.sigma_min * T, num_inference_steps) / T)
        self._set(num_inference_steps, device, overrides={k: v for k, v in over.items() if v is not None})

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(1 − σ)·x0 + σ·ε at the σ diffusers picks (begin_index / step_index when set, else each timestep's
        position, found on the device: no host read)."""
        return _sigma_noise(self, sample, noise, torch.as_tensor(timestep).reshape(-1), vp=False, flow=True)



class FlowMatchEulerDiscreteScheduler(_FlowScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler (SD3, Flux, ...: x + (σ_next − σ)·v, or stochastic_sampling's
    (1 − σ_next)·x̂0 + σ_next·ε) on fastdiff's fused op; every config option, set_timesteps(sigmas=, mu=,
    timesteps=), set_shift, scale_noise (fastdiff.samplers.flow)."""

    _sampler = "flow_euler"

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas: list[float] | None = None,
                      mu: float | None = None, timesteps: list[float] | None = None):
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        self._flow_set(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps: torch.Tensor | None = None, return_dict: bool = True):
        """diffusers' step (s_churn, s_tmin, s_tmax, s_noise are taken and unused, as there)."""
        self._no_index_timestep(timestep)
        if per_token_timesteps is not None:
            raise NotImplementedError("FlowMatchEulerDiscreteScheduler.step: per_token_timesteps is not supported "
                                      "by fastdiff's fused step")
        prev, _ = self._fused_step(model_output, timestep, sample, generator)
        out = _hf.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput
        return out(prev_sample=prev) if return_dict else (prev,)


class FlowMatchHeunDiscreteScheduler(_FlowScheduler):
    """diffusers' FlowMatchHeunDiscreteScheduler (Heun on the velocity ODE, 2N − 1 model calls) on fastdiff's fused
    op: the second call's update reads one stored tensor (x + dt·v/2), no host-side σ comparison per step."""

    _sampler = "flow_heun"

    @_set_timesteps
    def set_timesteps(self, num_inference_steps: int, device=None):
        self._flow_set(num_inference_steps, device)

    @property
    def state_in_first_order(self):
        return self._step_index is None or self._step_index % 2 == 0

    def _init_step_index(self, timestep):
        super()._init_step_index(timestep)
        if self._step_index % 2 == 1:  # the second call needs the first call's stored x + dt·v/2
            i, self._step_index = self._step_index, None
            raise NotImplementedError("FlowMatchHeunDiscreteScheduler: starting at a second-order call (odd step "
                                      f"index {i}) is not supported by fastdiff")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        self._no_index_timestep(timestep)
        if s_churn != 0.0:
            raise NotImplementedError("FlowMatchHeunDiscreteScheduler.step: s_churn > 0 (stochastic churn) is not "
                                      "supported by fastdiff")
        prev, _ = self._fused_step(model_output, timestep, sample, generator)
        out = _hf.schedulers.scheduling_flow_match_heun_discrete.FlowMatchHeunDiscreteSchedulerOutput
        return out(prev_sample=prev) if return_dict else (prev,)


SCHEDULERS = {c.__name__: c for c in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                                      DPMSolverSinglestepScheduler, KDPM2DiscreteScheduler,
                                      KDPM2AncestralDiscreteScheduler, DEISMultistepScheduler, LCMScheduler,
                                      TCDScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler,
                                      IPNDMScheduler,
                                      EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                                      UniPCMultistepScheduler, PNDMScheduler, LMSDiscreteScheduler)}
# the flow-matching schedulers (velocity models: SD3, Flux, ...), kept apart from the ε/x0/v ones above (whose
# pipelines and tests share one model interface); equivalent() and fastdiff.optimize take both
FLOW_SCHEDULERS = {c.__name__: c for c in (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)}


def equivalent(scheduler):
    """fastdiff's scheduler for a diffusers scheduler, or None, with a warning that says why diffusers' class is
    kept: fastdiff has no class of that name, or its fused step does not run this configuration (fastdiff's class
    would hand it to diffusers' own, so nothing would be gained). The new scheduler gets every live config value of
    the old one, those a pipeline rewrote after construction included (`from_config` would reset the ones listed in
    `_use_default_values`: a StableDiffusionPipeline's steps_offset = 1 on an old config), the keys its class does not
    take and `_use_default_values` itself. A fastdiff scheduler is returned as is."""
    every = {**SCHEDULERS, **FLOW_SCHEDULERS}
    if type(scheduler) in every.values():
        return scheduler
    name = type(scheduler).__name__
    if not type(scheduler).__module__.startswith("diffusers") or not hasattr(scheduler, "config"):
        return None
    cls = every.get(name)
    if cls is None:
        warnings.warn(f"fastdiff: keeping diffusers' {name}: fastdiff has no equivalent class (it has "
                      f"{', '.join(every)})", stacklevel=3)
        return None
    cfg = dict(scheduler.config)
    params = inspect.signature(cls.__init__).parameters
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = cls(**{k: v for k, v in cfg.items() if k in params and k != "self"})
    except _REFUSALS as e:  # diffusers' class took a config its own constructor refuses (set after construction)
        warnings.warn(f"fastdiff: keeping diffusers' {name}: {e}", stacklevel=3)
        return None
    if new._hf_impl is not None:
        warnings.warn(f"fastdiff: keeping diffusers' {name}: {new._hf_why}", stacklevel=3)
        return None
    rest = {k: v for k, v in cfg.items() if k not in params and k != "_class_name"}
    if rest:
        new.register_to_config(**rest)
    return new
