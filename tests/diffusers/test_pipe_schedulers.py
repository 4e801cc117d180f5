"""fastdiff.diffusers' schedulers in real (tiny, offline) diffusers pipelines against diffusers' own classes: same
generator, same images, final latents and U-Net inputs at every step. Tolerances (issue 14): 1e-4 of max|image| for
the Stable Diffusion pipelines, 1e-3 for the UNet2DModel pipelines with clip_sample (measured worst: printed by
-s)."""
import inspect

import diffusers as hf
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import fastdiff.diffusers as fd  # noqa: E402
import tiny_pipes as tp  # noqa: E402

# the fused step is what these tests check: a hand-over to diffusers' own class (fastdiff.diffusers._Base._to_diffusers,
# warned "fastdiff.diffusers.<Class>: ...") is an error here unless a test expects it (pytest.warns)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"error:fastdiff\.diffusers\.:UserWarning")]

SD_TOL = 1e-4
UNET_TOL = 1e-3

# (name, diffusers class, config overrides, pipeline call kwargs)
SD_CASES = [
    ("ddim_eta0", "DDIMScheduler", {}, {}),
    ("ddim_eta1_gen_list", "DDIMScheduler", {}, {"eta": 1.0, "num_images_per_prompt": 2, "gen_list": True}),
    ("ddim_trailing_v_zsnr", "DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                                               "rescale_betas_zero_snr": True}, {}),
    ("ddpm", "DDPMScheduler", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, {}),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    ("dpmpp_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("euler", "EulerDiscreteScheduler", {}, {}),
    ("euler_custom_sigmas", "EulerDiscreteScheduler", {}, {"sigmas": [14.6, 4.0, 1.2, 0.3, 0.0]}),
    ("dpmpp_custom_timesteps", "DPMSolverMultistepScheduler", {}, {"timesteps": [999, 650, 300, 40]}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}, {}),
    ("heun", "HeunDiscreteScheduler", {}, {}),
    ("unipc", "UniPCMultistepScheduler", {}, {}),
    ("plms", "PNDMScheduler", {"skip_prk_steps": True}, {}),
]


def _config(config, over):
    """A scheduler config with overrides that from_config honours (it ignores the keys listed in
    `_use_default_values`, the parameters the original was built without)."""
    cfg = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    cfg.update(over)
    return cfg


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _sd_run(pipe, kind, steps, call):
    call = dict(call)
    n = call.pop("num_images_per_prompt", 1)
    gen = [torch.Generator().manual_seed(10 + i) for i in range(n)] if call.pop("gen_list", False) else \
        torch.Generator().manual_seed(0)
    rec = tp.UNetInputs(pipe.unet)
    final = {}

    def grab(p, i, t, kw):
        final["latents"] = kw["latents"].clone()
        return kw

    kw = dict(num_inference_steps=steps, generator=gen, output_type="np", num_images_per_prompt=n,
              callback_on_step_end=grab, **call)
    if kind == "img2img":
        kw.update(image=tp.init_image(), strength=0.6)
    else:
        kw.update(height=tp.SD_SIZE, width=tp.SD_SIZE)
    try:
        img = pipe("a tiny photo", **kw).images
    finally:
        rec.close()
    return img, final["latents"], rec.seen


def _compare(a, b, tol, label):
    img_a, lat_a, seen_a = a
    img_b, lat_b, seen_b = b
    assert len(seen_a) == len(seen_b), f"{label}: {len(seen_a)} U-Net calls vs diffusers' {len(seen_b)}"
    errs = [_rel(xa, xb) for (xa, _), (xb, _) in zip(seen_a, seen_b)]
    assert [t for _, t in seen_a] == [t for _, t in seen_b], f"{label}: U-Net timesteps differ"
    e_img, e_lat = _rel(img_a, img_b), _rel(lat_a, lat_b)
    print(f"{label}: image {e_img:.2e} latents {e_lat:.2e} unet-inputs {max(errs):.2e} ({len(errs)} calls)")
    assert np.isfinite(img_a).all()
    assert e_img <= tol and e_lat <= tol and max(errs) <= tol, (label, e_img, e_lat, max(errs))


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
@pytest.mark.parametrize("name,cls,over,call", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_sd_pipeline_matches_diffusers(kind, name, cls, over, call):
    """Scheduler swapped after construction (`from_config(pipe.scheduler.config)`), as users do."""
    pipe = tp.sd_pipe(kind)
    cfg = _config(pipe.scheduler.config, over)
    steps = 4
    pipe.scheduler = getattr(hf, cls).from_config(cfg)
    ref = _sd_run(pipe, kind, steps, call)
    pipe.scheduler = getattr(fd, cls).from_config(cfg)
    assert type(pipe.scheduler).__module__ == "fastdiff.diffusers"
    assert all(pipe.scheduler.config[k] == v for k, v in over.items())
    got = _sd_run(pipe, kind, steps, call)
    _compare(got, ref, SD_TOL, f"{kind}/{name}")


@pytest.mark.parametrize("cls", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
def test_swap_before_construction(cls):
    """A fastdiff scheduler given to the pipeline's constructor: StableDiffusionPipeline rewrites steps_offset and
    clip_sample in its config afterwards, and the scheduler must use the rewritten values (as diffusers' does)."""
    comp = dict(tp.sd_pipe().components)
    out = []
    for lib in (hf, fd):
        comp["scheduler"] = getattr(lib, cls)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              steps_offset=0, **({"clip_sample": True} if cls == "DDIMScheduler"
                                                                 else {}))
        pipe = hf.StableDiffusionPipeline(**comp)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.scheduler.config.steps_offset == 1
        out.append(_sd_run(pipe, "text2img", 4, {}))
    _compare(out[1], out[0], SD_TOL, f"before-construction/{cls}")


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "DDIMScheduler", "HeunDiscreteScheduler"])
def test_one_instance_two_step_counts(cls):
    """set_timesteps resets every piece of state: one scheduler instance runs 3 then 6 steps, like diffusers'."""
    pipe = tp.sd_pipe()
    cfg = pipe.scheduler.config
    ref_s, fd_s = getattr(hf, cls).from_config(cfg), getattr(fd, cls).from_config(cfg)
    for steps in (3, 6):
        pipe.scheduler = ref_s
        ref = _sd_run(pipe, "text2img", steps, {})
        pipe.scheduler = fd_s
        got = _sd_run(pipe, "text2img", steps, {})
        _compare(got, ref, SD_TOL, f"{cls}/{steps} steps")


UNET_CASES = [
    ("ddim_eta0", "ddim", "DDIMScheduler", {}, {"eta": 0.0}),
    ("ddim_eta1", "ddim", "DDIMScheduler", {}, {"eta": 1.0}),
    ("ddpm", "ddpm", "DDPMScheduler", {}, {}),
    ("dpmpp", "ddpm", "DPMSolverMultistepScheduler", {}, {}),
    ("dpmpp_thresholding", "ddpm", "DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5}, {}),
    ("ddim_thresholding", "ddim", "DDIMScheduler", {"thresholding": True, "sample_max_value": 1.5}, {"eta": 0.5}),
    ("ddpm_v_fixed_large", "ddpm", "DDPMScheduler", {"prediction_type": "v_prediction",
                                                      "variance_type": "fixed_large"}, {}),
]


@pytest.mark.parametrize("name,pipe_kind,cls,over,call", UNET_CASES, ids=[c[0] for c in UNET_CASES])
def test_unet2d_pipeline_matches_diffusers(name, pipe_kind, cls, over, call):
    base = hf.DDPMScheduler(num_train_timesteps=1000)  # clip_sample=True, as the DDPM checkpoints
    cfg = _config(base.config, over)
    res = []
    for lib in (hf, fd):
        pipe = tp.unet_pipe(pipe_kind, hf.DDPMScheduler.from_config(cfg))
        pipe.scheduler = getattr(lib, cls).from_config(cfg)
        assert all(pipe.scheduler.config[k] == v for k, v in over.items())
        rec = tp.UNetInputs(pipe.unet)
        try:
            img = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5,
                       output_type="np", **call).images
        finally:
            rec.close()
        res.append((img, rec.seen[-1][0], rec.seen))
    _compare(res[1], res[0], UNET_TOL, f"unet2d/{name}")


EXTENSIONS = {("set_timesteps", "DDIMScheduler"), ("set_timesteps", "UniPCMultistepScheduler")}


def test_signatures_and_config_are_diffusers():
    for name, cls in fd.SCHEDULERS.items():
        ref = getattr(hf, name)
        assert inspect.signature(cls.__init__) == inspect.signature(ref.__init__), name
        for meth in ("set_timesteps", "step"):
            ours = list(inspect.signature(getattr(cls, meth)).parameters)
            theirs = list(inspect.signature(getattr(ref, meth)).parameters)
            # diffusers' parameters in diffusers' order; the one extension: set_timesteps(timesteps=) in DDIM and
            # UniPC (a custom / calibrated grid), appended after them
            extra = ["timesteps"] if (meth, name) in EXTENSIONS else []
            assert ours == theirs + extra, (name, meth)
        assert cls.order == ref.order and sorted(cls._compatibles) == sorted(ref._compatibles), name
        a, b = cls(), ref()
        assert dict(a.config) == dict(b.config), name
        c = cls.from_config(b.config)
        assert dict(c.config) == dict(b.config)
        a.set_timesteps(7)
        b.set_timesteps(7)
        assert a.timesteps.dtype == b.timesteps.dtype and torch.equal(a.timesteps, b.timesteps), name
        if getattr(b, "sigmas", None) is not None and torch.is_tensor(b.sigmas):
            assert torch.allclose(a.sigmas, b.sigmas.float(), rtol=1e-5, atol=1e-6), name
        assert abs(float(a.init_noise_sigma) - float(b.init_noise_sigma)) <= 1e-5 * float(b.init_noise_sigma), name
        assert hasattr(a, "set_begin_index") == hasattr(b, "set_begin_index"), name


def test_settings_fastdiff_lacks_run_on_diffusers_class_and_its_errors_stay():
    """A setting the fused step lacks (or refuses where diffusers computes NaN) is taken, warned naming it, and run
    by diffusers' own class; what diffusers' class refuses is still an error; s_churn is the one step argument
    refused (tests/diffusers/test_dropin.py checks the hand-over loop for loop)."""
    with pytest.warns(UserWarning, match="(?s)solver_p.*diffusers' own UniPCMultistepScheduler"):
        fd.UniPCMultistepScheduler(solver_p=hf.DPMSolverMultistepScheduler())
    with pytest.raises(ValueError, match="use_flow_sigmas"):  # diffusers' own error
        fd.UniPCMultistepScheduler().set_timesteps(sigmas=[3.0, 1.0, 0.0])
    with pytest.warns(UserWarning, match="fixed_large_log"):
        fd.DDPMScheduler(variance_type="fixed_large_log")
    s = fd.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        fd.DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500, 0])
    with pytest.raises(ValueError, match="Only one"):
        s.set_timesteps(timesteps=[999.0, 10.0], sigmas=[3.0, 1.0, 0.0])
    s.set_timesteps(4)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(NotImplementedError, match="s_churn"):
        s.step(x, s.timesteps[0], x, s_churn=1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        fd.DDIMScheduler().step(x, 10, x)


def test_ddpm_custom_timesteps_and_add_noise():
    """DDPM's custom timesteps (the previous timestep is the next on the list) and add_noise/get_velocity, against
    diffusers', with the step noise drawn from the same generator."""
    ref, got = hf.DDPMScheduler(), fd.DDPMScheduler()
    for s in (ref, got):
        s.set_timesteps(timesteps=[900, 640, 333, 120, 7, 0])
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([900, 7])
    assert _rel(got.add_noise(x0, eps, t), ref.add_noise(x0, eps, t)) < 1e-5
    assert _rel(got.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t)) < 1e-5
    xs = []
    for s in (ref, got):
        x, g = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2)
        for t in s.timesteps:
            x = s.step(0.1 * x, t, x, generator=g).prev_sample
        xs.append(x)
    assert _rel(xs[1], xs[0]) < 1e-3


def test_prev_sample_is_fresh_and_history_owned():
    """step returns a new tensor every call (pipelines keep references to latents) and never writes its inputs."""
    s = fd.DPMSolverMultistepScheduler()
    s.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    outs = []
    for t in s.timesteps:
        o = torch.randn_like(x)
        x_in, o_in = x.clone(), o.clone()
        new = s.step(o, t, x).prev_sample
        assert torch.equal(x, x_in) and torch.equal(o, o_in)
        assert all(new.data_ptr() != p.data_ptr() for p in outs + [x])
        outs.append(new)
        x = new


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                 "HeunDiscreteScheduler", "DDIMScheduler", "PNDMScheduler"])
def test_add_noise_like_diffusers(cls):
    """add_noise as each diffusers class computes it: by the begin index when set, else by each timestep's
    position in the grid (found on the device here)."""
    ref, got = getattr(hf, cls)(), getattr(fd, cls)()
    for s in (ref, got):
        s.set_timesteps(6)
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = ref.timesteps[[1, 2, 4]]
    assert _rel(got.add_noise(x0, eps, t), ref.add_noise(x0, eps, t)) < 1e-5
    if hasattr(ref, "set_begin_index"):
        for s in (ref, got):
            s.set_begin_index(2)
        t = ref.timesteps[2:3].repeat(3)
        assert _rel(got.add_noise(x0, eps, t), ref.add_noise(x0, eps, t)) < 1e-5


def test_scheduler_without_equivalent_is_kept():
    import fastdiff.optimize

    pipe = tp.sd_pipe()
    pipe.scheduler = hf.ScoreSdeVeScheduler.from_config(pipe.scheduler.config)
    fastdiff.optimize(pipe, fuse=False)
    assert type(pipe.scheduler) is hf.ScoreSdeVeScheduler and fd.equivalent(pipe.scheduler) is None


def test_no_shadowing_of_the_real_diffusers():
    import os
    import sys

    d = sys.modules["diffusers"]
    assert fd.__name__ == "fastdiff.diffusers" and d.__name__ == "diffusers" and fd._hf is d is hf
    assert os.path.dirname(d.__file__) != os.path.dirname(fd.__file__)
    assert d.DDIMScheduler is not fd.DDIMScheduler and issubclass(fd.DDIMScheduler, d.ConfigMixin)


def _synthetic_loop(lib, name, dtype, steps=8):
    s = getattr(lib, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           **({"clip_sample": False} if name in ("DDIMScheduler", "DDPMScheduler") else {}))
    s.set_timesteps(steps)
    x = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma).to(dtype)
    for t in s.timesteps:
        xi = s.scale_model_input(x, t).double()
        x = s.step((0.3 * xi + 0.1 * torch.sin(3 * xi)).to(dtype), t, x, return_dict=False)[0]
        assert x.dtype == dtype
    return x.double()


@pytest.mark.parametrize("name", [n for n in fd.SCHEDULERS if n not in ("DDPMScheduler",
                                                                       "EulerAncestralDiscreteScheduler",
                                                                       "KDPM2AncestralDiscreteScheduler",
                                                                       "LCMScheduler", "TCDScheduler",
                                                                       "EDMEulerScheduler",
                                                                       "EDMDPMSolverMultistepScheduler",
                                                                       "IPNDMScheduler")])  # no β config
def test_dtypes_float64_exact_and_half_no_worse_than_diffusers(name):
    """float64 samples run the reference in float64 (= diffusers' float64 loop); fp16/bf16 samples (math in
    float32, one rounding per output) stay within 2× diffusers' own error against that float64 loop."""
    ref = _synthetic_loop(hf, name, torch.float64)
    assert _rel(_synthetic_loop(fd, name, torch.float64), ref) < 1e-6
    for dt in (torch.float16, torch.bfloat16):
        e_hf, e_fd = _rel(_synthetic_loop(hf, name, dt), ref), _rel(_synthetic_loop(fd, name, dt), ref)
        assert e_fd <= 2 * e_hf + 1e-3, (dt, e_fd, e_hf)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_small_log"])
def test_ddpm_variances_like_diffusers(variance_type):
    """DDPM with a 2·C-channel model output (prediction, variance) as diffusers splits it; noise from the same
    generator."""
    xs = []
    for lib in (hf, fd):
        s = lib.DDPMScheduler(variance_type=variance_type, clip_sample=False)
        s.set_timesteps(6)
        x, g = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2)
        for t in s.timesteps:
            v = 0.5 * torch.tanh(x) + (0.6 if variance_type == "learned" else 0.0)  # learned: v is the variance itself
            out = torch.cat([0.2 * x, v], 1) if variance_type.startswith("learned") else 0.2 * x
            x = s.step(out, t, x, generator=g).prev_sample
        xs.append(x)
    assert _rel(xs[1], xs[0]) < 1e-4


@pytest.mark.parametrize("cls,kw", [
    ("EulerDiscreteScheduler", {"timesteps": [999, 700, 420, 130, 20]}),
    ("EulerDiscreteScheduler", {"sigmas": [14.6, 6.0, 2.5, 0.9, 0.2, 0.0]}),
    ("HeunDiscreteScheduler", {"timesteps": [999, 700, 420, 130, 20]}),
    ("DPMSolverMultistepScheduler", {"timesteps": [999, 700, 420, 130, 20]}),
])
def test_custom_grids_like_diffusers(cls, kw):
    xs = []
    for lib in (hf, fd):
        s = getattr(lib, cls)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        s.set_timesteps(**kw)
        xs.append((s.timesteps.clone(), s.sigmas.clone(), float(s.init_noise_sigma)))
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        for t in s.timesteps:
            xi = s.scale_model_input(x, t)
            x = s.step(0.3 * xi + 0.1 * torch.sin(3 * xi), t, x, return_dict=False)[0]
        xs[-1] += (x,)
    (t0, s0, i0, x0), (t1, s1, i1, x1) = xs
    assert t0.dtype == t1.dtype and torch.equal(t0, t1)
    assert torch.allclose(s1, s0.float(), rtol=1e-5) and abs(i1 - i0) <= 1e-5 * i0
    assert _rel(x1, x0) < 1e-5


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                                 "HeunDiscreteScheduler"])
def test_timestep_forms_and_layouts(cls):
    """The step is the same whatever form the timestep takes (a view of scheduler.timesteps, a Python number, a
    separate tensor; DDIM/DDPM step from the value) and whatever the sample's layout (channels_last, non-dense)."""
    def loop(form, layout):
        s = getattr(fd, cls)(clip_sample=False) if cls in ("DDIMScheduler", "DDPMScheduler") else getattr(fd, cls)()
        s.set_timesteps(5)
        x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        g = torch.Generator().manual_seed(1)
        host = s.timesteps.tolist()
        for i, t in enumerate(s.timesteps):
            tt = {"view": t, "number": host[i], "tensor": torch.tensor(host[i], dtype=t.dtype)}[form]
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "strided":
                x = torch.cat([x, x], 3)[..., : x.shape[3]]  # a non-dense view of the same values
            xi = s.scale_model_input(x, tt)
            kw = {"generator": g} if cls == "DDPMScheduler" else {}
            x = s.step(0.2 * xi, tt, x, return_dict=False, **kw)[0]
        return x
    ref = loop("view", "contiguous")
    for form in ("number", "tensor"):
        if cls == "HeunDiscreteScheduler" and form == "number":
            continue
        assert torch.equal(loop(form, "contiguous"), ref), form
    for layout in ("channels_last", "strided"):
        assert _rel(loop("view", layout), ref) < 1e-6, layout
