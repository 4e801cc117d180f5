"""Stable Diffusion's siblings: a tiny SDXL pipeline (added time conditioning, two text encoders) and a tiny
ControlNet pipeline (scale_model_input called for the ControlNet and the U-Net), with fastdiff's schedulers and with
fastdiff.optimize, against diffusers."""
import copy

import diffusers as hf
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import fastdiff.diffusers as fd  # noqa: E402
import fastdiff.optimize  # noqa: E402
import tiny_pipes as tp  # noqa: E402

# the fused step is what these tests check: a hand-over to diffusers' own class (fastdiff.diffusers._Base._to_diffusers,
# warned "fastdiff.diffusers.<Class>: ...") is an error here unless a test expects it (pytest.warns)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"error:fastdiff\.diffusers\.:UserWarning")]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _deep(pipe, names):
    for n in names:
        setattr(pipe, n, copy.deepcopy(getattr(pipe, n)))
    return pipe


@pytest.mark.parametrize("kind,cls", [("sdxl", "EulerDiscreteScheduler"), ("sdxl", "DPMSolverMultistepScheduler"),
                                      ("controlnet", "EulerAncestralDiscreteScheduler"),
                                      ("controlnet", "UniPCMultistepScheduler")])
def test_sibling_pipelines(kind, cls):
    make = tp.sdxl_pipe if kind == "sdxl" else tp.controlnet_pipe
    kw = dict(height=tp.SD_SIZE, width=tp.SD_SIZE, num_inference_steps=4, output_type="np")
    if kind == "controlnet":
        kw["image"] = torch.rand(1, 3, tp.SD_SIZE, tp.SD_SIZE, generator=torch.Generator().manual_seed(0))
    out = {}
    for label in ("diffusers", "fastdiff", "optimize"):
        pipe = make()
        cfg = pipe.scheduler.config
        pipe.scheduler = (fd if label == "fastdiff" else hf).__dict__[cls].from_config(cfg)
        if label == "optimize":
            _deep(pipe, ["unet", "vae"] + (["controlnet"] if kind == "controlnet" else []))
            fastdiff.optimize(pipe)
            rep = fastdiff.optimize.report(pipe)
            assert rep["scheduler"] == cls and rep["resnets"] > 0 and not rep["resnets_left"]
        out[label] = pipe("a tiny photo", generator=torch.Generator().manual_seed(0), **kw).images
    for label in ("fastdiff", "optimize"):
        err = _rel(out[label], out["diffusers"])
        print(f"{kind}/{cls}/{label}: image {err:.2e}")
        assert err <= 1e-4
