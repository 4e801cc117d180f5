"""The variational bound in bits per dimension, as improved-diffusion's `calc_bpd_loop` computes it
(docs/math.md, "Variational bound").

    −log p_θ(x0) ≤ L_T + Σ_{t≥1} L_t + L_0                                    (Ho et al. eq. 5, in code timesteps)
    L_T = KL(q(x_{T−1}|x0) ‖ N(0, I))                                         prior
    L_t = KL(q(x_{t−1}|x_t, x0) ‖ p_θ(x_{t−1}|x_t)),   t = 1 … T−1,  x_t ~ q(x_t|x0) (one draw per t)
    L_0 = −log p_θ(x0|x_1) under a Gaussian discretized on 256 bins of [−1, 1]  decoder

Every term is averaged over the dimensions of one sample and divided by ln 2, so they add up to bits/dim.
The step math is float64 and costs nothing next to the model: the work is T model calls, which `batch_timesteps`
groups into B·k-row batches (k timesteps per call). Noise is drawn per timestep from T−1 down to 0, whatever k, so
a seeded generator gives the same result for every k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastdiff import prediction
from fastdiff._util import progress as _progress
from fastdiff.run.loop import call_model
from fastdiff.schedule import NoiseSchedule

VLB_VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
_LN2 = math.log(2.0)


# ---- the formulas (float64 tensors) ----

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(μ1, e^{ℓ1}) ‖ N(μ2, e^{ℓ2})) elementwise, in nats: ½(−1 + ℓ2 − ℓ1 + e^{ℓ1−ℓ2} + (μ1−μ2)²e^{−ℓ2})."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715x³))), the approximation improved-diffusion (and PixelCNN++) use."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for x on the 256-level grid of [−1, 1] under N(means, e^{2·log_scales}) integrated over x's bin
    (±1/255; the edge bins −1 and 1 extend to ∓∞; probabilities floored at 1e-12). Elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.reshape(x.shape[0], -1).mean(1)


class _Tables:
    """Per-timestep float64 tables of improved-diffusion's GaussianDiffusion."""

    def __init__(self, schedule: NoiseSchedule):
        b = schedule.betas
        abar = schedule.alphas_cumprod
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas, self.abar = b, abar
        self.post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # t = 0 has β̃_0 = 0: improved-diffusion clips the log with β̃_1
        self.post_logvar = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.large_logvar = torch.log(torch.cat([self.post_var[1:2], b[1:]]))
        self.c0 = b * abar_prev.sqrt() / (1.0 - abar)
        self.ct = (1.0 - abar_prev) * (1.0 - b).sqrt() / (1.0 - abar)


# ---- the result ----

@dataclass
class VLBResult:
    """bits/dim per sample. `terms[:, t]` is L_t for code timestep t: t = 0 the decoder L_0, t ≥ 1 the KL term
    KL(q(x_{t−1}|x_t, x0) ‖ p_θ(x_{t−1}|x_t)). total = terms.sum(1) + prior."""

    total: torch.Tensor  # (B,)
    prior: torch.Tensor  # (B,)  L_T
    decoder: torch.Tensor  # (B,)  L_0 = terms[:, 0]
    terms: torch.Tensor  # (B, T)
    xstart_mse: torch.Tensor  # (B, T)  mean_flat((x̂0 − x0)²) per t
    mse: torch.Tensor  # (B, T)  mean_flat((ε̂ − ε)²) per t

    def mean(self) -> dict:
        """Batch averages (floats) of total, prior, decoder, and the sum of the KL terms."""
        return {"total": self.total.mean().item(), "prior": self.prior.mean().item(),
                "decoder": self.decoder.mean().item(), "kl": self.terms[:, 1:].sum(1).mean().item()}


def _model_out(model, x, t, learned, dtype):
    """The model's prediction (and variance output for learned variances) at x cast to `dtype`, as float64."""
    o, v = call_model(model, x.to(dtype), t, None, learned, check_nan=False)
    return o.to(torch.float64), (v.to(torch.float64) if v is not None else None)


def _bc(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def vlb_terms(x0, x_t, t, o, v, tables: _Tables, *, prediction_type="epsilon", variance_type="fixed_small",
              clip_denoised=True):
    """The bits/dim term of each row at its timestep t (B,) (decoder where t = 0, KL otherwise), and x̂0.

    x0, x_t, o (model output), v (learned variance output or None): (B, ...) float64; t: (B,) int64 on the CPU.
    """
    ab = _bc(tables.abar[t], x_t).to(x_t.device)
    x0_hat = prediction.to_x0(x_t, o, ab.sqrt(), (1.0 - ab).sqrt(), prediction_type,
                              types=prediction.VP_PREDICTION_TYPES)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    c0, ct = (_bc(c[t], x_t).to(x_t.device) for c in (tables.c0, tables.ct))
    true_mean, model_mean = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
    true_logvar = _bc(tables.post_logvar[t], x_t).to(x_t.device)
    if variance_type == "fixed_small":
        model_logvar = true_logvar.expand_as(x_t)
    elif variance_type == "fixed_large":
        model_logvar = _bc(tables.large_logvar[t], x_t).to(x_t.device).expand_as(x_t)
    elif variance_type == "learned":
        model_logvar = v
    elif variance_type == "learned_range":
        frac = (v + 1.0) / 2.0
        model_logvar = frac * _bc(tables.betas[t].log(), x_t).to(x_t.device) + (1.0 - frac) * true_logvar
    else:
        raise ValueError(f"variance_type must be one of {VLB_VARIANCE_TYPES}, got {variance_type!r}")
    kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / _LN2
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / _LN2
    return torch.where(t.to(x_t.device) == 0, nll, kl), x0_hat


def prior_bpd(x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """L_T = KL(N(√ᾱ_{T−1}·x0, 1−ᾱ_{T−1}) ‖ N(0, 1)) in bits/dim: (B,) float64."""
    abar = float(schedule.alphas_cumprod[-1])
    x = x0.to(torch.float64)
    kl = normal_kl(math.sqrt(abar) * x, torch.full_like(x, math.log(1.0 - abar)), torch.zeros_like(x),
                   torch.zeros_like(x))
    return _mean_flat(kl) / _LN2


@torch.no_grad()
def vlb(model: Callable, x0: torch.Tensor, schedule=None, *, prediction_type: str = "epsilon",
        variance_type: str = "fixed_small", clip_denoised: bool = True, batch_timesteps: int = 1,
        generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
        progress: bool = False) -> VLBResult:
    """The variational bound of `model` on data `x0`, in bits/dim (improved-diffusion `calc_bpd_loop`).

    model(x_t, t) -> ε̂ / x̂0 / v per `prediction_type` (t a LongTensor of training timesteps); with
    variance_type "learned_range" (Nichol & Dhariwal eq. 15) or "learned" (log σ²) it returns 2·C channels along dim 1.
    x0: (B, ...) data scaled to [−1, 1]; the decoder L_0 is a likelihood of 256-level data, so x0 should lie on the
    grid (k/127.5 − 1). schedule: a NoiseSchedule (default linear, T = 1000) or a diffusers scheduler / config.
    clip_denoised clamps x̂0 to [−1, 1] (improved-diffusion's default). batch_timesteps: timesteps per model call.
    dtype: the dtype the model sees (default x0's). Returns a VLBResult (float64, on x0's device).
    """
    if schedule is None:
        schedule = NoiseSchedule.linear()
    elif not isinstance(schedule, NoiseSchedule):
        schedule = NoiseSchedule.from_diffusers(schedule)
    T = len(schedule)
    if T < 2:
        raise ValueError("schedule: the bound needs at least 2 timesteps")
    prediction.check(prediction_type, prediction.VP_PREDICTION_TYPES)
    if variance_type not in VLB_VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VLB_VARIANCE_TYPES}, got {variance_type!r}")
    if isinstance(batch_timesteps, bool) or not isinstance(batch_timesteps, int) or batch_timesteps < 1:
        raise ValueError(f"batch_timesteps must be a positive int, got {batch_timesteps!r}")
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.dim() < 2 or x0.shape[0] < 1:
        raise ValueError("x0 must be a floating-point tensor of shape (B, C, ...) with B >= 1")
    if not torch.isfinite(x0).all() or x0.abs().max() > 1.0 + 1e-6:
        raise ValueError("x0 must be data scaled to [−1, 1] (the decoder is a 256-bin likelihood on that range)")
    if schedule.alphas_cumprod[-1] <= 0 or schedule.alphas_cumprod[-1] >= 1:
        raise ValueError("schedule: the prior term needs 0 < ᾱ_{T−1} < 1 (zero terminal SNR has no finite bound "
                         "with these formulas)")
    learned = variance_type.startswith("learned")
    dtype = dtype or x0.dtype
    tables = _Tables(schedule)
    B = x0.shape[0]
    xd = x0.to(torch.float64)
    terms = torch.zeros(B, T, dtype=torch.float64, device=x0.device)
    xmse, mse = torch.zeros_like(terms), torch.zeros_like(terms)
    order = list(range(T - 1, -1, -1))
    chunks = [order[i:i + batch_timesteps] for i in range(0, T, batch_timesteps)]
    for ts in _progress(chunks, progress, total=len(chunks), desc=f"vlb T={T}"):
        noise = torch.cat([torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                                       device=generator.device if generator is not None else x0.device)
                           .to(x0.device, torch.float64) for _ in ts])
        tt = torch.tensor(ts, dtype=torch.long).repeat_interleave(B)
        xr = xd.repeat(len(ts), *([1] * (x0.dim() - 1)))
        ab = _bc(tables.abar[tt], xr).to(x0.device)
        x_t = ab.sqrt() * xr + (1.0 - ab).sqrt() * noise
        o, v = _model_out(model, x_t, tt.to(x0.device), learned, dtype)
        out, x0_hat = vlb_terms(xr, x_t, tt, o, v, tables, prediction_type=prediction_type,
                                variance_type=variance_type, clip_denoised=clip_denoised)
        eps_hat = prediction.to_eps(x_t, x0_hat, ab.sqrt(), (1.0 - ab).sqrt(), "sample")  # from the clipped x̂0
        cols = torch.tensor(ts)
        terms[:, cols] = out.reshape(len(ts), B).T
        xmse[:, cols] = _mean_flat((x0_hat - xr) ** 2).reshape(len(ts), B).T
        mse[:, cols] = _mean_flat((eps_hat - noise) ** 2).reshape(len(ts), B).T
    prior = prior_bpd(x0, schedule).to(x0.device)
    return VLBResult(total=terms.sum(1) + prior, prior=prior, decoder=terms[:, 0].clone(), terms=terms,
                     xstart_mse=xmse, mse=mse)
