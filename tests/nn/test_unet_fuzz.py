"""Random UNet2DModel configs of the DDPM family: fastdiff.nn.UNet2D.from_diffusers must reproduce diffusers' output.

Each case is built from its own seed (FUZZ_SEED + i): a random config (1-4 levels, channel counts that are multiples of
the norm groups incl. channels == groups and non-powers of two, 1-3 layers per block, random block types incl. the
Resnet*sample blocks and the "UNetRes" prefix, attention placement and head width (None, a divisor or not), mid block
on/off/without attention, attn_norm_num_groups, scale_shift, positional/learned/fourier time embedding, class
conditioning of every kind, conv/resnet resampling, every act_fn, center_input_sample, mid_block_scale_factor,
in/out channels incl. 1 and out != in), odd batch sizes and non-square inputs whose sides need not be powers of two.
Some optional keys are left out of the config so that diffusers' defaults fill them on both sides.

diffusers' parameters are all perturbed (so that no zero-init hides a wrong wiring), the converted model runs in fp32
and must match within 2e-4 of the output's max magnitude (the same budget as tests/nn/test_unet.py; measured ~1e-6).
Each model also round-trips through UNet2D.save/load bit for bit. A failure message carries the seed and the config:
`pytest tests/nn/test_unet_fuzz.py -k "case7"` reruns it.
"""
import json
import random

import pytest
import torch

from fastdiff.nn import UNet2D, UNet2DConfig

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from diffusers import UNet2DModel  # noqa: E402

FUZZ_SEED = 20240611
N_CASES = 40
TOL = 2e-4
ACTS = ["silu", "swish", "mish", "gelu", "relu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads buy nothing and, when the 2 cores are shared, OpenMP barriers under
    oversubscription made the file ~10x slower (measured). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_case(seed: int) -> dict:
    """One random config (diffusers keyword arguments) plus the inputs' shape and kinds, from `seed` alone."""
    r = random.Random(seed)
    levels = r.randint(1, 4)
    groups = r.choice([1, 2, 3, 4, 5, 6, 8])
    # channels == groups (k=1) comes up often; the biggest channel count stays small for speed
    ch = [groups * r.choice([1, 1, 2, 3]) for _ in range(levels)]
    down = [r.choice(["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"])
            for _ in range(levels)]
    up = [r.choice(["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"]) for _ in range(levels)]
    if r.random() < 0.15:  # diffusers strips this prefix
        down[0] = "UNetRes" + down[0]
    mid = r.random() < 0.8
    add_attention = r.random() < 0.7
    attn_channels = [c for c, t in zip(ch, down) if "Attn" in t] + [c for c, t in zip(ch[::-1], up) if "Attn" in t]
    if mid and add_attention:
        attn_channels.append(ch[-1])
    head_dim = None
    if attn_channels and r.random() < 0.5:
        lo = min(attn_channels)
        divisors = [d for d in range(1, lo + 1) if all(c % d == 0 for c in attn_channels)]
        head_dim = r.choice(divisors) if r.random() < 0.7 else r.randint(1, lo)  # a divisor, or not
    tss = r.choice(["default", "default", "scale_shift"])
    cfg = dict(in_channels=r.choice([1, 2, 3, 4]), out_channels=r.choice([1, 2, 3, 5]), block_out_channels=ch,
               down_block_types=down, up_block_types=up, layers_per_block=r.randint(1, 3),
               norm_num_groups=groups, attention_head_dim=head_dim,
               mid_block_type="UNetMidBlock2D" if mid else None)
    optional = dict(
        sample_size=r.choice([None, 16, (16, 24)]),
        center_input_sample=r.random() < 0.3,
        flip_sin_to_cos=r.random() < 0.5,
        freq_shift=r.choice([0, 1]),
        downsample_padding=r.choice([0, 1]),
        resnet_time_scale_shift=tss,
        add_attention=add_attention,
        attn_norm_num_groups=r.choice([None, None] + [d for d in range(1, ch[-1] + 1) if ch[-1] % d == 0]),
        mid_block_scale_factor=r.choice([1.0, 1.0, 0.5, 2.0, 1.414]),
        norm_eps=r.choice([1e-6, 1e-5, 1e-3]),
        act_fn=r.choice(ACTS),
        downsample_type=r.choice(["conv", "resnet"]),
        upsample_type=r.choice(["conv", "resnet"]),
        time_embedding_dim=r.choice([None, None, 13, 24, 40]),
        dropout=r.choice([0.0, 0.1]),  # eval mode: dropout is the identity on both sides
    )
    for k, v in optional.items():
        if r.random() < 0.8:  # otherwise left out: diffusers' default on both sides
            cfg[k] = v
    temb = r.choice(["positional", "positional", "learned", "fourier"])
    cfg["time_embedding_type"] = temb
    if temb == "learned":
        cfg["num_train_timesteps"] = r.choice([50, 1000])
    cls = r.choice([None, None, "embeds", "timestep", "identity"])
    if cls == "embeds":
        cfg["num_class_embeds"] = r.randint(1, 10)
    elif cls is not None:
        cfg["class_embed_type"] = cls
    if temb == "positional" and ch[0] // 2 == cfg.get("freq_shift", 0):  # 0/0 in the embedding: NaN in diffusers
        cfg["freq_shift"] = 1 - cfg.get("freq_shift", 0)
    f = 2 ** (levels - 1)
    sides = [a * f for a in range(1, 8) if 3 <= a * f <= 16][:4]  # odd sides at 1 level, 6/10/12 at 2-3
    h, w = r.choice(sides), r.choice(sides)
    if h * w == f * f:  # a 1×1 bottom level: torch's group_norm refuses one value per group (channels == groups, B=1)
        w = 2 * f
    return dict(config=cfg, batch=r.choice([1, 2, 3]), hw=(h, w), scalar_t=r.random() < 0.2)


def make_inputs(case: dict, ours: UNet2D, seed: int):
    cfg, B = case["config"], case["batch"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg["in_channels"], *case["hw"], generator=g)
    kind = cfg["time_embedding_type"]
    if kind == "fourier":  # log t: t > 0 (a noise level, say)
        t = torch.rand(B, generator=g) * 20 + 0.05
    else:
        t = torch.randint(0, cfg.get("num_train_timesteps") or 1000, (B,), generator=g)
    if case["scalar_t"]:
        t = t[0]
    labels = None
    if cfg.get("num_class_embeds") is not None:
        labels = torch.randint(0, cfg["num_class_embeds"], (B,), generator=g)
    elif cfg.get("class_embed_type") == "timestep":
        labels = (torch.rand(B, generator=g) * 20 + 0.05) if kind == "fourier" else torch.randint(
            0, cfg.get("num_train_timesteps") or 1000, (B,), generator=g)
    elif cfg.get("class_embed_type") == "identity":
        labels = torch.randn(B, ours.config.temb_dim, generator=g)
    return x, t, labels


def describe(seed, case) -> str:
    return f"seed={seed} case={json.dumps(case, default=str)}"


CASES = [FUZZ_SEED + i for i in range(N_CASES)]


@pytest.mark.parametrize("seed", CASES, ids=[f"case{i}" for i in range(N_CASES)])
@torch.no_grad()
def test_random_config_matches_diffusers(seed, tmp_path):
    case = random_case(seed)
    torch.manual_seed(seed)
    ref = UNet2DModel(**case["config"]).eval()
    for p in ref.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    # alternate the two entry points: the module, and (state dict, the config as given, defaults filled in)
    ours = UNet2D.from_diffusers(ref) if seed % 2 else UNet2D.from_diffusers(ref.state_dict(), case["config"])
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), describe(seed, case)
    x, t, labels = make_inputs(case, ours, seed)
    want = ref(x, t, class_labels=labels).sample
    got = ours(x, t, labels)
    assert got.shape == want.shape, describe(seed, case)
    assert torch.isfinite(want).all(), describe(seed, case)
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    assert err < TOL, f"relative error {err:.3g} >= {TOL}: {describe(seed, case)}"

    path = tmp_path / "m.safetensors"
    ours.save(path)
    back = UNet2D.load(path)
    assert back.config == ours.config, describe(seed, case)
    torch.testing.assert_close(back(x, t, labels), got, rtol=0, atol=0, msg=lambda m: f"{m}\n{describe(seed, case)}")


def test_fuzz_covers_the_family():
    """The seeds above do reach every option (else the fuzz proves less than it claims)."""
    cases = [random_case(s) for s in CASES]
    cfgs = [c["config"] for c in cases]
    seen = {
        "levels": {len(c["block_out_channels"]) for c in cfgs},
        "time": {c["time_embedding_type"] for c in cfgs},
        "class": {("embeds" if c.get("num_class_embeds") else c.get("class_embed_type")) for c in cfgs},
        "act": {c.get("act_fn", "silu") for c in cfgs},
        "down": {t.removeprefix("UNetRes") for c in cfgs for t in c["down_block_types"]},
        "up": {t for c in cfgs for t in c["up_block_types"]},
        "layers": {c["layers_per_block"] for c in cfgs},
        "tss": {c.get("resnet_time_scale_shift", "default") for c in cfgs},
        "mid": {c["mid_block_type"] for c in cfgs},
    }
    assert seen["levels"] == {1, 2, 3, 4}
    assert seen["time"] == {"positional", "learned", "fourier"}
    assert seen["class"] == {None, "embeds", "timestep", "identity"}
    assert seen["act"] == set(ACTS)
    assert seen["down"] == {"DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"}
    assert seen["up"] == {"UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"}
    assert seen["layers"] == {1, 2, 3} and seen["tss"] == {"default", "scale_shift"}
    assert seen["mid"] == {None, "UNetMidBlock2D"}
    assert any(c["block_out_channels"][0] == c["norm_num_groups"] for c in cfgs)  # channels == groups
    assert any(c["in_channels"] == 1 for c in cfgs) and any(c["in_channels"] != c["out_channels"] for c in cfgs)
    assert any(c.get("attention_head_dim") for c in cfgs) and any(c.get("attention_head_dim") is None for c in cfgs)
    assert any(c.get("downsample_type") == "resnet" and any("Attn" in t for t in c["down_block_types"][:-1])
               for c in cfgs)
    assert any(c.get("upsample_type") == "resnet" and any("Attn" in t for t in c["up_block_types"][:-1])
               for c in cfgs)
    assert any(c["hw"][0] != c["hw"][1] for c in cases) and any(c["batch"] == 3 for c in cases)
    assert any((c["hw"][0] * c["hw"][1]) & (c["hw"][0] * c["hw"][1] - 1) for c in cases)  # H·W not a power of two
    assert all(UNet2DConfig.from_diffusers(c) for c in cfgs)
