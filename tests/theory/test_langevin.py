"""fastdiff.langevin_sample: annealed Langevin dynamics with the exact Gaussian-mixture score."""
import math

import pytest
import torch

import fastdiff
from fastdiff.theory import toy
from fastdiff.theory.langevin import langevin_sample, score_from_eps, vp_levels
from fastdiff.schedule import NoiseSchedule

MIX = toy.GaussianMixture([0.2, 0.3, 0.5], [[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]], 0.3)




def test_score_from_eps_is_the_exact_score():
    sched = NoiseSchedule.linear()
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    score = score_from_eps(MIX.model(sched), sched)
    for t in (0, 37, 500, 999):
        torch.testing.assert_close(score(x, t), MIX.score(x, float(sched.alphas_cumprod[t])), rtol=1e-12, atol=1e-12)


def test_weights_ve_levels(one_thread):
    # NCSN setting: σ from 8 to 0.1 (10 geometric levels), 300 steps per level, α_i = ε·σ_i²/σ_L² with ε = 0.2·σ_L².
    # Measured: z-scores of the three weights (−0.67, 0.71, −0.11) at n = 5000; too few steps per level
    # (e.g. 100 at ε = 0.02·σ_L²) leaves them biased towards equal weights (|z| up to 11).
    n = 5000
    sig = torch.logspace(math.log10(8.0), -1.0, 10).tolist()
    x = langevin_sample(MIX.score_model(), sig, 300, 0.2 * sig[-1] ** 2, shape=(n, 2),
                        generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w, se = toy.component_weights(x, MIX)
    assert ((w - MIX.weights).abs() <= 3 * se).all(), ((w - MIX.weights) / se)
    counts, means, var = toy.component_moments(x, MIX)
    torch.testing.assert_close(means, MIX.means, rtol=0, atol=0.05)
    # p_σL = data ∗ N(0, σ_L²): per-coordinate variance s² + σ_L² = 0.1 (ULA with a finite step inflates it a bit)
    assert ((var - 0.1).abs() < 0.015).all(), var


@pytest.mark.slow  # ~15 s alone, 10⁴ steps; test_weights_ve_levels is the fast check of the same property
def test_weights_eps_oracle_vp_levels(one_thread):
    # A noise-prediction model through ε = −σ·∇log p: the exact ε-oracle on its own timesteps (20 VP levels).
    # Measured: z = (1.1, 0.71, −1.53) at n = 5000.
    n = 5000
    sched = NoiseSchedule.linear()
    ts, sg = vp_levels(sched, 20, t_min=5)
    x = langevin_sample(score_from_eps(MIX.model(sched), sched), sg, 500, 0.1 * sg[-1] ** 2, levels=ts.tolist(),
                        x_init=torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                        generator=torch.Generator().manual_seed(0))
    w, se = toy.component_weights(x, MIX)
    assert ((w - MIX.weights).abs() <= 3 * se).all(), ((w - MIX.weights) / se)


def test_gaussian_stationary_variance(one_thread):
    # One level, K = 1 in 1-D: ULA on N(m, v) has the exact stationary variance v/(1 − α/(4v)); check mean/variance.
    one = toy.GaussianMixture([1.0], [[1.5]], 0.5)
    sigma, n, alpha = 0.5, 10000, 0.05  # target N(1.5, 0.5) since s² + σ² = 0.5; relaxes in ~2v/α = 20 steps
    x = langevin_sample(one.score_model(), [sigma], 200, alpha, x_init=torch.zeros(n, 1, dtype=torch.float64),
                        generator=torch.Generator().manual_seed(2))
    v_exact = 0.5 / (1 - alpha / (4 * 0.5))
    assert abs(x.mean().item() - 1.5) < 4 * math.sqrt(v_exact / n)
    assert abs(x.var().item() - v_exact) < 4 * v_exact * math.sqrt(2 / n)


def test_bad_input_names_argument():
    s = MIX.score_model()
    with pytest.raises(ValueError, match="sigmas"):
        langevin_sample(s, [0.1, 1.0], 10, 1e-3, shape=(4, 2))
    with pytest.raises(ValueError, match="steps_per_level"):
        langevin_sample(s, [1.0], 0, 1e-3, shape=(4, 2))
    with pytest.raises(ValueError, match="step_size"):
        langevin_sample(s, [1.0], 10, -1.0, shape=(4, 2))
    with pytest.raises(ValueError, match="shape"):
        langevin_sample(s, [1.0], 10, 1e-3)
    with pytest.raises(ValueError, match="levels"):
        langevin_sample(s, [1.0, 0.5], 10, 1e-3, shape=(4, 2), levels=[3])


def test_exported():
    assert fastdiff.langevin_sample is langevin_sample
