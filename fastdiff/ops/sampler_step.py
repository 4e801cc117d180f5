"""The sampler update x_t, model output → x_{t−1}: reference math in plain PyTorch (`*_ref`).

Every function here follows REFERENCE.md and the order of operations of diffusers' `DDPMScheduler.step` /
`DDIMScheduler.step`, so that a reference loop and a diffusers loop agree to float32 rounding. Per-step scalars are
Python floats computed in float64; tensor math runs in float32 (fp16/bf16 inputs are upcast, the result cast back).
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def predict_x0_eps_ref(x_t: torch.Tensor, o: torch.Tensor, abar_t: float, prediction_type: str = "epsilon"):
    """x̂0 and ε̂ from the model output `o` at a timestep with cumulative ᾱ_t (REFERENCE.md table).

    x_t, o: (B, ...) same shape. Returns float32 (or float64) tensors (x̂0, ε̂).
    """
    x, o = _f32(x_t), _f32(o)
    a, b = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    if prediction_type == "epsilon":
        return (x - b * o) / a, o
    if prediction_type == "sample":
        return o, (x - a * o) / b
    if prediction_type == "v_prediction":
        return a * x - b * o, a * o + b * x
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def dynamic_threshold_ref(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen dynamic thresholding: per sample s = clamp(quantile(|x̂0|, ratio), 1, max_value), x̂0 ← clamp(x̂0, ±s)/s."""
    flat = _f32(x0).reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold_ref(x0, *, clip_sample=False, clip_sample_range=1.0, thresholding=False,
                          dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """Thresholding takes precedence over clipping, as in diffusers."""
    if thresholding:
        return dynamic_threshold_ref(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def posterior_mean_variance_ref(x0: torch.Tensor, x_t: torch.Tensor, abar_t: float, abar_p: float):
    """q(x_{t−1} | x_t, x0) = N(μ̃, β̃) between two (possibly strided) timesteps with ᾱ_t and ᾱ_p (Ho et al. eq. 6–7).

    Returns (μ̃ tensor, β̃ float, log β̃ clipped at 1e-20 as diffusers clamps it).
    """
    beta = 1.0 - abar_t / abar_p
    alpha = abar_t / abar_p
    c0 = math.sqrt(abar_p) * beta / (1.0 - abar_t)
    ct = math.sqrt(alpha) * (1.0 - abar_p) / (1.0 - abar_t)
    mean = c0 * _f32(x0) + ct * _f32(x_t)
    var = (1.0 - abar_p) / (1.0 - abar_t) * beta
    return mean, var, math.log(max(var, 1e-20))


def ddpm_variance(abar_t: float, abar_p: float, variance_type: str = "fixed_small", v: torch.Tensor | None = None):
    """σ_t² of the DDPM reverse step (a float; a tensor for learned_range given the model's v ∈ [−1, 1]).

    fixed_small: β̃ = (1−ᾱ_p)/(1−ᾱ_t)·β′, clamped at 1e-20 like diffusers; fixed_large: β′ = 1 − ᾱ_t/ᾱ_p;
    learned: v itself; learned_range: exp(f·log β′ + (1−f)·log β̃), f = (v+1)/2 (Nichol & Dhariwal eq. 15).
    """
    beta = 1.0 - abar_t / abar_p
    small = max((1.0 - abar_p) / (1.0 - abar_t) * beta, 1e-20)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return small
    if variance_type == "fixed_large":
        return beta
    if variance_type in ("learned", "learned_range") and v is None:
        raise ValueError(f"variance_type={variance_type!r} needs the model's variance output v")
    if variance_type == "learned":
        return _f32(v)
    if variance_type == "learned_range":
        f = (_f32(v) + 1) / 2
        return torch.exp(f * math.log(beta) + (1 - f) * math.log(small))
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


def ddpm_step_ref(x_t, o, abar_t, abar_p, *, noise=None, prediction_type="epsilon", variance_type="fixed_small",
                  v=None, clip_sample=False, clip_sample_range=1.0, thresholding=False,
                  dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """One DDPM ancestral step (Ho et al. eq. 6–7, 11) between timesteps with ᾱ_t and ᾱ_p (ᾱ_p = 1 after the last).

    x_t, o, noise, v: (B, ...). Returns (x_prev in x_t's dtype, x̂0 float32). No noise is added when `noise` is None.
    """
    x0, _ = predict_x0_eps_ref(x_t, o, abar_t, prediction_type)
    x0 = clip_or_threshold_ref(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                               thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                               sample_max_value=sample_max_value)
    mean, _, _ = posterior_mean_variance_ref(x0, x_t, abar_t, abar_p)
    if noise is not None:
        var = ddpm_variance(abar_t, abar_p, variance_type, v)
        std = var.sqrt() if torch.is_tensor(var) else math.sqrt(var)
        mean = mean + std * _f32(noise)
    return mean.to(x_t.dtype), x0


def ddim_sigma(abar_t: float, abar_p: float, eta: float) -> float:
    """σ_t = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_p) (Song et al. eq. 16)."""
    return eta * math.sqrt(max((1.0 - abar_p) / (1.0 - abar_t) * (1.0 - abar_t / abar_p), 0.0))


def ddim_step_ref(x_t, o, abar_t, abar_p, *, eta=0.0, noise=None, prediction_type="epsilon",
                  use_clipped_model_output=False, clip_sample=False, clip_sample_range=1.0, thresholding=False,
                  dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """One DDIM step (Song et al. eq. 12): x_prev = √ᾱ_p·x̂0 + √(1−ᾱ_p−σ²)·ε̂ + σ·z.

    By default ε̂ is the unclipped one (diffusers' use_clipped_model_output=False). Returns (x_prev, x̂0 float32).
    """
    x0, eps = predict_x0_eps_ref(x_t, o, abar_t, prediction_type)
    x0 = clip_or_threshold_ref(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                               thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                               sample_max_value=sample_max_value)
    sigma = ddim_sigma(abar_t, abar_p, eta)
    if use_clipped_model_output:
        eps = (_f32(x_t) - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)
    out = math.sqrt(abar_p) * x0 + math.sqrt(max(1.0 - abar_p - sigma**2, 0.0)) * eps
    if noise is not None and eta > 0:
        out = out + sigma * _f32(noise)
    return out.to(x_t.dtype), x0
