"""UNet2D forward against diffusers' UNet2DModel with the same weights (google/ddpm-cifar10-32 architecture).

    pytest benchmarks/bench_unet.py --benchmark-only [--benchmark-json=out.json]

Sizes: GPU: batch 1, 64, 256 in fp16 and fp32. CPU (2 cores): batch 1 and 8 in fp32, batch 1 in fp16 (diffusers'
fp16 forward takes ~9 s per batch-1 call on this CPU: PyTorch's CPU fp16 convolution is a slow path, which fastdiff's
layers avoid by computing in fp32 and rounding once, fastdiff/nn/layers.py). Larger CPU runs, side by side:
    python benchmarks/bench_unet.py --batch 64 --dtype float16 --rounds 1
Forms:
  diffusers         diffusers.UNet2DModel, eager, NCHW (the baseline of the issue's target)
  fastdiff          fastdiff.nn.UNet2D converted from it (UNet2D.from_diffusers), eager, NCHW
  fastdiff_cl       the same in channels_last (model and input) — GPU only
  fastdiff_compile  torch.compile(UNet2D) in channels_last — GPU only, and only with FASTDIFF_BENCH_COMPILE=1
                    (compiling takes minutes per shape; scripts/gpu_check.sh leaves it off)
Every fastdiff form also records extra_info["speedup_vs_diffusers"]: median(diffusers) / median(ours) from an
interleaved A/B timing in the same process (ROUNDS_AB pairs, each call synchronized), so that the ratio the issue asks
for (batch 64, fp16, on a GPU) comes out of one run; scripts/bench_summary.py prints it in the notes column.
bytes = input + output sample (2 · numel · itemsize): not a bandwidth figure for the network, recorded for the summary.
"""
import os
import statistics
import time

import pytest
import torch

from fastdiff.nn import UNet2D

diffusers = pytest.importorskip("diffusers")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
BATCHES = [1, 64, 256] if GPU else [1, 8]
DTYPES = [torch.float16, torch.float32] if GPU else [torch.float32, torch.float16]
FORMS = ["diffusers", "fastdiff"] + (["fastdiff_cl"] if GPU else []) + (
    ["fastdiff_compile"] if GPU and os.environ.get("FASTDIFF_BENCH_COMPILE") == "1" else [])
ROUNDS = 20 if GPU else 5
ROUNDS_AB = 10 if GPU else 3
CIFAR10 = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
               norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)
_models = {}


def _models_for(dtype, form):
    """(diffusers model, our model for `form`), built once per (dtype, form) from the same seed-0 weights."""
    if dtype not in _models:
        torch.manual_seed(0)
        ref = diffusers.UNet2DModel(**CIFAR10).eval()
        ours = UNet2D.from_diffusers(ref).eval()
        _models[dtype] = {"diffusers": ref.to(DEV, dtype), "fastdiff": ours.to(DEV, dtype)}
    m = _models[dtype]
    if form not in m:
        ours_cl = UNet2D.from_diffusers(m["diffusers"]).eval().to(DEV, dtype).to(memory_format=torch.channels_last)
        m["fastdiff_cl"] = ours_cl
        if form == "fastdiff_compile":
            m[form] = torch.compile(ours_cl)
    return m["diffusers"], m[form]


def _call(model, x, t):
    with torch.no_grad():
        o = model(x, t)
    o = o.sample if hasattr(o, "sample") else o
    if GPU:
        torch.cuda.synchronize()
    return o


def _alternate(ref, x_ref, model, x, t, rounds, log=False):
    """Times of ref and model called alternately (same clocks and background load for both): (ref_s, model_s)."""
    tr, tm = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _call(ref, x_ref, t)
        t1 = time.perf_counter()
        _call(model, x, t)
        tr.append(t1 - t0)
        tm.append(time.perf_counter() - t1)
        if log:
            print(f"  round: diffusers {tr[-1]:.3f} s, fastdiff {tm[-1]:.3f} s", flush=True)
    return tr, tm


def _interleaved_ratio(ref, x_ref, model, x, t):
    """median(ref) / median(model) over ROUNDS_AB alternating pairs."""
    tr, tm = _alternate(ref, x_ref, model, x, t, ROUNDS_AB)
    return statistics.median(tr) / statistics.median(tm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("form", FORMS)
def test_unet_forward(benchmark, form, batch, dtype):
    if not GPU and dtype == torch.float16 and batch > 1:
        pytest.skip("CPU fp16: batch 1 only (diffusers takes ~1 min per batch-8 call); see the side-by-side mode")
    ref, model = _models_for(dtype, form)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(DEV, dtype)
    t = torch.full((batch,), 500, device=DEV, dtype=torch.long)
    x_in = x.to(memory_format=torch.channels_last) if form in ("fastdiff_cl", "fastdiff_compile") else x
    out = _call(model, x_in, t)  # warm-up (and compilation)
    if form != "diffusers":  # the same function: a benchmark of a wrong model is worthless
        want = _call(ref, x, t)
        err = (out.float() - want.float()).abs().max().item()
        tol = 5e-2 if dtype != torch.float32 else 1e-3
        assert err < tol * max(1.0, want.float().abs().max().item()), f"{form} differs from diffusers by {err:.3g}"
        benchmark.extra_info["speedup_vs_diffusers"] = round(_interleaved_ratio(ref, x, model, x_in, t), 3)
    benchmark.extra_info["bytes"] = 2 * x.numel() * x.element_size()
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if GPU else "cpu"
    slow = not GPU and dtype == torch.float16
    benchmark.pedantic(lambda: _call(model, x_in, t), rounds=2 if slow else ROUNDS, warmup_rounds=0 if slow else 1)


def side_by_side(batch, dtype, rounds, threads):
    """diffusers vs fastdiff (NCHW, eager) in one process, alternating; accuracy of both against diffusers in fp32
    (same weights) first. Prints medians and the median of per-round ratios."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ref32 = diffusers.UNet2DModel(**CIFAR10).eval()
    ours = UNet2D.from_diffusers(ref32).eval().to(DEV, dtype)
    ref = diffusers.UNet2DModel(**CIFAR10).eval()
    ref.load_state_dict(ref32.state_dict())
    ref = ref.to(DEV, dtype)
    ref32 = ref32.to(DEV)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(DEV)
    t = torch.randint(0, 1000, (batch,), generator=g).to(DEV)
    xs = x.to(dtype)
    print(f"{DEV}, batch {batch}, {dtype}, threads {threads}, rounds {rounds}", flush=True)
    want = _call(ref32, x[:8], t[:8]).double()  # accuracy on the first 8 samples (diffusers fp32 as the truth)
    scale = want.abs().max().item()
    e_ref = (_call(ref, xs[:8], t[:8]).double() - want).abs().max().item() / scale
    e_ours = (_call(ours, xs[:8], t[:8]).double() - want).abs().max().item() / scale
    print(f"max error vs diffusers fp32 (relative to max {scale:.3g}): diffusers {e_ref:.3g}, fastdiff {e_ours:.3g}",
          flush=True)
    tr, tm = _alternate(ref, xs, ours, xs, t, rounds, log=True)
    ratio = statistics.median(a / b for a, b in zip(tr, tm))
    print(f"diffusers {statistics.median(tr):.3f} s, fastdiff {statistics.median(tm):.3f} s, "
          f"speedup {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    side_by_side(a.batch, getattr(torch, a.dtype), a.rounds, a.threads)
