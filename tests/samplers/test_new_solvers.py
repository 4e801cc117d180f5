"""fastdiff.sample(sampler=...) against diffusers' own classes for the rest of the solver family (issue 21, item 4):
full loops as diffusers' pipelines run them, same seed, a small random model (test_diffusers_parity's Net). The
bound is that file's: 5e-4 of max|x| (diffusers keeps its scalars in float32, fastdiff in float64)."""
from __future__ import annotations

import inspect

import pytest
import torch

import fastdiff
from fastdiff import samplers as S
from tests.samplers.test_diffusers_parity import BOUND, SHAPE, Net

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_loop(sch, steps, model, seed, sigmas64=None):
    """diffusers' scheduler loop as its pipelines run it (x_T = randn · init_noise_sigma, scale_model_input, step with
    the generator where step takes one). sigmas64: the same code on float64 samples with these σ's (fastdiff's float64
    ones) in place of diffusers' float32 σ's: diffusers' math without its float32 rounding."""
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=g)
    if sigmas64 is not None:
        sch.sigmas = torch.tensor(sigmas64, dtype=torch.float64)
        x = x.double()
    x = x * sch.init_noise_sigma
    kw = {"generator": g} if "generator" in inspect.signature(sch.step).parameters else {}
    for t in sch.timesteps:
        xin = sch.scale_model_input(x, t)
        o = model(xin.float(), t.reshape(1).expand(SHAPE[0])).to(x.dtype)
        x = sch.step(o, t, x, **kw).prev_sample
    return x


def rel_err(got, ref):
    assert torch.isfinite(ref).all(), "diffusers' own loop is not finite here"
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()


def check(cls_name, config, steps, seed=0):
    """fastdiff within BOUND of diffusers' loop; where diffusers' own float32 rounding is larger than that (σ_max ≈
    2e4 on squaredcos_cap_v2), within BOUND of diffusers' math in float64 (as test_diffusers_parity.check)."""
    sch = getattr(diffusers, cls_name)(**config)
    model = Net()
    got = fastdiff.sample(model, steps, schedule=sch, shape=SHAPE, generator=torch.Generator().manual_seed(seed))
    try:
        ref = diffusers_loop(getattr(diffusers, cls_name).from_config(sch.config), steps, model, seed)
    except IndexError:
        # diffusers' quirk (test_diffusers_parity): Karras σ's whose rounded timesteps coincide (squaredcos_cap_v2)
        # make its step index overrun its tables; fastdiff runs every step
        sch.set_timesteps(steps)
        assert len(set(sch.timesteps.tolist())) < len(sch.timesteps), "diffusers failed for another reason"
        assert torch.isfinite(got).all()
        return None
    err = rel_err(got, ref)
    if err <= BOUND:
        return err
    name = S.sampler_for(sch)
    plan = S.build_plan(name, fastdiff.NoiseSchedule.from_diffusers(dict(sch.config)), steps,
                        S.solver_options(name, dict(sch.config), {}))
    ref64 = diffusers_loop(getattr(diffusers, cls_name).from_config(sch.config), steps, model, seed, plan.sigmas)
    own, ours = rel_err(ref.double(), ref64), rel_err(got.double(), ref64)
    assert own > BOUND and ours <= max(BOUND, own / 10), (err, own, ours)
    return err


SCHEDULES = [dict(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             dict(beta_schedule="squaredcos_cap_v2")]

LMS = [dict(), dict(use_karras_sigmas=True), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
       dict(timestep_spacing="leading", steps_offset=1), dict(prediction_type="sample")]


@pytest.mark.parametrize("sched", range(len(SCHEDULES)), ids=["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("cfg", LMS, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default") for c in LMS])
def test_lms_matches_diffusers(cfg, sched):
    check("LMSDiscreteScheduler", {**SCHEDULES[sched], **cfg}, 12)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 25])
def test_lms_step_counts(steps):
    """The warm-up orders 1–3, N = 1, and a longer loop."""
    check("LMSDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), steps)


def test_lms_weights_are_exact():
    """The Lagrange-integral weights integrate every polynomial of degree < k exactly over the step (here: the
    slope τ^m, m < k, on an uneven σ grid)."""
    from fastdiff.samplers import lms
    sig = [14.6, 7.1, 3.3, 1.2, 0.4, 0.0]
    for i in range(1, 5):
        for k in range(1, min(i + 1, 4) + 1):
            w = lms.weights(sig, i, k)
            for m in range(k):
                exact = (sig[i + 1] ** (m + 1) - sig[i] ** (m + 1)) / (m + 1)
                assert abs(sum(wj * sig[i - j] ** m for j, wj in enumerate(w)) - exact) <= 1e-12 * max(1, abs(exact))


SINGLESTEP = [dict(), dict(solver_order=3), dict(solver_order=1), dict(solver_type="heun", solver_order=3),
              dict(use_karras_sigmas=True, solver_order=3), dict(algorithm_type="sde-dpmsolver++"),
              dict(algorithm_type="sde-dpmsolver++", solver_type="heun", solver_order=3),
              dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
              dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"),
              dict(final_sigmas_type="sigma_min", lower_order_final=False),
              dict(prediction_type="v_prediction", thresholding=True, sample_max_value=1.5),
              dict(prediction_type="sample", lambda_min_clipped=-3.0)]


@pytest.mark.parametrize("sched", range(len(SCHEDULES)), ids=["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("cfg", SINGLESTEP, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default")
                                                 for c in SINGLESTEP])
def test_dpm_singlestep_matches_diffusers(cfg, sched):
    check("DPMSolverSinglestepScheduler", {**SCHEDULES[sched], **cfg}, 12)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_singlestep_step_counts(steps, order):
    """Every order_list shape: lower_order_final's tails for steps ≡ 0, 1, 2 (mod order), N = 1, the last call of
    order 1 (final σ 0), and the groups without lower_order_final (σ_min final, steps a multiple of the order)."""
    check("DPMSolverSinglestepScheduler", dict(solver_order=order), steps)
    if steps % order == 0:
        check("DPMSolverSinglestepScheduler", dict(solver_order=order, final_sigmas_type="sigma_min"), steps)
