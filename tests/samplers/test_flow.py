"""Flow-matching samplers (fastdiff.samplers.flow) against diffusers' FlowMatch schedulers and the exact flow oracle.

The reference is diffusers' scheduler loop as its pipelines run it (latents = randn(shape, generator); model(x, t)
with t from scheduler.timesteps; step(..., generator)), so x_T, the timesteps the model sees and every noise draw are
compared. diffusers keeps σ's and steps in float32, fastdiff in float64: bound 1e-4 of max|x| for Euler/Heun.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.theory import toy
from tests.samplers.test_diffusers_parity import Net  # a small random conv net of (x, t)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 3, 5, 5)
BOUND = 1e-4


@torch.no_grad()
def diffusers_loop(sch, steps, model, seed, **set_kw):
    seen = []
    sch.set_timesteps(steps, **set_kw)
    g = torch.Generator().manual_seed(seed)
    x = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=g)
    for t in sch.timesteps:
        seen.append(float(t))
        x = sch.step(model(x, t.expand(SHAPE[0])), t, x, generator=g).prev_sample
    return x, seen


def recording(model):
    seen = []

    def m(x, t):
        seen.append(float(t.reshape(-1)[0]))
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        return model(x, t)

    return m, seen


EULER = "FlowMatchEulerDiscreteScheduler"
HEUN = "FlowMatchHeunDiscreteScheduler"
CASES = [
    (EULER, {}, {}),
    (EULER, {"shift": 3.0}, {}),  # SD3
    (EULER, {"shift": 3.0, "stochastic_sampling": True}, {}),
    (EULER, {"use_dynamic_shifting": True}, {"mu": 0.8}),  # Flux
    (EULER, {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.7}),
    (EULER, {"use_dynamic_shifting": True, "shift_terminal": 0.1}, {"mu": 1.2}),  # LTX
    (EULER, {"shift": 2.0, "use_karras_sigmas": True}, {}),
    (EULER, {"shift": 2.0, "use_exponential_sigmas": True}, {}),
    (EULER, {"shift": 2.0, "use_beta_sigmas": True}, {}),
    (EULER, {"shift": 2.0, "invert_sigmas": True}, {}),
    (EULER, {"shift": 3.0}, {"sigmas": list(np.linspace(1.0, 0.1, 7))}),  # Flux-style custom σ's
    (EULER, {"use_dynamic_shifting": True}, {"sigmas": [1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05], "mu": 0.5}),
    (EULER, {"shift": 3.0}, {"timesteps": [999.0, 800.0, 650.5, 400.0, 250.0, 90.0, 10.0]}),
    (HEUN, {}, {}),
    (HEUN, {"shift": 3.0}, {}),
]


@pytest.mark.parametrize("cls,cfg,kw", CASES, ids=lambda v: str(v) if not isinstance(v, list) else "")
def test_same_seed_same_result_as_diffusers(cls, cfg, kw):
    model = Net()
    steps = 7
    sch = getattr(diffusers, cls)(**cfg)
    ref, ref_ts = diffusers_loop(getattr(diffusers, cls).from_config(sch.config), steps, model, 0, **kw)
    m, seen = recording(model)
    out = fastdiff.sample(m, steps, schedule=sch, shape=SHAPE, generator=torch.Generator().manual_seed(0), **kw)
    assert seen == ref_ts  # the model sees diffusers' float32 timesteps exactly
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= BOUND, err


def test_sampler_name_and_config_dict():
    """sampler="flow_euler" with options, and schedule= a config dict, equal the scheduler instance."""
    model = Net()
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    a = fastdiff.sample(model, 6, schedule=sch, shape=SHAPE, generator=torch.Generator().manual_seed(1))
    b = fastdiff.sample(model, 6, sampler="flow_euler", shift=3.0, shape=SHAPE,
                        generator=torch.Generator().manual_seed(1))
    c = fastdiff.sample(model, 6, schedule={**sch.config, "_class_name": EULER}, shape=SHAPE,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a, c)
    d = fastdiff.sample(model, 6, sampler="flow_euler", shift=1.0, shape=SHAPE,
                        generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, d)  # the option is used


def test_image_seq_len_computes_mu_as_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = Net()
    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    a = fastdiff.sample(model, 5, schedule=sch, mu=mu, shape=SHAPE, generator=torch.Generator().manual_seed(2))
    b = fastdiff.sample(model, 5, schedule=sch, image_seq_len=1024, shape=SHAPE,
                        generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(sampler="flow_euler", use_dynamic_shifting=True), "mu"),
    (dict(sampler="flow_euler", sigmas=[1.0, 0.5], timesteps=[1000.0, 500.0]), "sigmas"),
    (dict(sampler="flow_euler", sigmas=[1.5, 0.5]), "sigmas"),
    (dict(sampler="flow_euler", sigmas=[1.0, 0.0]), "sigmas"),
    (dict(sampler="flow_euler", sigmas=[0.5, 0.8]), "sigmas"),
    (dict(sampler="flow_euler", timesteps=[1200.0, 500.0]), "timesteps"),
    (dict(sampler="flow_euler", prediction_type="epsilon"), "prediction_type"),
    (dict(sampler="flow_heun", prediction_type="v_prediction"), "prediction_type"),
    (dict(sampler="flow_euler", shift=0.0), "shift"),
    (dict(sampler="flow_euler", time_shift_type="cubic"), "time_shift_type"),
    (dict(sampler="flow_euler", use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas"),
    (dict(sampler="flow_euler", time_grid="karras"), "time_grid"),
    (dict(sampler="flow_heun", sigmas=[1.0, 0.5]), "sigmas"),
    (dict(sampler="flow_heun", stochastic_sampling=True), "stochastic_sampling"),
])
def test_bad_input_named(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastdiff.sample(Net(), kw.pop("steps", 2) if "sigmas" not in kw and "timesteps" not in kw else None,
                        shape=SHAPE, **kw)


def test_epsilon_scheduler_config_refused_for_flow_sampler():
    """An ε-prediction model's scheduler config under a flow sampler: an error naming prediction_type."""
    cfg = dict(diffusers.DPMSolverMultistepScheduler().config)
    with pytest.raises(ValueError, match="prediction_type"):
        fastdiff.sample(Net(), 4, sampler="flow_euler", schedule=cfg, shape=SHAPE)


# ---- the exact flow oracle -----------------------------------------------------------------------------------------

MIX = toy.GaussianMixture([0.3, 0.7], [[2.0, 0.0], [-1.0, 1.5]], 0.3)


def test_flow_velocity_is_the_conditional_expectation():
    """E[(ε − x0 − v*(x_t))·f(x_t)] = 0 for f = 1 and f = x (v* is the regression of ε − x0 on x_t), by Monte Carlo
    within 5 standard errors, at three t's; a velocity off by 20% fails."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t in (0.2, 0.6, 0.95):
        x0 = MIX.sample(n, g)
        e = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = (1 - t) * x0 + t * e
        for v, ok in ((MIX.flow_velocity(xt, t), True), (1.2 * MIX.flow_velocity(xt, t), False)):
            r = e - x0 - v
            z = torch.stack([(r * f).mean(0).abs() / ((r * f).std(0) / n**0.5) for f in (torch.ones_like(xt), xt)])
            assert bool((z < 5).all()) == ok, (t, z)


def test_flow_velocity_ends():
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(MIX.flow_velocity(x, 0.0), -x)  # t = 0: x0 = x, E[ε] = 0
    mean = (MIX.weights[:, None] * MIX.means).sum(0)
    assert torch.allclose(MIX.flow_velocity(x, 1.0), x - mean)  # t = 1: x = ε, E[x0] = the data mean


@pytest.mark.parametrize("sampler,steps", [("flow_euler", 40), ("flow_heun", 12)])
def test_flow_samplers_reproduce_the_mixture(sampler, steps):
    x = fastdiff.sample(MIX.flow_model(), steps, sampler=sampler, shape=(4000, 2), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(4))
    w, se = toy.component_weights(x, MIX)
    assert ((w - MIX.weights).abs() <= 4 * se).all(), w
    _, means, var = toy.component_moments(x, MIX)
    assert ((means - MIX.means).abs() <= 0.05).all(), means
    assert ((var.sqrt() - MIX.std).abs() <= 0.05).all(), var


@pytest.mark.parametrize("sampler,order", [("flow_euler", 1), ("flow_heun", 2)])
def test_flow_samplers_converge_at_their_order(sampler, order):
    """Median distance to the ODE solution (Heun, 800 steps) from the same x_T; the slope in log steps."""
    model = MIX.flow_model()
    kw = dict(shape=(1000, 2), dtype=torch.float64)
    ref = fastdiff.sample(model, 800, sampler="flow_heun", generator=torch.Generator().manual_seed(1), **kw)
    ns = [16, 32, 64]
    errs = [float((fastdiff.sample(model, n, sampler=sampler, generator=torch.Generator().manual_seed(1), **kw)
                   - ref).norm(dim=1).median()) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, (errs, slope)


# ---- DPM-Solver++ / UniPC on flow σ's (Sana, Wan) and every σ grid of the VP samplers -----------------------------

DPM, UNI = "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"
FL = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
SIGMA_CASES = [
    (DPM, dict(FL, flow_shift=3.0), {}),  # Sana
    (DPM, dict(FL, flow_shift=3.0, solver_order=3), {}),
    (DPM, dict(FL, flow_shift=3.0, algorithm_type="sde-dpmsolver++"), {}),
    (DPM, dict(FL, use_dynamic_shifting=True), {"mu": 0.9}),
    (DPM, dict(FL, flow_shift=3.0, final_sigmas_type="sigma_min"), {}),
    (DPM, dict(use_flow_sigmas=True, flow_shift=2.0), {}),  # an ε model on flow σ's
    (UNI, dict(FL, flow_shift=3.0), {}),  # Wan
    (UNI, dict(FL, flow_shift=5.0, solver_order=3), {}),
    (UNI, dict(FL, use_dynamic_shifting=True), {"mu": 0.9}),
    (UNI, dict(FL, flow_shift=3.0, shift_terminal=0.05), {}),
    (UNI, dict(FL, flow_shift=3.0), {"sigmas": np.linspace(1.0, 0.05, 7)}),
    (UNI, dict(FL, use_karras_sigmas=True), {}),
    (UNI, dict(FL, flow_shift=3.0, final_sigmas_type="sigma_min", solver_type="bh1"), {}),
    # α = 1 − σ at UniPC's first σ = 1 − 10⁻⁶ is 3% off in float32: the plan takes diffusers' float32 σ's
    (UNI, dict(use_flow_sigmas=True, flow_shift=1.0, solver_order=1, lower_order_final=False), {}),  # ε model
    (UNI, dict(FL, flow_shift=3.0, solver_type="bh1", final_sigmas_type="sigma_min", shift_terminal=0.05), {}),
    # the last σ repeated (sigma_min on flow σ's) with a 2nd-order final step: the identity, as diffusers
    (UNI, dict(FL, flow_shift=5.0, lower_order_final=False, final_sigmas_type="sigma_min", solver_type="bh1"), {}),
    (DPM, dict(use_exponential_sigmas=True), {}),
    (DPM, dict(use_beta_sigmas=True), {}),
    (DPM, dict(use_lu_lambdas=True), {}),
    (DPM, dict(use_lu_lambdas=True, beta_schedule="scaled_linear", solver_order=3), {}),
    (DPM, dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"), {}),
    (UNI, dict(use_exponential_sigmas=True), {}),
    (UNI, dict(use_beta_sigmas=True, final_sigmas_type="sigma_min"), {}),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True), {}),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True, beta_schedule="scaled_linear"), {}),
    ("HeunDiscreteScheduler", dict(use_exponential_sigmas=True), {}),
    ("HeunDiscreteScheduler", dict(use_beta_sigmas=True), {}),
]


@torch.no_grad()
def vp_loop(sch, steps, model, seed, **set_kw):
    """diffusers' loop for the VP schedulers (init_noise_sigma, scale_model_input; step's generator where it has one)."""
    seen = []
    sch.set_timesteps(steps, **set_kw)
    g = torch.Generator().manual_seed(seed)
    x = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=g) * sch.init_noise_sigma
    kw = {} if type(sch).__name__.startswith(("UniPC", "Heun")) else {"generator": g}
    for t in sch.timesteps:
        seen.append(float(t))
        x = sch.step(model(sch.scale_model_input(x, t), t.expand(SHAPE[0])), t, x, **kw).prev_sample
    return x, seen


@pytest.mark.parametrize("cls,cfg,kw", SIGMA_CASES, ids=lambda v: str(v) if not isinstance(v, np.ndarray) else "")
def test_sigma_grids_same_seed_same_result_as_diffusers(cls, cfg, kw):
    model = Net()
    steps = 7
    sch = getattr(diffusers, cls)(**cfg)
    ref, ref_ts = vp_loop(getattr(diffusers, cls).from_config(sch.config), steps, model, 0, **kw)
    m, seen = recording(model) if not cls.startswith(("DPM", "UniPC")) else (model, None)
    out = fastdiff.sample(m, None if "sigmas" in kw else steps, schedule=sch, shape=SHAPE,
                          generator=torch.Generator().manual_seed(0), **kw)
    if seen is not None:
        assert seen == ref_ts
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= 5e-4, err


def test_multistep_flow_timesteps_are_diffusers():
    """DPM-Solver++/UniPC on flow σ's hand the model diffusers' int64 timesteps (σ·T truncated)."""
    for cls, cfg in ((DPM, dict(FL, flow_shift=3.0)), (UNI, dict(FL, flow_shift=5.0))):
        sch = getattr(diffusers, cls)(**cfg)
        sch.set_timesteps(9)
        plan = fastdiff.run.sampling.plan_for("dpmsolver++" if cls == DPM else "unipc", sch, {}, 9)
        assert [int(c.t) for c in plan.calls] == sch.timesteps.tolist()
        assert plan.t_dtype == torch.int64
        assert np.allclose(plan.sigmas, sch.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sampler,kw,match", [
    ("dpmsolver++", dict(prediction_type="flow_prediction"), "use_flow_sigmas"),
    ("unipc", dict(use_flow_sigmas=True, use_dynamic_shifting=True), "mu"),
    ("dpmsolver++", dict(use_flow_sigmas=True, use_dynamic_shifting=True), "mu"),
    ("dpmsolver++", dict(use_flow_sigmas=True, use_exponential_sigmas=True), "use_flow_sigmas"),
    ("dpmsolver++", dict(use_lu_lambdas=True, use_karras_sigmas=True), "use_lu_lambdas"),
    ("unipc", dict(use_beta_sigmas=True, use_exponential_sigmas=True), "use_exponential_sigmas"),
    ("dpmsolver++", dict(use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver",
                         final_sigmas_type="sigma_min"), "algorithm_type"),
    ("unipc", dict(shift_terminal=0.1), "shift_terminal"),
    ("dpmsolver++", dict(use_flow_sigmas=True, flow_shift=-1.0), "flow_shift"),
    ("euler", dict(use_beta_sigmas=True, use_karras_sigmas=True), "use_karras_sigmas"),
])
def test_sigma_options_bad_input_named(sampler, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastdiff.sample(Net(), 4, sampler=sampler, shape=SHAPE, **kw)


def test_flow_sigmas_refuse_grids_they_do_not_take():
    with pytest.raises(ValueError, match="timesteps"):
        fastdiff.sample(Net(), None, sampler="unipc", use_flow_sigmas=True, timesteps=[900, 500, 100], shape=SHAPE)
    with pytest.raises(ValueError, match="sigmas"):
        fastdiff.sample(Net(), None, sampler="dpmsolver++", use_flow_sigmas=True, sigmas=[1.0, 0.5], shape=SHAPE)
    with pytest.raises(ValueError, match="use_exponential_sigmas"):
        fastdiff.sample(Net(), 3, sampler="dpmsolver++", use_exponential_sigmas=True, time_grid="karras",
                        shape=SHAPE)


@pytest.mark.parametrize("cls,sampler", [(DPM, "dpmsolver++"), (UNI, "unipc")])
@pytest.mark.parametrize("spread", ["use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_sigma_grid_timesteps_are_diffusers(cls, sampler, spread, beta_schedule):
    """The model's int64 timesteps of the exponential / beta / λ grids equal diffusers' for every N tried (the λ grid
    between the float32 logs of diffusers' σ table, unrounded on the cosine schedule)."""
    if spread == "use_lu_lambdas" and cls == UNI:
        pytest.skip("UniPC has no use_lu_lambdas")
    for n in (1, 2, 3, 5, 8, 13, 25):
        sch = getattr(diffusers, cls)(beta_schedule=beta_schedule, **{spread: True})
        sch.set_timesteps(n)
        plan = fastdiff.run.sampling.plan_for(sampler, sch, {}, n)
        assert [int(c.t) for c in plan.calls] == sch.timesteps.tolist(), n
