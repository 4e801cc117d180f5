"""Full sampling loops against diffusers' schedulers with the same seeds.

Tolerance: diffusers keeps β, ᾱ and every per-step scalar in float32; fastdiff computes them in float64 and casts once.
docs/math.md ("Precision"): the scalars differ by ~3e-6 (DDIM) to ~5e-5 (DDPM at t = 1, cancellation in 1 − ᾱ_t/ᾱ_p).
Over a loop these relative errors add up and are amplified where x̂0 = (x − √(1−ᾱ)ε̂)/√ᾱ divides by a small √ᾱ, so
we compare with rtol = 1e-3 relative to the sample's scale (measured worst case over this matrix: 1.5e-4 relative,
DDPM with ε-prediction and no clipping, whose samples the stand-in model drives to |x| ~ 1e4).
"""
import itertools

import pytest
import torch

import fastdiff
from tests._tol import assert_close_per_element
from tests.conftest import requires_cpp

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

SHAPE = (2, 3, 5, 4)  # odd spatial sizes on purpose


class TinyModel(torch.nn.Module):
    """A deterministic, smooth stand-in for a noise-prediction network: mixes channels, depends on t."""

    def __init__(self, channels=3, out_mult=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(channels * out_mult, channels, generator=g) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(channels * out_mult, generator=g) * 0.1)

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).float().reshape(-1)
        t = t.expand(x.shape[0]).reshape(-1, *([1] * (x.dim() - 1))) / 1000.0
        h = torch.einsum("oc,bc...->bo...", self.w.to(x.dtype), x) + self.b.to(x.dtype).reshape(-1, *([1] * (x.dim() - 2)))
        return torch.tanh(h + t.to(x.dtype))


def diffusers_loop(sched, model, steps, seed, shape=SHAPE, **step_kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, generator=g, **step_kw).prev_sample
    return x


RTOL = {"linear": 5e-5, "scaled_linear": 5e-5, "squaredcos_cap_v2": 7e-4}


def assert_close_scaled(got, want, beta="linear"):
    assert_close_per_element(got, want, rtol=RTOL[beta], floor=1.0, what=f"{beta} β")


BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDS = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "linspace", "trailing"]
CLIPS = ["none", "clip", "threshold"]


def clip_cfg(clip):
    return dict(clip_sample=clip == "clip", clip_sample_range=1.5, thresholding=clip == "threshold",
                dynamic_thresholding_ratio=0.9, sample_max_value=2.0)


# "torch": the reference step functions; "cpp": the fused op, what "auto" runs on the CPU (tests/test_build_record.py
# checks that; naming it here means a missing extension skips these visibly instead of re-running the reference)
STEP_BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp)]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("beta,pred,spacing,clip", list(itertools.product(BETAS, PREDS, SPACINGS, CLIPS)))
def test_ddim_matches_diffusers(beta, pred, spacing, clip, backend):
    model = TinyModel()
    for eta, steps in ((0.0, 10), (0.5, 7), (1.0, 13)):
        sched = DDIMScheduler(beta_schedule=beta, prediction_type=pred, timestep_spacing=spacing,
                              steps_offset=1 if spacing == "leading" else 0, **clip_cfg(clip))
        want = diffusers_loop(sched, model, steps, seed=steps, eta=eta)
        got = fastdiff.ddim_sample(model, steps, shape=SHAPE, schedule=sched, eta=eta,
                                   generator=torch.Generator().manual_seed(steps), backend=backend)
        assert_close_scaled(got, want, beta)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("beta,pred,spacing,clip", list(itertools.product(BETAS, PREDS, SPACINGS, CLIPS)))
def test_ddpm_matches_diffusers(beta, pred, spacing, clip, backend):
    for variance, steps in (("fixed_small", 9), ("fixed_large", 12), ("learned_range", 6)):
        model = TinyModel(out_mult=2 if variance == "learned_range" else 1)
        sched = DDPMScheduler(beta_schedule=beta, prediction_type=pred, timestep_spacing=spacing,
                              variance_type=variance, **clip_cfg(clip))
        want = diffusers_loop(sched, model, steps, seed=steps)
        got = fastdiff.ddpm_sample(model, steps=steps, shape=SHAPE, schedule=sched,
                                   generator=torch.Generator().manual_seed(steps), backend=backend)
        assert_close_scaled(got, want, beta)


def test_ddim_use_clipped_model_output_and_final_alpha():
    model = TinyModel()
    sched = DDIMScheduler(clip_sample=True, set_alpha_to_one=False, steps_offset=1)
    want = diffusers_loop(sched, model, 20, seed=3, eta=1.0, use_clipped_model_output=True)
    got = fastdiff.ddim_sample(model, 20, shape=SHAPE, schedule=sched, eta=1.0, use_clipped_model_output=True,
                               generator=torch.Generator().manual_seed(3))
    assert_close_scaled(got, want)


def test_zero_terminal_snr_v_prediction_trailing():
    model = TinyModel()
    for cls, kw in ((DDIMScheduler, dict(eta=0.5)), (DDPMScheduler, {})):
        sched = cls(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                    beta_schedule="scaled_linear", clip_sample=False)
        want = diffusers_loop(sched, model, 10, seed=5, **kw)
        fn = fastdiff.ddim_sample if cls is DDIMScheduler else fastdiff.ddpm_sample
        got = fn(model, steps=10, shape=SHAPE, schedule=sched, generator=torch.Generator().manual_seed(5), **kw)
        assert_close_scaled(got, want, "scaled_linear")


def test_trained_betas_and_config_dict():
    model = TinyModel()
    betas = torch.linspace(2e-4, 0.03, 300).tolist()
    sched = DDIMScheduler(num_train_timesteps=300, trained_betas=betas, clip_sample=False)
    want = diffusers_loop(sched, model, 15, seed=1)
    got = fastdiff.ddim_sample(model, 15, shape=SHAPE, schedule=dict(sched.config),
                               generator=torch.Generator().manual_seed(1))
    assert_close_scaled(got, want)


def test_ddpm_full_1000_steps():
    model = TinyModel()
    sched = DDPMScheduler(clip_sample=True)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=g)
    sched.set_timesteps(1000)
    sched.num_inference_steps = None  # what DDPMPipeline's full loop does: prev t = t − 1
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, generator=g).prev_sample
    got = fastdiff.ddpm_sample(model, shape=SHAPE, schedule=sched, generator=torch.Generator().manual_seed(11))
    assert_close_scaled(got, x)


def test_pipeline_with_unet2dmodel():
    """diffusers' own DDIMPipeline and a UNet2DModel, called as is (output has .sample, t is a LongTensor (B,))."""
    from diffusers import DDIMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    sched = DDIMScheduler()
    pipe = DDIMPipeline(unet, sched)
    want = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=6, eta=0.5,
                output_type="np").images
    got = fastdiff.ddim_sample(unet, 6, schedule=sched, eta=0.5, shape=(2, 3, 8, 8),
                               generator=torch.Generator().manual_seed(4))
    got = (got / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(got - want).max() < 1e-4


def test_zero_snr_eta1_stays_finite():
    """At ᾱ_t = 0 with η = 1, √(1 − ᾱ_p − σ²) is √0: diffusers' float32 rounding gives NaN there, fastdiff stays
    finite (its argument is clamped at 0) — and agrees with diffusers wherever diffusers is finite (η < 1)."""
    model = TinyModel()
    sched = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                          clip_sample=False)
    want = diffusers_loop(sched, model, 10, seed=4, eta=1.0)
    got = fastdiff.ddim_sample(model, 10, shape=SHAPE, schedule=sched, eta=1.0,
                               generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(got).all()
    if not torch.isnan(want).any():  # a diffusers release that fixes the rounding must then agree with us
        assert_close_scaled(got, want, "squaredcos_cap_v2")  # zero terminal SNR: ᾱ_T = 0, as cosine's ≈ 0
