"""fastdiff.calibrate: per-model grids (GITS dynamic programming + refinement on the final error), checked against
the exact mixture oracle on held-out x_T's."""
import time

import pytest
import torch

import fastdiff
from fastdiff.run.calibration import _gits, _rms, calibrate_report, fine_grid, jump_costs
from fastdiff.schedule import NoiseSchedule

MIX = fastdiff.theory.toy.GaussianMixture([0.2, 0.3, 0.5], [[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]], 0.3)
SCHED = NoiseSchedule.linear()


def _held_out(model, sched, n=1000, seed=123):
    xT = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = fastdiff.sample(model, 500, sampler="dpmsolver++", solver_order=3, time_grid="quadratic", x_T=xT,
                          schedule=sched)
    return xT, ref


def test_calibrate_returns_a_descending_float64_grid_and_is_deterministic():
    m = MIX.model(SCHED)
    a = fastdiff.calibrate(m, 6, shape=(64, 2), generator=torch.Generator().manual_seed(0), progress=False)
    b = fastdiff.calibrate(m, 6, shape=(64, 2), generator=torch.Generator().manual_seed(0), progress=False)
    assert a.dtype == torch.float64 and a.shape == (6,)
    assert a[0] == len(SCHED) - 1 and (a[1:] < a[:-1]).all() and a[-1] >= 0
    assert torch.equal(a, b)


@pytest.mark.parametrize("sched", [NoiseSchedule.linear(), NoiseSchedule.scaled_linear()], ids=["linear", "scaled"])
def test_calibrated_grid_beats_the_default_and_model_blind_grids_on_held_out_x_T(sched):
    m = MIX.model(sched)
    xT, ref = _held_out(m, sched)
    t0 = time.perf_counter()
    r = calibrate_report(m, 8, sampler="unipc", shape=(256, 2), schedule=sched,
                         generator=torch.Generator().manual_seed(0), progress=False)
    assert time.perf_counter() - t0 < 120
    err = {k: _rms(fastdiff.sample(m, 8, sampler="unipc", x_T=xT, schedule=sched, **kw), ref)
           for k, kw in [("default", {}), ("logsnr", dict(time_grid="logsnr")),
                         ("quadratic", dict(time_grid="quadratic")), ("calibrated", dict(timesteps=r.timesteps))]}
    assert err["calibrated"] <= 0.5 * err["default"], err
    assert err["calibrated"] < 0.8 * min(err["logsnr"], err["quadratic"]), err
    assert r.errors["calibrated"] <= min(r.errors["gits"], r.errors["quadratic"], r.errors["logsnr"])
    assert r.model_calls > 0 and r.seconds > 0


def test_gits_dynamic_programme_finds_the_cheapest_path():
    """On a tiny teacher, the DP's path costs no more than any other path of the same length (brute force)."""
    import itertools

    m = MIX.model(SCHED)
    xT = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    from fastdiff.run.calibration import _teacher

    tr = _teacher(m, SCHED, None, xT, 5, "epsilon")
    C = jump_costs(tr)
    M = len(tr.times)

    def cost(path):
        return sum(C[i, j] for i, j in zip(path, path[1:])) + C[path[-1], M]

    for steps in (2, 3, 4):
        got = [tr.times.index(t) for t in _gits(tr, steps)]
        best = min(cost([0, *rest]) for rest in itertools.combinations(range(1, M), steps - 1))
        assert got[0] == 0 and cost(got) == pytest.approx(best, rel=1e-12)


def test_fine_grid_spans_the_schedule():
    g = fine_grid(SCHED, 30)
    assert g[0] == 999 and g[-1] == 0 and all(a > b for a, b in zip(g, g[1:]))


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "euler", "heun", "ipndm", "plms", "ddpm", "lms", "deis",
                                     "dpmsolver_singlestep", "kdpm2", "pndm"])
def test_calibrate_works_for_every_sampler(sampler):
    m = MIX.model(SCHED)
    r = calibrate_report(m, 5, sampler=sampler, shape=(32, 2), generator=torch.Generator().manual_seed(0),
                         progress=False, fine_steps=20, sweeps=1)
    assert r.timesteps.shape == (5,) and r.sampler == sampler
    x = fastdiff.sample(m, sampler=sampler, timesteps=r.timesteps, shape=(4, 2),
                        generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_calibrate_in_bfloat16_keeps_a_float64_grid():
    lin = torch.nn.Linear(2, 2).to(torch.bfloat16)
    oracle = MIX.model(SCHED)

    class Model(torch.nn.Module):  # a bfloat16 module: calibration runs in its dtype
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, t):
            assert x.dtype == torch.bfloat16
            return oracle(x, t)

    r = calibrate_report(Model(), 5, shape=(32, 2), generator=torch.Generator().manual_seed(0), progress=False,
                         fine_steps=20, sweeps=1)
    assert r.timesteps.dtype == torch.float64 and r.errors["calibrated"] < r.errors["default"]


def test_calibrate_bad_models_and_arguments():
    good = MIX.model(SCHED)
    with pytest.raises(ValueError, match="model output at step 0 has shape"):
        fastdiff.calibrate(lambda x, t: x[:, :1], 5, shape=(8, 2), progress=False)
    with pytest.raises(FloatingPointError, match="model output at step 0 contains NaN"):
        fastdiff.calibrate(lambda x, t: torch.full_like(x, float("nan")), 5, shape=(8, 2), progress=False)
    with pytest.raises(ValueError, match="shape"):
        fastdiff.calibrate(good, 5, progress=False)
    with pytest.raises(ValueError, match="sampler must be one of"):
        fastdiff.calibrate(good, 5, sampler="no_such_sampler", shape=(8, 2), progress=False)
    with pytest.raises(TypeError, match="do not apply to sampler='unipc'"):
        fastdiff.calibrate(good, 5, shape=(8, 2), eta=1.0, progress=False)
    with pytest.raises((TypeError, ValueError), match="steps"):
        fastdiff.calibrate(good, 0, shape=(8, 2), progress=False)
    with pytest.raises(NotImplementedError, match="'ipndm_v' takes no grid as data"):
        fastdiff.calibrate(good, 5, sampler="ipndm_v", shape=(8, 2), progress=False)
    with pytest.raises(NotImplementedError, match="'edm_euler' calls the model with EDM's c_noise"):
        fastdiff.calibrate(good, 5, sampler="edm_euler", shape=(8, 2), progress=False)
    with pytest.raises(NotImplementedError, match="'edm_dpmsolver\\+\\+' calls the model with EDM's c_noise"):
        fastdiff.calibrate(good, 5, sampler="edm_dpmsolver++", shape=(8, 2), progress=False)
    with pytest.raises(NotImplementedError, match="'flow_heun' on flow σ's takes no custom timesteps"):
        fastdiff.calibrate(good, 5, sampler="flow_heun", shape=(8, 2), progress=False)
    with pytest.raises(NotImplementedError, match="use_dynamic_shifting: fastdiff.calibrate handles flow_euler"):
        fastdiff.calibrate(good, 5, sampler="flow_euler", use_dynamic_shifting=True, mu=1.0, shape=(8, 2),
                           progress=False)


def test_integer_grid_for_the_diffusers_classes():
    m = MIX.model(SCHED)
    r = calibrate_report(m, 6, shape=(64, 2), generator=torch.Generator().manual_seed(0), progress=False,
                         fine_steps=20, sweeps=2, integer=True)
    ts = r.timesteps.tolist()
    assert all(float(t).is_integer() for t in ts) and all(a > b for a, b in zip(ts, ts[1:]))
    assert r.errors["calibrated"] < r.errors["default"]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_calibrated_grid_beats_its_default_on_held_out_x_T(shift):
    """A velocity model (the exact flow oracle): the grid is the model-call times σ·T, used with shift=1 (it holds
    the spacing); its error against a converged flow Heun solution is below the default (shifted) grid's."""
    m = MIX.flow_model()
    xT = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = fastdiff.sample(m, 300, sampler="flow_heun", x_T=xT, shift=shift)
    r = calibrate_report(m, 8, sampler="flow_euler", shape=(256, 2), generator=torch.Generator().manual_seed(0),
                         progress=False, shift=shift)
    ts = r.timesteps.tolist()
    assert ts[0] == 1000 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 1
    e_def = _rms(fastdiff.sample(m, 8, sampler="flow_euler", x_T=xT, shift=shift), ref)
    e_cal = _rms(fastdiff.sample(m, sampler="flow_euler", x_T=xT, shift=1.0, timesteps=r.timesteps), ref)
    assert e_cal < 0.9 * e_def, (e_cal, e_def)
