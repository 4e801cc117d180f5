"""The ten newer drop-in classes in a tiny SDXL pipeline and a UNet2DModel (DDPMPipeline) pipeline: same images as
diffusers' own classes (Stable Diffusion text2img/img2img: tests/diffusers/test_new_classes.py)."""
import numpy as np
import pytest
import torch

hf = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import fastdiff.diffusers as fd  # noqa: E402
import tiny_pipes as tp  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"error:fastdiff\.diffusers\.:UserWarning")]

NEW = ["LMSDiscreteScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
       "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler",
       "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "IPNDMScheduler"]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


@pytest.mark.parametrize("cls", NEW)
def test_new_class_in_a_tiny_sdxl_pipeline(cls):
    kw = dict(height=tp.SD_SIZE, width=tp.SD_SIZE, num_inference_steps=4, output_type="np")
    out = {}
    for lib in (hf, fd):
        pipe = tp.sdxl_pipe()
        pipe.scheduler = getattr(lib, cls).from_config(pipe.scheduler.config)
        out[lib.__name__] = pipe("a tiny photo", generator=torch.Generator().manual_seed(0), **kw).images
    a, b = out["fastdiff.diffusers"], out["diffusers"]
    assert np.isfinite(b).all()
    assert _rel(a, b) <= 1e-4, _rel(a, b)


@pytest.mark.parametrize("cls", NEW)
def test_new_class_in_a_unet2d_pipeline(cls):
    cfg = hf.DDPMScheduler(num_train_timesteps=1000).config
    out = {}
    for lib in (hf, fd):
        pipe = tp.unet_pipe("ddpm", hf.DDPMScheduler.from_config(cfg))
        pipe.scheduler = getattr(lib, cls).from_config(cfg)
        try:
            out[lib.__name__] = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5,
                                     output_type="np").images
        except TypeError:  # DDPMPipeline passes generator= to step, which these classes' step lacks: the loop by hand
            out[lib.__name__] = _unet_loop(getattr(lib, cls).from_config(cfg))
    a, b = out["fastdiff.diffusers"], out["diffusers"]
    assert np.isfinite(b).all()
    assert _rel(a, b) <= 1e-4, _rel(a, b)


@torch.no_grad()
def _unet_loop(sched, steps=5):
    """The UNet2DModel sampling loop a pipeline runs: x_T · init_noise_sigma, scale_model_input, the model, step."""
    unet = tp.unet2d()
    sched.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x.numpy()
