"""The rest of diffusers' solver family as fastdiff.diffusers drop-in classes (issue 21, item 4) against diffusers'
own classes: full scheduler loops with a tiny model (same generator, same samples, x̂0, add_noise, img2img starts,
step arguments), and tiny Stable Diffusion pipelines (same images, latents and U-Net inputs at every call)."""
import inspect

import diffusers as hf
import pytest
import torch

import fastdiff.diffusers as fd

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"error:fastdiff\.diffusers\.:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*__array__ implementation:DeprecationWarning")]

TOL = 5e-4  # of max|x|, as tests/samplers/test_diffusers_parity.py: diffusers keeps its scalars in float32
SHAPE = (2, 4, 8, 8)


class Tiny(torch.nn.Module):
    """A random conv model that depends on t."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t):
        t = torch.as_tensor(t).reshape(-1).float().expand(x.shape[0])
        return self.b(torch.tanh(self.a(x) + torch.sin(t / 137.0).view(-1, 1, 1, 1))) + 0.2 * x


def loop(sch, steps, begin=None, seed=0, step_kw=None, timesteps=None):
    """A pipeline's loop; begin=k: img2img from step k (set_begin_index, x = add_noise of a clean sample); the
    generator goes to step where it takes one."""
    sch.set_timesteps(steps) if timesteps is None else sch.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(seed)
    ts = sch.timesteps
    x = torch.randn(SHAPE, generator=g)
    if begin:
        sch.set_begin_index(begin)
        ts = ts[begin:]
        x = sch.add_noise(torch.rand(SHAPE, generator=g), x, ts[:1].repeat(SHAPE[0]))
    else:
        x = x * sch.init_noise_sigma
    m, x0s = Tiny(), []
    kw = dict(step_kw or {}, **({"generator": g} if "generator" in inspect.signature(sch.step).parameters else {}))
    for t in ts:
        out = sch.step(m(sch.scale_model_input(x, t), t), t, x, **kw)
        x = out.prev_sample
        x0s.append(getattr(out, "pred_original_sample", getattr(out, "denoised", getattr(out, "pred_noised_sample",
                                                                                          None))))
    return x, x0s


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def same_run(name, cfg, steps, begin=None, step_kw=None, timesteps=None):
    ref, ref_x0 = loop(getattr(hf, name)(**cfg), steps, begin, step_kw=step_kw, timesteps=timesteps)
    got, got_x0 = loop(getattr(fd, name)(**cfg), steps, begin, step_kw=step_kw, timesteps=timesteps)
    err = max([rel(got, ref)] + [rel(a, b) for a, b in zip(got_x0, ref_x0) if b is not None])
    print(f"{name} {cfg} steps={steps} begin={begin}: {err:.2e}")
    assert err <= TOL, err


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

LMS_CFGS = [{}, SD, dict(SD, use_karras_sigmas=True), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
            dict(SD, timestep_spacing="leading", steps_offset=1), dict(prediction_type="sample")]


@pytest.mark.parametrize("cfg", LMS_CFGS, ids=range(len(LMS_CFGS)))
@pytest.mark.parametrize("steps", [1, 4, 12])
def test_lms_loop_like_diffusers(cfg, steps):
    same_run("LMSDiscreteScheduler", cfg, steps)


@pytest.mark.parametrize("begin", [1, 2, 5])
def test_lms_img2img_start_like_diffusers(begin):
    """diffusers takes the order from the step index but has only this run's slopes (fastdiff.samplers.lms)."""
    same_run("LMSDiscreteScheduler", SD, 10, begin)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_lms_order_argument_like_diffusers(order):
    same_run("LMSDiscreteScheduler", SD, 8, step_kw={"order": order})


def test_lms_before_set_timesteps_and_surface():
    """Usable before set_timesteps (diffusers runs set_timesteps(T) in __init__), init_noise_sigma a tensor, the
    step index, a changed order mid-run refused."""
    a, b = fd.LMSDiscreteScheduler(**SD), hf.LMSDiscreteScheduler(**SD)
    assert a.num_inference_steps == b.num_inference_steps == 1000
    assert torch.equal(a.timesteps, b.timesteps) and torch.allclose(a.sigmas, b.sigmas, rtol=1e-5, atol=1e-6)
    assert torch.is_tensor(a.init_noise_sigma) and abs(float(a.init_noise_sigma) - float(b.init_noise_sigma)) < 1e-3
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * b.init_noise_sigma
    m = Tiny()
    for _ in range(3):  # the first steps of the full training grid
        t = b.timesteps[b.step_index or 0]
        o = m(b.scale_model_input(x, t), t)
        assert rel(a.scale_model_input(x, t), b.scale_model_input(x, t)) <= 1e-6
        xa, xb = a.step(o, t, x).prev_sample, b.step(o, t, x).prev_sample
        assert rel(xa, xb) <= TOL and a.step_index == b.step_index
        x = xb
    a.set_timesteps(5)
    t = a.timesteps[0]
    a.step(m(a.scale_model_input(x, t), t), t, x)
    with pytest.raises(NotImplementedError, match="order"):
        a.step(x, a.timesteps[1], x, order=2)


def test_lms_add_noise_and_index_like_diffusers():
    a, b = fd.LMSDiscreteScheduler(**SD), hf.LMSDiscreteScheduler(**SD)
    for s in (a, b):
        s.set_timesteps(9)
    x0, n = torch.rand(SHAPE), torch.randn(SHAPE)
    ts = b.timesteps[[0, 4]]
    assert rel(a.add_noise(x0, n, ts), b.add_noise(x0, n, ts)) <= 1e-6
    assert a.index_for_timestep(b.timesteps[3]) == b.index_for_timestep(b.timesteps[3])


SS_CFGS = [{}, dict(SD, solver_order=3), dict(SD, use_karras_sigmas=True, solver_type="heun", solver_order=3),
           dict(algorithm_type="sde-dpmsolver++", solver_order=3),
           dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
           dict(prediction_type="v_prediction", thresholding=True, sample_max_value=1.5)]


@pytest.mark.parametrize("cfg", SS_CFGS, ids=range(len(SS_CFGS)))
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_dpm_singlestep_loop_like_diffusers(cfg, steps):
    same_run("DPMSolverSinglestepScheduler", cfg, steps)


@pytest.mark.parametrize("begin", [1, 4, 5])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_singlestep_img2img_start_like_diffusers(begin, order):
    """diffusers takes the orders of its order_list at the absolute step, lowered to the outputs this run has."""
    same_run("DPMSolverSinglestepScheduler", dict(SD, solver_order=order), 12, begin)


def test_dpm_singlestep_custom_timesteps_and_config_like_diffusers():
    """timesteps= as diffusers takes them; set_timesteps switches lower_order_final on in the config as diffusers'
    does, and order_list is diffusers'."""
    same_run("DPMSolverSinglestepScheduler", dict(solver_order=3), None, timesteps=[999, 800, 500, 200, 50])
    for cfg, n in ((dict(solver_order=3, final_sigmas_type="sigma_min"), 9),
                   (dict(solver_order=3, final_sigmas_type="sigma_min"), 10), (dict(), 8)):
        a, b = fd.DPMSolverSinglestepScheduler(**cfg), hf.DPMSolverSinglestepScheduler(**cfg)
        a.set_timesteps(n)
        b.set_timesteps(n)
        assert a.config.lower_order_final == b.config.lower_order_final and a.order_list == b.order_list


KDPM2_CFGS = [{}, dict(SD, use_karras_sigmas=True), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
              dict(SD, timestep_spacing="leading", steps_offset=1)]


@pytest.mark.parametrize("cfg", KDPM2_CFGS, ids=range(len(KDPM2_CFGS)))
@pytest.mark.parametrize("steps", [1, 4, 10])
@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_loop_like_diffusers(name, cfg, steps):
    same_run(name, cfg, steps)


@pytest.mark.parametrize("begin", [2, 6])
@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_img2img_start_like_diffusers(name, begin):
    """Pipelines start at begin_index = t_start · order: a first-order call."""
    same_run(name, SD, 8, begin)


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_surface_like_diffusers(name):
    """Usable before set_timesteps (diffusers' __init__ runs set_timesteps(T)); the interleaved timesteps, σ tables,
    state_in_first_order and add_noise as diffusers'."""
    a, b = getattr(fd, name)(), getattr(hf, name)()
    assert torch.equal(a.timesteps, b.timesteps) and a.timesteps.dtype == b.timesteps.dtype
    for s in (a, b):
        s.set_timesteps(6)
    assert torch.equal(a.timesteps, b.timesteps) and torch.allclose(a.sigmas, b.sigmas, rtol=1e-5, atol=1e-6)
    x0, n = torch.rand(SHAPE), torch.randn(SHAPE)
    assert rel(a.add_noise(x0, n, b.timesteps[[0, 4]]), b.add_noise(x0, n, b.timesteps[[0, 4]])) <= 1e-6
    m, x = Tiny(), torch.randn(SHAPE) * b.init_noise_sigma
    for t in b.timesteps[:3]:
        assert a.state_in_first_order == b.state_in_first_order
        o = m(b.scale_model_input(x, t), t)
        a.scale_model_input(x, t)
        x = b.step(o, t, x, generator=torch.Generator().manual_seed(0)).prev_sample if "Ancestral" in name else \
            b.step(o, t, x).prev_sample
        a.step(o, t, x, **({"generator": torch.Generator().manual_seed(0)} if "Ancestral" in name else {}))


@pytest.mark.filterwarnings("default:fastdiff\\.diffusers\\.:UserWarning")
def test_kdpm2_ancestral_float32_cancellation_is_said():
    """squaredcos_cap_v2 (σ_max ≈ 2e4): diffusers' float32 σ_down = √(σ_next² − σ_up²) cancels (NaN or far off);
    fastdiff's float64 step stays finite and says where it departs from diffusers' numbers."""
    cfg = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    ref, _ = loop(hf.KDPM2AncestralDiscreteScheduler(**cfg), 10)
    with pytest.warns(UserWarning, match="cancels"):
        got, _ = loop(fd.KDPM2AncestralDiscreteScheduler(**cfg), 10)
    assert not torch.isfinite(ref).all() and torch.isfinite(got).all()


DEIS_CFGS = [{}, dict(SD, solver_order=3), dict(SD, use_karras_sigmas=True, solver_order=3),
             dict(prediction_type="v_prediction", timestep_spacing="trailing", lower_order_final=False),
             dict(prediction_type="sample", thresholding=True, sample_max_value=1.5)]


@pytest.mark.parametrize("cfg", DEIS_CFGS, ids=range(len(DEIS_CFGS)))
@pytest.mark.parametrize("steps", [1, 5, 16])
def test_deis_loop_like_diffusers(cfg, steps):
    same_run("DEISMultistepScheduler", cfg, steps)


@pytest.mark.parametrize("begin", [1, 3])
def test_deis_img2img_start_like_diffusers(begin):
    same_run("DEISMultistepScheduler", dict(SD, solver_order=3), 10, begin)


def test_deis_config_names_like_diffusers():
    """diffusers maps algorithm_type 'dpmsolver++' and solver_type 'midpoint' (a DPM-Solver config handed over) to
    DEIS's own names in the config."""
    cfg = dict(algorithm_type="dpmsolver++", solver_type="midpoint")
    a, b = fd.DEISMultistepScheduler(**cfg), hf.DEISMultistepScheduler(**cfg)
    assert dict(a.config) == dict(b.config)


LCM_CFGS = [{}, dict(prediction_type="v_prediction", original_inference_steps=100, set_alpha_to_one=False),
            dict(beta_schedule="linear", beta_end=0.02, timestep_scaling=5.0)]


@pytest.mark.parametrize("cfg", LCM_CFGS, ids=range(len(LCM_CFGS)))
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_loop_like_diffusers(cfg, steps):
    """prev_sample and `denoised` (what LCM pipelines decode) at every step."""
    same_run("LCMScheduler", cfg, steps)


def test_lcm_strength_img2img_and_tuple_like_diffusers():
    a, b = fd.LCMScheduler(), hf.LCMScheduler()
    for s in (a, b):
        s.set_timesteps(4, strength=0.5, original_inference_steps=40)
    assert torch.equal(a.timesteps, b.timesteps)
    x, o = torch.randn(SHAPE), torch.randn(SHAPE)
    t = b.timesteps[0]
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    pa, da = a.step(o, t, x, generator=ga, return_dict=False)
    pb, db = b.step(o, t, x, generator=gb, return_dict=False)
    assert rel(pa, pb) <= TOL and rel(da, db) <= TOL
    x0, n = torch.rand(SHAPE), torch.randn(SHAPE)
    assert rel(a.add_noise(x0, n, b.timesteps[[0, 2]]), b.add_noise(x0, n, b.timesteps[[0, 2]])) <= 1e-6


TCD_CFGS = [{}, dict(prediction_type="v_prediction", set_alpha_to_one=False), dict(beta_schedule="linear")]


@pytest.mark.parametrize("cfg", TCD_CFGS, ids=range(len(TCD_CFGS)))
@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("eta", [None, 0.0, 1.0])
def test_tcd_loop_like_diffusers(cfg, steps, eta):
    """prev_sample and pred_noised_sample every step, with diffusers' default eta (γ = 0.3) or a given one."""
    same_run("TCDScheduler", cfg, steps, step_kw=None if eta is None else {"eta": eta})


def test_tcd_grids_and_eta_change_like_diffusers():
    """An explicit original_inference_steps selects from all T timesteps (diffusers' branch); strength; eta changed
    mid-run refused."""
    for kw in ({"original_inference_steps": 30}, {"strength": 0.6}):
        a, b = fd.TCDScheduler(), hf.TCDScheduler()
        for s in (a, b):
            s.set_timesteps(6, **kw)
        assert torch.equal(a.timesteps, b.timesteps)
    x = torch.randn(SHAPE)
    a.step(x, a.timesteps[0], x, eta=0.5)
    with pytest.raises(NotImplementedError, match="eta|gamma"):
        a.step(x, a.timesteps[1], x, eta=0.2)


EDM_CFGS = [{}, dict(sigma_schedule="exponential", prediction_type="v_prediction"), dict(final_sigmas_type="sigma_min")]


@pytest.mark.parametrize("cfg", EDM_CFGS, ids=range(len(EDM_CFGS)))
@pytest.mark.parametrize("steps", [1, 4, 12])
def test_edm_euler_loop_like_diffusers(cfg, steps):
    """prev_sample and x̂0 every step; the network's input c_in·x and timesteps ¼·log σ as diffusers'."""
    same_run("EDMEulerScheduler", cfg, steps)
    a, b = fd.EDMEulerScheduler(**cfg), hf.EDMEulerScheduler(**cfg)
    for s in (a, b):
        s.set_timesteps(steps)
    assert torch.equal(a.timesteps, b.timesteps) and a.init_noise_sigma == b.init_noise_sigma
    x = torch.randn(SHAPE)
    assert rel(a.scale_model_input(x, a.timesteps[0]), b.scale_model_input(x, b.timesteps[0])) <= 1e-6


def test_edm_euler_before_set_timesteps_like_diffusers():
    """diffusers' __init__ builds the T + 1 σ's of its ramp: timesteps, σ's and a step on them as diffusers'."""
    a, b = fd.EDMEulerScheduler(num_train_timesteps=50), hf.EDMEulerScheduler(num_train_timesteps=50)
    assert torch.equal(a.timesteps, b.timesteps) and torch.allclose(a.sigmas, b.sigmas, rtol=1e-6)
    x, m = torch.randn(SHAPE), Tiny()
    for t in b.timesteps[:3]:
        o = m(b.scale_model_input(x, t), t)
        a.scale_model_input(x, t)
        xa, xb = a.step(o, t, x).prev_sample, b.step(o, t, x).prev_sample
        assert rel(xa, xb) <= TOL
        x = xb


EDM_DPM_CFGS = [{}, dict(solver_order=3, sigma_schedule="exponential", prediction_type="v_prediction"),
                dict(solver_type="heun", final_sigmas_type="sigma_min", euler_at_final=True),
                dict(algorithm_type="sde-dpmsolver++"), dict(solver_order=1, thresholding=True, sample_max_value=2.0)]


@pytest.mark.parametrize("cfg", EDM_DPM_CFGS, ids=range(len(EDM_DPM_CFGS)))
@pytest.mark.parametrize("steps", [1, 4, 12, 16])
def test_edm_dpmsolver_loop_like_diffusers(cfg, steps):
    """prev_sample every step, the network on c_in·x at ¼·log σ; img2img starts (set_begin_index) restart the
    history as diffusers' does, lower_order_final judged on the full grid."""
    same_run("EDMDPMSolverMultistepScheduler", cfg, steps)
    if steps > 2:
        same_run("EDMDPMSolverMultistepScheduler", cfg, steps, begin=steps // 2)
    a, b = fd.EDMDPMSolverMultistepScheduler(**cfg), hf.EDMDPMSolverMultistepScheduler(**cfg)
    for s in (a, b):
        s.set_timesteps(steps)
    assert torch.equal(a.timesteps, b.timesteps) and a.init_noise_sigma == b.init_noise_sigma
    assert torch.allclose(a.sigmas, b.sigmas, rtol=1e-6, atol=0)
    x = torch.randn(SHAPE)
    assert rel(a.scale_model_input(x, a.timesteps[0]), b.scale_model_input(x, b.timesteps[0])) <= 1e-6


def test_edm_dpmsolver_before_set_timesteps_like_diffusers():
    """diffusers' __init__ builds the T σ's and c_noise timesteps: scale_model_input works (an unknown timestep takes
    the last σ), step raises (num_inference_steps is None); diffusers' own EDM DPM-Solver tests: 29 passed, 3 skipped
    with fastdiff's class, as with diffusers'."""
    x = torch.randn(SHAPE)
    a, b = fd.EDMDPMSolverMultistepScheduler(), hf.EDMDPMSolverMultistepScheduler()
    assert torch.equal(a.timesteps, b.timesteps)
    assert rel(a.scale_model_input(x, 0.0), b.scale_model_input(x, 0.0)) <= 1e-6
    for s in (fd.EDMDPMSolverMultistepScheduler(), hf.EDMDPMSolverMultistepScheduler()):
        assert s.num_inference_steps is None
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step(x, s.timesteps[0], x)


def test_edm_dpmsolver_dtypes_like_diffusers():
    """Samples in the sample's dtype; fp16/bf16 no further from diffusers' float64 loop than diffusers' own (measured
    fp16 1.0e-3 vs 2.7e-3, bf16 1.0e-2 vs 2.4e-2 of max|x|)."""
    def run(lib, dt):
        s = lib.EDMDPMSolverMultistepScheduler(solver_order=3)
        s.set_timesteps(10)
        x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma).to(dt)
        for t in s.timesteps:
            xi = s.scale_model_input(x, t).double()
            x = s.step((0.3 * xi + 0.1 * torch.sin(3 * xi)).to(dt), t, x, return_dict=False)[0]
            assert x.dtype == dt
        return x

    ref = run(hf, torch.float64)
    assert rel(run(fd, torch.float64), ref) < 1e-6
    for dt in (torch.float16, torch.bfloat16):
        assert rel(run(fd, dt), ref) <= 2 * rel(run(hf, dt), ref) + 1e-3


def test_edm_dpmsolver_registered():
    assert fd.SCHEDULERS["EDMDPMSolverMultistepScheduler"] is fd.EDMDPMSolverMultistepScheduler
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = fd.equivalent(hf.EDMDPMSolverMultistepScheduler(solver_order=3))
    assert type(new) is fd.EDMDPMSolverMultistepScheduler and new.config.solver_order == 3


@pytest.mark.parametrize("steps", [1, 3, 5, 20])
def test_ipndm_loop_like_diffusers(steps):
    """diffusers' IPNDMScheduler (its angle schedule): the first step's α = 0 gives diffusers' exact 0·x̂0."""
    same_run("IPNDMScheduler", {}, steps)


def test_ipndm_mid_schedule_start_like_diffusers():
    """A first step at timesteps[4] (no begin index): diffusers finds it by value and starts its warm-up there."""
    xs = []
    for lib in (fd, hf):
        s = lib.IPNDMScheduler()
        s.set_timesteps(10)
        x, m = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), Tiny()
        for t in s.timesteps[4:]:
            x = s.step(m(x, t), t, x).prev_sample
        xs.append(x)
    assert rel(xs[0], xs[1]) <= TOL


def ipndm_passes(lib, steps, restarts, begin=None, first=None, seed=0):
    """diffusers' tests/schedulers/test_scheduler_ipndm.py full_loop and its kind: a pass over the timesteps (the
    first `first` of them only, when given), then `restarts` more passes after `_step_index = None` with no
    set_timesteps in between (from timesteps[begin] by set_begin_index when given); the sample after each pass."""
    s = lib.IPNDMScheduler()
    s.set_timesteps(steps)
    x, m, outs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)), Tiny(seed), []
    for p in range(restarts + 1):
        ts = s.timesteps if p or first is None else s.timesteps[:first]
        if p:
            s._step_index = None
            if begin is not None:
                s.set_begin_index(begin)
                ts = ts[begin:]
        for t in ts:
            x = s.step(m(x, t), t, x).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("steps,restarts,begin,first", [(10, 1, None, None), (10, 2, None, None), (1, 3, None, None),
                                                        (2, 2, None, None), (10, 1, 3, None), (10, 1, None, 2),
                                                        (20, 2, 7, 5)])
def test_ipndm_pass_without_set_timesteps_keeps_history_like_diffusers(steps, restarts, begin, first):
    """diffusers' IPNDMScheduler empties its ets in set_timesteps only: a pass started again with `_step_index = None`
    (or a begin index) goes on from the e's of the earlier steps (its first step, α = 0, then divides by 1e-8)."""
    got, ref = ipndm_passes(fd, steps, restarts, begin, first), ipndm_passes(hf, steps, restarts, begin, first)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    print(steps, restarts, begin, first, errs)
    assert max(errs) <= TOL, errs


def test_ipndm_set_timesteps_empties_history_like_diffusers():
    """set_timesteps between passes: the second pass starts its warm-up afresh, as a new scheduler's first pass."""
    xs = []
    for lib in (fd, hf):
        s, m = lib.IPNDMScheduler(), Tiny()
        for steps in (10, 10, 6):
            s.set_timesteps(steps)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
            for t in s.timesteps:
                x = s.step(m(x, t), t, x).prev_sample
        xs.append(x)
    s, m = fd.IPNDMScheduler(), Tiny()  # a new scheduler's one pass of 6 steps
    s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for t in s.timesteps:
        x = s.step(m(x, t), t, x).prev_sample
    fresh = x
    assert rel(xs[0], xs[1]) <= TOL and torch.equal(xs[0], fresh)


def test_ipndm_before_set_timesteps_like_diffusers():
    a, b = fd.IPNDMScheduler(num_train_timesteps=40), hf.IPNDMScheduler(num_train_timesteps=40)
    assert torch.equal(a.timesteps, b.timesteps) and a.num_inference_steps == b.num_inference_steps
    x, m = torch.randn(SHAPE), Tiny()
    for t in b.timesteps[:5]:
        o = m(x, t)
        xa, xb = a.step(o, t, x).prev_sample, b.step(o, t, x).prev_sample
        assert rel(xa, xb) <= TOL
        x = xb


# ---- tiny Stable Diffusion pipelines ----

tp = pytest.importorskip("tiny_pipes")
pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
@pytest.mark.parametrize("name,over", [("LMSDiscreteScheduler", {}),
                                       ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
                                       ("DPMSolverSinglestepScheduler", {}),
                                       ("DPMSolverSinglestepScheduler", {"solver_order": 3,
                                                                         "use_karras_sigmas": True}),
                                       ("KDPM2DiscreteScheduler", {}),
                                       ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
                                       ("DEISMultistepScheduler", {}),
                                       ("DEISMultistepScheduler", {"solver_order": 3}),
                                       ("LCMScheduler", {}), ("TCDScheduler", {}), ("EDMEulerScheduler", {}),
                                       ("EDMDPMSolverMultistepScheduler", {}),
                                       ("EDMDPMSolverMultistepScheduler", {"solver_order": 3}),
                                       ("IPNDMScheduler", {})])
def test_sd_pipeline_like_diffusers(kind, name, over):
    from test_pipe_schedulers import SD_TOL, _compare, _config, _sd_run

    if name == "IPNDMScheduler" and kind == "img2img":
        pytest.skip("diffusers' IPNDMScheduler has no add_noise: img2img fails with it too")

    pipe = tp.sd_pipe(kind)
    cfg = _config(pipe.scheduler.config, over)
    pipe.scheduler = getattr(hf, name).from_config(cfg)
    ref = _sd_run(pipe, kind, 4, {})
    pipe.scheduler = getattr(fd, name).from_config(cfg)
    got = _sd_run(pipe, kind, 4, {})
    _compare(got, ref, SD_TOL, f"{kind}/{name}")


@pytest.mark.filterwarnings("default:fastdiff\\.diffusers\\.:UserWarning")
def test_lms_repeated_sigma_is_said_not_nan():
    """SD's config (leading, steps_offset 1) repeats σ_max in the training grid diffusers builds in __init__: its
    second step divides by 0 there (NaN); fastdiff's is finite, leaves the repeated σ out, and says so."""
    cfg = dict(SD, timestep_spacing="leading", steps_offset=1)
    a, b = fd.LMSDiscreteScheduler(**cfg), hf.LMSDiscreteScheduler(**cfg)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * b.init_noise_sigma
    xa, xb, m = x, x, Tiny()
    for i in range(2):
        t = b.timesteps[i]
        ea, eb = m(a.scale_model_input(xa, t), t), m(b.scale_model_input(xb, t), t)
        if i == 1:
            with pytest.warns(UserWarning, match="repeat"):
                xa = a.step(ea, t, xa).prev_sample
        else:
            xa = a.step(ea, t, xa).prev_sample
        xb = b.step(eb, t, xb).prev_sample
    assert not torch.isfinite(xb).all() and torch.isfinite(xa).all()
