"""The time grid as data: timesteps= / sigmas= / time_grid= in every sampler, iPNDM, and the errors for bad grids."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import samplers as S
from fastdiff.schedule import NoiseSchedule, grids

SCHED = NoiseSchedule.linear()
MIX = fastdiff.theory.toy.GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -1.0]], 0.4)
ALL = ("ddim", "ddpm", "dpmsolver++", "sde-dpmsolver++", "unipc", "euler", "euler_ancestral", "heun", "pndm", "plms",
       "ipndm")


def _xT(n=64, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _spy(model):
    seen = []

    def m(x, t):
        seen.append(t.detach().clone())
        return model(x, t)
    return m, seen


@pytest.mark.parametrize("sampler", ["dpmsolver++", "unipc", "euler", "heun", "pndm", "plms", "ddim", "ddpm"])
def test_the_default_grid_given_as_timesteps_reproduces_the_default_run(sampler):
    """A grid is an argument: the sampler's own (diffusers') grid, handed back as timesteps=, gives the same sample
    (10 steps: PNDM's PRK midpoints, t − ⌊T/N/2⌋ in diffusers, are then exactly halfway as on a given grid)."""
    steps = 10
    model = MIX.model(SCHED)
    if sampler in ("ddim", "ddpm"):
        ts = SCHED.timesteps(steps, "leading").tolist()
    else:
        plan = S.build_plan(sampler, SCHED, steps, S.solver_options(sampler, None, {}))
        ts = list(dict.fromkeys(plan.timesteps))  # Heun and PLMS repeat a time; PNDM's PRK midpoints are not grid
        if sampler == "pndm":
            ts = sorted(set(plan.timesteps[:12:4] + [plan.timesteps[11]] + plan.timesteps[12:]), reverse=True)
    a = fastdiff.sample(model, steps, sampler=sampler, x_T=_xT(), generator=torch.Generator().manual_seed(1))
    b = fastdiff.sample(model, sampler=sampler, x_T=_xT(), generator=torch.Generator().manual_seed(1), timesteps=ts)
    if sampler in ("euler", "heun"):  # the default grid's σ's come from diffusers' float32 table; given: float64
        assert (a - b).abs().max() < 1e-4
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ALL)
def test_fractional_timesteps_reach_the_model(sampler):
    ts = [999.0, 700.25, 420.5, 181.75, 60.5, 10.25, 3.5, 0.0]
    model, seen = _spy(MIX.model(SCHED))
    x = fastdiff.sample(model, sampler=sampler, x_T=_xT(8), timesteps=ts, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    got = sorted({round(float(t[0]), 4) for t in seen}, reverse=True)
    assert set(ts) <= set(got)  # PNDM adds midpoints between grid times
    assert all(t.is_floating_point() for t in seen)


def test_sigmas_at_fractional_times_follow_the_schedule():
    s = grids.sigma_at(SCHED, [3.0, 3.5, 4.0])
    tab = ((1 - SCHED.alphas_cumprod) / SCHED.alphas_cumprod).sqrt()
    assert s[0] == pytest.approx(float(tab[3]), rel=1e-12) and s[2] == pytest.approx(float(tab[4]), rel=1e-12)
    assert s[1] == pytest.approx((float(tab[3]) + float(tab[4])) / 2, rel=1e-12)
    t = grids.times_for_sigmas(SCHED, s)
    assert np.allclose(t, [3.0, 3.5, 4.0], atol=1e-9)


@pytest.mark.parametrize("name", grids.TIME_GRIDS)
@pytest.mark.parametrize("sched", [NoiseSchedule.linear(), NoiseSchedule.cosine(), NoiseSchedule.scaled_linear(500)])
def test_named_grids_run_from_the_top_to_zero(name, sched):
    g = grids.make_grid(sched, 7, name)
    assert len(g) == 7 and g.timesteps[0] == len(sched) - 1 and g.timesteps[-1] == 0.0
    assert all(a > b for a, b in zip(g.timesteps, g.timesteps[1:]))
    assert all(a > b for a, b in zip(g.sigmas, g.sigmas[1:]))
    lam = -np.log(g.sigmas)
    if name in ("logsnr", "exponential"):
        assert np.allclose(np.diff(lam), (lam[-1] - lam[0]) / 6, rtol=1e-6)
    if name == "quadratic":
        u = np.linspace(0, 1, 7)
        assert np.allclose(g.timesteps, (len(sched) - 1) * (1 - u) ** 2)


@pytest.mark.parametrize("sampler", ALL)
def test_time_grid_is_an_option_of_every_sampler(sampler):
    for name in ("logsnr", "quadratic", "karras"):
        x = fastdiff.sample(MIX.model(SCHED), 6, sampler=sampler, x_T=_xT(8), time_grid=name,
                            generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("bad, match", [
    ([999, 500, 500, 0], "timesteps must be strictly decreasing"),
    ([0, 500, 999], "timesteps must be strictly decreasing"),
    ([999, float("nan"), 0], "timesteps must be finite"),
    ([1000, 500, 0], r"timesteps must lie in \[0, 999\]"),
    ([999, 500, -1], r"timesteps must lie in \[0, 999\]"),
    ([[999, 500]], "timesteps must be a non-empty 1-D"),
    ([], "timesteps must be a non-empty 1-D"),
])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "unipc", "euler"])
def test_a_bad_grid_is_an_error_naming_timesteps(bad, match, sampler):
    with pytest.raises(ValueError, match=match):
        fastdiff.sample(MIX.model(SCHED), sampler=sampler, x_T=_xT(4), timesteps=bad)


def test_grid_arguments_conflicts_are_named():
    m = MIX.model(SCHED)
    with pytest.raises(ValueError, match="the grid has 3 times but steps=5"):
        fastdiff.sample(m, 5, sampler="unipc", x_T=_xT(4), timesteps=[999, 500, 0])
    with pytest.raises(ValueError, match="only one of timesteps=, sigmas= and time_grid="):
        fastdiff.sample(m, 3, sampler="unipc", x_T=_xT(4), timesteps=[999, 500, 0], time_grid="logsnr")
    with pytest.raises(ValueError, match="time_grid must be one of"):
        fastdiff.sample(m, 3, sampler="unipc", x_T=_xT(4), time_grid="cosine")
    with pytest.raises(ValueError, match="sigmas must lie in the schedule's range"):
        fastdiff.sample(m, sampler="euler", x_T=_xT(4), sigmas=[1e4, 1.0, 0.1])
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        fastdiff.sample(m, sampler="euler", x_T=_xT(4), sigmas=[10.0, 1.0, 1.0])


def test_sigmas_given_match_the_same_timesteps():
    """sigmas= and the timesteps they map to (diffusers' σ → t) give one grid for a σ sampler."""
    sig = [80.0, 10.0, 1.5, 0.3, 0.05]
    g = grids.custom_grid(SCHED, sigmas=sig)
    assert g.sigmas == sig
    assert all(a > b for a, b in zip(g.timesteps, g.timesteps[1:]))
    x = fastdiff.sample(MIX.model(SCHED), sampler="euler", x_T=_xT(8), sigmas=sig)
    assert torch.isfinite(x).all()


def _err(x, ref):
    return float((x - ref).norm(dim=1).mean())


def test_ipndm_order_one_is_ddim_on_the_same_grid():
    ts = grids.make_grid(SCHED, 9, "quadratic").timesteps
    m = MIX.model(SCHED)
    a = fastdiff.sample(m, sampler="ipndm", solver_order=1, timesteps=ts, x_T=_xT())
    b = fastdiff.sample(m, sampler="ddim", timesteps=ts, x_T=_xT())
    assert (a - b).abs().max() < 1e-10


def test_ipndm_converges_faster_than_ddim():
    """On the exact mixture ε*, the error of iPNDM falls much faster with calls than DDIM's: DDIM is 1st order; the fixed
    Adams–Bashforth weights are 2nd order on a smoothly varying grid (here time-quadratic), and ~10x more accurate at
    10 calls."""
    m, xT = MIX.model(SCHED), _xT(256)
    ref = fastdiff.sample(m, 500, sampler="dpmsolver++", solver_order=3, time_grid="quadratic", x_T=xT)
    e = {k: [_err(fastdiff.sample(m, n, sampler=k, time_grid="quadratic", x_T=xT), ref) for n in (10, 20, 40)]
         for k in ("ddim", "ipndm")}
    slope = {k: math.log(v[0] / v[2]) / math.log(4) for k, v in e.items()}
    assert slope["ddim"] == pytest.approx(1.0, abs=0.35)
    assert slope["ipndm"] > 1.8
    assert e["ipndm"][0] < e["ddim"][0] / 5


def test_ipndm_options_are_checked():
    with pytest.raises(ValueError, match="solver_order must be 1, 2, 3 or 4 for ipndm"):
        fastdiff.sample(MIX.model(SCHED), 5, sampler="ipndm", solver_order=5, x_T=_xT(4))
    with pytest.raises(TypeError, match="do not apply to sampler='ipndm'"):
        fastdiff.sample(MIX.model(SCHED), 5, sampler="ipndm", use_karras_sigmas=True, x_T=_xT(4))
