"""The one loop: backends against the reference loop, the graph body against the eager loop, the graph cache's key,
buffers (x_T never written), bad input."""
from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.run import sampling
from fastdiff import samplers as S
from tests.conftest import requires_cpp

pytestmark = pytest.mark.usefixtures("one_thread")
SOLVERS = ["dpmsolver++", "sde-dpmsolver++", "unipc", "euler", "euler_ancestral", "heun", "pndm", "plms"]


class Net(torch.nn.Module):
    def __init__(self, c=3):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = torch.nn.Conv2d(c, 6, 3, padding=1)
        self.b = torch.nn.Conv2d(6, c, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t):
        t = t.float().reshape(-1, 1, 1, 1)
        return self.b(torch.tanh(self.a(x) + torch.cos(t / 200).to(x.dtype))) + 0.1 * x


def _run(sampler, backend, dtype=torch.float32, **kw):
    """x_T drawn in float32 and cast (torch.randn's stream depends on the dtype), per-step noise from the generator."""
    net = Net().to(dtype)
    g = torch.Generator().manual_seed(4)
    xT = torch.randn(2, 3, 6, 5, generator=g).to(dtype)
    return fastdiff.sample(net, 8, sampler=sampler, x_T=xT, generator=g, backend=backend, **kw)


@requires_cpp
@pytest.mark.parametrize("sampler", SOLVERS)
@pytest.mark.parametrize("extra", [{}, {"guidance_scale": 2.5}], ids=["plain", "cfg"])
def test_fused_loop_equals_reference_loop(sampler, extra):
    if extra:
        base = Net()
        net = lambda x, t: torch.cat([base(x[: len(x) // 2], t[: len(x) // 2]), base(x[len(x) // 2:] * 0.5,  # noqa
                                                                                     t[len(x) // 2:])])
        got = fastdiff.sample(net, 8, sampler=sampler, shape=(2, 3, 6, 5), generator=torch.Generator().manual_seed(4),
                              backend="cpp", **extra)
        ref = fastdiff.sample(net, 8, sampler=sampler, shape=(2, 3, 6, 5), generator=torch.Generator().manual_seed(4),
                              backend="torch", **extra)
    else:
        got, ref = _run(sampler, "cpp"), _run(sampler, "torch")
    # the same float32 formula term by term, in another order of summation: a few ulps of max|x| per step
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


@requires_cpp
@pytest.mark.parametrize("sampler", ["dpmsolver++", "unipc", "heun"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_loops_track_float32(sampler, dtype, tol):
    """fp16/bf16 loops (model, samples and history in that dtype, math in float32) stay within a few of the
    dtype's ulps of max|x| of the float32 loop (measured: fp16 ~3e-3, bf16 ~2e-2)."""
    got = _run(sampler, "cpp", dtype).float()
    ref = _run(sampler, "cpp", torch.float32)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < tol


def test_float64_runs_the_reference_in_float64():
    got = _run("unipc", "auto", torch.float64)
    assert got.dtype == torch.float64
    ref = _run("unipc", "torch", torch.float64)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="float64"):
        _run("unipc", "cpp", torch.float64)


@requires_cpp
def test_x_T_is_never_written_and_result_is_not_an_alias():
    xT = torch.randn(2, 3, 4, 4)
    keep = xT.clone()
    for sampler in SOLVERS + ["ddim", "ddpm"]:
        out = fastdiff.sample(Net(), 5, sampler=sampler, x_T=xT, generator=torch.Generator().manual_seed(0))
        assert torch.equal(xT, keep), sampler
        assert out.data_ptr() != xT.data_ptr()


@requires_cpp
def test_callback_values_are_kept_intact():
    """Callbacks may keep what they get: the loop's buffers are reused, so it must hand out copies."""
    seen = []
    out = fastdiff.sample(Net(), 6, sampler="dpmsolver++", shape=(1, 3, 4, 4),
                          generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    torch.testing.assert_close(seen[-1]["x_prev"], out, rtol=0, atol=0)
    for a, b in zip(seen, seen[1:]):
        torch.testing.assert_close(a["x_prev"], b["x"], rtol=0, atol=0)
    assert all(d["x0"] is not None for d in seen)  # DPM-Solver++ keeps x̂0


@requires_cpp
@pytest.mark.parametrize("sampler", ["euler_ancestral", "sde-dpmsolver++"])
def test_philox_noise(sampler):
    a = _run(sampler, "cpp", noise="philox")
    b = _run(sampler, "cpp", noise="philox")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = _run(sampler, "torch", noise="philox")  # the reference draws the same Philox numbers on the host
    assert ((a - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert (a - _run(sampler, "cpp")).abs().max() > 1e-3  # not the randn stream


# ---- the graph body and its cache, on the CPU with the capture stubbed ---------------------------------------------

@pytest.fixture
def stub_graphs(monkeypatch):
    """Pretend CPU tensors can be captured: capture() runs the body once eagerly into static buffers and run()
    re-runs the same body (what a replay does), so the cache, the static buffers and their reload are exercised."""
    captures = []

    def capture(self):
        captures.append(self)
        self.out = self._run()

    def run(self):
        return self._run().clone()

    monkeypatch.setattr(sampling, "_use_graph", lambda *a, **k: True)
    monkeypatch.setattr(sampling._GraphedLoop, "capture", capture)
    monkeypatch.setattr(sampling._GraphedLoop, "run", run)
    sampling._GRAPHS.clear()
    yield captures
    sampling._GRAPHS.clear()


@requires_cpp
@pytest.mark.parametrize("sampler", SOLVERS + ["ddim", "ddpm"])
def test_graph_body_equals_eager(sampler, stub_graphs):
    net = Net()
    kw = dict(sampler=sampler, shape=(2, 3, 6, 5), backend="cpp")
    eager = fastdiff.sample(net, 7, generator=torch.Generator().manual_seed(5), cuda_graph=False, **kw)
    g1 = fastdiff.sample(net, 7, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(g1, eager, rtol=0, atol=0)
    other = fastdiff.sample(net, 7, generator=torch.Generator().manual_seed(6), **kw)  # reload: fresh x_T, noise
    torch.testing.assert_close(other, fastdiff.sample(net, 7, generator=torch.Generator().manual_seed(6),
                                                      cuda_graph=False, **kw), rtol=0, atol=0)
    assert len(stub_graphs) == 1


@requires_cpp
def test_graph_cache_keys_on_weight_storage(stub_graphs):
    net = Net()
    kw = dict(sampler="unipc", shape=(1, 3, 4, 4), backend="cpp")
    fastdiff.sample(net, 5, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        net.a.weight.mul_(1.5)  # in place: same storage, a replay reads the new values
    a = fastdiff.sample(net, 5, generator=torch.Generator().manual_seed(0), **kw)
    assert len(stub_graphs) == 1
    torch.testing.assert_close(a, fastdiff.sample(net, 5, generator=torch.Generator().manual_seed(0),
                                                  cuda_graph=False, **kw), rtol=0, atol=0)
    net.a.weight = torch.nn.Parameter(net.a.weight.detach().clone() * 0.5)  # new storage (a LoRA switch, a reload)
    b = fastdiff.sample(net, 5, generator=torch.Generator().manual_seed(0), **kw)
    assert len(stub_graphs) == 2
    torch.testing.assert_close(b, fastdiff.sample(net, 5, generator=torch.Generator().manual_seed(0),
                                                  cuda_graph=False, **kw), rtol=0, atol=0)


# ---- bad input ------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    m = Net()
    kw = dict(shape=(1, 3, 4, 4))
    with pytest.raises(ValueError, match="sampler must be one of"):
        fastdiff.sample(m, 5, sampler="dpm2", **kw)
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3"):
        fastdiff.sample(m, 5, sampler="dpmsolver++", solver_order=4, **kw)
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3"):
        fastdiff.sample(m, 5, sampler="unipc", solver_order=0, **kw)
    with pytest.raises(TypeError, match=r"\['solver_order'\] do not apply to sampler='euler'"):
        fastdiff.sample(m, 5, sampler="euler", solver_order=2, **kw)
    with pytest.raises(TypeError, match=r"\['clip_sample'\] do not apply to sampler='dpmsolver\+\+'"):
        fastdiff.sample(m, 5, sampler="dpmsolver++", clip_sample=True, **kw)
    with pytest.raises(ValueError, match="eta applies to sampler='ddim' only"):
        fastdiff.sample(m, 5, sampler="unipc", eta=0.5, **kw)
    with pytest.raises(ValueError, match="algorithm_type must be one of"):
        fastdiff.sample(m, 5, sampler="dpmsolver++", algorithm_type="deis", **kw)
    with pytest.raises(ValueError, match="solver_type must be 'bh1' or 'bh2'"):
        fastdiff.sample(m, 5, sampler="unipc", solver_type="midpoint", **kw)
    with pytest.raises(ValueError, match="steps must be"):
        fastdiff.sample(m, 0, sampler="euler", **kw)
    with pytest.raises(ValueError, match="fixes algorithm_type"):
        fastdiff.sample(m, 5, sampler="sde-dpmsolver++", algorithm_type="dpmsolver++", **kw)
    with pytest.raises(ValueError, match="PRK warm-up needs steps >= 4"):
        fastdiff.sample(m, 3, sampler="pndm", **kw)


def test_scheduler_without_equivalent_is_refused_by_name():
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="CMStochasticIterativeScheduler has no fastdiff equivalent"):
        fastdiff.sample(Net(), 5, schedule=diffusers.CMStochasticIterativeScheduler(), shape=(1, 3, 4, 4))
    with pytest.raises(ValueError, match="CMStochasticIterativeScheduler has no fastdiff equivalent"):
        fastdiff.sample(Net(), 5, sampler="euler", shape=(1, 3, 4, 4),
                        schedule={**diffusers.CMStochasticIterativeScheduler().config,
                                  "_class_name": "CMStochasticIterativeScheduler"})
    with pytest.raises(ValueError, match="config without '_class_name'.*pass sampler="):
        fastdiff.sample(Net(), 5, schedule=diffusers.EulerDiscreteScheduler().config, shape=(1, 3, 4, 4))
    with pytest.raises(ValueError, match="timestep_type='continuous' has no fastdiff equivalent"):
        fastdiff.sample(Net(), 5, schedule=diffusers.EulerDiscreteScheduler(timestep_type="continuous"),
                        shape=(1, 3, 4, 4))
    # a setting another sampler has: named with the samplers that have it
    with pytest.raises(ValueError, match="use_flow_sigmas=True has no fastdiff equivalent for sampler='euler'.*"
                                         "dpmsolver"):
        fastdiff.sample(Net(), 5, sampler="euler", schedule=diffusers.UniPCMultistepScheduler(use_flow_sigmas=True),
                        shape=(1, 3, 4, 4))
    with pytest.raises(ValueError, match="bh1.*final_sigmas_type='zero' is NaN in diffusers"):
        fastdiff.sample(Net(), 5, schedule=diffusers.UniPCMultistepScheduler(solver_type="bh1"), shape=(1, 3, 4, 4))


def test_sampler_follows_the_scheduler_class():
    diffusers = pytest.importorskip("diffusers")
    for cls, name in S.SCHEDULER_CLASSES.items():
        sch = getattr(diffusers, cls)()
        assert S.sampler_for(sch) == name and S.sampler_for({**sch.config, "_class_name": cls}) == name
    # a diffusers config adopted: solver_order 3 and Karras reach the plan
    sch = diffusers.DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True)
    o = S.solver_options("dpmsolver++", dict(sch.config), {})
    assert o["solver_order"] == 3 and o["use_karras_sigmas"]
    assert S.solver_options("dpmsolver++", dict(sch.config), {"solver_order": 2})["solver_order"] == 2


def test_bad_common_arguments_are_named():
    m = Net()
    for fn in (lambda **k: fastdiff.sample(m, 4, sampler="unipc", **k), lambda **k: fastdiff.ddim_sample(m, 4, **k)):
        with pytest.raises(TypeError, match=r"generator must be a torch.Generator.*manual_seed\(42\)"):
            fn(shape=(1, 3, 4, 4), generator=42)
        with pytest.raises(TypeError, match="shape must be a tuple of ints"):
            fn(shape=16)
        with pytest.raises(ValueError, match="dtype must be one of"):
            fn(shape=(1, 3, 4, 4), dtype=torch.long)
        with pytest.raises(TypeError, match="guidance_scale must be a number"):
            fn(shape=(1, 3, 4, 4), guidance_scale="2")
    with pytest.raises(ValueError, match="eta must be finite"):
        fastdiff.ddim_sample(m, 4, shape=(1, 3, 4, 4), eta=float("inf"))
    with pytest.raises(TypeError, match="model output at step 0 is an empty tuple"):
        fastdiff.sample(lambda x, t: (), 4, sampler="dpmsolver++", shape=(1, 3, 4, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["dpmsolver++", "unipc", "euler_ancestral", "heun", "pndm"])
def test_cuda_graph_replay_equals_eager(sampler):
    net = Net().cuda()
    xT = torch.randn(2, 3, 16, 16, device="cuda")
    backend = "cuda" if fastdiff.backends()["cuda"]["available"] else "triton"

    def run(cg, seed=3):
        return fastdiff.sample(net, 10, sampler=sampler, x_T=xT, generator=torch.Generator("cuda").manual_seed(seed),
                               backend=backend, cuda_graph=cg)

    eager = run(False)
    sampling._GRAPHS.clear()
    first, again = run(True), run(True)
    assert len(sampling._GRAPHS) == 1
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(run(True, seed=4), run(False, seed=4), rtol=1e-5, atol=1e-5)
