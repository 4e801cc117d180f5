"""Host syncs and launched ops per scheduler step inside a real pipeline, counted by the aten ops each step
dispatches (opcount.py): every fastdiff scheduler reads no tensor value back to the host and launches one fused op
(plus the noise draw where diffusers draws), where diffusers' classes read values (nonzero/item on the first step;
DDIM, DDPM, Euler and PNDM every step) and launch 8–138 small ops."""
import diffusers as hf
import pytest
import torch

pytest.importorskip("transformers")

import fastdiff.diffusers as fd  # noqa: E402
import opcount  # noqa: E402
import tiny_pipes as tp  # noqa: E402

# the fused step is what these tests check: a hand-over to diffusers' own class (fastdiff.diffusers._Base._to_diffusers,
# warned "fastdiff.diffusers.<Class>: ...") is an error here unless a test expects it (pytest.warns)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"error:fastdiff\.diffusers\.:UserWarning")]

FUSED = {"multistep_step_", "multistep_step_triton", "sampler_step_out", "sampler_step_out_triton"}
CASES = [(name, {}, {}) for name in fd.SCHEDULERS] + [
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}),
]


def _counts(pipe, kind, call):
    kw = dict(num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent", **call)
    if kind == "img2img":
        kw.update(image=tp.init_image(), strength=0.75)
    else:
        kw.update(height=tp.SD_SIZE, width=tp.SD_SIZE)
    with opcount.counting(pipe.scheduler) as c:
        pipe("a", **kw)
    return c


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
@pytest.mark.parametrize("name,over,call", CASES, ids=[f"{c[0]}{'-' + str(c[1] or c[2]) if c[1] or c[2] else ''}"
                                                       for c in CASES])
def test_no_host_sync_one_fused_op_per_step(kind, name, over, call):
    if name == "PNDMScheduler" and kind == "img2img" and not over.get("skip_prk_steps"):
        pytest.skip("PRK warm-up started mid-schedule is refused (test_prk_mid_schedule_is_refused)")
    if name == "IPNDMScheduler" and kind == "img2img":
        pytest.skip("diffusers' IPNDMScheduler has no add_noise: img2img fails with it too")
    pipe = tp.sd_pipe(kind)
    cfg = {k: v for k, v in dict(pipe.scheduler.config).items() if k != "_use_default_values"}
    cfg.update(over)
    pipe.scheduler = getattr(hf, name).from_config(cfg)
    ref = _counts(pipe, kind, call)
    pipe.scheduler = getattr(fd, name).from_config(cfg)
    got = _counts(pipe, kind, call)
    print(f"{kind}/{name} {over or call or ''}: syncs per step fastdiff {got.syncs_per_step()} diffusers "
          f"{ref.syncs_per_step()}; ops per step fastdiff {got.ops_per_step()} diffusers {ref.ops_per_step()}")
    assert len(got.steps) == len(ref.steps) > 0
    assert got.syncs_per_step() == [0] * len(got.steps), [c.syncs for c in got.steps]
    if kind == "text2img":  # diffusers' first-step search at least (img2img: pipelines set the begin index)
        assert sum(ref.syncs_per_step()) > 0
    # PNDMScheduler has no begin index (as in diffusers): starting mid-schedule, its first step finds the start by
    # the timestep's address and builds the plan of the remaining grid then (host work, no sync)
    late = name == "PNDMScheduler" and kind == "img2img"
    for c in got.steps[1:] if late else got.steps:
        fused = [op for op in c.ops if op in FUSED]
        assert len(fused) == 1, c.ops
        assert set(c.ops) - FUSED <= {"randn"} and c.ops.count("randn") <= 1, c.ops
    # noise drawn exactly where diffusers draws it
    assert [c.ops.count("randn") for c in got.steps] == [c.ops.count("randn") + c.ops.count("normal_")
                                                         for c in ref.steps]


def test_prk_mid_schedule_is_refused():
    pipe = tp.sd_pipe("img2img")
    pipe.scheduler = fd.PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(NotImplementedError, match="skip_prk_steps"):
        pipe("a", num_inference_steps=4, image=tp.init_image(), strength=0.75, output_type="latent")
