"""A calibrated (or any custom) grid in the drop-in classes: set_timesteps(timesteps=...) in DPM-Solver (as
diffusers) and in UniPC and DDIM (fastdiff's extension: diffusers' classes take none), same result as
fastdiff.sample(..., timesteps=) on the same grid."""
import pytest
import torch

import fastdiff
import fastdiff.diffusers as fd

GRID = [999, 741, 502, 311, 170, 77, 25, 3]


def _net(x, t):
    # a smooth stand-in for a trained ε-model (depends on x and t)
    return torch.tanh(0.7 * x) * (0.5 + float(t.float().mean()) / 2000) + 0.1 * x


def _loop(sched, xT):
    x = xT * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(_net(sched.scale_model_input(x, t), t.reshape(1).expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("cls, sampler", [(fd.DPMSolverMultistepScheduler, "dpmsolver++"),
                                          (fd.UniPCMultistepScheduler, "unipc"), (fd.DDIMScheduler, "ddim")])
def test_custom_timesteps_in_the_dropin_class_match_fastdiff_sample(cls, sampler):
    xT = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    s = cls()
    s.set_timesteps(timesteps=GRID)
    assert s.timesteps.tolist() == GRID
    got = _loop(s, xT)
    kw = dict(set_alpha_to_one=True, clip_sample=True) if sampler == "ddim" else {}  # DDIMScheduler's defaults
    ref = fastdiff.sample(lambda x, t: _net(x, t), sampler=sampler, timesteps=GRID, x_T=xT, **kw)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    # and not the default grid of the same length
    s2 = cls()
    s2.set_timesteps(len(GRID))
    assert (got - _loop(s2, xT)).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [fd.UniPCMultistepScheduler, fd.DDIMScheduler])
def test_bad_custom_timesteps_are_named(cls):
    s = cls()
    with pytest.raises(ValueError, match="timesteps"):
        s.set_timesteps(timesteps=[999, 500, 500, 0])
    with pytest.raises(ValueError, match="timesteps"):
        s.set_timesteps(3, timesteps=[999, 500, 0])
