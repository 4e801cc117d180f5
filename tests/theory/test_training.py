import pytest
import torch

import fastdiff
from fastdiff.theory.training import elbo_weights


def test_q_sample_formula_and_statistics():
    s = fastdiff.NoiseSchedule.linear()
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 300)
    g = torch.Generator().manual_seed(0)
    xt = fastdiff.q_sample(x0, t, s, generator=g)
    a = float(s.alphas_cumprod[300])
    assert abs(xt.mean().item() - 2.0 * a**0.5) < 4 * (1 - a) ** 0.5 / 20000**0.5
    assert abs(xt.var().item() - (1 - a)) < 0.03
    z = torch.randn(3, 2)
    torch.testing.assert_close(fastdiff.q_sample(x0[:3].expand(3, 2), t[:3], s, noise=z),
                               a**0.5 * 2.0 + (1 - a) ** 0.5 * z)


def test_training_loss_targets():
    s = fastdiff.NoiseSchedule.linear(100)
    x0 = torch.randn(4, 3)
    z = torch.randn(4, 3)
    t = torch.tensor([0, 10, 50, 99])
    perfect = lambda xt, tt: z  # noqa: E731
    assert fastdiff.training_loss(perfect, x0, s, t=t, noise=z).item() == 0.0
    assert fastdiff.training_loss(lambda xt, tt: x0, x0, s, t=t, noise=z, prediction_type="sample").item() == 0.0
    a = s.alphas_cumprod[t].float().unsqueeze(1)
    v = a.sqrt() * z - (1 - a).sqrt() * x0
    assert fastdiff.training_loss(lambda xt, tt: v, x0, s, t=t, noise=z, prediction_type="v_prediction") < 1e-12
    zero = lambda xt, tt: torch.zeros_like(xt)  # noqa: E731
    assert torch.isclose(fastdiff.training_loss(zero, x0, s, t=t, noise=z), (z**2).mean())


def test_elbo_weights():
    s = fastdiff.NoiseSchedule.linear()
    w = elbo_weights(s)
    b, a, abar = s.betas, s.alphas, s.alphas_cumprod
    t = 500
    var = (1 - abar[t - 1]) / (1 - abar[t]) * b[t]
    assert torch.isclose(w[t], b[t] ** 2 / (2 * var * a[t] * (1 - abar[t])))
    assert torch.isfinite(w).all() and (w > 0).all()
    z = torch.randn(2, 3)
    tt = torch.tensor([10, 500])
    zero = lambda xt, t_: torch.zeros_like(xt)  # noqa: E731
    got = fastdiff.training_loss(zero, torch.randn(2, 3), s, t=tt, noise=z, weighting="elbo")
    want = ((z**2).mean(1) * w[tt].float()).mean()
    assert torch.isclose(got, want)


def test_training_loss_bad_input():
    s = fastdiff.NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="weighting"):
        fastdiff.training_loss(lambda x, t: x, torch.randn(2, 2), s, weighting="vlb")
    with pytest.raises(ValueError, match="t must be"):
        fastdiff.training_loss(lambda x, t: x, torch.randn(2, 2), s, t=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="model output"):
        fastdiff.training_loss(lambda x, t: x[:1], torch.randn(2, 2), s)
