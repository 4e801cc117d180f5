"""Noise schedules and timestep grids.

Notation (docs/math.md, "Notation and schedules"): T training steps, β_t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, timesteps 0 … T−1.
Tables are float64 on the CPU; samplers derive per-step coefficients from them once, then cast.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fastdiff.schedule.grids import SPACINGS, timesteps  # noqa: F401  (fastdiff.schedule.timesteps)
from fastdiff.validate import BETA_SCHEDULES



def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift and scale √ᾱ so that ᾱ_{T−1} = 0 while ᾱ_0 is kept."""
    s = torch.cumprod(1.0 - betas, 0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    abar = s**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """A discrete noise schedule: β_t for t = 0 … T−1 and the tables derived from it, in float64.

    Build one with `NoiseSchedule.linear()`, `.scaled_linear()`, `.cosine()`, `NoiseSchedule(betas)` for custom β,
    or `NoiseSchedule.from_diffusers(scheduler)`. `rescale_zero_snr=True` applies the zero-terminal-SNR rescale
    (then ᾱ_{T−1} = 0 and only v- or x0-prediction can sample from t = T−1).
    """

    def __init__(self, betas, *, rescale_zero_snr: bool = False, name: str = "custom"):
        from fastdiff import validate

        if isinstance(betas, (str, bytes)):
            validate.check_betas("betas", betas)  # NoiseSchedule("linear"): a TypeError naming from_name
        b = torch.as_tensor(np.asarray(betas, dtype=np.float64) if not torch.is_tensor(betas) else betas)
        b = b.detach().to("cpu", torch.float64).flatten()
        if b.numel() < 1:
            raise ValueError("betas: need at least one timestep")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b > 1).any():
            raise ValueError("betas: every β_t must be finite and in (0, 1]")
        raw32 = b.to(torch.float32)  # diffusers: torch.tensor(trained_betas, dtype=torch.float32)
        if rescale_zero_snr:
            validate.check_rescale_zero_snr(b)  # one step, or constant ᾱ: nothing to rescale (else 0/0 = NaN)
            b = _rescale_zero_terminal_snr(b)
        elif (b >= 1).any():
            raise ValueError("betas: β_t = 1 zeroes ᾱ; use rescale_zero_snr=True for a zero-terminal-SNR schedule")
        self.betas = b
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.rescale_zero_snr = bool(rescale_zero_snr)
        self.name = name
        self._f32 = ("raw", raw32)  # how diffusers builds β in float32 (the named builders refine it)

    def alphas_cumprod_f32(self) -> torch.Tensor:
        """ᾱ as diffusers' schedulers compute it: β built in float32, then cumprod in float32. The σ solvers take
        their *timesteps* from this table (rounding and interpolation in σ then match diffusers exactly); every
        coefficient comes from the float64 table."""
        kind, *a = self._f32
        if kind == "linear":
            b = torch.linspace(a[0], a[1], a[2], dtype=torch.float32)
        elif kind == "scaled_linear":
            b = torch.linspace(a[0] ** 0.5, a[1] ** 0.5, a[2], dtype=torch.float32) ** 2
        else:
            b = a[0]
        if self.rescale_zero_snr:
            b = _rescale_zero_terminal_snr(b)
        return torch.cumprod(1.0 - b, 0)

    # ---- builders (as diffusers builds them, but in float64) ----
    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kw):
        _check_T(num_train_timesteps)
        s = cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64), name="linear", **kw)
        s._f32 = ("linear", beta_start, beta_end, num_train_timesteps)
        return s

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, **kw):
        _check_T(num_train_timesteps)
        b = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        s = cls(b, name="scaled_linear", **kw)
        s._f32 = ("scaled_linear", beta_start, beta_end, num_train_timesteps)
        return s

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999, **kw):
        """Nichol & Dhariwal 2021 (diffusers `squaredcos_cap_v2`): β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), max_beta)."""
        _check_T(num_train_timesteps)

        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        b = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
        return cls(torch.tensor(b, dtype=torch.float64), name="cosine", **kw)

    @classmethod
    def sigmoid(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kw):
        _check_T(num_train_timesteps)
        b = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)) * (beta_end - beta_start)
        return cls(b + beta_start, name="sigmoid", **kw)

    @classmethod
    def from_name(cls, beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, trained_betas=None, rescale_zero_snr: bool = False) -> "NoiseSchedule":
        """The schedule a diffusers config names (`beta_schedule`, `trained_betas`, ...)."""
        if trained_betas is None:  # numbers of a number type, names of a known schedule (errors name the setting)
            from fastdiff.validate import check_scheduler_config

            check_scheduler_config({"beta_schedule": beta_schedule, "num_train_timesteps": num_train_timesteps,
                                    "beta_start": beta_start, "beta_end": beta_end}, "schedule")
        if trained_betas is not None:
            return cls(trained_betas, rescale_zero_snr=rescale_zero_snr, name="trained")
        kw = dict(rescale_zero_snr=rescale_zero_snr)
        if beta_schedule == "linear":
            return cls.linear(num_train_timesteps, beta_start, beta_end, **kw)
        if beta_schedule == "scaled_linear":
            return cls.scaled_linear(num_train_timesteps, beta_start, beta_end, **kw)
        if beta_schedule in ("cosine", "squaredcos_cap_v2"):
            return cls.cosine(num_train_timesteps, **kw)
        if beta_schedule == "sigmoid":
            return cls.sigmoid(num_train_timesteps, beta_start, beta_end, **kw)
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")

    @classmethod
    def from_diffusers(cls, scheduler_or_config) -> "NoiseSchedule":
        """The β schedule of a diffusers scheduler (or its config dict), rebuilt in float64."""
        from fastdiff.validate import check_scheduler_config

        # types and consistency (a string where a number belongs, trained_betas against num_train_timesteps)
        cfg = check_scheduler_config(diffusers_config(scheduler_or_config), "schedule")
        return cls.from_name(cfg.get("beta_schedule", "linear"), cfg.get("num_train_timesteps", 1000),
                             cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), cfg.get("trained_betas"),
                             cfg.get("rescale_betas_zero_snr", False))

    # ---- derived ----
    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        z = ", zero terminal SNR" if self.rescale_zero_snr else ""
        return f"NoiseSchedule({self.name}, T={len(self)}{z})"

    def alpha_bar(self, t) -> torch.Tensor:
        """ᾱ_t (float64) for integer timesteps t; t = −1 gives 1 (the 'previous' of t = 0)."""
        t = torch.as_tensor(t, dtype=torch.long)
        one = torch.ones((), dtype=torch.float64)
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], one)

    def snr(self) -> torch.Tensor:
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        return timesteps(len(self), steps, spacing, steps_offset)


def _check_T(T):
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")


SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "cosine",
                  "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}  # name → NoiseSchedule builder


def named_schedule(obj: Any) -> Any:
    """`schedule=` as users type it: a name ("linear", "scaled_linear", "cosine" = "squaredcos_cap_v2", "sigmoid")
    is that NoiseSchedule builder with its defaults (T = 1000; e.g. NoiseSchedule.scaled_linear() is Stable
    Diffusion's 0.00085..0.012); anything else is returned as is."""
    if not isinstance(obj, str):
        return obj
    if obj not in SCHEDULE_NAMES:
        raise ValueError(f"schedule: unknown schedule name {obj!r}; names: {tuple(SCHEDULE_NAMES)} (or pass a "
                         "NoiseSchedule, e.g. NoiseSchedule.linear(num_train_timesteps=..., beta_start=..., "
                         "beta_end=...), a diffusers scheduler or its config)")
    return getattr(NoiseSchedule, SCHEDULE_NAMES[obj])()


def diffusers_config(obj: Any) -> dict:
    """A plain dict of a diffusers scheduler's config (accepts the scheduler, its FrozenDict config, or a dict)."""
    cfg = getattr(obj, "config", obj)
    if not hasattr(cfg, "keys"):
        raise TypeError(f"schedule: expected a NoiseSchedule, a schedule name {tuple(SCHEDULE_NAMES)}, a diffusers "
                        f"scheduler or its config, got {type(obj).__name__}")
    return dict(cfg)
