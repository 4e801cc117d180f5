"""Timestep and σ grids of the σ-parameterised solvers, as diffusers' `set_timesteps` builds them.

σ_t = √((1 − ᾱ_t)/ᾱ_t) (the variance-exploding view of a variance-preserving schedule, Karras et al. 2022, §2 and
Song et al. 2021b). Every grid is computed twice: once from the float32 ᾱ table that diffusers builds (so the
*timesteps* handed to the model — which involve rounding and interpolation in σ — are exactly diffusers'), and once
from fastdiff's float64 ᾱ (so the *coefficients* are the exact formulas; diffusers keeps them in float32).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch


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
    """diffusers' leading/linspace/trailing timestep grids, descending: float32 for Euler/Heun, int64 for DPM/UniPC
    (plus_one) and for DDIM/DDPM (dtype=np.int64); every sampler's grid comes from here (and `timesteps`).

    plus_one: DPM-Solver/UniPC build N + 1 points and drop the last (linspace and leading); the others build N.
    """
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        if plus_one:
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if dtype == np.int64:  # DDIM/DDPM: rounded in float64
            return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        if plus_one:
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(dtype) + steps_offset
    if spacing == "trailing":
        ratio = T / n
        # NumPy fills arange as last + i·δ, δ = (last − T/N) − last; its float length may give an (N+1)-th entry ≈ 0
        # (timestep −1, e.g. T = 1000, N = 61): diffusers' DDIM/DDPM keep it, `timesteps` takes the first N
        ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64 if plus_one else dtype)
        return ts - 1
    raise ValueError(f"timestep_spacing must be one of ('linspace', 'leading', 'trailing'), got {spacing!r}")


SPACINGS = ("leading", "linspace", "trailing", "quad")


def timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """The descending grid of `steps` training timesteps (int64), as diffusers' `set_timesteps` builds it.

    leading:  t_i = i·⌊T/N⌋ + steps_offset;  linspace: round(linspace(0, T−1, N));
    trailing: round(T − i·T/N) − 1, i < N;  quad (DDIM paper, CIFAR-10): ⌊linspace(0, √(0.8T), N)²⌋.
    `quad` repeats small timesteps when N is large (50 steps of T = 1000 give 0, 0, 1, …): the repeats are dropped,
    with a warning that gives the number of steps actually taken (a repeated DDIM step with η = 0 is the identity).
    """
    T = num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, num_train_timesteps={T}], got {steps}")
    if spacing in ("leading", "linspace", "trailing"):
        ts = spaced_timesteps(T, steps, spacing, int(steps_offset), dtype=np.int64)[:steps]
    elif spacing == "quad":
        ts = np.unique((np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64))[::-1]
        if len(ts) != steps:
            warnings.warn(f"'quad' spacing repeats timesteps at steps={steps} (T={T}): the repeats are dropped, "
                          f"{len(ts)} steps remain", stacklevel=2)
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    ts = torch.from_numpy(np.ascontiguousarray(ts))
    if ts.numel() and (ts.max() >= T or ts.min() < 0):
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps outside [0, {T - 1}]")
    return ts


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


def exponential_sigmas(lo: float, hi: float, n: int) -> np.ndarray:
    """n σ's uniform in log σ from hi to lo (diffusers' use_exponential_sigmas)."""
    return np.exp(np.linspace(math.log(hi), math.log(lo), n))


def beta_sigmas(lo: float, hi: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """σ = lo + F⁻¹(1 − i/(n − 1))·(hi − lo), F the Beta(0.6, 0.6) CDF (Lee et al. 2024, "Beta Sampling is All You
    Need", arXiv 2407.12173; diffusers' use_beta_sigmas)."""
    try:
        from scipy.stats import beta as beta_dist
    except ImportError:  # pragma: no cover - scipy is a test dependency
        raise ImportError("use_beta_sigmas needs scipy (the Beta distribution's inverse CDF): pip install scipy") \
            from None
    return np.array([lo + beta_dist.ppf(u, alpha, beta) * (hi - lo) for u in 1 - np.linspace(0, 1, n)])


def spread(lo: float, hi: float, n: int, o: dict) -> np.ndarray | None:
    """n Karras / exponential / beta σ's from hi down to lo (whichever of use_karras_sigmas, use_exponential_sigmas,
    use_beta_sigmas `o` sets), or None when none is set."""
    if o.get("use_karras_sigmas"):
        return karras(lo, hi, n)
    if o.get("use_exponential_sigmas"):
        return exponential_sigmas(lo, hi, n)
    if o.get("use_beta_sigmas"):
        return beta_sigmas(lo, hi, n)
    return None


SPREADS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def check_spread(o: dict):
    on = [k for k in SPREADS if o.get(k)]
    if len(on) > 1:
        raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set, got "
                         f"{on}")


def vp(sigma: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) of the VP process at VE noise level σ: α = 1/√(σ²+1), σ_t = σ·α, λ = log(α/σ_t) = −log σ."""
    a = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return a, sigma * a, (-math.log(sigma) if sigma > 0 else math.inf)


def flow_vp(sigma: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) of the flow-matching path x = (1 − σ)·x0 + σ·ε (diffusers' use_flow_sigmas): α = 1 − σ,
    σ_t = σ, λ = log(α/σ) (+∞ at σ = 0, −∞ at σ = 1)."""
    a = 1.0 - sigma
    lam = math.inf if sigma <= 0 else (-math.inf if a <= 0 else math.log(a) - math.log(sigma))
    return a, sigma, lam


# ---------------------------------------------------------------------------------------------------------------
# The time grid as data: the model-call times of a sampler (and the σ's they stand for), built once and handed to
# any planner. `Grid` is what every plan function takes; `make_grid` builds the named grids, `custom_grid` the
# user's timesteps= / sigmas=.

TIME_GRIDS = ("logsnr", "exponential", "quadratic", "karras", "uniform")


class Grid:
    """N model-call times, descending: `timesteps` (the t the model sees, floats; whole numbers where the grid lies
    on the training timesteps) and `sigmas` (the VE noise level σ_t = √((1 − ᾱ_t)/ᾱ_t) of each, float64). The
    sampler appends its own final σ (0, or σ_min with final_sigmas_type="sigma_min") unless `final` gives it (a
    diffusers custom σ list ends with its own final σ; a partial grid keeps the full grid's)."""

    __slots__ = ("timesteps", "sigmas", "final")

    def __init__(self, timesteps, sigmas, final: float | None = None):
        self.timesteps = [float(t) for t in timesteps]
        self.sigmas = [float(s) for s in sigmas]
        self.final = None if final is None else float(final)

    def __len__(self):
        return len(self.timesteps)

    @property
    def integral(self) -> bool:
        """Every time a whole number (the discrete-time samplers then hand the model int64 timesteps)."""
        return all(float(t).is_integer() for t in self.timesteps)

    def key(self) -> tuple:
        return tuple(self.timesteps), tuple(self.sigmas), self.final

    def __repr__(self):
        return f"Grid({[round(t, 3) for t in self.timesteps]})"


def log_sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """log σ_t for t = 0 … T−1 in float64 (a zero-terminal-SNR schedule: diffusers' finite stand-in at T−1)."""
    a64, _ = abar_tables(schedule)
    return np.log(sigma_table(a64))


def sigma_at(schedule: NoiseSchedule, ts) -> np.ndarray:
    """σ at (possibly fractional) times t ∈ [0, T−1]: σ interpolated linearly between training timesteps, as
    diffusers maps custom timesteps to σ's (np.interp) and fastdiff.theory.toy's oracle reads a fractional t; exact at
    whole t."""
    a64, _ = abar_tables(schedule)
    s = sigma_table(a64)
    return np.interp(np.asarray(ts, dtype=np.float64), np.arange(len(s), dtype=np.float64), s)


def abar_at(schedule: NoiseSchedule, t: float) -> float:
    """ᾱ at a (possibly fractional) time: the float64 table at whole t, else 1/(1 + σ(t)²)."""
    t = float(t)
    if t.is_integer():
        host = schedule.__dict__.get("_abar_host")
        if host is None:  # one host copy of the table per schedule (no tensor op per lookup)
            host = schedule.__dict__["_abar_host"] = schedule.alphas_cumprod.tolist()
        return host[int(t)]
    s = float(sigma_at(schedule, [t])[0])
    return 1.0 / (1.0 + s * s)


def times_for_sigmas(schedule: NoiseSchedule, sigmas) -> np.ndarray:
    """The fractional time of each σ: the inverse of `sigma_at` (σ_t increases with t)."""
    a64, _ = abar_tables(schedule)
    s = sigma_table(a64)
    return np.interp(np.asarray(sigmas, dtype=np.float64), s, np.arange(len(s), dtype=np.float64))


def make_grid(schedule: NoiseSchedule, steps: int, name: str, *, t_max: float | None = None, t_min: float = 0.0,
              rho: float = 7.0) -> Grid:
    """A model-blind grid of `steps` call times from t_max (default T − 1) down to t_min (default 0):

        logsnr       uniform in λ = log(α/σ) = −log σ (= diffusers' "exponential" σ's: uniform in log σ)
        exponential  the same grid, under diffusers' name
        quadratic    t_i = t_min + (t_max − t_min)·(1 − i/(N−1))², dense near the data (Song et al. 2021, DDIM §D.2)
        karras       σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7 (Karras et al. 2022, eq. 5)
        uniform      t uniform from t_max to t_min (unlike diffusers' linspace, the last call is at t_min)
    """
    T = len(schedule)
    if name not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {TIME_GRIDS}, got {name!r}")
    t_max = float(T - 1 if t_max is None else t_max)
    if not 0 <= t_min <= t_max <= T - 1:
        raise ValueError(f"time_grid: need 0 <= t_min <= t_max <= {T - 1}, got t_min={t_min}, t_max={t_max}")
    if steps == 1:
        return custom_grid(schedule, timesteps=[t_max])
    u = np.linspace(0.0, 1.0, steps)
    if name == "uniform":
        ts = t_max + u * (t_min - t_max)
    elif name == "quadratic":
        ts = t_min + (t_max - t_min) * (1.0 - u) ** 2
    else:
        s_hi, s_lo = sigma_at(schedule, [t_max, t_min])
        if name == "karras":
            sig = karras(float(s_lo), float(s_hi), steps, rho)
        else:
            sig = np.exp(np.log(s_hi) + u * (np.log(s_lo) - np.log(s_hi)))
        ts = times_for_sigmas(schedule, sig)
        ts[0], ts[-1] = t_max, t_min  # exact ends (the interpolation round-trips to ~1e-12)
    return custom_grid(schedule, timesteps=ts)


def vector(name: str, v) -> np.ndarray:
    """A user's 1-D sequence of numbers (list, array, tensor) as float64 NumPy; errors name the argument."""
    if torch.is_tensor(v):
        v = v.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(v).__name__}") from None
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(arr.shape)}")
    return arr


def custom_grid(schedule: NoiseSchedule, timesteps=None, sigmas=None) -> Grid:
    """A user's grid: `timesteps` (model-call times in [0, T−1], fractional allowed, σ's by `sigma_at`) or `sigmas`
    (VE noise levels within the schedule's range, used as given; the model sees the times `sigma_to_t` gives, as in
    diffusers' σ samplers), strictly decreasing; errors name the argument."""
    T = len(schedule)
    if (timesteps is None) == (sigmas is None):
        raise ValueError("pass exactly one of timesteps= and sigmas=")
    name = "timesteps" if timesteps is not None else "sigmas"
    arr = vector(name, timesteps if timesteps is not None else sigmas)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if arr.size > 1 and not (np.diff(arr) < 0).all():
        k = int(np.argmax(np.diff(arr) >= 0))
        raise ValueError(f"{name} must be strictly decreasing (no repeats): {name}[{k}] = {arr[k]:g}, "
                         f"{name}[{k + 1}] = {arr[k + 1]:g}")
    if timesteps is not None:
        if arr[0] > T - 1 or arr[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {T - 1}] (num_train_timesteps = {T}), got "
                             f"[{arr[-1]:g}, {arr[0]:g}]")
        return Grid(arr, sigma_at(schedule, arr))
    ls = log_sigma_table(schedule)
    lo, hi = math.exp(ls[0]), math.exp(ls[-1])
    if arr[-1] < lo * (1 - 1e-9) or arr[0] > hi * (1 + 1e-9):
        raise ValueError(f"sigmas must lie in the schedule's range [{lo:.6g}, {hi:.6g}], got [{arr[-1]:g}, {arr[0]:g}]")
    # the model sees the time diffusers' σ samplers give it (sigma_to_t: log σ interpolated); the σ's stay as given
    return Grid(np.clip(sigma_to_t(arr, ls), 0, T - 1), arr)
