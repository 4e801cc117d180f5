"""Sampler API: shapes, callbacks, options from diffusers, and clear errors on bad input."""
import math

import pytest
import torch

import fastdiff
from fastdiff.ops.multistep import COEF
from fastdiff.ops.sampler_step import ddim_step_ref, ddpm_step_ref
from fastdiff.run.sampling import plan_for


def eps_model(x, t):
    return 0.1 * x + 0.01 * t.float().reshape(-1, *([1] * (x.dim() - 1))) / 1000


def test_any_sample_shape_and_callback():
    seen = []
    x = fastdiff.ddim_sample(eps_model, 5, shape=(3, 7), generator=torch.Generator().manual_seed(0),
                             callback=seen.append)
    assert x.shape == (3, 7) and len(seen) == 5
    assert [d["i"] for d in seen] == list(range(5))
    assert seen[0]["t"] == 800 and seen[-1]["t"] == 0
    assert torch.equal(seen[-1]["x_prev"], x)
    for a, b in zip(seen, seen[1:]):
        assert torch.equal(a["x_prev"], b["x"])
    assert seen[-1]["x0"].shape == (3, 7)


def test_x_T_and_seed_reproducible():
    g = torch.Generator().manual_seed(7)
    xT = torch.randn(2, 3, 4, 4, generator=g)
    a = fastdiff.ddpm_sample(eps_model, steps=10, x_T=xT, generator=torch.Generator().manual_seed(1))
    b = fastdiff.ddpm_sample(eps_model, steps=10, x_T=xT, generator=torch.Generator().manual_seed(1))
    c = fastdiff.ddpm_sample(eps_model, steps=10, x_T=xT, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_eta_zero_is_deterministic_and_draws_no_noise():
    g = torch.Generator().manual_seed(0)
    xT = torch.randn(2, 5)
    state = g.get_state()
    fastdiff.ddim_sample(eps_model, 8, x_T=xT, generator=g)
    assert torch.equal(g.get_state(), state)  # η = 0 draws nothing


def test_shape_inferred_from_model_config():
    class M(torch.nn.Module):
        class config:  # noqa: N801
            in_channels, sample_size = 2, 6

        def forward(self, x, t):
            return torch.zeros_like(x)

    assert fastdiff.ddim_sample(M(), 3).shape == (1, 2, 6, 6)
    M.config.sample_size = (4, 6)  # diffusers allows an (H, W) pair
    assert fastdiff.ddim_sample(M(), 3).shape == (1, 2, 4, 6)
    del M.config.sample_size
    with pytest.raises(ValueError, match="shape"):
        fastdiff.ddim_sample(M(), 3)


def test_ddim_eta1_clipped_equals_ddpm_fixed_small():
    """docs/math.md, "DDIM": η = 1 with the clipped model output is DDPM's fixed_small posterior (same noise)."""
    x = torch.randn(4, 6, dtype=torch.float64)
    o = torch.randn(4, 6, dtype=torch.float64)
    z = torch.randn(4, 6, dtype=torch.float64)
    for at, ap in ((0.3, 0.5), (0.01, 0.2), (0.9, 0.95)):
        a, _ = ddim_step_ref(x, o, at, ap, eta=1.0, noise=z, use_clipped_model_output=True)
        b, _ = ddpm_step_ref(x, o, at, ap, noise=z, variance_type="fixed_small")
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ddpm_eps_closed_form():
    """With ε-prediction and no clipping, μ̃ = (x_t − β′/√(1−ᾱ_t)·ε̂)/√α′ (Ho et al. eq. 11)."""
    x = torch.randn(3, 4, dtype=torch.float64)
    e = torch.randn(3, 4, dtype=torch.float64)
    at, ap = 0.2, 0.3
    b, a = 1 - at / ap, at / ap
    got, _ = ddpm_step_ref(x, e, at, ap)
    torch.testing.assert_close(got, (x - b / math.sqrt(1 - at) * e) / math.sqrt(a), rtol=1e-12, atol=1e-12)


def test_options_adopted_from_diffusers_and_overridden():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
                                set_alpha_to_one=False, thresholding=True, sample_max_value=3.0)
    opts = plan_for("ddim", s, {"timestep_spacing": "linspace"}, 10).options
    assert opts["prediction_type"] == "v_prediction" and opts["thresholding"]
    assert opts["sample_max_value"] == 3.0 and not opts["set_alpha_to_one"] and opts["timestep_spacing"] == "linspace"
    assert opts["prev_timestep"] == "diffusers"


def _abar_p(plan, i):
    """ᾱ of the time DDIM step i goes to (η = 0, ε-prediction: the x̂0 coefficient is √ᾱ_p)."""
    return plan.calls[i].coef[COEF["yd"]] ** 2


def test_grid_vs_diffusers_prev_timestep():
    s = fastdiff.NoiseSchedule.linear()
    plan = plan_for("ddim", s, {"timestep_spacing": "linspace"}, 10)
    assert _abar_p(plan, 0) == pytest.approx(float(s.alphas_cumprod[int(plan.timesteps[1])]))
    plan = plan_for("ddim", s, {"timestep_spacing": "linspace", "prev_timestep": "diffusers"}, 10)
    assert _abar_p(plan, 0) == pytest.approx(float(s.alphas_cumprod[999 - 100]))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        fastdiff.ddim_sample(eps_model, steps, shape=(1, 2))


@pytest.mark.parametrize("eta", [-0.1, float("nan"), "1"])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        fastdiff.ddim_sample(eps_model, 5, shape=(1, 2), eta=eta)


def test_shape_disagrees_with_x_T():
    with pytest.raises(ValueError, match="shape"):
        fastdiff.ddim_sample(eps_model, 5, shape=(1, 2), x_T=torch.zeros(2, 2))


def test_missing_shape():
    with pytest.raises(ValueError, match="shape"):
        fastdiff.ddim_sample(eps_model, 5)


@pytest.mark.parametrize("bad,match", [
    (lambda x, t: x[:, :1], "shape"),
    (lambda x, t: x.double(), "dtype"),
    (lambda x, t: "nope", "tensor"),
])
def test_bad_model_output(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastdiff.ddpm_sample(bad, steps=3, shape=(2, 3))


def test_model_output_wrong_device():
    meta = lambda x, t: torch.empty(x.shape, device="meta")  # noqa: E731
    with pytest.raises(ValueError, match="on meta"):
        fastdiff.ddim_sample(meta, 3, shape=(2, 3))


def test_learned_range_needs_2c_channels():
    with pytest.raises(ValueError, match="2·C"):
        fastdiff.ddpm_sample(eps_model, steps=3, shape=(2, 3, 2), variance="learned_range")


def test_eps_prediction_on_zero_terminal_snr():
    s = fastdiff.NoiseSchedule.linear(rescale_zero_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        fastdiff.ddim_sample(eps_model, 10, shape=(1, 2), schedule=s, timestep_spacing="trailing")
    x = fastdiff.ddim_sample(eps_model, 10, shape=(1, 2), schedule=s, timestep_spacing="trailing",
                             prediction_type="v_prediction")
    assert torch.isfinite(x).all()


def test_nan_check_is_opt_in():
    nan_model = lambda x, t: torch.full_like(x, float("nan"))  # noqa: E731
    assert torch.isnan(fastdiff.ddim_sample(nan_model, 3, shape=(1, 2))).all()
    with pytest.raises(FloatingPointError, match="NaN"):
        fastdiff.ddim_sample(nan_model, 3, shape=(1, 2), check_nan=True)


def test_unknown_and_invalid_options():
    with pytest.raises(TypeError, match="unknown option.*clip_smaple"):
        fastdiff.ddim_sample(eps_model, 3, shape=(1, 2), clip_smaple=True)
    with pytest.raises(ValueError, match="prediction_type"):
        fastdiff.ddim_sample(eps_model, 3, shape=(1, 2), prediction_type="eps")
    with pytest.raises(ValueError, match="variance_type"):
        fastdiff.ddpm_sample(eps_model, steps=3, shape=(1, 2), variance="fixed_medium")
    with pytest.raises(ValueError, match="backend"):
        fastdiff.ddim_sample(eps_model, 3, shape=(1, 2), backend="metal")
    with pytest.raises(TypeError, match="schedule"):
        fastdiff.ddim_sample(eps_model, 3, shape=(1, 2), schedule=42)


def test_settings_switched_off_are_not_validated():
    """A diffusers config may carry any value for a setting it switches off (diffusers samples it): so does fastdiff;
    the same values with the setting on raise, naming it."""
    DDIMScheduler = pytest.importorskip("diffusers").DDIMScheduler

    odd = dict(clip_sample_range=0.0, dynamic_thresholding_ratio=1.5, sample_max_value=0.5)
    sched = DDIMScheduler(clip_sample=False, thresholding=False, **odd)
    x = fastdiff.ddim_sample(eps_model, 3, shape=(1, 2), schedule=sched, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="clip_sample_range"):
        fastdiff.ddim_sample(eps_model, 3, shape=(1, 2), schedule=sched, clip_sample=True)
    valid = dict(dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    for name in valid:
        with pytest.raises(ValueError, match=name):
            fastdiff.ddim_sample(eps_model, 3, shape=(1, 2), schedule=sched, thresholding=True,
                                 **{**valid, name: odd[name]})
