"""CUDA-graph sampling: ddim_sample / ddpm_sample(..., cuda_graph=...) capture the whole loop once per structure.

The GPU tests (marked gpu) skip without a CUDA device. The CPU tests run the captured loop's body (`_GraphedLoop._run`,
reading every per-call value from the static buffers) eagerly, which checks the buffer plumbing anywhere.
"""
import pytest
import torch

import fastdiff
from fastdiff.run import sampling
from fastdiff._backend import backends, has_cuda_kernels

HAS_CPP = backends()["cpp"]["available"]


class TinyNet(torch.nn.Module):
    """A tiny conv net with a time input (what bench_ddim_loop.py times)."""

    def __init__(self, c=3, width=16, learned=False):
        super().__init__()
        self.learned = learned
        self.inp = torch.nn.Conv2d(c, width, 3, padding=1)
        self.temb = torch.nn.Linear(1, width)
        self.out = torch.nn.Conv2d(width, c * (2 if learned else 1), 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.temb((t.float() / 1000).view(-1, 1).to(x.dtype))[:, :, None, None]
        o = self.out(torch.nn.functional.silu(h))
        if self.learned:
            o = torch.cat([o[:, :3], torch.tanh(o[:, 3:])], 1)
        return o


def _net(device, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return TinyNet(**kw).to(device, dtype).eval()


# ---- CPU: the option is ignored with a note, and the captured loop's body is right ------------------------------

def test_cuda_graph_option_on_cpu():
    net = _net("cpu")
    xT = torch.randn(2, 3, 8, 8)
    ref = fastdiff.ddim_sample(net, 4, x_T=xT, cuda_graph=False)
    with pytest.warns(RuntimeWarning, match="cuda_graph=True ignored"):
        got = fastdiff.ddim_sample(net, 4, x_T=xT, cuda_graph=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        fastdiff.ddim_sample(net, 4, x_T=xT, cuda_graph="yes")


@pytest.mark.skipif(not HAS_CPP, reason="needs a fused backend (fastdiff._C)")
@pytest.mark.parametrize("kind,eta,noise,w", [("ddim", 0.0, "randn", None), ("ddim", 0.7, "randn", 2.0),
                                              ("ddpm", None, "randn", None), ("ddpm", None, "philox", 3.0)])
def test_graph_body_from_static_buffers_equals_eager(kind, eta, noise, w):
    """_GraphedLoop reads x_T, timesteps, coefficients and noise (pre-drawn in diffusers' order, or Philox rows) from
    its static buffers; run eagerly it equals the eager fused loop, and after a reload with another schedule and x_T
    it equals the eager loop of those (no stale coefficients)."""
    net = _net("cpu", learned=kind == "ddpm")
    opts = dict(variance_type="learned_range") if kind == "ddpm" else {}
    for j, sched in enumerate([fastdiff.NoiseSchedule.linear(), fastdiff.NoiseSchedule.cosine()]):
        plan = sampling.plan_for(kind, sched, opts, 5, eta or 0.0)
        xT = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(j))
        want = sampling.run_plan(plan, net, xT, generator=torch.Generator().manual_seed(7), backend="cpp",
                                 guidance_scale=w, noise=noise, cuda_graph=False)
        if j == 0:
            loop = sampling._GraphedLoop(plan, net, xT, "cpp", w, noise)
        loop.load(plan, xT, torch.Generator().manual_seed(7), w)
        got = loop._run()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- GPU ---------------------------------------------------------------------------------------------------------

def _fused_backend():
    return "cuda" if has_cuda_kernels() else "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,eta,noise", [("ddim", 0.0, "randn"), ("ddim", 1.0, "randn"), ("ddim", 0.5, "philox"),
                                            ("ddpm", None, "randn")])
def test_graph_replay_equals_eager(dtype, kind, eta, noise):
    net = _net("cuda", dtype)
    xT = torch.randn(2, 3, 16, 16, device="cuda", dtype=dtype)
    kw = dict(x_T=xT, noise=noise, backend=_fused_backend())

    def run(cg):
        g = torch.Generator("cuda").manual_seed(3)
        if kind == "ddim":
            return fastdiff.ddim_sample(net, 10, eta=eta, generator=g, cuda_graph=cg, **kw)
        return fastdiff.ddpm_sample(net, steps=10, generator=g, cuda_graph=cg, **kw)

    eager = run(False)
    sampling._GRAPHS.clear()
    first = run(True)  # capture + replay
    again = run(True)  # replay
    assert len(sampling._GRAPHS) == 1
    # the same kernels on the same data: equal up to the model's own run-to-run freedom (cuDNN algorithm choice)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(first, eager, **tol)
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # replays are bitwise reproducible


@pytest.mark.gpu
def test_graph_is_reused_and_never_stale():
    """One capture per structure: another schedule, η, guidance scale, x_T or seed replays the same graph with fresh
    values in its static device buffers, and equals the eager loop for those values."""
    model = _Doubled(_net("cuda"))
    sampling._GRAPHS.clear()
    for j, (sched, eta) in enumerate([(fastdiff.NoiseSchedule.linear(), 0.3), (fastdiff.NoiseSchedule.cosine(), 0.8),
                                      (fastdiff.NoiseSchedule.scaled_linear(), 0.1)]):
        xT = torch.randn(1, 3, 16, 16, device="cuda")
        kw = dict(x_T=xT, schedule=sched, eta=eta, backend=_fused_backend(), guidance_scale=1.0 + j)
        got = fastdiff.ddim_sample(model, 8, generator=torch.Generator().manual_seed(j), cuda_graph=True, **kw)
        want = fastdiff.ddim_sample(model, 8, generator=torch.Generator().manual_seed(j), cuda_graph=False, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len(sampling._GRAPHS) == 1  # captured once, replayed with new coefficients, noise and x_T
    (loop,) = sampling._GRAPHS.values()
    assert loop.model is model


class _Doubled(torch.nn.Module):
    """CFG convention: the model sees [x, x] and returns the unconditional half first."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        o = self.net(x, t)
        B = x.shape[0] // 2
        return torch.cat([o[:B], 0.9 * o[B:] + 0.05])


@pytest.mark.gpu
def test_replay_does_not_sync_with_the_host():
    net = _net("cuda")
    xT = torch.randn(2, 3, 16, 16, device="cuda")
    sampling._GRAPHS.clear()
    kw = dict(x_T=xT, eta=0.5, noise="philox", cuda_graph=True, backend=_fused_backend(), thresholding=True)
    fastdiff.ddim_sample(net, 6, **kw)
    (loop,) = sampling._GRAPHS.values()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_eager_fused_steps_do_not_sync_with_the_host():
    """The per-step work of the eager fused loop (model aside) issues no host sync: coefficients come from a device
    table, thresholding is a device reduction, Philox reads [seed, offset] from the device."""
    sched = fastdiff.NoiseSchedule.linear()
    from fastdiff.run.loop import Loop, philox_table

    plan = sampling.plan_for("ddim", sched, dict(thresholding=True, clip_sample=True), 5, 0.5)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    o = torch.randn_like(x)
    loop = Loop(plan, lambda x_t, t: o, x, _fused_backend())
    loop.rngs = philox_table(plan.steps, x, None).cuda()
    x = loop.start(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(plan.steps):  # the first step through the checked entry, the others the raw op
            x, _ = loop.body(i, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_capture_unsafe_model_gets_a_clear_error():
    class Syncs(torch.nn.Module):
        def forward(self, x, t):
            if x.abs().max().item() > 1e9:  # a host sync: not capturable
                return x
            return 0.1 * x

    xT = torch.randn(1, 3, 8, 8, device="cuda")
    sampling._GRAPHS.clear()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        fastdiff.ddim_sample(Syncs(), 4, x_T=xT, cuda_graph=True, backend=_fused_backend())
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        got = fastdiff.ddim_sample(Syncs(), 4, x_T=xT, backend=_fused_backend())  # "auto": eager, with a note
    torch.testing.assert_close(got, fastdiff.ddim_sample(Syncs(), 4, x_T=xT, cuda_graph=False,
                                                         backend=_fused_backend()))
    with pytest.raises(ValueError, match="callback needs the host"):
        fastdiff.ddim_sample(_net("cuda"), 4, x_T=xT, cuda_graph=True, callback=lambda d: None)


def test_graph_noise_budget(monkeypatch):
    """noise='randn' under a graph pre-draws every step's noise: past the budget True raises, 'auto' runs eagerly."""
    plan = sampling.plan_for("ddpm", fastdiff.NoiseSchedule.linear(), {}, 100)
    x = torch.empty(4, 3, 32, 32)
    monkeypatch.setattr(sampling, "GRAPH_NOISE_BUDGET_BYTES", 1 << 20)
    assert sampling._graph_noise_fits(True, plan, x, "philox")
    with pytest.raises(ValueError, match="noise='philox'"):
        sampling._graph_noise_fits(True, plan, x, "randn")
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        assert not sampling._graph_noise_fits("auto", plan, x, "randn")
    assert sampling._graph_noise_fits("auto", plan, x[:1, :1, :8, :8], "randn")


@pytest.mark.gpu
def test_graphed_ddpm_with_philox_and_learned_variance():
    net = _net("cuda", learned=True)
    xT = torch.randn(2, 3, 16, 16, device="cuda")
    kw = dict(steps=20, x_T=xT, variance="learned_range", noise="philox", backend=_fused_backend())
    a = fastdiff.ddpm_sample(net, generator=torch.Generator().manual_seed(1), cuda_graph=True, **kw)
    b = fastdiff.ddpm_sample(net, generator=torch.Generator().manual_seed(1), cuda_graph=False, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = fastdiff.ddpm_sample(net, generator=torch.Generator().manual_seed(2), cuda_graph=True, **kw)
    assert (c - a).abs().max() > 1e-2  # a new seed reaches the replay through the static [seed, offset] rows
