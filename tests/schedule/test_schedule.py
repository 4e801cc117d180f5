import numpy as np
import pytest
import torch

from fastdiff import NoiseSchedule, timesteps

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_tables_match_diffusers_float32(name):
    ref = DDPMScheduler(beta_schedule=name)
    s = NoiseSchedule.from_diffusers(ref)
    assert s.betas.dtype == torch.float64 and len(s) == 1000
    torch.testing.assert_close(s.betas.float(), ref.betas, rtol=1e-6, atol=1e-9)
    # ᾱ: diffusers' float32 cumprod drifts from the float64 one by a few 1e-6 relative (docs/math.md, "Precision").
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-7)


def test_zero_snr_rescale():
    s = NoiseSchedule.scaled_linear(rescale_zero_snr=True)
    assert s.alphas_cumprod[-1] == 0.0
    assert abs(s.alphas_cumprod[0] - NoiseSchedule.scaled_linear().alphas_cumprod[0]) < 1e-15
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_spacings_match_diffusers(spacing, steps):
    offset = 1 if spacing == "leading" and steps < 1000 else 0
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    got = timesteps(1000, steps, spacing, steps_offset=offset)
    assert got.tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("T,steps", [(1000, 61), (1000, 769), (17, 7), (15, 13)])
def test_trailing_spacing_has_exactly_steps_entries(T, steps):
    """diffusers' np.arange(T, 0, −T/N) has N + 1 entries for these (T, N) (the last one ≈ 0, i.e. timestep −1):
    fastdiff gives exactly N, equal to diffusers' first N (it used to raise a misleading steps_offset error)."""
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    if len(ref.timesteps) != steps:  # diffusers 0.42: the quirk this guards against
        assert len(ref.timesteps) == steps + 1 and ref.timesteps[-1] == -1
    got = timesteps(T, steps, "trailing")
    assert got.tolist() == ref.timesteps[:steps].tolist()
    assert NoiseSchedule.linear(T).timesteps(steps, "trailing").min() >= 0


def test_quad_spacing():
    ts = timesteps(1000, 20, "quad")
    want = (np.linspace(0, np.sqrt(800), 20) ** 2).astype(np.int64)[::-1]
    assert ts.tolist() == want.tolist()
    assert ts[0] == 800 and ts[-1] == 0
    with pytest.warns(UserWarning, match="repeats"):
        ts = timesteps(1000, 50, "quad")  # 0, 0, 1, 3, ...: the repeated 0 is dropped
    assert len(ts) == 49 and len(set(ts.tolist())) == 49 and (ts.diff() < 0).all()


def test_cosine_formula():
    s = NoiseSchedule.cosine(100)
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(100)
    want = np.minimum(1 - f((i + 1) / 100) / f(i / 100), 0.999)
    np.testing.assert_allclose(s.betas.numpy(), want, rtol=1e-14)


def test_custom_betas_and_alpha_bar():
    s = NoiseSchedule([0.1, 0.2, 0.3])
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), [0.9, 0.72, 0.504])
    assert s.alpha_bar(-1) == 1.0 and abs(s.alpha_bar(2) - 0.504) < 1e-15


@pytest.mark.parametrize("bad", [[], [0.1, -0.1], [0.1, float("nan")], [0.5, 1.0]])
def test_bad_betas(bad):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(bad)


@pytest.mark.parametrize("steps,err", [(0, ValueError), (1001, ValueError), (2.5, TypeError)])
def test_bad_steps(steps, err):
    with pytest.raises(err, match="steps"):
        timesteps(1000, steps)


def test_bad_spacing_and_schedule():
    with pytest.raises(ValueError, match="timestep_spacing"):
        timesteps(1000, 10, "log")
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_name("quadratic")
