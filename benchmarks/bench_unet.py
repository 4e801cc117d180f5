"""UNet2D forward against diffusers' UNet2DModel with the same weights (google/ddpm-cifar10-32 architecture).

    pytest benchmarks/bench_unet.py --benchmark-only

GPU: batch 1, 64, 256 in fp16 and fp32. CPU (2 cores): batch 1 and 8 in fp32 only, to keep the run to a few minutes.
bytes = input + output sample (2 · numel · itemsize): not a bandwidth figure for the network, recorded for the summary.
"""
import pytest
import torch

from fastdiff.nn import UNet2D

diffusers = pytest.importorskip("diffusers")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
BATCHES = [1, 64, 256] if GPU else [1, 8]
DTYPES = [torch.float16, torch.float32] if GPU else [torch.float32]
CIFAR10 = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
               norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)
_models = {}


def _pair(dtype):
    if dtype not in _models:
        torch.manual_seed(0)
        ref = diffusers.UNet2DModel(**CIFAR10).eval()
        ours = UNet2D.from_diffusers(ref)
        _models[dtype] = (ref.to(DEV, dtype), ours.to(DEV, dtype))
    return _models[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("form", ["diffusers", "fastdiff"])
def test_unet_forward(benchmark, form, batch, dtype):
    ref, ours = _pair(dtype)
    x = torch.randn(batch, 3, 32, 32, device=DEV, dtype=dtype)
    t = torch.full((batch,), 500, device=DEV, dtype=torch.long)
    model = ref if form == "diffusers" else ours

    @torch.no_grad()
    def run():
        o = model(x, t)
        if GPU:
            torch.cuda.synchronize()
        return o

    run()
    benchmark.extra_info["bytes"] = 2 * x.numel() * x.element_size()
    benchmark.pedantic(run, rounds=5 if not GPU else 20, warmup_rounds=1)
