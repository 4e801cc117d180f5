"""A 50-step DDIM loop (η = 0) with a tiny conv model at batch 1, 3×32×32: reference eager, fused eager, fused +
CUDA graph (GPU only), and diffusers' DDIMScheduler loop, side by side.

    pytest benchmarks/bench_ddim_loop.py --benchmark-only

With a tiny model the loop is launch- and host-bound: the fused step removes ~10 kernel launches per step, the CUDA
graph removes the host from the loop entirely (target on a GPU: graphed ≥ 5× faster than the reference eager loop).
extra_info["bytes"] is the step traffic only (50 · 3·n·s), so its GB/s is not a bandwidth figure for the model part.
"""
import pytest
import torch

import fastdiff

DEV = "cuda" if torch.cuda.is_available() else "cpu"
STEPS, SHAPE = 50, (1, 3, 32, 32)


class TinyNet(torch.nn.Module):
    def __init__(self, c=3, width=32):
        super().__init__()
        self.inp = torch.nn.Conv2d(c, width, 3, padding=1)
        self.temb = torch.nn.Linear(1, width)
        self.out = torch.nn.Conv2d(width, c, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.temb((t.float() / 1000).view(-1, 1).to(x.dtype))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


FORMS = ["reference_eager", "fused_eager", "fused_graph", "diffusers_eager"]


def loop_forms(net, xT, forms=FORMS):
    """{form: a callable running the 50-step loop from xT}; the graphed form only on CUDA."""
    out = {}
    for form in forms:
        if form == "diffusers_eager":
            diffusers = pytest.importorskip("diffusers")
            sch = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
            sch.set_timesteps(STEPS)

            @torch.no_grad()
            def diff_loop(sch=sch):
                x = xT
                for t in sch.timesteps:
                    x = sch.step(net(x, t.to(DEV).expand(x.shape[0])), t, x, eta=0.0).prev_sample
                return x

            out[form] = diff_loop
        elif form != "fused_graph" or DEV == "cuda":
            backend = "torch" if form == "reference_eager" else "auto"
            graph = form == "fused_graph"
            out[form] = lambda backend=backend, graph=graph: fastdiff.ddim_sample(net, STEPS, x_T=xT, backend=backend,
                                                                                   cuda_graph=graph)
    return out


@pytest.mark.parametrize("form", FORMS)
def test_ddim_loop(benchmark, form):
    if form == "fused_graph" and DEV != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    torch.manual_seed(0)
    net = TinyNet().to(DEV).eval()
    xT = torch.randn(SHAPE, device=DEV)
    fn = loop_forms(net, xT, [form])[form]

    def run():
        out = fn()
        _sync()
        return out

    run()  # warm-up (and the one capture, for the graphed form)
    benchmark(run)
    benchmark.extra_info.update(bytes=STEPS * 3 * xT.numel() * xT.element_size(), steps=STEPS, form=form,
                                device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu")


def side_by_side(rounds=15):
    """Every form interleaved round by round (the graphed one on a GPU only): min and median per form and the
    median per-round ratio reference/form."""
    import statistics
    import time

    torch.manual_seed(0)
    net = TinyNet().to(DEV).eval()
    xT = torch.randn(SHAPE, device=DEV)
    forms = loop_forms(net, xT)
    times = {k: [] for k in forms}
    for f in forms.values():
        f()
    for _ in range(rounds):
        for k, f in forms.items():
            _sync()
            t0 = time.perf_counter()
            f()
            _sync()
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        ratio = statistics.median(r / f for r, f in zip(times["reference_eager"], ts))
        print(f"{k}: min {min(ts) * 1e3:.2f} ms, median {statistics.median(ts) * 1e3:.2f} ms; "
              f"reference_eager/{k} = {ratio:.2f}x (median per-round ratio)")


if __name__ == "__main__":  # python benchmarks/bench_ddim_loop.py
    side_by_side()
