"""fastdiff.optimize on real tiny pipelines and bare models: every ResnetBlock2D fused (and its output unchanged
within float32 rounding), the scheduler swapped, idempotent; the U-Net graph cache keyed on input structure and on
the weights' storage (capture stubbed on the CPU); the CPU compile option's recompile rule (compile stubbed)."""
import copy

import diffusers as hf
import numpy as np
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

pytest.importorskip("transformers")

import fastdiff  # noqa: E402
import fastdiff.diffusers as fd  # noqa: E402
import fastdiff.optimize  # noqa: E402
import opcount  # noqa: E402
import tiny_pipes as tp  # noqa: E402
from fastdiff.optimize import FrozenCompiled, GraphedForward  # noqa: E402

# the fused step is what these tests check: a hand-over to diffusers' own class (fastdiff.diffusers._Base._to_diffusers,
# warned "fastdiff.diffusers.<Class>: ...") is an error here unless a test expects it (pytest.warns)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"error:fastdiff\.diffusers\.:UserWarning")]


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _fresh_sd(kind="text2img"):
    pipe = tp.sd_pipe(kind)
    for name in ("unet", "vae", "text_encoder"):
        setattr(pipe, name, copy.deepcopy(getattr(pipe, name)))
    return pipe


def _gns_calls(module, *args, **kwargs):
    c = opcount.OpCounter()
    with torch.no_grad(), c:
        module(*args, **kwargs)
    return c.ops.count("group_norm_silu"), c.ops.count("native_group_norm")


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
def test_optimize_sd_pipeline(kind):
    ref = tp.sd_pipe(kind)
    ref.scheduler = hf.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    pipe = _fresh_sd(kind)
    pipe.scheduler = hf.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    assert fastdiff.optimize(pipe) is pipe  # the module is callable
    rep = fastdiff.optimize.report(pipe)
    blocks = [m for c in (pipe.unet, pipe.vae) for m in c.modules() if isinstance(m, ResnetBlock2D)]
    assert blocks and all(getattr(m, "_fastdiff_fused", False) for m in blocks)
    assert rep["resnets"] == len(blocks) and rep["resnets_left"] == []
    assert type(pipe.scheduler) is fd.DPMSolverMultistepScheduler and rep["scheduler"] == type(pipe.scheduler).__name__
    # the U-Net runs two fused GroupNorm+SiLU per ResnetBlock2D (the remaining GroupNorms are the attention blocks')
    n_unet = sum(isinstance(m, ResnetBlock2D) for m in pipe.unet.modules())
    x = torch.randn(2, 4, 8, 8)
    emb = torch.randn(2, 77, 32)
    assert _gns_calls(pipe.unet, x, torch.tensor([500, 500]), emb)[0] == 2 * n_unet
    assert _gns_calls(ref.unet, x, torch.tensor([500, 500]), emb)[0] == 0

    kw = dict(num_inference_steps=4, output_type="np")
    kw.update(image=tp.init_image(), strength=0.7) if kind == "img2img" else kw.update(height=tp.SD_SIZE,
                                                                                     width=tp.SD_SIZE)
    a = ref("a tiny photo", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a tiny photo", generator=torch.Generator().manual_seed(0), **kw).images
    err = _rel(b, a)
    print(f"optimize/{kind}: image {err:.2e}")
    assert err <= 1e-4

    # idempotent: a second call changes nothing
    fwd = [m.forward for m in blocks]
    sched = pipe.scheduler
    fastdiff.optimize(pipe)
    assert [m.forward for m in blocks] == fwd and pipe.scheduler is sched
    assert fastdiff.optimize.report(pipe) == rep


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
def test_optimize_keeps_the_live_scheduler_config(kind):
    """A StableDiffusionPipeline built on a scheduler config without steps_offset (0) rewrites it to 1 and lists it in
    `_use_default_values`, which `from_config` would reset to 0 (DDIM's first timestep 830 instead of 831, other
    images): optimize() carries every live value over, and the images stay diffusers' within 1e-4 of max|image|."""
    ref = tp.sd_pipe(kind)
    old = ref.scheduler
    assert old.config.steps_offset == 1 and "steps_offset" in old.config["_use_default_values"]
    assert fd.DDIMScheduler.from_config(old.config).config.steps_offset == 0  # what a plain from_config gives
    pipe = _fresh_sd(kind)
    fastdiff.optimize(pipe, fuse=False)
    assert type(pipe.scheduler) is fd.DDIMScheduler
    assert {k: v for k, v in pipe.scheduler.config.items() if k != "_class_name"} == \
        {k: v for k, v in old.config.items() if k != "_class_name"}
    kw = dict(num_inference_steps=4, output_type="np")
    kw.update(image=tp.init_image(), strength=0.7) if kind == "img2img" else kw.update(height=tp.SD_SIZE,
                                                                                     width=tp.SD_SIZE)
    a = ref("a tiny photo", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a tiny photo", generator=torch.Generator().manual_seed(0), **kw).images
    assert pipe.scheduler.timesteps[0].item() == ref.scheduler.timesteps[0].item()
    err = _rel(b, a)
    print(f"optimize/live config/{kind}: image {err:.2e}")
    assert err <= 1e-4


def test_equivalent_says_why_it_keeps_diffusers_class():
    with pytest.warns(UserWarning, match="keeping diffusers' UnCLIPScheduler: fastdiff has no equivalent"):
        assert fd.equivalent(hf.UnCLIPScheduler()) is None
    with pytest.warns(UserWarning, match="(?s)keeping diffusers' UniPCMultistepScheduler: .*solver_p"):
        assert fd.equivalent(hf.UniPCMultistepScheduler(solver_p=hf.DDIMScheduler())) is None
    s = fd.equivalent(hf.DPMSolverMultistepScheduler(solver_order=3))
    assert type(s) is fd.DPMSolverMultistepScheduler and s.config.solver_order == 3


def test_optimize_unet2d_pipelines_and_bare_models():
    unet = copy.deepcopy(tp.unet2d())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        y0 = unet(x, t).sample
        assert fastdiff.optimize(unet) is unet
        y1 = unet(x, t).sample
    assert _rel(y1, y0) <= 1e-5
    n = sum(isinstance(m, ResnetBlock2D) for m in unet.modules())
    assert fastdiff.optimize.report(unet)["resnets"] == n and _gns_calls(unet, x, t)[0] == 2 * n

    vae = copy.deepcopy(tp.sd_pipe().vae)
    img = torch.randn(1, 3, tp.SD_SIZE, tp.SD_SIZE)
    with torch.no_grad():
        d0 = vae(img).sample
        fastdiff.optimize(vae)
        d1 = vae(img).sample
    assert _rel(d1, d0) <= 1e-5

    for cls in ("DDPMScheduler", "DDIMScheduler"):
        res = []
        for opt in (False, True):
            pipe = tp.unet_pipe("ddpm", hf.DDPMScheduler())
            if cls == "DDIMScheduler":
                pipe.scheduler = hf.DDIMScheduler.from_config(pipe.scheduler.config)
            if opt:
                pipe.unet = copy.deepcopy(pipe.unet)
                fastdiff.optimize(pipe)
                assert type(pipe.scheduler).__module__ == "fastdiff.diffusers"
            res.append(pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                            output_type="np").images)
        assert _rel(res[1], res[0]) <= 1e-3, cls


def test_optimize_options():
    pipe = _fresh_sd()
    with pytest.warns(UserWarning, match="cuda_graph=True ignored"):
        fastdiff.optimize(pipe, cuda_graph=True)
    assert not isinstance(pipe.unet.forward, GraphedForward)
    with pytest.raises(ValueError, match="exclusive"):
        fastdiff.optimize(pipe, cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match="attention"):
        fastdiff.optimize(pipe, attention="flash")
    with pytest.raises(TypeError, match="pipeline"):
        fastdiff.optimize(object())
    # "fastdiff" installs the processor on the CPU too; outputs stay within rounding
    pipe2 = _fresh_sd()
    fastdiff.optimize(pipe2, attention="fastdiff", scheduler=False)
    assert fastdiff.optimize.report(pipe2)["attention"] > 0 and type(pipe2.scheduler).__module__ == "diffusers." \
        "schedulers.scheduling_ddim"
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([3, 3]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert _rel(pipe2.unet(x, t, emb).sample, tp.sd_pipe().unet(x, t, emb).sample) <= 1e-5


class _StubCapture:
    """Stands in for the CUDA capture: runs fn at capture and at each replay (what a graph replays), counting."""

    def __init__(self):
        self.captures = 0

    def __call__(self, fn):
        self.captures += 1
        box = {"out": fn()}

        def replay():
            from torch.utils._pytree import tree_leaves

            for dst, src in zip(tree_leaves(box["out"]), tree_leaves(fn())):
                dst.copy_(src)
        return replay, box["out"]


def test_graph_cache_keys_on_shapes_and_weight_storage():
    unet = copy.deepcopy(tp.unet2d())
    stub = _StubCapture()
    fastdiff.optimize(unet)
    g = GraphedForward(unet, unet.forward, stub)
    unet.forward = g
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        ref = g.forward(x, t).sample
        y = unet(x, t).sample
        assert stub.captures == 1 and torch.allclose(y, ref)
        y2 = unet(x + 1, t).sample  # same structure: replayed with the new inputs
        assert stub.captures == 1 and torch.allclose(y2, g.forward(x + 1, t).sample)
        unet(torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3]))  # new batch size
        assert stub.captures == 2
        unet(torch.randn(2, 3, 16, 16), t)  # new resolution
        assert stub.captures == 3
        unet(x, t)  # back to the first shape: cached
        assert stub.captures == 3
        # weights changed in place (same storage): the graph reads them, no recapture
        w = unet.conv_in.weight
        w.mul_(1.01)
        y3 = unet(x, t).sample
        assert stub.captures == 3 and torch.allclose(y3, g.forward(x, t).sample)
        # weights swapped (new storage, as load_state_dict(assign=True) or a LoRA switch does): recaptured
        sd = {k: v.clone() * 0.5 for k, v in unet.state_dict().items()}
        unet.load_state_dict(sd, assign=True)
        y4 = unet(x, t).sample
        assert stub.captures == 4 and torch.allclose(y4, g.forward(x, t).sample)
        assert not torch.allclose(y4, y3)
    # in training (grad on, weights requiring grad) the graph is bypassed
    out = unet(x, t).sample
    assert out.requires_grad and stub.captures == 4


def test_optimize_cuda_graph_wiring_with_stub():
    pipe = _fresh_sd()
    stub = _StubCapture()
    ref = tp.sd_pipe()
    ref.scheduler = fd.equivalent(ref.scheduler)  # the live config (from_config would reset steps_offset to 0)
    fastdiff.optimize(pipe, cuda_graph=True, _capture=stub)
    assert isinstance(pipe.unet.forward, GraphedForward)
    kw = dict(num_inference_steps=3, height=tp.SD_SIZE, width=tp.SD_SIZE, output_type="np")
    a = ref("a", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a", generator=torch.Generator().manual_seed(0), **kw).images
    assert stub.captures == 1 and _rel(b, a) <= 1e-4  # one capture, replayed every step
    fastdiff.optimize(pipe, cuda_graph=True, _capture=stub)  # idempotent: not wrapped twice
    assert isinstance(pipe.unet.forward, GraphedForward) and not isinstance(pipe.unet.forward.forward,
                                                                            GraphedForward)


def test_frozen_compile_recompiles_on_weight_swap(monkeypatch):
    compiled, resets = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    m = torch.nn.Linear(3, 3)
    f = FrozenCompiled(m, m.forward)
    with torch.no_grad():
        f(torch.randn(2, 3))
        f(torch.randn(5, 3))
        assert len(compiled) == 1 and compiled[0]["options"] == {"freezing": True} and not resets
        m.weight = torch.nn.Parameter(torch.randn(3, 3))
        f(torch.randn(2, 3))
        assert len(compiled) == 2 and len(resets) == 1
    f(torch.randn(2, 3))  # grad mode: eager
    assert len(compiled) == 2



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_on_gpu():
    """The real capture (no stub): a UNet2DModel replayed from CUDA graphs equals its eager forward, one capture per
    input shape, a recapture after the weights are swapped; the fastdiff schedulers step on the GPU with no sync."""
    unet = copy.deepcopy(tp.unet2d()).cuda()
    eager = copy.deepcopy(unet)
    fastdiff.optimize(unet, cuda_graph=True)
    g = unet.forward
    assert isinstance(g, GraphedForward)
    x, t = torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([10, 900], device="cuda")
    with torch.no_grad():
        for _ in range(3):
            assert _rel(unet(x, t).sample.cpu(), eager(x, t).sample.cpu()) <= 1e-4
        assert g.captures == 1
        unet(torch.randn(4, 3, 8, 8, device="cuda"), torch.tensor([1, 2, 3, 4], device="cuda"))
        assert g.captures == 2
        sd = {k: v.clone() * 0.9 for k, v in unet.state_dict().items()}
        unet.load_state_dict(sd, assign=True)
        eager.load_state_dict(sd)
        assert _rel(unet(x, t).sample.cpu(), eager(x, t).sample.cpu()) <= 1e-4 and g.captures == 3

    pipe = tp.unet_pipe("ddpm", hf.DDPMScheduler())
    pipe.unet = copy.deepcopy(pipe.unet).cuda()
    ref = tp.unet_pipe("ddpm", hf.DDPMScheduler())
    ref.unet = copy.deepcopy(ref.unet).cuda()
    fastdiff.optimize(pipe, cuda_graph=True)
    a = ref(batch_size=2, generator=torch.Generator("cuda").manual_seed(0), num_inference_steps=5,
            output_type="np").images
    b = pipe(batch_size=2, generator=torch.Generator("cuda").manual_seed(0), num_inference_steps=5,
             output_type="np").images
    assert _rel(b, a) <= 1e-3


def test_graph_capture_failure_runs_eagerly():
    m = torch.nn.Linear(3, 3)

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")
    g = GraphedForward(m, m.forward, broken)
    x = torch.randn(2, 3)
    with torch.no_grad(), pytest.warns(UserWarning, match="cannot be captured"):
        y = g(x)
    assert torch.equal(y, m(x)) and g.captures == 0
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(g(x), m(x))  # remembered: no second attempt, no second warning
