"""fastdiff.sample(sampler=...) against diffusers' own classes for the rest of the solver family (issue 21, item 4):
full loops as diffusers' pipelines run them, same seed, a small random model (test_diffusers_parity's Net). The
bound is that file's: 5e-4 of max|x| (diffusers keeps its scalars in float32, fastdiff in float64)."""
from __future__ import annotations

import contextlib
import inspect
import math
import sys

import pytest
import torch

import fastdiff
from fastdiff import samplers as S
from tests.samplers.test_diffusers_parity import BOUND, SHAPE, Net

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def kdpm2_float64(sch, plan):
    """diffusers' KDPM2 (ancestral) σ tables recomputed by its own formulas in float64 from fastdiff's float64 σ's, its
    timesteps those fastdiff hands the model: diffusers' math without its float32 rounding."""
    e = plan.sigmas
    s = torch.tensor([e[0]] + e[1::2][:(len(e) - 2) // 2], dtype=torch.float64)

    def expand(v):
        return torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])

    if hasattr(sch, "sigmas_up"):
        nxt = s.roll(-1)
        nxt[-1] = 0.0
        up = (nxt**2 * (s**2 - nxt**2) / s**2).clamp(min=0) ** 0.5
        down = (nxt**2 - up**2).clamp(min=0) ** 0.5
        down[-1] = 0.0
        mid = s.log().lerp(down.log(), 0.5).exp()
        mid[-2:] = 0.0
        sch.sigmas_up, sch.sigmas_down = expand(up), expand(down)
    else:
        mid = s.log().lerp(s.roll(1).log(), 0.5).exp()
    sch.sigmas, sch.sigmas_interpol = expand(s), expand(mid)
    sch.timesteps = torch.tensor(plan.timesteps, dtype=sch.timesteps.dtype)


@contextlib.contextmanager
def float32_noise(sch):
    """The step noise of diffusers' class drawn as its float32 loop draws it, then widened (a float64 draw from the
    same generator gives other numbers)."""
    mod = sys.modules[type(sch).__module__]
    draw = getattr(mod, "randn_tensor", None)
    if draw is not None:
        mod.randn_tensor = lambda shape, dtype=None, **k: draw(shape, dtype=torch.float32, **k).to(dtype)
    try:
        yield
    finally:
        if draw is not None:
            mod.randn_tensor = draw


def diffusers_loop(sch, steps, model, seed, plan64=None):
    """diffusers' scheduler loop as its pipelines run it (x_T = randn · init_noise_sigma, scale_model_input, step with
    the generator where step takes one). plan64: the same code on float64 samples with fastdiff's float64 σ's (that
    plan's) in place of diffusers' float32 σ's: diffusers' math without its float32 rounding."""
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=g)
    if plan64 is not None:
        if "KDPM2" in type(sch).__name__:
            kdpm2_float64(sch, plan64)
        else:
            sch.sigmas = torch.tensor(plan64.sigmas, dtype=torch.float64)
        x = x.double()
    x = x * sch.init_noise_sigma
    kw = {"generator": g} if "generator" in inspect.signature(sch.step).parameters else {}
    with float32_noise(sch) if plan64 is not None else contextlib.nullcontext():
        for t in sch.timesteps:
            xin = sch.scale_model_input(x, t)
            o = model(xin.float(), t.reshape(1).expand(SHAPE[0])).to(x.dtype)
            x = sch.step(o, t, x, **kw).prev_sample
    return x


def rel_err(got, ref):
    if not torch.isfinite(ref).all():
        return math.inf
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
    sch.set_timesteps(steps)
    if (sch.timesteps == sch.timesteps[0]).sum() > 1:
        # the same quirk without the overrun: a first timestep that repeats (Karras σ's rounded on
        # squaredcos_cap_v2) makes diffusers start at its second occurrence, skipping calls; fastdiff runs them all
        assert torch.isfinite(got).all()
        return None
    # diffusers' loop NaN: only KDPM2 ancestral's float32 σ_down = √(σ_next² − σ_up²) on squaredcos_cap_v2 (σ_max ≈
    # 2e4) cancels to √(negative); fastdiff's float64 coefficients stay finite (held to diffusers' math in float64)
    assert torch.isfinite(ref).all() or "Ancestral" in cls_name, "diffusers' own loop is not finite here"
    err = rel_err(got, ref)
    if err <= BOUND:
        return err
    name = S.sampler_for(sch)
    plan = S.build_plan(name, fastdiff.NoiseSchedule.from_diffusers(dict(sch.config)), steps,
                        S.solver_options(name, dict(sch.config), {}))
    ref64 = diffusers_loop(getattr(diffusers, cls_name).from_config(sch.config), steps, model, seed, plan)
    own = rel_err(ref.double(), ref64) if torch.isfinite(ref).all() else math.inf
    ours = rel_err(got.double(), ref64)
    assert own > BOUND and ours <= (max(BOUND, own / 10) if math.isfinite(own) else BOUND), (err, own, ours)
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


KDPM2 = [dict(), dict(use_karras_sigmas=True), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
         dict(timestep_spacing="leading", steps_offset=1)]


@pytest.mark.parametrize("sched", range(len(SCHEDULES)), ids=["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("cfg", KDPM2, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default") for c in KDPM2])
@pytest.mark.parametrize("cls", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_matches_diffusers(cls, cfg, sched):
    check(cls, {**SCHEDULES[sched], **cfg}, 10)


@pytest.mark.parametrize("steps", [1, 2, 3, 25])
@pytest.mark.parametrize("cls", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_step_counts(cls, steps):
    check(cls, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), steps)


DEIS = [dict(), dict(solver_order=3), dict(solver_order=1), dict(use_karras_sigmas=True, solver_order=3),
        dict(prediction_type="v_prediction", timestep_spacing="trailing"),
        dict(timestep_spacing="leading", steps_offset=1, lower_order_final=False, solver_order=3),
        dict(prediction_type="sample", thresholding=True, sample_max_value=1.5),
        dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True, solver_order=3)]


@pytest.mark.parametrize("sched", range(len(SCHEDULES)), ids=["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("cfg", DEIS, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default") for c in DEIS])
def test_deis_matches_diffusers(cfg, sched):
    check("DEISMultistepScheduler", {**SCHEDULES[sched], **cfg}, 12)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 14, 15, 25])
def test_deis_step_counts(steps):
    """lower_order_final below 15 steps (orders 1 and 2 on the last two), not from 15 on."""
    check("DEISMultistepScheduler", dict(solver_order=3), steps)


LCM = [dict(), dict(prediction_type="v_prediction", original_inference_steps=100),
       dict(clip_sample=True, clip_sample_range=0.8, set_alpha_to_one=False, timestep_scaling=5.0),
       dict(thresholding=True, sample_max_value=1.5, prediction_type="sample")]


@pytest.mark.parametrize("sched", range(len(SCHEDULES)), ids=["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("cfg", LCM, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default") for c in LCM])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_diffusers(cfg, sched, steps):
    check("LCMScheduler", {**SCHEDULES[sched], **cfg}, steps)


TCD = [dict(), dict(prediction_type="v_prediction", set_alpha_to_one=False), dict(prediction_type="sample")]


@pytest.mark.parametrize("sched", range(len(SCHEDULES)), ids=["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("cfg", TCD, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default") for c in TCD])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd_matches_diffusers(cfg, sched, steps):
    """diffusers' step default eta (γ) = 0.3, fastdiff's gamma too."""
    check("TCDScheduler", {**SCHEDULES[sched], **cfg}, steps)


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_tcd_gamma_matches_diffusers(eta):
    sch = diffusers.TCDScheduler()
    model = Net()
    got = fastdiff.sample(model, 6, schedule=sch, shape=SHAPE, generator=torch.Generator().manual_seed(0),
                          gamma=eta)
    ref = sch
    ref.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=g)
    for t in ref.timesteps:
        x = ref.step(model(x, t.reshape(1).expand(SHAPE[0])), t, x, eta=eta, generator=g).prev_sample
    assert rel_err(got, x) <= BOUND


EDM = [dict(), dict(sigma_schedule="exponential"), dict(prediction_type="v_prediction", final_sigmas_type="sigma_min"),
       dict(sigma_min=0.01, sigma_max=20.0, rho=5.0, sigma_data=1.0)]


@pytest.mark.parametrize("cfg", EDM, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default") for c in EDM])
@pytest.mark.parametrize("steps", [1, 2, 5, 18])
def test_edm_euler_matches_diffusers(cfg, steps):
    """The network sees diffusers' float32 c_noise = ¼·log σ and its c_in-scaled input."""
    check("EDMEulerScheduler", cfg, steps)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 12, 30])
def test_ipndm_v_matches_diffusers(steps):
    """diffusers' IPNDMScheduler (its angle schedule; not fastdiff's VP 'ipndm'): warm-up orders 1-3, then 4."""
    check("IPNDMScheduler", {}, steps)


EDM_DPM = [dict(), dict(solver_order=3), dict(solver_order=1), dict(solver_type="heun", solver_order=3),
           dict(sigma_schedule="exponential", solver_type="heun"),
           dict(prediction_type="v_prediction", final_sigmas_type="sigma_min"),
           dict(final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3),
           dict(final_sigmas_type="sigma_min", euler_at_final=True, solver_order=3),
           dict(algorithm_type="sde-dpmsolver++"), dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                                        final_sigmas_type="sigma_min"),
           dict(thresholding=True, sample_max_value=1.5, solver_order=3),
           dict(sigma_min=0.01, sigma_max=20.0, rho=5.0, sigma_data=1.0)]


@pytest.mark.parametrize("cfg", EDM_DPM, ids=[("-".join(f"{k}={v}" for k, v in c.items()) or "default")
                                              for c in EDM_DPM])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 14, 20])
def test_edm_dpmsolver_matches_diffusers(cfg, steps):
    """diffusers' EDMDPMSolverMultistepScheduler: DPM-Solver++ on EDM's σ's (α = 1, λ = −log σ), the network on
    c_in·x at c_noise; warm-up, lower_order_final below 15 steps, euler_at_final, SDE noise every step."""
    sch = diffusers.EDMDPMSolverMultistepScheduler(**cfg)
    sch.set_timesteps(steps)
    if cfg.get("final_sigmas_type") == "sigma_min" and not torch.isfinite(diffusers_loop(sch, steps, Net(), 0)).all():
        # diffusers' last step runs from its last float32 σ to σ_min, equal up to an ulp: h = 0 and its heun /
        # order-3 coefficients (e^{−h} − 1)/h are 0/0 = NaN; fastdiff takes the h → 0 limit x′ = x, which is
        # diffusers' loop with euler_at_final (the same first N − 1 steps, then an order-1 step of h ≈ 0)
        model = Net()
        got = fastdiff.sample(model, steps, schedule=sch, shape=SHAPE, generator=torch.Generator().manual_seed(0))
        ref = diffusers_loop(diffusers.EDMDPMSolverMultistepScheduler(**{**cfg, "euler_at_final": True}), steps,
                             model, 0)
        assert torch.isfinite(ref).all() and rel_err(got, ref) <= BOUND, rel_err(got, ref)
        return
    check("EDMDPMSolverMultistepScheduler", cfg, steps)


def test_edm_dpmsolver_refusals():
    with pytest.raises(ValueError, match="prediction_type"):
        fastdiff.sample(Net(), 4, sampler="edm_dpmsolver++", shape=SHAPE, prediction_type="sample")
    with pytest.raises(ValueError, match="algorithm_type"):
        fastdiff.sample(Net(), 4, sampler="edm_dpmsolver++", shape=SHAPE, algorithm_type="dpmsolver")
    # diffusers' class has no order-3 SDE update (UnboundLocalError at its first order-3 step): refused there only
    with pytest.raises(S.PlanError, match="order-3 SDE"):
        fastdiff.sample(Net(), 5, sampler="edm_dpmsolver++", shape=SHAPE, algorithm_type="sde-dpmsolver++",
                        solver_order=3)
    assert torch.isfinite(fastdiff.sample(Net(), 2, sampler="edm_dpmsolver++", shape=SHAPE,
                                          algorithm_type="sde-dpmsolver++", solver_order=3)).all()
