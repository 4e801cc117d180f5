"""An exact oracle: Gaussian-mixture data and its exact noise / x0 / v predictors
(docs/math.md, "Exact oracle: Gaussian mixtures").

Data x0 ~ Σ_k w_k N(m_k, s²I) in D dimensions. Noised with cumulative ᾱ (a = √ᾱ, σ² = 1 − ᾱ), the marginal is again a
mixture, q_t = Σ_k w_k N(a·m_k, v·I) with v = a²s² + σ², so the optimal denoiser is known in closed form:

    r_k = softmax_k(log w_k − ‖x − a·m_k‖²/(2v))        (squared distance taken directly, log-sum-exp)
    ε*  = (σ/v)·(x − a·Σ_k r_k m_k) = −σ·∇log q_t(x)
    x̂0 = Σ_k r_k m_k·σ²/v + (a·s²/v)·x                 (= (x − σ·ε*)/a, written so that ᾱ = 0 is finite)
    v*  = a·ε* − σ·x̂0

`GaussianMixture.model(schedule)` wraps these as a `model(x_t, t)` for any fastdiff sampler, so sampling error is
discretization error only (no training error). `GaussianMixture.flow_model()` is the same for a flow-matching model:
the exact velocity E[ε − x0 | x_t] of x_t = (1 − t)·x0 + t·ε (the marginal is the mixture with a = 1 − t, σ = t). Test helpers: `component_weights`, `component_moments` and
`moment_recursion` (the exact mean and variance of every sampler step for K = 1).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fastdiff import prediction
from fastdiff.schedule import NoiseSchedule


def _as_f64(x, name: str) -> torch.Tensor:
    if not torch.is_tensor(x):  # lists and floats straight to float64 (not through float32)
        return torch.as_tensor(x, dtype=torch.float64)
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected real numbers, got {x.dtype}")
    return x.detach().to("cpu", torch.float64)


class GaussianMixture:
    """Σ_k w_k N(m_k, s²I): `weights` (K,) positive (normalized here), `means` (K, D), `std` s > 0 (isotropic).

    Parameters are stored in float64 on the CPU; predictors compute in float64 on the input's device.
    """

    def __init__(self, weights, means, std: float):
        w = _as_f64(weights, "weights").flatten()
        m = _as_f64(means, "means")
        if m.dim() == 1:
            m = m[:, None]
        if m.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(m.shape)}")
        if w.numel() != m.shape[0]:
            raise ValueError(f"weights has {w.numel()} entries but means has K = {m.shape[0]} rows")
        if w.numel() < 1 or not torch.isfinite(w).all() or (w <= 0).any():
            raise ValueError("weights must be finite and > 0 (at least one component)")
        if not torch.isfinite(m).all():
            raise ValueError("means must be finite")
        std = float(std)
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"std must be a finite number > 0, got {std}")
        self.weights = w / w.sum()
        self.means = m.contiguous()
        self.std = std

    @property
    def K(self) -> int:
        return self.means.shape[0]

    @property
    def D(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, D={self.D}, std={self.std:g})"

    # ---- data ----
    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n draws from the mixture: (n, D) float64 on the CPU (and the (n,) component labels if asked)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[labels] + self.std * torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        return (x, labels) if return_labels else x

    # ---- the noised marginal and its exact denoisers ----
    def _prep(self, x: torch.Tensor, abar):
        """x as (n, D) float64 and per-row a, σ², v as (n, 1) float64 tensors on x's device."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor of shape (n, D) or (n, ...) with D elements per row")
        xf = x.reshape(x.shape[0], -1).to(torch.float64) if x.dim() > 0 else None
        if xf is None or xf.shape[1] != self.D:
            raise ValueError(f"x must have {self.D} elements per row (the mixture's D), got shape {tuple(x.shape)}")
        ab = torch.as_tensor(abar, dtype=torch.float64, device=x.device).detach()
        if ab.dim() > 1 or (ab.dim() == 1 and ab.numel() not in (1, xf.shape[0])):
            raise ValueError(f"abar must be a float or a tensor of shape (n,) = ({xf.shape[0]},), got {tuple(ab.shape)}")
        if ((ab < 0) | (ab > 1) | ~torch.isfinite(ab)).any():
            raise ValueError("abar: every ᾱ must be in [0, 1]")
        ab = ab.reshape(-1, 1).expand(xf.shape[0], 1)
        var = self.std**2 * ab + (1.0 - ab)
        return xf, ab.sqrt(), 1.0 - ab, var

    def _resp(self, xf, a, var):
        """log w_k − ‖x − a·m_k‖²/(2v): (n, K), and its log-sum-exp (n,)."""
        m = self.means.to(xf.device)
        d2 = ((xf[:, None, :] - a[:, :, None] * m[None]) ** 2).sum(-1)  # (n, K), taken directly (no expansion)
        logits = self.weights.to(xf.device).log()[None] - d2 / (2 * var)
        return logits, torch.logsumexp(logits, dim=1)

    def responsibilities(self, x: torch.Tensor, abar=1.0) -> torch.Tensor:
        """r_k(x) = q(component k | x_t = x) at cumulative ᾱ: (n, K) float64."""
        xf, a, _, var = self._prep(x, abar)
        logits, lse = self._resp(xf, a, var)
        return (logits - lse[:, None]).exp()

    def _mean_mix(self, xf, a, var):
        logits, lse = self._resp(xf, a, var)
        r = (logits - lse[:, None]).exp()
        return r @ self.means.to(xf.device)  # Σ_k r_k m_k, (n, D)

    def log_prob(self, x: torch.Tensor, abar=1.0) -> torch.Tensor:
        """log q_t(x) at cumulative ᾱ (ᾱ = 1: the data density): (n,) float64."""
        xf, a, _, var = self._prep(x, abar)
        _, lse = self._resp(xf, a, var)
        return lse - 0.5 * self.D * torch.log(2 * math.pi * var[:, 0])

    def score(self, x: torch.Tensor, abar=1.0) -> torch.Tensor:
        """∇_x log q_t(x) = −(x − a·Σ r_k m_k)/v, in x's shape, float64."""
        xf, a, _, var = self._prep(x, abar)
        return (-(xf - a * self._mean_mix(xf, a, var)) / var).reshape(x.shape)

    def eps(self, x: torch.Tensor, abar) -> torch.Tensor:
        """ε*(x, ᾱ) = (σ/v)(x − a·Σ r_k m_k) = −σ·∇log q_t: x's shape, float64."""
        return self.predict(x, abar, "epsilon")

    def x0(self, x: torch.Tensor, abar) -> torch.Tensor:
        """E[x0 | x_t = x] = Σ r_k m_k·σ²/v + (a·s²/v)·x: x's shape, float64 (finite at ᾱ = 0)."""
        return self.predict(x, abar, "sample")

    def v(self, x: torch.Tensor, abar) -> torch.Tensor:
        """v* = a·ε* − σ·x̂0 (Salimans & Ho 2022): x's shape, float64."""
        return self.predict(x, abar, "v_prediction")

    def predict(self, x: torch.Tensor, abar, prediction_type: str = "epsilon") -> torch.Tensor:
        """The exact output of a `prediction_type` model at x (fastdiff.prediction.target of ε*, x̂0): x's shape,
        float64. ε* and x̂0 are each written in closed form (x̂0 finite at ᾱ = 0), not converted into each other."""
        pt = prediction.check(prediction_type, prediction.VP_PREDICTION_TYPES)
        xf, a, s2, var = self._prep(x, abar)
        mm = self._mean_mix(xf, a, var)
        eps = s2.sqrt() / var * (xf - a * mm) if pt != "sample" else None
        x0 = mm * (s2 / var) + (a * self.std**2 / var) * xf if pt != "epsilon" else None
        return prediction.target(pt, x0, eps, a, s2.sqrt()).reshape(x.shape)

    def reverse_variance(self, x: torch.Tensor, abar_t, abar_p) -> torch.Tensor:
        """Var(x_{t−1} | x_t = x) per coordinate, averaged over coordinates: β̃ + c0²·tr Cov(x0 | x_t)/D, (n,) float64.

        The variance of the exact reverse step from ᾱ_t to ᾱ_p (c0 = √ᾱ_p·β′/(1−ᾱ_t), β′ = 1 − ᾱ_t/ᾱ_p); for K = 1 the
        reverse step is exactly Gaussian with this variance, for K > 1 it is its moment-matched isotropic variance.
        """
        xf, a, s2, var = self._prep(x, abar_t)
        ab_t = a**2
        ab_p = torch.as_tensor(abar_p, dtype=torch.float64, device=x.device).reshape(-1, 1).expand_as(ab_t)
        beta = 1.0 - ab_t / ab_p
        small = (1.0 - ab_p) / (1.0 - ab_t) * beta
        c0 = ab_p.sqrt() * beta / (1.0 - ab_t)
        logits, lse = self._resp(xf, a, var)
        r = (logits - lse[:, None]).exp()  # (n, K)
        m = self.means.to(xf.device)
        post_k = m[None] * (s2 / var)[:, :, None] + (a * self.std**2 / var)[:, :, None] * xf[:, None, :]  # (n, K, D)
        mbar = (r[:, :, None] * post_k).sum(1)
        spread = (r * (post_k - mbar[:, None]).pow(2).sum(-1)).sum(1) / self.D  # between-component part
        cov = self.std**2 * s2[:, 0] / var[:, 0] + spread
        return small[:, 0] + c0[:, 0] ** 2 * cov

    def model(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", variance: str | None = None) -> Callable:
        """`model(x_t, t)` for fastdiff.ddim_sample / ddpm_sample / vlb: t a LongTensor (B,) of training timesteps.

        Returns the exact ε*, x̂0 or v* (per `prediction_type`) in x_t's shape, dtype and device.
        variance="learned_range": also return the exact reverse variance (`reverse_variance` between t and t−1 of the
        schedule) as improved-diffusion's learned_range v ∈ [−1, 1] (log σ² = f·log β_t + (1−f)·log β̃_t, f = (v+1)/2,
        β̃_0 replaced by β̃_1 as improved-diffusion clips it), concatenated along dim 1: 2·C channels.
        """
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        prediction.check(prediction_type, prediction.VP_PREDICTION_TYPES)
        if variance not in (None, "learned_range"):
            raise ValueError(f"variance must be None or 'learned_range', got {variance!r}")
        abar_table = schedule.alphas_cumprod
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar_table[:-1]])
        if variance is not None and len(schedule) < 2:
            raise ValueError("variance='learned_range' needs a schedule with at least 2 timesteps")
        if variance is not None:
            post = schedule.betas * (1 - abar_prev) / (1 - abar_table)
            log_small = torch.cat([post[1:2], post[1:]]).log()
            log_large = schedule.betas.log()

        sigma_table = ((1 - abar_table) / abar_table).sqrt()

        def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tf = torch.as_tensor(t).reshape(-1).cpu()
            if tf.numel() == 1:
                tf = tf.expand(x_t.shape[0])
            if tf.numel() != x_t.shape[0] or (tf < 0).any() or (tf > len(abar_table) - 1).any():
                raise ValueError(f"t must hold {x_t.shape[0]} timesteps in [0, {len(abar_table) - 1}]")
            t = tf.long()
            abar = abar_table[t]
            if tf.is_floating_point() and (tf != t).any():
                # a fractional timestep (the σ-grid solvers, e.g. Euler with linspace spacing): the noise level the
                # sampler assumes there, σ interpolated linearly in t as diffusers does, ᾱ = 1/(1 + σ²)
                hi = (t + 1).clamp(max=len(abar_table) - 1)
                w = (tf.double() - t.double())
                sig = (1 - w) * sigma_table[t] + w * sigma_table[hi]
                abar = torch.where(tf != t, 1.0 / (1.0 + sig**2), abar)
            abar = abar.to(x_t.device)
            out = self.predict(x_t, abar, prediction_type).to(x_t.dtype)
            if variance is None:
                return out
            if x_t.dim() < 2:
                raise ValueError("variance='learned_range' needs x_t of shape (B, C, ...)")
            var = self.reverse_variance(x_t, abar, abar_prev[t].to(x_t.device))
            lo, hi = log_small[t].to(x_t.device), log_large[t].to(x_t.device)
            v = (2 * (var.log() - lo) / (hi - lo) - 1).clamp(-1, 1)
            return torch.cat([out, v.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1))).expand_as(x_t)], dim=1)

        oracle.mixture = self
        oracle.prediction_type = prediction_type
        return oracle

    # ---- flow matching (rectified flow): x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1] ----
    def flow_velocity(self, x: torch.Tensor, t) -> torch.Tensor:
        """The exact velocity v*(x, t) = E[ε − x0 | x_t = x] of the straight path x_t = (1 − t)·x0 + t·ε (Lipman et al.
        2023; Liu et al. 2023): with a = 1 − t and var = a²s² + t² the marginal is Σ_k w_k N(a·m_k, var·I), and
        x̂0 = Σ r_k m_k·t²/var + (a·s²/var)·x, ε̂ = (t/var)·(x − a·Σ r_k m_k), v* = ε̂ − x̂0: x's shape, float64
        (finite at t = 0 and t = 1). t: a float or a (n,) tensor in [0, 1]."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor of shape (n, D) or (n, ...) with D elements per row")
        xf = x.reshape(x.shape[0], -1).to(torch.float64) if x.dim() > 0 else None
        if xf is None or xf.shape[1] != self.D:
            raise ValueError(f"x must have {self.D} elements per row (the mixture's D), got shape {tuple(x.shape)}")
        tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).detach().reshape(-1)
        if tt.numel() not in (1, xf.shape[0]) or ((tt < 0) | (tt > 1) | ~torch.isfinite(tt)).any():
            raise ValueError(f"t must be a float or {xf.shape[0]} values in [0, 1]")
        tt = tt.reshape(-1, 1).expand(xf.shape[0], 1)
        a = 1.0 - tt
        var = a * a * self.std**2 + tt * tt
        mm = self._mean_mix(xf, a, var)
        x0 = mm * (tt * tt / var) + (a * self.std**2 / var) * xf
        eps = (tt / var) * (xf - a * mm)
        return prediction.target("flow_prediction", x0, eps, a, tt).reshape(x.shape)

    def flow_model(self, num_train_timesteps: int = 1000) -> Callable:
        """`model(x_t, t)` of a flow-matching (velocity) model for fastdiff.sample(sampler="flow_euler" | "flow_heun"
        | a VP solver with prediction_type="flow_prediction", use_flow_sigmas=True): t the timestep as diffusers'
        FlowMatch schedulers hand it (σ·num_train_timesteps, float, shape (B,)); returns the exact v* in x_t's dtype."""
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or \
                num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        T = float(num_train_timesteps)

        def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tf = torch.as_tensor(t).reshape(-1).to("cpu", torch.float64)
            if tf.numel() == 1:
                tf = tf.expand(x_t.shape[0])
            if tf.numel() != x_t.shape[0] or (tf < 0).any() or (tf > T).any():
                raise ValueError(f"t must hold {x_t.shape[0]} timesteps in [0, {T:g}]")
            return self.flow_velocity(x_t, (tf / T).to(x_t.device)).to(x_t.dtype)

        oracle.mixture = self
        oracle.prediction_type = "flow_prediction"
        return oracle

    def score_model(self) -> Callable:
        """`score(x, sigma)` of the data convolved with N(0, σ²I) (variance-exploding noise, as annealed Langevin
        uses it): ∇ log Σ_k w_k N(x; m_k, (s² + σ²)I). σ a float or a (n,) tensor."""

        def score(x: torch.Tensor, sigma) -> torch.Tensor:
            sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
            xf = x.detach().reshape(x.shape[0], -1).to(torch.float64)
            var = (self.std**2 + sig.reshape(-1, 1) ** 2).expand(xf.shape[0], 1)
            one = torch.ones_like(var)
            return (-(xf - self._mean_mix(xf, one, var)) / var).reshape(x.shape).to(x.dtype)

        score.mixture = self
        return score


# ---------------------------------------------------------------------------------------------------------------
# test helpers

def component_weights(samples: torch.Tensor, mixture: GaussianMixture):
    """Assign each sample to its most responsible component (under the data density) and count.

    Returns (weights, stderr): empirical weights ŵ_k (K,) float64 and their binomial standard errors
    √(w_k(1−w_k)/n), using the mixture's true w_k so that (ŵ − w)/stderr is a z-score.
    """
    labels = assign(samples, mixture)
    n = labels.numel()
    counts = torch.bincount(labels, minlength=mixture.K).to(torch.float64)
    w = mixture.weights
    return counts / n, (w * (1 - w) / n).sqrt()


def assign(samples: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """The most responsible component of each sample under the data density: (n,) int64 on the CPU."""
    return mixture.responsibilities(samples, 1.0).argmax(dim=1).cpu()


def component_moments(samples: torch.Tensor, mixture: GaussianMixture):
    """Per-component (count, mean (D,), variance per coordinate (D,)) of the samples assigned to each component.

    Returns three tensors: counts (K,), means (K, D), variances (K, D) (NaN for a component with < 2 samples).
    """
    labels = assign(samples, mixture)
    x = samples.detach().reshape(samples.shape[0], -1).to("cpu", torch.float64)
    K, D = mixture.K, mixture.D
    counts = torch.bincount(labels, minlength=K)
    means = torch.full((K, D), float("nan"), dtype=torch.float64)
    variances = torch.full((K, D), float("nan"), dtype=torch.float64)
    for k in range(K):
        xk = x[labels == k]
        if xk.shape[0] >= 1:
            means[k] = xk.mean(0)
        if xk.shape[0] >= 2:
            variances[k] = xk.var(0, unbiased=True)
    return counts, means, variances


def step_affine(plan, i: int, mixture: GaussianMixture):
    """For K = 1 data N(m, s²I), call i of a history-free plan (DDIM, DDPM, ...) maps x ↦ c_x·x + c_0 + σ·z exactly:
    (c_x, c_0 (D,), σ²).

    docs/math.md, "Exact oracle: Gaussian mixtures": x̂0 = A·x + B and ε̂ = C·x + E are affine for the exact oracle,
    so the model output o of the plan's prediction type is too, and so is the fused op's row
    y = yx·x + yo·o + yd·d + yz·z with d = p·x + q·o.
    """
    from fastdiff.ops.multistep import COEF

    if mixture.K != 1:
        raise ValueError(f"moment recursion needs a single Gaussian (K = 1), got K = {mixture.K}")
    c = plan.calls[i]
    if c.clip or c.threshold:
        raise ValueError("moment recursion: clipping / thresholding make the step non-affine")
    if c.var_mode != "scalar":
        raise ValueError("moment recursion: learned variances depend on a model output; use a fixed variance_type")
    if c.reads or c.d_slot is not None or c.y2_slot is not None or c.scale_in != 1.0:
        raise ValueError(f"moment recursion: {plan.sampler} keeps a history or rescales its input; the recursion "
                         "takes history-free plans in the model's scale (ddim, ddpm)")
    sig_ve = plan.sigmas[i]
    at = 1.0 / (1.0 + sig_ve * sig_ve)
    m, s2 = mixture.means[0], mixture.std**2
    a, sig2 = math.sqrt(at), 1.0 - at
    var = at * s2 + sig2
    A, B = a * s2 / var, m * (sig2 / var)  # x̂0 = A x + B
    C, E = (1 - a * A) / math.sqrt(sig2), -a * B / math.sqrt(sig2)  # ε̂ = (x − a x̂0)/σ
    pt, s = plan.options.get("prediction_type", "epsilon"), math.sqrt(sig2)
    vp = prediction.VP_PREDICTION_TYPES
    Ko, ko = prediction.target(pt, A, C, a, s, types=vp), prediction.target(pt, B, E, a, s, types=vp)  # o = Ko·x + ko
    k = {n: c.coef[j] for n, j in COEF.items()}
    Kd, kd = k["p"] + k["q"] * Ko, k["q"] * ko  # d = Kd·x + kd
    cx = k["yx"] + k["yo"] * Ko + k["yd"] * Kd
    c0 = k["yo"] * ko + k["yd"] * kd
    noise_var = k["yz"] ** 2 if c.noise else 0.0
    return cx, c0, noise_var


def moment_recursion(plan_or_schedule, mixture: GaussianMixture, *, kind: str = "ddim", steps: int | None = None,
                     eta: float = 0.0, mean0=0.0, var0: float = 1.0, **options):
    """Exact per-coordinate mean and variance of a sampler's x after each step, for K = 1 data N(m, s²I).

    M′ = c_x·M + c_0, V′ = c_x²·V + σ² (docs/math.md, "Exact oracle"),
    starting from x_T ~ N(mean0, var0·I) (the sampler's prior:
    N(0, I)). `plan_or_schedule`: a history-free plan (fastdiff.run.sampling.plan_for("ddim" or "ddpm", ...)) or a
    NoiseSchedule plus kind ("ddim"/"ddpm"), steps, eta and DDIM/DDPM options. Returns (M (N+1, D), V (N+1,))
    float64; row 0 is x_T.
    """
    from fastdiff.samplers.plan import SolverPlan
    from fastdiff.run.sampling import plan_for

    if isinstance(plan_or_schedule, SolverPlan):
        plan = plan_or_schedule
    else:
        if kind not in ("ddim", "ddpm"):
            raise ValueError(f"kind must be 'ddim' or 'ddpm', got {kind!r}")
        plan = plan_for(kind, plan_or_schedule, options, steps, eta)
    M = torch.zeros(plan.steps + 1, mixture.D, dtype=torch.float64)
    V = torch.zeros(plan.steps + 1, dtype=torch.float64)
    M[0] = _as_f64(mean0, "mean0")
    V[0] = float(var0)
    for i in range(plan.steps):
        cx, c0, nv = step_affine(plan, i, mixture)
        M[i + 1] = cx * M[i] + c0
        V[i + 1] = cx**2 * V[i] + nv
    return M, V
