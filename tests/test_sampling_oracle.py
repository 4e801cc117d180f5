"""Samplers against the exact Gaussian-mixture oracle (REFERENCE.md): no training error, only the sampler's own."""
import math

import pytest
import torch

import fastdiff
from fastdiff.sampling import make_plan, resolve_schedule
from fastdiff.toy import GaussianMixture, component_weights, moment_recursion

pytestmark = pytest.mark.usefixtures("one_thread")  # small float64 tensors (tests/conftest.py)

SCHED = fastdiff.NoiseSchedule.linear()
N = 20000


def _sample(kind, mix, steps, eta=0.0, seed=0, n=N, **opts):
    g = torch.Generator().manual_seed(seed)
    model = mix.model(SCHED, opts.get("prediction_type", "epsilon"))
    if kind == "ddim":
        return fastdiff.ddim_sample(model, steps, shape=(n, mix.D), schedule=SCHED, eta=eta, generator=g,
                                    dtype=torch.float64, **opts)
    return fastdiff.ddpm_sample(model, steps=steps, shape=(n, mix.D), schedule=SCHED, generator=g,
                                dtype=torch.float64, **opts)


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
    """K = 1: every step is affine + Gaussian, so the sample mean and variance follow M′ = c_x·M + c_0,
    V′ = c_x²·V + σ² exactly. Check the final moments within 4 standard errors (mean) / 4 SE of a variance."""
    mix = GaussianMixture([1.0], [[1.5, -0.5, 0.0]], std=0.4)
    x = _sample(kind, mix, steps, eta, seed=steps, **opts)
    _, opts_ = resolve_schedule(SCHED, opts)[:2]
    M, V = moment_recursion(make_plan(kind, SCHED, opts_, steps, eta), mix)
    se_mean = math.sqrt(V[-1] / N)
    assert (x.mean(0) - M[-1]).abs().max() < 4 * se_mean, (x.mean(0), M[-1])
    se_var = V[-1] * math.sqrt(2 / (N - 1))
    assert (x.var(0) - V[-1]).abs().max() < 4 * se_var, (x.var(0), V[-1])
    # and the recursion's end point is the data distribution, up to the sampler's discretization error
    assert (M[-1] - mix.means[0]).abs().max() < 0.2


def test_k1_ddim_eta0_is_the_affine_map_exactly():
    """η = 0: x_0 = (∏c_x)·x_T + const per sample; the mean recursion from each x_T gives it to float64 rounding."""
    mix = GaussianMixture([1.0], [[0.7, -1.2]], std=0.3)
    xT = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = fastdiff.ddim_sample(mix.model(SCHED), 17, x_T=xT, schedule=SCHED)
    _, opts, _ = resolve_schedule(SCHED, {})
    plan = make_plan("ddim", SCHED, opts, 17, 0.0)
    for j in range(0, 64, 9):
        M, V = moment_recursion(plan, mix, mean0=xT[j], var0=0.0)
        assert V[-1] == 0.0
        torch.testing.assert_close(got[j], M[-1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,steps,n", [("ddpm", 1000, 10000), ("ddim", 50, N)])
def test_k3_many_step_samplers_reproduce_weights(kind, steps, n):
    mix = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], std=0.35)
    x = _sample(kind, mix, steps, seed=2, n=n)
    w, se = component_weights(x, mix)
    z = (w - mix.weights) / se
    assert z.abs().max() < 3, f"weights {w.tolist()} vs {mix.weights.tolist()}: z = {z.tolist()}"
