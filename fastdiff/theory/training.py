"""Forward process and training loss (Ho et al. 2020, eq. 4 and 14)."""
from __future__ import annotations

import torch

from fastdiff import prediction
from fastdiff._util import model_output
from fastdiff.schedule import NoiseSchedule


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))


def _check_t(t: torch.Tensor, x0: torch.Tensor, T: int) -> torch.Tensor:
    t = torch.as_tensor(t, device=x0.device)
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or t.shape != x0.shape[:1]:
        raise ValueError(f"t must be an integer tensor of shape (B,) = {tuple(x0.shape[:1])}, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t.long()


def q_sample(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. eq. 4). x0: (B, ...), t: (B,) int64 in [0, T)."""
    t = _check_t(t, x0, len(schedule))
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    abar = _bcast(schedule.alphas_cumprod.to(x0.device)[t], x0)
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


def elbo_weights(schedule: NoiseSchedule) -> torch.Tensor:
    """Per-timestep weight that turns ‖ε − ε̂‖² into the true-ELBO term (float64, (T,); Ho et al. 2020
    eq. 12; docs/math.md, "Training loss weighting").

    w_t = β_t² / (2σ_t²·α_t·(1−ᾱ_t)) with σ_t² = β̃_t; at t = 0, where β̃_0 = 0, σ_0² = β_0 is used (w_0 = 1/(2α_0)).
    """
    b, a, abar = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    var = (1 - abar_prev) / (1 - abar) * b
    var[0] = b[0]
    return b**2 / (2 * var * a * (1 - abar))


def training_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, *, t: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, prediction_type: str = "epsilon", weighting: str = "simple",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """L_simple = E‖target − model(x_t, t)‖² with t uniform over {0, …, T−1} (Ho et al. eq. 14); a scalar.

    weighting: "simple" (every t weighted 1, as DDPM trains) or "elbo" (the true-ELBO weight of each t).
    prediction_type sets the target: ε ("epsilon"), x0 ("sample") or v = √ᾱ·ε − √(1−ᾱ)·x0 ("v_prediction").
    """
    if weighting not in ("simple", "elbo"):
        raise ValueError(f"weighting must be 'simple' or 'elbo', got {weighting!r}")
    prediction.check(prediction_type, prediction.VP_PREDICTION_TYPES)
    B = x0.shape[0]
    T = len(schedule)
    if t is None:
        t = torch.randint(0, T, (B,), generator=generator, device=generator.device if generator else x0.device)
        t = t.to(x0.device)
    t = _check_t(t, x0, T)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device,
                            dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, t, schedule, noise)
    out = model(x_t, t)
    out = model_output(out)
    if out.shape != x0.shape:
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x0.shape)}")
    a = s = None  # α_t, σ_t: only the v target reads them (no table copy to the device for ε / x0)
    if prediction_type == "v_prediction":
        abar = _bcast(schedule.alphas_cumprod.to(x0.device)[t], x0)
        a, s = abar.sqrt(), (1 - abar).sqrt()
    target = prediction.target(prediction_type, x0.float(), noise.float(), a, s)
    per = ((out.float() - target.float()) ** 2).reshape(B, -1).mean(1)
    if weighting == "elbo":
        per = per * elbo_weights(schedule).to(x0.device)[t].float()
    return per.mean()
