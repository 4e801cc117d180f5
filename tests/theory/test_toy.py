"""fastdiff.theory.toy: the exact Gaussian-mixture oracle, its test helpers and the K = 1 moment recursion."""
import math

import pytest
import torch

import fastdiff
from fastdiff.theory import toy
from fastdiff.schedule import NoiseSchedule

ABARS = [1e-6, 0.01, 0.3, 0.9, 0.9999, 1.0]


@pytest.fixture(scope="module")
def mix():
    return toy.GaussianMixture([0.2, 0.3, 0.5], [[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]], 0.3)


def _x(n=64, D=2, seed=0, scale=3.0):
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("abar", ABARS)
def test_eps_matches_autograd_score(mix, abar):
    # ε* = −σ·∇log q_t, the gradient taken by autograd through log_prob: agreement to ~1e-12 relative, float64.
    x = _x().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, abar).sum(), x)
    scale = grad.abs().max().item()
    assert (mix.score(x.detach(), abar) - grad).abs().max().item() <= 1e-12 * max(scale, 1.0)
    sigma = math.sqrt(1 - abar)
    assert (mix.eps(x.detach(), abar) + sigma * grad).abs().max().item() <= 1e-12 * max(sigma * scale, 1.0)


def test_log_prob_against_direct_density(mix):
    # ᾱ-marginal Σ w_k N(a m_k, v I), written out with explicit exp (fine in float64 at these moderate distances).
    x, abar = _x(seed=1), 0.5
    a, v = math.sqrt(abar), 0.5 * mix.std**2 + 0.5
    d2 = ((x[:, None] - a * mix.means[None]) ** 2).sum(-1)
    dens = (mix.weights * torch.exp(-d2 / (2 * v)) / (2 * math.pi * v)).sum(1)
    torch.testing.assert_close(mix.log_prob(x, abar), dens.log(), rtol=1e-12, atol=1e-12)


def test_predictors_consistent_and_per_row_abar(mix):
    x = _x(seed=2)
    abar = torch.linspace(0.05, 0.95, x.shape[0], dtype=torch.float64)
    a, s = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    eps, x0, v = mix.eps(x, abar), mix.x0(x, abar), mix.v(x, abar)
    torch.testing.assert_close(x0, (x - s * eps) / a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, a * eps - s * x0, rtol=1e-12, atol=1e-12)
    for i in (0, 17, 63):  # a per-row ᾱ equals the scalar call on that row
        torch.testing.assert_close(mix.eps(x[i:i + 1], float(abar[i])), eps[i:i + 1], rtol=0, atol=1e-14)


def test_stable_far_from_modes_and_at_extremes(mix):
    # Naive exp(−d²/2v) underflows to 0/0 here; log-sum-exp stays finite.
    x = torch.tensor([[1e3, -1e3], [40.0, 40.0]], dtype=torch.float64)
    for abar in (0.0, 1e-12, 0.999999, 1.0):
        for f in (mix.eps, mix.x0, mix.v, mix.log_prob, mix.score):
            assert torch.isfinite(f(x, abar)).all(), (f.__name__, abar)
    # ᾱ = 0: x_t is pure noise, x̂0 is the prior mean and ε* = x. (Logits of size ~1e6 − their log-sum-exp lose
    # ~1e-10 to rounding: the responsibilities are right to that, not to 1e-16.)
    torch.testing.assert_close(mix.x0(x, 0.0), (mix.weights @ mix.means).expand(2, 2), rtol=0, atol=1e-9)
    torch.testing.assert_close(mix.eps(x, 0.0), x, rtol=0, atol=1e-12)


def test_bad_input_names_argument(mix):
    with pytest.raises(ValueError, match="weights"):
        toy.GaussianMixture([0.5, -0.5], [[0.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="means"):
        toy.GaussianMixture([1.0, 1.0], [[0.0]], 1.0)
    with pytest.raises(ValueError, match="std"):
        toy.GaussianMixture([1.0], [[0.0]], 0.0)
    with pytest.raises(ValueError, match="abar"):
        mix.eps(_x(), 1.5)
    with pytest.raises(ValueError, match="elements per row"):
        mix.eps(torch.zeros(3, 5, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        mix.model(NoiseSchedule.linear(10), "score")


def test_sample_weights_and_moments(mix):
    x, labels = mix.sample(20000, generator=torch.Generator().manual_seed(3), return_labels=True)
    assert x.shape == (20000, 2) and x.dtype == torch.float64
    w, se = toy.component_weights(x, mix)
    assert ((w - mix.weights).abs() <= 3 * se).all(), (w, mix.weights)
    assert (toy.assign(x, mix) == labels).float().mean() > 0.999  # well separated: nearly every label recovered
    counts, means, var = toy.component_moments(x, mix)
    assert counts.sum() == 20000
    torch.testing.assert_close(means, mix.means, rtol=0, atol=0.02)
    torch.testing.assert_close(var, torch.full_like(var, mix.std**2), rtol=0.06, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_oracle_model_drives_samplers(mix, prediction_type):
    sched = NoiseSchedule.linear()
    model = mix.model(sched, prediction_type)
    out = model(torch.zeros(4, 2, dtype=torch.float32), torch.tensor([0, 10, 500, 999]))
    assert out.shape == (4, 2) and out.dtype == torch.float32
    x = fastdiff.ddim_sample(model, 50, shape=(6000, 2), generator=torch.Generator().manual_seed(4),
                             dtype=torch.float64, prediction_type=prediction_type)
    w, se = toy.component_weights(x, mix)
    assert ((w - mix.weights).abs() <= 3 * se).all(), (w, mix.weights)


@pytest.mark.parametrize("kind,kw", [("ddim", dict(eta=0.0)), ("ddim", dict(eta=0.7)),
                                     ("ddpm", dict(variance="fixed_small")), ("ddpm", dict(variance="fixed_large"))])
def test_moment_recursion_matches_sampler(kind, kw):
    # K = 1: every step is affine + Gaussian; the sample mean/variance must follow the exact recursion.
    sched = NoiseSchedule.linear()
    one = toy.GaussianMixture([1.0], [[1.0, -2.0]], 0.5)
    n, steps = 40000, 10
    opts = {"variance_type": kw["variance"]} if kind == "ddpm" else {}
    M, V = toy.moment_recursion(sched, one, kind=kind, steps=steps, eta=kw.get("eta", 0.0), **opts)
    assert M.shape == (steps + 1, 2) and V.shape == (steps + 1,)
    fn = fastdiff.ddim_sample if kind == "ddim" else fastdiff.ddpm_sample
    x = fn(one.model(sched), steps=steps, shape=(n, 2), generator=torch.Generator().manual_seed(5),
           dtype=torch.float64, **kw)
    mean_se = (V[-1] / n).sqrt()
    var_se = V[-1] * math.sqrt(2 / (n - 1))
    assert ((x.mean(0) - M[-1]).abs() <= 4 * mean_se).all(), (x.mean(0), M[-1])
    assert ((x.var(0) - V[-1]).abs() <= 4 * var_se).all(), (x.var(0), V[-1])


def test_moment_recursion_deterministic_ddim_exact():
    # η = 0 and a deterministic x_T: the recursion is the sampler, to float64 rounding, at every step.
    sched = NoiseSchedule.cosine(200)
    one = toy.GaussianMixture([1.0], [[0.7]], 0.2)
    xT = torch.tensor([[-1.3], [0.0], [2.1]], dtype=torch.float64)
    traj = []
    fastdiff.ddim_sample(one.model(sched), 7, x_T=xT, schedule=sched, callback=lambda d: traj.append(d["x_prev"]))
    for x0 in xT[:, 0].tolist():
        M, V = toy.moment_recursion(sched, one, kind="ddim", steps=7, mean0=x0, var0=0.0)
        assert V.abs().max() == 0
        row = [float(t[xT[:, 0].tolist().index(x0), 0]) for t in traj]
        torch.testing.assert_close(M[1:, 0], torch.tensor(row, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # More steps, closer to the data law N(0.7, 0.04): the discretization error
    # (docs/math.md, "Discretization error vs steps"), exactly.
    lin = NoiseSchedule.linear()
    err = []
    for steps in (10, 100, 1000):
        M, V = toy.moment_recursion(lin, one, kind="ddim", steps=steps)
        err.append(abs(V[-1].item() - 0.04) + abs(M[-1, 0].item() - 0.7))
    assert err[0] > err[1] > err[2] and err[2] < 1.5e-3, err


def test_moment_recursion_rejects_mixtures(mix):
    with pytest.raises(ValueError, match="K = 1"):
        toy.moment_recursion(NoiseSchedule.linear(20), mix, steps=5)
