"""Timestep and σ grids of the σ-parameterised solvers, as diffusers' `set_timesteps` builds them.

σ_t = √((1 − ᾱ_t)/ᾱ_t) (the variance-exploding view of a variance-preserving schedule, Karras et al. 2022, §2 and
Song et al. 2021b). Every grid is computed twice: once from the float32 ᾱ table that diffusers builds (so the
*timesteps* handed to the model — which involve rounding and interpolation in σ — are exactly diffusers'), and once
from fastdiff's float64 ᾱ (so the *coefficients* are the exact formulas; diffusers keeps them in float32).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.schedule import NoiseSchedule

ZERO_SNR_ABAR = 2.0**-24  # diffusers' stand-in for ᾱ_{T−1} = 0 in the σ solvers (σ_max stays finite)


def abar_tables(schedule: NoiseSchedule, zero_snr_floor: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ᾱ float64, ᾱ as diffusers' float32 tensors give it) as NumPy arrays; a zero-terminal-SNR schedule gets
    diffusers' ᾱ_{T−1} = 2^−24 in both (σ_max would be infinite)."""
    a64 = schedule.alphas_cumprod.numpy().copy()
    a32 = schedule.alphas_cumprod_f32().numpy().astype(np.float32)
    if zero_snr_floor and a64[-1] <= 0.0:
        a64[-1] = ZERO_SNR_ABAR
        a32[-1] = np.float32(ZERO_SNR_ABAR)
    return a64, a32


def sigma_table(abar) -> np.ndarray:
    """σ_t for every training timestep, in the dtype of `abar` (float32 as diffusers computes it on float32)."""
    if abar.dtype == np.float32:
        a = torch.from_numpy(abar)
        return (((1 - a) / a) ** 0.5).numpy()
    return np.sqrt((1 - abar) / abar)


def spaced_timesteps(T: int, n: int, spacing: str, steps_offset: int = 0, *, plus_one: bool = False,
                     last_timestep: int | None = None, dtype=np.float32) -> np.ndarray:
    """diffusers' timestep grid for the σ solvers (descending; float for Euler/Heun, int64 for DPM/UniPC).

    plus_one: DPM-Solver/UniPC build N + 1 points and drop the last (linspace and leading); Euler/Heun build N.
    """
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        if plus_one:
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        if plus_one:
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32) + steps_offset
    if spacing == "trailing":
        ratio = T / n
        ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64 if plus_one else np.float32)
        return ts - 1
    raise ValueError(f"timestep_spacing must be one of ('linspace', 'leading', 'trailing'), got {spacing!r}")


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`: the fractional timestep whose log σ interpolates linearly to log `sigma`."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def vp(sigma: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) of the VP process at VE noise level σ: α = 1/√(σ²+1), σ_t = σ·α, λ = log(α/σ_t) = −log σ."""
    a = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return a, sigma * a, (-math.log(sigma) if sigma > 0 else math.inf)
