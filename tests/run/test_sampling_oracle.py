"""Samplers against the exact Gaussian-mixture oracle: no training error, only the sampler's own.

The expectations are computed here, independently of the product: the β schedule, the timestep grid and every
per-step coefficient come from the papers' formulas in float64 NumPy (Ho et al. 2020 eq. 4, 6-7; Song et al. 2021
eq. 12, 16; diffusers' grid conventions), never from fastdiff.run.sampling.make_plan or fastdiff.theory.toy.moment_recursion.
For K = 1 data N(m, s²I) the exact model makes each step affine + Gaussian, x' = c_x·x + c_0 + σ·z, so the mean and
variance of the samples follow M' = c_x·M + c_0, V' = c_x²·V + σ² exactly.
"""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.theory.toy import GaussianMixture, component_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # small float64 tensors (tests/conftest.py)

T = 1000
SCHED = fastdiff.NoiseSchedule.linear()
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # Ho et al.'s linear β in float64
N = 20000


def abar_of(name, T=1000, beta_start=None, beta_end=None):
    """ᾱ of the named β schedules in float64 (Ho et al. 2020 linear; Stable Diffusion's scaled_linear; Nichol &
    Dhariwal 2021 eq. 17 cosine with s = 0.008 and β clipped at 0.999)."""
    if name == "linear":
        b = np.linspace(1e-4 if beta_start is None else beta_start, 0.02 if beta_end is None else beta_end, T)
    elif name == "scaled_linear":
        b = np.linspace(np.sqrt(beta_start or 0.00085), np.sqrt(beta_end or 0.012), T) ** 2
    else:
        f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        b = np.minimum(1 - f(np.arange(1, T + 1)) / f(np.arange(T)), 0.999)
    return np.cumprod(1.0 - b)


def grid(steps, spacing="leading", T=T):
    """diffusers' set_timesteps grids, descending."""
    if spacing == "leading":
        return (np.arange(steps) * (T // steps))[::-1]
    if spacing == "trailing":
        return np.round(T - np.arange(steps) * (T / steps)).astype(np.int64) - 1
    return np.round(np.linspace(0, T - 1, steps))[::-1].astype(np.int64)


def affine_steps(kind, steps, eta=0.0, m=0.0, s2=1.0, spacing="leading", variance_type="fixed_small", abar=ABAR):
    """[(c_x, c_0, σ²)] of each step for data N(m, s²): the exact x̂0 = m + √ᾱ·s²/(ᾱs² + 1 − ᾱ)·(x − √ᾱ·m)."""
    ts = grid(steps, spacing, len(abar))
    out = []
    for i, t in enumerate(ts):
        at = abar[t]
        ap = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0  # set_alpha_to_one (DDIM default), and DDPM's last step
        vt = at * s2 + 1 - at
        A, B = math.sqrt(at) * s2 / vt, m * (1 - at) / vt  # x̂0 = A·x + B
        C, E = (1 - math.sqrt(at) * A) / math.sqrt(1 - at), -math.sqrt(at) * B / math.sqrt(1 - at)  # ε̂ = C·x + E
        if kind == "ddim":
            sig2 = eta**2 * (1 - ap) / (1 - at) * (1 - at / ap)
            d = math.sqrt(max(1 - ap - sig2, 0.0))
            out.append((math.sqrt(ap) * A + d * C, math.sqrt(ap) * B + d * E, sig2))
        else:
            beta = 1 - at / ap
            k0, kt = math.sqrt(ap) * beta / (1 - at), math.sqrt(1 - beta) * (1 - ap) / (1 - at)
            var = (1 - ap) / (1 - at) * beta if variance_type == "fixed_small" else beta
            out.append((k0 * A + kt, k0 * B, var if t > 0 else 0.0))  # no noise at t = 0
    return out


def moments(kind, steps, eta, m, s2, mean0=0.0, var0=1.0, **kw):
    M, V = np.asarray(mean0, dtype=np.float64), var0
    for cx, c0, sig2 in affine_steps(kind, steps, eta, m, s2, **kw):
        M, V = cx * M + c0, cx**2 * V + sig2
    return M, V


def _sample(kind, mix, steps, eta=0.0, seed=0, n=N, **opts):
    g = torch.Generator().manual_seed(seed)
    model = mix.model(SCHED, opts.get("prediction_type", "epsilon"))
    if kind == "ddim":
        return fastdiff.ddim_sample(model, steps, shape=(n, mix.D), schedule=SCHED, eta=eta, generator=g,
                                    dtype=torch.float64, **opts)
    return fastdiff.ddpm_sample(model, steps=steps, shape=(n, mix.D), schedule=SCHED, generator=g,
                                dtype=torch.float64, **opts)


def test_schedule_and_grids_match_the_formulas():
    """The product's schedule and grids equal the ones this file uses (else the oracle below tests nothing)."""
    np.testing.assert_allclose(SCHED.alphas_cumprod.numpy(), ABAR, rtol=1e-12)
    for steps in (1, 5, 13, 20, 50, 1000):
        for spacing in ("leading", "trailing", "linspace"):
            assert SCHED.timesteps(steps, spacing).tolist() == grid(steps, spacing).tolist(), (steps, spacing)


CASES = [  # (kind, steps, eta, options): several step counts, both samplers, every prediction type
    ("ddim", 5, 0.0, {}),
    ("ddim", 20, 1.0, {}),
    ("ddim", 50, 0.5, {"prediction_type": "v_prediction"}),
    ("ddpm", 10, 0.0, {"variance_type": "fixed_large"}),
    ("ddpm", 100, 0.0, {"prediction_type": "sample"}),
    ("ddim", 13, 0.3, {"timestep_spacing": "trailing"}),
]


@pytest.mark.parametrize("kind,steps,eta,opts", CASES)
def test_k1_moment_recursion(kind, steps, eta, opts):
    """K = 1: the final sample mean and variance within 4 standard errors (mean: √(V/N); variance: V·√(2/(N−1)),
    the final law being Gaussian) of the recursion computed above."""
    mean, std = np.array([1.5, -0.5, 0.0]), 0.4
    mix = GaussianMixture([1.0], [mean.tolist()], std=std)
    x = _sample(kind, mix, steps, eta, seed=steps, **opts)
    kw = dict(spacing=opts.get("timestep_spacing", "leading"), variance_type=opts.get("variance_type", "fixed_small"))
    M, V = moments(kind, steps, eta, mean, std**2, **kw)
    se_mean = math.sqrt(V / N)
    assert np.abs(x.mean(0).numpy() - M).max() < 4 * se_mean, (x.mean(0), M)
    se_var = V * math.sqrt(2 / (N - 1))
    assert np.abs(x.var(0).numpy() - V).max() < 4 * se_var, (x.var(0), V)
    # and the recursion's end point is the data distribution, up to the sampler's discretization error
    assert np.abs(M - mean).max() < 0.2


@pytest.mark.parametrize("steps,spacing", [(17, "leading"), (10, "trailing"), (7, "linspace"), (1, "leading")])
def test_k1_ddim_eta0_is_the_affine_map_exactly(steps, spacing):
    """η = 0: x_0 = (∏c_x)·x_T + const per sample; the recursion from each x_T (variance 0) gives it to float64
    rounding, so any change to the grid, ᾱ_p or a coefficient shows."""
    mean, std = np.array([0.7, -1.2]), 0.3
    mix = GaussianMixture([1.0], [mean.tolist()], std=std)
    xT = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = fastdiff.ddim_sample(mix.model(SCHED), steps, x_T=xT, schedule=SCHED, timestep_spacing=spacing)
    for j in range(0, 64, 9):
        M, V = moments("ddim", steps, 0.0, mean, std**2, mean0=xT[j].numpy(), var0=0.0, spacing=spacing)
        assert V == 0.0
        np.testing.assert_allclose(got[j].numpy(), M, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,steps,n", [("ddpm", 1000, 10000), ("ddim", 50, N)])
def test_k3_many_step_samplers_reproduce_weights(kind, steps, n):
    mix = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], std=0.35)
    x = _sample(kind, mix, steps, seed=2, n=n)
    w, se = component_weights(x, mix)
    z = (w - mix.weights) / se
    assert z.abs().max() < 3, f"weights {w.tolist()} vs {mix.weights.tolist()}: z = {z.tolist()}"
