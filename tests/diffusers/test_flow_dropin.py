"""fastdiff.diffusers.FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler against diffusers' classes:
scheduler loops for every option, set_timesteps(sigmas=, mu=, timesteps=), img2img (set_begin_index, scale_noise),
host syncs and ops per step, and tiny SD3 / Flux pipelines (text encoders not needed: prompt embeddings passed)."""
import inspect

import diffusers as hf
import numpy as np
import pytest
import torch

import fastdiff.diffusers as fd
import opcount

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"error:fastdiff\.diffusers\.:UserWarning")]  # no hand-over expected

EULER, HEUN = "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"
BOUND = 1e-4


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _model(x, t):
    return 0.3 * x + 0.1 * torch.sin(3 * x) + t.reshape(-1, *[1] * (x.dim() - 1)) / 2000


def _loop(s, steps, seed=0, x=None, **kw):
    s.set_timesteps(steps, **kw)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) if x is None else x
    for t in s.timesteps:
        x = s.step(_model(x, t.expand(x.shape[0])), t, x, generator=g).prev_sample
    return x


CASES = [
    (EULER, {}, {}),
    (EULER, {"shift": 3.0}, {}),
    (EULER, {"shift": 3.0, "stochastic_sampling": True}, {}),
    (EULER, {"use_dynamic_shifting": True}, {"mu": 0.7}),
    (EULER, {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.3}),
    (EULER, {"use_dynamic_shifting": True}, {"mu": 0.7, "sigmas": np.linspace(1, 1 / 6, 6)}),  # Flux
    (EULER, {"shift": 3.0}, {"sigmas": [1.0, 0.7, 0.4, 0.2, 0.1, 0.05], "timesteps": [1000, 700, 400, 200, 100, 50]}),
    (EULER, {"shift": 3.0}, {"timesteps": [999.0, 700.5, 400.0, 200.0, 100.0, 50.0]}),
    (EULER, {"shift": 3.0, "invert_sigmas": True}, {}),
    (EULER, {"shift": 2.0, "shift_terminal": 0.1}, {}),
    (EULER, {"use_karras_sigmas": True, "shift": 2.0}, {}),
    (EULER, {"use_exponential_sigmas": True, "shift": 2.0}, {}),
    (EULER, {"use_beta_sigmas": True, "shift": 2.0}, {}),
    (HEUN, {}, {}),
    (HEUN, {"shift": 3.0}, {}),
]


@pytest.mark.parametrize("name,cfg,kw", CASES, ids=[f"{c[0][9:14]}-{c[1]}-{sorted(c[2])}" for c in CASES])
def test_loop_same_as_diffusers(name, cfg, kw):
    got, ref = getattr(fd, name)(**cfg), getattr(hf, name)(**cfg)
    steps = None if "sigmas" in kw or "timesteps" in kw else 6
    a, b = _loop(got, steps, **kw), _loop(ref, steps, **kw)
    assert got._hf_impl is None  # the fused step ran
    assert torch.equal(got.timesteps, ref.timesteps)
    assert torch.allclose(got.sigmas, ref.sigmas, rtol=0, atol=2e-7)
    assert _rel(a, b) <= BOUND, _rel(a, b)


def test_state_before_set_timesteps_and_signatures():
    for name in (EULER, HEUN):
        cls, ref_cls = getattr(fd, name), getattr(hf, name)
        assert inspect.signature(cls.__init__) == inspect.signature(ref_cls.__init__)
        for meth in ("set_timesteps", "step"):
            assert list(inspect.signature(getattr(cls, meth)).parameters) == \
                list(inspect.signature(getattr(ref_cls, meth)).parameters), (name, meth)
        assert cls.order == ref_cls.order and sorted(cls._compatibles) == sorted(ref_cls._compatibles)
        got, ref = cls(shift=3.0), ref_cls(shift=3.0)
        assert torch.equal(got.timesteps, ref.timesteps) and torch.equal(got.sigmas, ref.sigmas)
        assert (got.sigma_min, got.sigma_max, got.shift) == (ref.sigma_min, ref.sigma_max, ref.shift)
    got, ref = fd.FlowMatchEulerDiscreteScheduler(shift=3.0), hf.FlowMatchEulerDiscreteScheduler(shift=3.0)
    for s in (got, ref):
        s.set_shift(2.0)
    assert _rel(_loop(got, 5), _loop(ref, 5)) <= BOUND and got.shift == ref.shift == 2.0


@pytest.mark.parametrize("name", [EULER, HEUN])
def test_img2img_begin_index_and_scale_noise(name):
    """As SD3's img2img runs it: set_timesteps, set_begin_index(k), scale_noise(x0, timesteps[k:k+1], ε), then the
    loop over timesteps[k:]."""
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    outs = []
    for lib in (fd, hf):
        s = getattr(lib, name)(shift=3.0)
        s.set_timesteps(8)
        k = 2 if name == EULER else 4  # Heun: a first-order call
        s.set_begin_index(k)
        x = s.scale_noise(x0, s.timesteps[k:k + 1].repeat(2), eps)
        outs.append(x)
        for t in s.timesteps[k:]:
            x = s.step(_model(x, t.expand(2)), t, x).prev_sample
        assert s.step_index == len(s.timesteps)
        outs.append(x)
    assert _rel(outs[0], outs[2]) <= 1e-6  # the noised start
    assert _rel(outs[1], outs[3]) <= BOUND


def test_scale_noise_by_timestep_without_begin_index():
    got, ref = fd.FlowMatchEulerDiscreteScheduler(shift=3.0), hf.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    for s in (got, ref):
        s.set_timesteps(10)
    t = ref.timesteps[[1, 4, 7]]
    assert _rel(got.scale_noise(x0, t, eps), ref.scale_noise(x0, t, eps)) <= 1e-6


@pytest.mark.parametrize("name,cfg", [(EULER, {"shift": 3.0}), (EULER, {"stochastic_sampling": True}),
                                      (HEUN, {"shift": 3.0})])
def test_no_host_sync_one_fused_op_per_step(name, cfg):
    """diffusers' FlowMatch step reads the device (index search on the first step); fastdiff's steps read nothing
    and launch one fused op (plus the noise draw where diffusers draws)."""
    counts = {}
    for lib in (fd, hf):
        s = getattr(lib, name)(**cfg)
        s.set_timesteps(5, device="cpu")  # as pipelines call it (the coefficient rows go to the device here)
        x = torch.randn(1, 4, 8, 8)
        g = torch.Generator().manual_seed(0)
        steps = counts[lib.__name__] = []
        for t in s.timesteps:
            o = _model(x, t.reshape(1))
            with opcount.OpCounter() as c:  # the step alone (diffusers' FlowMatch classes have no scale_model_input)
                x = s.step(o, t, x, generator=g).prev_sample
            steps.append(c)
    got, ref = counts["fastdiff.diffusers"], counts["diffusers"]
    assert [len(c.syncs) for c in got] == [0] * len(got)
    assert sum(len(c.syncs) for c in ref) > 0
    for c in got:
        fused = [op for op in c.ops if op.startswith("multistep_step")]
        assert len(fused) == 1 and set(c.ops) - set(fused) <= {"randn"}, c.ops
    assert [c.ops.count("randn") for c in got] == [c.ops.count("randn") + c.ops.count("normal_") for c in ref]


def test_errors_as_diffusers():
    s = fd.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        s.set_timesteps(4)
    s = fd.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="same length"):
        s.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(3, sigmas=[1.0, 0.5])
    s.set_timesteps(4)
    x = torch.randn(1, 2, 2)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 0, x)


def test_equivalent_swaps_flow_schedulers():
    old = hf.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    new = fd.equivalent(old)
    assert type(new) is fd.FlowMatchEulerDiscreteScheduler and new.config.shift == 3.0 and new.config.use_dynamic_shifting
    assert type(fd.equivalent(hf.FlowMatchHeunDiscreteScheduler())) is fd.FlowMatchHeunDiscreteScheduler


# ---- tiny SD3 / Flux pipelines --------------------------------------------------------------------------------------

def _vae():
    return hf.AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            norm_num_groups=8, shift_factor=0.1)


def _sd3(cls=hf.StableDiffusion3Pipeline):
    torch.manual_seed(0)
    tr = hf.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    return cls(transformer=tr, scheduler=hf.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(),
               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
               tokenizer_3=None)


def _flux():
    torch.manual_seed(0)
    tr = hf.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    sch = hf.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return hf.FluxPipeline(transformer=tr, scheduler=sch, vae=_vae(), text_encoder=None, tokenizer=None,
                           text_encoder_2=None, tokenizer_2=None)


def _embeds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)


def _both(pipe, cls, **kw):
    """Latents of the pipeline with diffusers' scheduler of `cls`'s name, then with `cls`, from one config."""
    with torch.no_grad():
        pipe.scheduler = getattr(hf, cls.__name__).from_config(pipe.scheduler.config)
        ref = pipe(generator=torch.Generator().manual_seed(1), output_type="latent", **kw).images
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        got = pipe(generator=torch.Generator().manual_seed(1), output_type="latent", **kw).images
    return got, ref


@pytest.mark.parametrize("cls", [fd.FlowMatchEulerDiscreteScheduler, fd.FlowMatchHeunDiscreteScheduler])
def test_tiny_sd3_pipeline_latents(cls):
    pe, pp = _embeds()
    got, ref = _both(_sd3(), cls, prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=0 * pe,
                     negative_pooled_prompt_embeds=0 * pp, num_inference_steps=4, height=16, width=16)
    assert _rel(got, ref) <= BOUND, _rel(got, ref)


def test_tiny_sd3_img2img_pipeline_latents():
    pe, pp = _embeds()
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    got, ref = _both(_sd3(hf.StableDiffusion3Img2ImgPipeline), fd.FlowMatchEulerDiscreteScheduler, image=image,
                     strength=0.6, prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=0 * pe,
                     negative_pooled_prompt_embeds=0 * pp, num_inference_steps=5)
    assert _rel(got, ref) <= BOUND, _rel(got, ref)


def test_tiny_flux_pipeline_latents():
    """Flux: custom σ's (linspace(1, 1/N, N)) and mu from the image sequence length, as the pipeline passes them."""
    pe, pp = _embeds()
    got, ref = _both(_flux(), fd.FlowMatchEulerDiscreteScheduler, prompt_embeds=pe, pooled_prompt_embeds=pp,
                     num_inference_steps=4, height=16, width=16, guidance_scale=1.0)
    assert _rel(got, ref) <= BOUND, _rel(got, ref)


def test_optimize_swaps_the_flow_scheduler_of_a_flux_pipeline():
    import fastdiff

    pe, pp = _embeds()
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=4, height=16, width=16,
              guidance_scale=1.0, output_type="latent")
    pipe = _flux()
    with torch.no_grad():
        ref = pipe(generator=torch.Generator().manual_seed(1), **kw).images
        fastdiff.optimize(pipe)
        assert type(pipe.scheduler) is fd.FlowMatchEulerDiscreteScheduler
        got = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert _rel(got, ref) <= BOUND, _rel(got, ref)


FL = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
MULTISTEP = [
    ("DPMSolverMultistepScheduler", dict(FL, flow_shift=3.0), {}),  # Sana
    ("DPMSolverMultistepScheduler", dict(FL, use_dynamic_shifting=True), {"mu": 0.8}),
    ("DPMSolverMultistepScheduler", dict(FL, flow_shift=3.0, algorithm_type="sde-dpmsolver++"), {}),
    ("UniPCMultistepScheduler", dict(FL, flow_shift=5.0), {}),  # Wan
    ("UniPCMultistepScheduler", dict(FL, use_dynamic_shifting=True), {"mu": 0.8}),
    ("UniPCMultistepScheduler", dict(FL, flow_shift=3.0), {"sigmas": np.linspace(1, 0.05, 6)}),
    ("UniPCMultistepScheduler", dict(FL, use_dynamic_shifting=True, shift_terminal=0.05),
     {"mu": 0.8, "sigmas": np.linspace(1, 0.05, 6)}),
    ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True), {}),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), {}),
    ("UniPCMultistepScheduler", dict(use_beta_sigmas=True), {}),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True), {}),
    ("HeunDiscreteScheduler", dict(use_beta_sigmas=True), {}),
]


@pytest.mark.parametrize("name,cfg,kw", MULTISTEP, ids=[f"{c[0][:5]}-{c[1]}-{sorted(c[2])}" for c in MULTISTEP])
def test_multistep_and_sigma_options_run_fused_as_diffusers(name, cfg, kw):
    """Flow σ's (Sana, Wan: set_timesteps(mu=), UniPC's sigmas=) and the exponential / beta / λ σ grids: fused, with
    diffusers' timesteps and numbers (bound 5e-4 of max|x| for the multistep solvers)."""
    got, ref = getattr(fd, name)(**cfg), getattr(hf, name)(**cfg)
    steps = None if "sigmas" in kw else 6
    outs = []
    for s in (got, ref):
        s.set_timesteps(steps, **kw)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * s.init_noise_sigma
        g = torch.Generator().manual_seed(0)
        gen = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
        for t in s.timesteps:
            xi = s.scale_model_input(x, t)
            x = s.step(_model(xi, t.reshape(1).expand(2).float()), t, x, **gen).prev_sample
        outs.append(x)
    assert got._hf_impl is None and torch.equal(got.timesteps, ref.timesteps)
    assert _rel(*outs) <= 5e-4, _rel(*outs)


@pytest.mark.parametrize("name,cfg", [("DPMSolverMultistepScheduler", dict(FL, flow_shift=3.0)),
                                      ("UniPCMultistepScheduler", dict(FL, flow_shift=5.0)),
                                      ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True))])
def test_multistep_flow_and_sigma_options_mid_schedule(name, cfg):
    """img2img: set_begin_index(k), the history restarted at k as diffusers does, on these grids too."""
    outs = []
    for lib in (fd, hf):
        s = getattr(lib, name)(**cfg)
        s.set_timesteps(8)
        s.set_begin_index(3)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        for t in s.timesteps[3:]:
            x = s.step(_model(x, t.reshape(1).expand(2).float()), t, x).prev_sample
        outs.append(x)
    assert _rel(*outs) <= 5e-4, _rel(*outs)


def test_heun_refuses_a_second_order_start():
    s = fd.FlowMatchHeunDiscreteScheduler()
    s.set_timesteps(4)
    s.set_begin_index(1)
    x = torch.randn(1, 2, 2)
    with pytest.raises(NotImplementedError, match="second-order"):
        s.step(x, s.timesteps[1], x)
