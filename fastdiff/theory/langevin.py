"""Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1; docs/math.md, "Annealed Langevin dynamics").

For noise levels σ_1 > σ_2 > … > σ_L and a score s(x, σ) ≈ ∇_x log p_σ(x) (p_σ = data ∗ N(0, σ²I)):

    for each level i:  α_i = ε·σ_i²/σ_L²
        repeat steps_per_level times:  x ← x + (α_i/2)·s(x, σ_i) + √α_i·z,   z ~ N(0, I)

an MCMC chain per level, with fresh noise at every step (unlike DDPM's generative chain, which visits each noise level
once). `step_size` is ε, the step at the last (smallest) level.

A noise-prediction model trained on x_t = √ᾱ·x0 + √(1−ᾱ)·ε gives the score of the variance-preserving marginal:
∇log q_t(x) = −ε̂(x, t)/√(1−ᾱ_t). `score_from_eps` wraps such a model (or `GaussianMixture.model(schedule)`) as a score
on its own timesteps: use `vp_levels(schedule, ...)` for the levels, so that "σ" there means √(1−ᾱ_t) and
the chain targets q_t at each level.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fastdiff._util import model_output, progress as _progress
from fastdiff.schedule import NoiseSchedule


def score_from_eps(eps_model: Callable, schedule: NoiseSchedule) -> Callable:
    """score(x, t) = −ε̂(x, t)/√(1−ᾱ_t) for an ε-prediction `eps_model(x, t)` (t a LongTensor (B,) of timesteps)."""
    abar = schedule.alphas_cumprod

    def score(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        tb = t.expand(x.shape[0]) if t.numel() == 1 else t
        out = eps_model(x, tb.to(x.device))
        out = model_output(out)
        sig = (1.0 - abar[tb.cpu()]).sqrt().to(device=x.device, dtype=torch.float64)
        return (-out.to(torch.float64) / sig.reshape(-1, *([1] * (x.dim() - 1)))).to(x.dtype)

    return score


def vp_levels(schedule: NoiseSchedule, num_levels: int, t_min: int = 0, t_max: int | None = None):
    """(timesteps (L,) descending, their σ_t = √(1−ᾱ_t) as floats) for `langevin_sample` with `score_from_eps`.

    Timesteps are spaced geometrically in the variance-exploding equivalent noise √((1−ᾱ_t)/ᾱ_t) (x_t/√ᾱ_t is data
    plus that much noise) between t_max (default T−1) and t_min, as NCSN spaces its σ's; repeated timesteps are dropped.
    """
    T = len(schedule)
    t_max = T - 1 if t_max is None else t_max
    if not 0 <= t_min < t_max < T:
        raise ValueError(f"need 0 <= t_min < t_max < T = {T}, got t_min={t_min}, t_max={t_max}")
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    abar = schedule.alphas_cumprod
    sig_all = (1.0 - abar).sqrt()
    ve = ((1.0 - abar) / abar).log()  # increasing in t
    target = torch.linspace(float(ve[t_max]), float(ve[t_min]), num_levels, dtype=torch.float64)
    ts = torch.searchsorted(ve, target).clamp(t_min, t_max)
    ts = torch.unique_consecutive(ts)
    return ts, sig_all[ts].tolist()


def _score(score_model: Callable, x: torch.Tensor, level) -> torch.Tensor:
    """score_model(x, level) in x's dtype, checked: a floating tensor of exactly x's shape on x's device (a score of
    another shape would broadcast into x silently)."""
    s = score_model(x, level)
    if not torch.is_tensor(s):
        raise TypeError(f"score_model(x, {level!r}) returned {type(s).__name__}, expected a tensor of x's shape "
                        f"{tuple(x.shape)} (∇log p_σ(x)); does it forget to `return`?")
    if s.shape != x.shape:
        raise ValueError(f"score_model(x, {level!r}) returned shape {tuple(s.shape)}, expected x's shape "
                         f"{tuple(x.shape)}: a score is one gradient per element of x (it is not broadcast)")
    if not s.is_floating_point():
        raise TypeError(f"score_model(x, {level!r}) returned dtype {s.dtype}; a score must be floating point")
    if s.device != x.device:
        raise ValueError(f"score_model(x, {level!r}) returned a tensor on {s.device}, x is on {x.device}")
    return s.to(x.dtype)


@torch.no_grad()
def langevin_sample(score_model: Callable, sigmas: Sequence[float], steps_per_level: int = 100,
                    step_size: float = 2e-5, *, shape=None, x_init: torch.Tensor | None = None, levels=None,
                    generator: torch.Generator | None = None, dtype: torch.dtype | None = None, device=None,
                    final_denoise: bool = False, progress: bool = False, callback: Callable | None = None):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): returns x after the last level, shape (B, ...).

    score_model(x, level) -> ∇log p_σ(x), where `level` is what `levels[i]` holds (default: σ_i as a float);
    for an ε-prediction model pass `score_from_eps(model, schedule)` and `levels=` its timesteps (see `vp_levels`).
    sigmas: σ_1 > … > σ_L (floats). step_size: ε, so that α_i = ε·σ_i²/σ_L². x_init: the start (default
    σ_1·N(0, I) of `shape`; for variance-preserving levels pass N(0, I) explicitly). final_denoise: add one
    noise-free step x ← x + σ_L²·s(x, σ_L) (Tweedie) at the end. callback(d) gets i, level, sigma, x after each level.
    """
    from fastdiff.validate import check_device

    check_device("device", device)  # 'gpu', or 'cuda' without CUDA: named, with the fix
    sig = [float(s) for s in sigmas]
    if len(sig) < 1 or any(not (s > 0 and math.isfinite(s)) for s in sig):
        raise ValueError("sigmas must be a non-empty sequence of finite numbers > 0")
    if any(a < b for a, b in zip(sig, sig[1:])):
        raise ValueError("sigmas must be non-increasing (σ_1 ≥ … ≥ σ_L)")
    if isinstance(steps_per_level, bool) or not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"steps_per_level must be a positive int, got {steps_per_level!r}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    if levels is None:
        levels = sig
    elif len(levels) != len(sig):
        raise ValueError(f"levels has {len(levels)} entries, sigmas {len(sig)}")
    if x_init is None:
        if shape is None:
            raise ValueError("shape: pass shape=(B, ...) or x_init")
        rd = generator.device if generator is not None else torch.device(device or "cpu")
        x = torch.randn(tuple(shape), generator=generator, device=rd, dtype=dtype or torch.float32)
        x = (x * sig[0]).to(device or "cpu")
    else:
        if not torch.is_tensor(x_init) or not x_init.is_floating_point():
            raise TypeError("x_init must be a floating-point tensor")
        x = x_init.to(device=device or x_init.device, dtype=dtype or x_init.dtype).clone()
    rd = generator.device if generator is not None else x.device
    for i in _progress(range(len(sig)), progress, desc=f"langevin {len(sig)}×{steps_per_level}"):
        alpha = step_size * (sig[i] / sig[-1]) ** 2
        for _ in range(steps_per_level):
            z = torch.randn(x.shape, generator=generator, device=rd, dtype=x.dtype).to(x.device)
            x = x + (0.5 * alpha) * _score(score_model, x, levels[i]) + math.sqrt(alpha) * z
        if callback is not None:
            callback({"i": i, "level": levels[i], "sigma": sig[i], "x": x})
    if final_denoise:
        x = x + sig[-1] ** 2 * _score(score_model, x, levels[-1])
    return x
