"""Drop-in behaviour of fastdiff.diffusers' classes beyond the pipeline loop (issue 21): configurations diffusers'
classes take are taken (the ones the fused step lacks run on diffusers' own class, warned), the Euler family before
set_timesteps, init_noise_sigma's type, PNDM's explicit step_prk / step_plms, DDIM/DDPM _get_variance,
previous_timestep and index_for_timestep, each against diffusers' class."""
import inspect
import warnings

import diffusers as hf
import numpy as np
import pytest
import torch

import fastdiff.diffusers as fd

pytestmark = pytest.mark.usefixtures("one_thread")

# fastdiff's tables are float64, diffusers' float32: ᾱ-derived values near t = 0 differ by up to ~5e-5 relative
# (README, Precision); σ's and variances are compared at this bound, samples at their own
F64 = 1e-4


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _loop(s, steps=None, x=None, seed=0, limit=None):
    """A loop (the first `limit` steps, all by default) of a scheduler with a smooth synthetic model, noise from a
    seeded generator."""
    if steps is not None:
        s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) if x is None else x
    x = x * s.init_noise_sigma
    kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
    for t in s.timesteps[:limit]:
        xi = s.scale_model_input(x, t)
        x = s.step(0.3 * xi + 0.1 * torch.sin(3 * xi), t, x, **kw).prev_sample
    return x


# (class, config diffusers takes and the fused step does not run, steps, what the warning names)
HANDED_OVER = [
    ("DDIMScheduler", {"trained_betas": [0.1, 0.3, 0.5], "num_train_timesteps": 4}, 2, "trained_betas"),
    ("DDPMScheduler", {"beta_end": 2.0, "clip_sample": False}, 4, "beta_end"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "use_karras_sigmas": True}, 6, "use_flow_sigmas"),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace"}, 1000, "repeats timestep"),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "use_beta_sigmas": True}, 6, "use_beta_sigmas"),
    ("HeunDiscreteScheduler", {"beta_schedule": "exp"}, 4, "beta_schedule"),
    ("DPMSolverMultistepScheduler", {"use_dynamic_shifting": True}, 4, "use_dynamic_shifting"),
]


@pytest.mark.parametrize("name,cfg,steps,named", HANDED_OVER, ids=[c[3] + "-" + c[0] for c in HANDED_OVER])
def test_configs_diffusers_takes_are_taken(name, cfg, steps, named):
    """Warned once, naming the setting; then the same loop as diffusers' class (its own code runs it), the
    timesteps / sigmas / init_noise_sigma a pipeline reads included."""
    ref = getattr(hf, name)(**cfg)
    with pytest.warns(UserWarning, match=named):
        got = getattr(fd, name)(**cfg)
        got.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(got.timesteps, ref.timesteps)
    if getattr(ref, "sigmas", None) is not None:
        assert torch.equal(got.sigmas, ref.sigmas)
    assert getattr(got, "step_index", None) == getattr(ref, "step_index", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per reason, not per step
        a = _loop(got, limit=8)  # a few steps are enough
    b = _loop(ref, limit=8)
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def test_handed_over_config_returns_to_the_fused_step():
    """A pipeline that rewrites the config into one the fused step runs gets the fused step at its next
    set_timesteps (and diffusers' numbers within float64-vs-float32 rounding)."""
    with pytest.warns(UserWarning, match="beta_schedule"):
        s = fd.HeunDiscreteScheduler(beta_schedule="exp")
    s.register_to_config(beta_schedule="linear")
    s.set_timesteps(5)
    assert s._hf_impl is None
    assert _rel(_loop(s), _loop(hf.HeunDiscreteScheduler(), 5)) < 1e-4


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler"])
@pytest.mark.parametrize("thr", [{"sample_max_value": 0.5}, {"dynamic_thresholding_ratio": 0.0,
                                                              "sample_max_value": 1.5}])
def test_thresholding_values_diffusers_takes_run_fused(name, thr):
    """sample_max_value < 1 (the scale is then sample_max_value itself) and ratio 0 (the minimum |x̂0|): refused by
    fastdiff.sample, run fused here with diffusers' numbers."""
    cfg = dict(thresholding=True, **thr)
    if name != "DPMSolverMultistepScheduler" and name != "UniPCMultistepScheduler":
        cfg["clip_sample"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing handed over
        got = getattr(fd, name)(**cfg)
        a = _loop(got, 6, x=3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    assert got._hf_impl is None
    b = _loop(getattr(hf, name)(**cfg), 6, x=3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "HeunDiscreteScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_euler_family_before_set_timesteps(name, spacing):
    """diffusers builds the full training grid in __init__: timesteps, sigmas, a tensor init_noise_sigma, and a
    step from any of its timesteps, without set_timesteps."""
    cfg = dict(timestep_spacing=spacing)
    if name != "EulerAncestralDiscreteScheduler":
        cfg["use_karras_sigmas"] = True  # not used by __init__'s grid (Heun's excepted: it runs set_timesteps(T))
    ref, got = getattr(hf, name)(**cfg), getattr(fd, name)(**cfg)
    assert got.num_inference_steps == ref.num_inference_steps
    assert torch.equal(got.timesteps, ref.timesteps)
    assert torch.allclose(got.sigmas, ref.sigmas, rtol=F64)
    assert torch.is_tensor(got.init_noise_sigma) and got.init_noise_sigma.dtype == ref.init_noise_sigma.dtype
    assert abs(float(got.init_noise_sigma) - float(ref.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)
    x = torch.randn(2, 3, 4, 4)
    outs = []
    for s in (ref, got):
        t = s.timesteps[10]
        kw = {} if name == "HeunDiscreteScheduler" else {"generator": torch.Generator().manual_seed(3)}
        outs.append(s.step(0.2 * s.scale_model_input(x, t), t, x, **kw).prev_sample)
    assert _rel(outs[1], outs[0]) < 1e-5


def test_init_grid_follows_a_config_rewritten_before_set_timesteps():
    ref, got = hf.EulerDiscreteScheduler(), fd.EulerDiscreteScheduler()
    for s in (ref, got):
        s.register_to_config(prediction_type="v_prediction")
    x = torch.randn(1, 3, 4, 4)
    outs = [s.step(0.5 * x, s.timesteps[0], x).prev_sample for s in (ref, got)]
    assert _rel(outs[1], outs[0]) < 1e-5


@pytest.mark.parametrize("cfg", [{}, {"prediction_type": "v_prediction", "set_alpha_to_one": True},
                                 {"skip_prk_steps": True}, {"timestep_spacing": "trailing"}])
def test_pndm_explicit_prk_and_plms(cfg):
    """prk_timesteps / plms_timesteps and step_prk / step_plms over them, as diffusers' PNDMScheduler; the fused
    `step` over `timesteps` gives the same sample."""
    ref, got = hf.PNDMScheduler(**cfg), fd.PNDMScheduler(**cfg)
    res = []
    for s in (ref, got):
        s.set_timesteps(10)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        for t in s.prk_timesteps:
            x = s.step_prk(0.3 * x + 0.1 * torch.sin(3 * x), t, x).prev_sample
        for t in s.plms_timesteps:
            x = s.step_plms(0.3 * x + 0.1 * torch.sin(3 * x), t, x).prev_sample
        res.append(x)
    np.testing.assert_array_equal(got.prk_timesteps, ref.prk_timesteps)
    np.testing.assert_array_equal(got.plms_timesteps, ref.plms_timesteps)
    assert got.counter == ref.counter and len(got.ets) == len(ref.ets)
    assert _rel(res[1], res[0]) < 1e-5
    fused = fd.PNDMScheduler(**cfg)
    assert _rel(_loop(fused, 10), res[0]) < 1e-4


def test_pndm_explicit_calls_with_given_history_and_errors():
    """The public state (ets set by the caller) drives step_plms / step_prk as in diffusers; step_plms before the
    PRK warm-up and either call before set_timesteps are errors, as in diffusers."""
    x = torch.randn(2, 3, 4, 4)
    past = [x * (0.1 + k / 10) for k in range(4)]
    outs = []
    for lib in (hf, fd):
        s = lib.PNDMScheduler()
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step_prk(x, 1, x)
        s.set_timesteps(10)
        with pytest.raises(ValueError, match="prk"):
            s.step_plms(x, 1, x)
        s.ets = past[:]
        outs.append(s.step_prk(0.1 * x, 901, x).prev_sample)
        outs.append(s.step_plms(0.1 * x, 801, x).prev_sample)
    assert _rel(outs[2], outs[0]) < 1e-5 and _rel(outs[3], outs[1]) < 1e-5


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                           "learned_range"])
def test_ddpm_get_variance_like_diffusers(variance_type):
    ref, got = hf.DDPMScheduler(variance_type=variance_type), fd.DDPMScheduler(variance_type=variance_type)
    v = torch.linspace(-0.9, 0.9, 5)
    for t in (1, 487, 999, 950):
        if t == 950:  # on the grid of a run: ᾱ_p of the grid's next timestep
            for s in (ref, got):
                s.set_timesteps(20)
        a, b = got._get_variance(t, predicted_variance=v), ref._get_variance(t, predicted_variance=v)
        assert torch.is_tensor(a) and _rel(a, b) < F64, (t, a, b)


def test_ddim_get_variance_and_ddpm_previous_timestep_types():
    # (ᾱ_p = ᾱ_0 of a negative prev_timestep with set_alpha_to_one=False is not compared: 1 − ᾱ_0 ≈ 1e-4 has a
    # relative error of ~6e-4 in diffusers' float32)
    ref, got = hf.DDIMScheduler(), fd.DDIMScheduler()
    for t, p in ((0, 0), (420, 400), (980, 960), (487, 486), (999, 998), (30, -1)):
        a, b = got._get_variance(t, p), ref._get_variance(t, p)
        assert torch.is_tensor(a) and abs(float(a) - float(b)) <= F64 * max(abs(float(b)), 1e-6), (t, p, a, b)
    s, h = fd.DDPMScheduler(), hf.DDPMScheduler()
    h.set_timesteps(timesteps=[100, 87, 50, 1, 0])

    def hf_prev(t):
        return h.previous_timestep(t).item()
    s.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    prev = [s.previous_timestep(t) for t in s.timesteps]
    assert all(torch.is_tensor(p) for p in prev) and [p.item() for p in prev] == [87, 50, 1, 0, -1]
    assert s.previous_timestep(50).item() == 1 == hf_prev(50)
    assert fd.DDPMScheduler().previous_timestep(500) == 499 == hf.DDPMScheduler().previous_timestep(500)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "EulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_index_for_timestep_like_diffusers(name):
    ref, got = getattr(hf, name)(), getattr(fd, name)()
    for s in (ref, got):
        s.set_timesteps(8)
    for k in (0, 3, len(ref.timesteps) - 1):
        assert got.index_for_timestep(got.timesteps[k]) == ref.index_for_timestep(ref.timesteps[k])
    sched = torch.tensor([9.0, 5.0, 5.0, 1.0])
    assert got.index_for_timestep(torch.tensor(5.0), sched) == ref.index_for_timestep(torch.tensor(5.0), sched)


@pytest.mark.parametrize("name", list(fd.SCHEDULERS))
def test_mixed_precision_result_dtype_like_diffusers(name):
    """fp16 / fp32 samples and model outputs in any mix: prev_sample in the dtype diffusers' class returns (history
    kept across a promoted sample), the loop within fp16 rounding of diffusers'."""
    for sd, od in ((torch.float32, torch.float16), (torch.float16, torch.float32), (torch.float16, torch.float16)):
        res = []
        for lib in (hf, fd):
            s = getattr(lib, name)()
            s.set_timesteps(5)
            x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(sd) * s.init_noise_sigma
            kw = {"generator": torch.Generator().manual_seed(1)} if "generator" in \
                inspect.signature(s.step).parameters else {}
            for t in s.timesteps:
                x = s.step((0.1 * s.scale_model_input(x, t)).to(od), t, x, **kw).prev_sample
            res.append(x)
        assert res[1].dtype == res[0].dtype, (sd, od)
        assert _rel(res[1].float(), res[0].float()) < 1e-2, (sd, od)  # fp16: ~1e-3 per rounding


def test_euler_continuous_timesteps_like_diffusers():
    """timestep_type='continuous' with v-prediction: the model sees 0.25·log σ (before and after set_timesteps), the
    loop runs fused with diffusers' numbers; custom timesteps= with it is diffusers' error."""
    cfg = dict(timestep_type="continuous", prediction_type="v_prediction")
    ref = hf.EulerDiscreteScheduler(**cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing handed over
        got = fd.EulerDiscreteScheduler(**cfg)
        assert torch.allclose(got.timesteps, ref.timesteps, atol=F64)
        b = _loop(got, 10)
    a = _loop(ref, 10)
    assert torch.allclose(got.timesteps, ref.timesteps, atol=F64) and got._hf_impl is None
    assert _rel(b, a) < 1e-5
    with pytest.raises(ValueError, match="continuous"):
        got.set_timesteps(timesteps=[900.0, 500.0, 100.0])


def test_nan_diffusers_computes_is_warned():
    """Euler ancestral on its full zero-terminal-SNR training grid: σ_max = 4096 (ᾱ = 2⁻²⁴) sits below its
    neighbour, σ_up = √(negative) at the first step: diffusers' NaN, warned and handed to diffusers' class."""
    with pytest.warns(UserWarning, match="diffusers computes NaN"):
        s = fd.EulerAncestralDiscreteScheduler(rescale_betas_zero_snr=True)
    s.set_timesteps(10)  # a grid the fused step runs
    assert s._hf_impl is None


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("clip", [True, False])
def test_epsilon_at_zero_snr_steps_as_diffusers(name, clip):
    """ε-prediction at ᾱ_t = 0 divides by 0: diffusers gets x̂0 = ±∞, clipped to ±1 (finite) or NaN; that step is
    diffusers' (warned once, at the caller's line), the rest of the run fused."""
    cfg = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=clip)
    got, ref = getattr(fd, name)(**cfg), getattr(hf, name)(**cfg)
    res = []
    for s in (got, ref):
        s.set_timesteps(5)
        x, g = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.Generator().manual_seed(0)
        with (pytest.warns(UserWarning, match="ᾱ_t = 0.*diffusers' own") if s is got else warnings.catch_warnings()):
            for t in s.timesteps:
                x = s.step(0.1 * x, t, x, generator=g).prev_sample
        res.append(x)
    assert torch.isfinite(res[1]).all() == clip
    if clip:
        assert _rel(res[0], res[1]) < 1e-4
    else:
        assert torch.equal(torch.isnan(res[0]), torch.isnan(res[1]))


def test_where_diffusers_computes_nan_it_is_said_not_refused():
    """DDIM's η > 1 stays finite (diffusers: NaN), DDPM's fixed_large_log is handed over: each warned once, at the
    caller's line, naming the NaN."""
    x = torch.randn(2, 3, 4, 4)
    s = fd.DDIMScheduler()
    s.set_timesteps(5)
    with pytest.warns(UserWarning, match="eta=1.5 > 1.*NaN.*clamps"):
        for t in s.timesteps:
            x = s.step(0.1 * x, t, x, eta=1.5, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(x).all()
    with pytest.warns(UserWarning, match=r"fixed_large_log.*NaN samples.*diffusers' own DDPMScheduler") as rec:
        fd.DDPMScheduler(variance_type="fixed_large_log")
    assert rec[0].filename == __file__


# diffusers' test_scheduler_dpm_multi.py config (final_sigmas_type="sigma_min"): after a Karras / exponential / beta /
# λ grid, which ends on σ_min, the last step goes from σ_min to σ_min (h = 0)
DPM_SIGMA_MIN = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0,
                     algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
                     euler_at_final=False, lambda_min_clipped=-float("inf"), variance_type=None,
                     final_sigmas_type="sigma_min")
ZERO_STEP = [
    {"use_beta_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_lu_lambdas": True, "prediction_type": "v_prediction"},
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    {"use_exponential_sigmas": True, "algorithm_type": "sde-dpmsolver++", "prediction_type": "sample"},
    {"use_beta_sigmas": True, "algorithm_type": "dpmsolver"},
    {"use_lu_lambdas": True, "algorithm_type": "sde-dpmsolver"},
    {"use_exponential_sigmas": True, "solver_type": "heun", "lower_order_final": True},
]


@pytest.mark.parametrize("extra", ZERO_STEP, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("steps", [3, 10])
def test_dpm_step_of_h_zero_runs_fused_as_diffusers(extra, steps):
    """The final σ_min → σ_min step (h = 0) divided by h in float64 (ZeroDivisionError at set_timesteps); diffusers'
    float32 update gives the sample back there (D1 = (m0 − m1)/∞ = 0). Fused, unwarned, diffusers' grid and loop."""
    cfg = dict(DPM_SIGMA_MIN, **extra)
    got, ref = fd.DPMSolverMultistepScheduler(**cfg), hf.DPMSolverMultistepScheduler(**cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got.set_timesteps(steps)
        a = _loop(got)
    assert got._hf_impl is None
    ref.set_timesteps(steps)
    assert torch.equal(got.timesteps, ref.timesteps)
    assert torch.allclose(got.sigmas, ref.sigmas, rtol=F64) and got.sigmas[-1] == got.sigmas[-2]
    b = _loop(ref)
    assert torch.isfinite(b).all() and _rel(a, b) < 1e-4, _rel(a, b)
    # the last step returns its sample, as diffusers'
    assert torch.equal(a, _loop(got, steps, limit=steps - 1)) and torch.equal(b, _loop(ref, steps, limit=steps - 1))


@pytest.mark.parametrize("extra", [{"solver_type": "heun"}, {"solver_order": 3}])
def test_dpm_step_of_h_zero_where_diffusers_computes_nan(extra):
    """Heun and order 3 over h = 0: diffusers' (e^{−h} − 1)/h = 0/0 makes the run NaN; fastdiff takes the step's limit
    (the sample back: the run before that step, diffusers' too), said once at set_timesteps."""
    cfg = dict(DPM_SIGMA_MIN, use_exponential_sigmas=True, **extra)
    got, ref = fd.DPMSolverMultistepScheduler(**cfg), hf.DPMSolverMultistepScheduler(**cfg)
    with pytest.warns(UserWarning, match="σ_min to σ_min.*NaN.*prev_sample = sample") as rec:
        got.set_timesteps(10)
    assert got._hf_impl is None and rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not per step
        a = _loop(got)
        got.set_timesteps(10)
    ref.set_timesteps(10)
    assert torch.isnan(_loop(ref)).all()
    assert torch.equal(a, _loop(got, limit=9))
    assert _rel(a, _loop(ref, 10, limit=9)) < 1e-4
