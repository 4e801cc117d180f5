"""fastdiff.nn.UNet2D against diffusers' UNet2DModel with the same (random) weights.

Tolerances. fp32: both models run the same float32 math in a different order (fused GroupNorm statistics, one
QKV GEMM, SDPA), so we allow 2e-4 relative to the output's max magnitude (measured: ~1e-6). fp16/bf16: compared with
the fp32 diffusers output, with a budget of 3x diffusers' own error in that dtype (+ a small floor), the
flash-attention rule of docs/math.md ("Precision") applied to the whole network.
"""
import json
import struct

import pytest
import torch

import fastdiff
from fastdiff import _backend
from fastdiff.nn import UNet2D, UNet2DConfig
from tests.conftest import requires_triton

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
               layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
               norm_eps=1e-6, norm_num_groups=32, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
               act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional")
CELEBAHQ = dict(CIFAR10, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
# small configs that exercise every supported option; channel counts are not powers of two on purpose
SMALL = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=[24, 48], layers_per_block=1,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
             attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
             downsample_padding=0)
VARIANTS = {
    "small": SMALL,
    "multihead_flip_pad1": dict(SMALL, attention_head_dim=8, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                                in_channels=1, out_channels=2),
    "scale_shift_midscale": dict(SMALL, resnet_time_scale_shift="scale_shift", mid_block_scale_factor=2.0,
                                 center_input_sample=True, time_embedding_dim=40),
    "no_mid_attn_3levels": dict(SMALL, block_out_channels=[16, 32, 32], layers_per_block=2, add_attention=False,
                                down_block_types=["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"], attn_norm_num_groups=4),
    "no_mid_block": dict(SMALL, mid_block_type=None),
    # beyond the DDPM checkpoints' settings (tests/nn/test_unet_fuzz.py draws random combinations of all of these)
    "learned_time_class_embeds_gelu": dict(SMALL, time_embedding_type="learned", num_train_timesteps=1000,
                                           num_class_embeds=5, act_fn="gelu", attention_head_dim=20),
    "fourier_identity_class_resnet_resampling_mish": dict(
        SMALL, time_embedding_type="fourier", class_embed_type="identity", act_fn="mish", downsample_type="resnet",
        upsample_type="resnet", down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"], resnet_time_scale_shift="scale_shift"),
    "resnet_blocks_timestep_class_relu": dict(
        SMALL, class_embed_type="timestep", act_fn="relu", sample_size=(16, 8),
        down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UNetResUpBlock2D"]),
}


def make_pair(cfg, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    ref = UNet2DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but randomise biases/norms so every tensor matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref, UNet2D.from_diffusers(ref).to(dtype)


def inputs(cfg, batch, seed=1, size=None):
    g = torch.Generator().manual_seed(seed)
    s = size or cfg["sample_size"]
    h, w = s if isinstance(s, tuple) else (s, s)
    x = torch.randn(batch, cfg["in_channels"], h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def class_labels(cfg, ours, batch, seed=2):
    """Class labels of the kind the config takes (None for an unconditional one)."""
    g = torch.Generator().manual_seed(seed)
    if cfg.get("num_class_embeds") is not None:
        return torch.randint(0, cfg["num_class_embeds"], (batch,), generator=g)
    if cfg.get("class_embed_type") == "timestep":
        return torch.randint(1, 1000, (batch,), generator=g)
    if cfg.get("class_embed_type") == "identity":
        return torch.randn(batch, ours.config.temb_dim, generator=g)
    return None


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@torch.no_grad()
def test_cifar10_config_matches_diffusers():
    ref, ours = make_pair(CIFAR10)
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    assert ours.config.in_channels == 3 and ours.config.sample_size == 32
    x, t = inputs(CIFAR10, 2)
    want = ref(x, t).sample
    got = ours(x, t)
    assert got.shape == want.shape
    assert rel_err(got, want) < 2e-4
    # a scalar timestep (0-d tensor and Python int) broadcasts over the batch
    want1 = ref(x, t[0]).sample
    assert rel_err(ours(x, t[0]), want1) < 2e-4
    assert rel_err(ours(x, int(t[0])), want1) < 2e-4
    # a Python float is a long timestep in diffusers (truncated); so here
    assert rel_err(ours(x, float(t[0]) + 0.7), ref(x, float(t[0]) + 0.7).sample) < 2e-4
    # a float tensor stays float in both (fractional timesteps reach the sinusoidal embedding)
    tf = t.float() + 0.25
    assert rel_err(ours(x, tf), ref(x, tf).sample) < 2e-4


def test_celebahq_parameter_count():
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet2D(UNet2DConfig.ddpm_celebahq()).parameters()) == 113_673_219
        assert sum(p.numel() for p in UNet2DModel(**CELEBAHQ).parameters()) == 113_673_219


@torch.no_grad()
def test_celebahq_config_reduced_resolution_matches_diffusers():
    """The celebahq-256 architecture at 64×64 input (6 levels: 64 → 2); the full 256×256 run is the next test."""
    ref, ours = make_pair(CELEBAHQ)
    x, t = inputs(CELEBAHQ, 1, size=64)
    assert rel_err(ours(x, t), ref(x, t).sample) < 2e-4


@pytest.mark.slow  # ~9 s on 2 CPU cores: runs by default (CI too)
@torch.no_grad()
def test_celebahq_config_256_matches_diffusers():
    ref, ours = make_pair(CELEBAHQ)
    x, t = inputs(CELEBAHQ, 1)
    assert rel_err(ours(x, t), ref(x, t).sample) < 2e-4


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_config_variants_match_diffusers(name):
    cfg = VARIANTS[name]
    ref, ours = make_pair(cfg)
    x, t = inputs(cfg, 3)
    t = t + 1  # the fourier embedding takes log t
    y = class_labels(cfg, ours, 3)
    assert rel_err(ours(x, t, y), ref(x, t, class_labels=y).sample) < 2e-4


@torch.no_grad()
def test_deprecated_attention_names():
    ref, _ = make_pair(SMALL)
    ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in ren.items():
            if f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v
    assert any(".query." in k for k in sd) and any(".proj_attn." in k for k in sd)
    ours = UNet2D.from_diffusers(sd, dict(ref.config))
    x, t = inputs(SMALL, 2)
    assert rel_err(ours(x, t), ref(x, t).sample) < 2e-4


def test_from_diffusers_errors():
    ref, _ = make_pair(SMALL)
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="config"):
        UNet2D.from_diffusers(sd)
    bad = dict(sd)
    del bad["conv_in.weight"]
    bad["conv_in.extra"] = torch.zeros(1)
    bad["conv_out.bias"] = torch.zeros(5)
    with pytest.raises(ValueError) as e:
        UNet2D.from_diffusers(bad, dict(ref.config))
    msg = str(e.value)
    assert "conv_in.weight" in msg and "conv_in.extra" in msg and "conv_out.bias" in msg
    # outside the DDPM family: each rejected with the key named
    bad_configs = {"class_embed_type": dict(class_embed_type="projection"),
                   "down_block_types": dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]),
                   "up_block_types": dict(up_block_types=["AttnSkipUpBlock2D", "UpBlock2D"]),
                   "resnet_time_scale_shift": dict(resnet_time_scale_shift="spatial"),
                   "act_fn": dict(act_fn="tanh"),
                   "time_embedding_type": dict(time_embedding_type="rotary"),
                   "num_train_timesteps": dict(time_embedding_type="learned"),
                   "attention_head_dim": dict(attention_head_dim=64),
                   "attn_norm_num_groups": dict(attn_norm_num_groups=5),
                   "downsample_type": dict(downsample_type="fir"),
                   "freq_shift": dict(freq_shift=12)}  # 24 // 2 - 12 = 0: a division by zero (NaN in diffusers)
    for key, kw in bad_configs.items():
        with pytest.raises(ValueError, match=key):
            UNet2DConfig.from_diffusers(dict(SMALL, **kw))


@torch.no_grad()
def test_save_load_roundtrip(tmp_path):
    _, ours = make_pair(VARIANTS["multihead_flip_pad1"])
    p = tmp_path / "m.safetensors"
    ours.save(p)
    back = UNet2D.load(p)
    assert back.config == ours.config
    x, t = inputs(VARIANTS["multihead_flip_pad1"], 2)
    torch.testing.assert_close(back(x, t), ours(x, t), rtol=0, atol=0)
    # no pickle: the file is a safetensors header (JSON) followed by raw bytes, with the config in the metadata
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert json.loads(header["__metadata__"]["config"])["attention_head_dim"] == 8
    half = UNet2D.load(p, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    _, ours = make_pair(SMALL)
    p = tmp_path / "m.safetensors"
    ours.save(p)
    raw = p.read_bytes()
    # truncated file
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        UNet2D.load(tmp_path / "trunc.safetensors")
    # garbage header
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="junk.safetensors"):
        UNet2D.load(tmp_path / "junk.safetensors")
    # tensors that disagree with the stored config: a missing key and a wrong shape, both named
    sd = {k: v.contiguous() for k, v in ours.state_dict().items()}
    meta = {"format": "fastdiff.UNet2D/1", "config": json.dumps(ours.config.to_dict())}
    del sd["conv_in.bias"]
    sd["conv_out.weight"] = torch.zeros(3, 24, 1, 1)
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError) as e:
        UNet2D.load(tmp_path / "bad.safetensors")
    assert "conv_in.bias" in str(e.value) and "conv_out.weight" in str(e.value)
    # no config metadata (e.g. a raw diffusers checkpoint)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="from_diffusers"):
        UNet2D.load(tmp_path / "nometa.safetensors")


@pytest.mark.parametrize("dtype, name", [(torch.float16, "small"), (torch.bfloat16, "small"),
                                         (torch.float16, "fourier_identity_class_resnet_resampling_mish")])
@torch.no_grad()
def test_half_precision(dtype, name):
    cfg = VARIANTS[name]
    ref, ours = make_pair(cfg, dtype=dtype)
    x, t = inputs(cfg, 2)
    t = t + 1
    y = class_labels(cfg, ours, 2)
    want = ref(x, t, class_labels=y).sample
    ref_lp = ref.to(dtype)
    err_torch = rel_err(ref_lp(x.to(dtype), t, class_labels=y).sample, want)
    got = ours(x.to(dtype), t, y)
    assert got.dtype == dtype
    assert rel_err(got, want) <= 3 * err_torch + 2e-3, (rel_err(got, want), err_torch)


@torch.no_grad()
def test_channels_last():
    ref, ours = make_pair(SMALL)
    x, t = inputs(SMALL, 2)
    want = ref(x, t).sample
    ours = ours.to(memory_format=torch.channels_last)
    got = ours(x.to(memory_format=torch.channels_last), t)
    assert rel_err(got, want) < 2e-4


TINY = dict(SMALL, block_out_channels=[8, 16], norm_num_groups=4, sample_size=8)
# the ResBlockGeneral path (act_fn other than SiLU, resnet resampling), fourier time and timestep class embedding
TINY_GENERAL = dict(TINY, act_fn="mish", time_embedding_type="fourier", class_embed_type="timestep",
                    down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
                    up_block_types=["AttnUpBlock2D", "ResnetUpsampleBlock2D"], downsample_type="resnet",
                    resnet_time_scale_shift="scale_shift")


@pytest.mark.parametrize("compile_backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.slow),  # Inductor's C++ codegen: ~22 s on 2 cores, runs by default
])
@torch.no_grad()
def test_torch_compile(compile_backend):
    """fullgraph=True: the fused ops trace (fake kernels) with no graph break. Inductor on a tiny config (its C++
    code generation dominates the time)."""
    torch._dynamo.reset()
    cfg = SMALL if compile_backend == "aot_eager" else TINY
    _, ours = make_pair(cfg)
    x, t = inputs(cfg, 2)
    want = ours(x, t)
    compiled = torch.compile(ours, fullgraph=True, backend=compile_backend)
    assert rel_err(compiled(x, t), want) < 1e-4


@torch.no_grad()
def test_torch_compile_general_path():
    """The non-SiLU / resampling ResBlock, the fourier embedding and class labels also trace with no graph break."""
    torch._dynamo.reset()
    _, ours = make_pair(TINY_GENERAL)
    x, t = inputs(TINY_GENERAL, 2)
    t, y = t + 1, class_labels(TINY_GENERAL, ours, 2)
    want = ours(x, t, y)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, t, y), want) < 1e-4


@torch.no_grad()
def test_ddim_sample_matches_diffusers_loop():
    ref, ours = make_pair(SMALL)
    sched = DDIMScheduler(num_train_timesteps=1000)
    steps, seed = 5, 3
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(ref(x, t).sample, t, x, generator=g).prev_sample
    got = fastdiff.ddim_sample(ours, steps, shape=(2, 3, 16, 16), schedule=sched,
                               generator=torch.Generator().manual_seed(seed))
    assert rel_err(got, x) < 1e-3


def test_bad_inputs():
    _, ours = make_pair(SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        ours(torch.randn(1, 4, 16, 16), 1)
    with pytest.raises(ValueError, match="divisible"):
        ours(torch.randn(1, 3, 15, 16), 1)
    with pytest.raises(ValueError, match="t must be"):
        ours(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNet2DConfig(block_out_channels=(30, 64), down_block_types=("DownBlock2D",) * 2,
                     up_block_types=("UpBlock2D",) * 2)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="class_labels given"):
        ours(x, 1, torch.tensor([0, 1]))


def test_class_labels_errors():
    x = torch.randn(2, 3, 16, 16)
    _, embeds = make_pair(VARIANTS["learned_time_class_embeds_gelu"])
    with pytest.raises(ValueError, match="class_labels are required"):
        embeds(x, 1)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        embeds(x, 1, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class_labels must be integer"):
        embeds(x, 1, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class_labels must be integer class indices in \[0, 5\), got values"):
        embeds(x, 1, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="t must be integer"):
        embeds(x, torch.tensor([1.5, 2.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"t must be integer timesteps.*\[0, 1000\)"):
        embeds(x, torch.tensor([1, 1000]), torch.tensor([0, 1]))
    assert embeds(x, 1, 3).shape == (2, 3, 16, 16)  # a scalar label broadcasts over the batch
    _, identity = make_pair(VARIANTS["fourier_identity_class_resnet_resampling_mish"])
    with pytest.raises(ValueError, match=r"class_labels must have shape \(B, 96\)"):
        identity(x, 1, torch.randn(2, 95))


@requires_triton
@torch.no_grad()
@pytest.mark.parametrize("cfg", [TINY, TINY_GENERAL], ids=["fused_silu", "general"])
def test_backends_agree(cfg):
    """The same tiny model with every GroupNorm through each available backend (with silu=False and the add too)."""
    _, ours = make_pair(cfg)
    x, t = inputs(cfg, 2)
    t, y = t + 1, class_labels(cfg, ours, 2)
    want = ours(x, t, y, backend="torch")
    for b in ["triton"] + (["cpp"] if _backend.has_cpp() else []):
        assert rel_err(ours(x, t, y, backend=b), want) < 1e-4, b


def test_attention_levels_config():
    c = UNet2DConfig.from_attention_levels([False, True, False, False])
    assert c == UNet2DConfig()


# ---- GPU: the fused CUDA/Triton GroupNorm in the real network, and the CUDA-graph sampling loop ------------------
# Skipped without a CUDA device (tests/conftest.py); they run on a GPU machine (scripts/gpu_check.sh).

def _gpu_backends():
    return ["triton"] + (["cuda"] if _backend.has_cuda_kernels() else [])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@torch.no_grad()
def test_gpu_matches_diffusers(dtype, channels_last):
    """CIFAR-10 config on CUDA: every GPU backend of group_norm_silu against diffusers' float32 output, within 3× the
    error of diffusers itself run in `dtype` (+ 2e-3), as test_half_precision on the CPU."""
    ref, ours = make_pair(CIFAR10)
    x, t = inputs(CIFAR10, 4)
    ref, ours, x, t = ref.cuda(), ours.cuda().to(dtype), x.cuda(), t.cuda()
    want = ref(x, t).sample
    err_torch = rel_err(ref.to(dtype)(x.to(dtype), t).sample, want)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    for b in _gpu_backends():
        got = ours(x.to(dtype), t, backend=b)
        assert got.dtype == dtype
        assert rel_err(got, want) <= 3 * err_torch + 2e-3, (b, rel_err(got, want), err_torch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@torch.no_grad()
def test_ddim_sample_cuda_graph_replay_equals_eager(dtype):
    """fastdiff.ddim_sample(unet, ..., cuda_graph=True): the captured loop (U-Net with the fused GroupNorm kernels +
    fused sampler step) replays to the same samples as the eager loop with the same generator, and repeats."""
    _, ours = make_pair(SMALL)
    ours = ours.cuda().to(dtype)
    kw = dict(shape=(3, 3, 16, 16), dtype=dtype, device="cuda", eta=0.5)
    eager = fastdiff.ddim_sample(ours, 6, generator=torch.Generator("cuda").manual_seed(5), cuda_graph=False, **kw)
    graph = fastdiff.ddim_sample(ours, 6, generator=torch.Generator("cuda").manual_seed(5), cuda_graph=True, **kw)
    again = fastdiff.ddim_sample(ours, 6, generator=torch.Generator("cuda").manual_seed(5), cuda_graph=True, **kw)
    assert torch.isfinite(graph).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(graph, eager) < tol, rel_err(graph, eager)
    assert torch.equal(graph, again)
