"""The DDPM U-Net (Ho et al. 2020; diffusers' `UNet2DModel` for this family), built on fastdiff's fused ops.

    unet = UNet2D()                                   # google/ddpm-cifar10-32 architecture, random weights
    unet = UNet2D.from_diffusers(diffusers_unet)      # or (state_dict, config)
    eps = unet(x, t)                                  # x (B, C, H, W), t LongTensor (B,) or scalar → (B, C_out, H, W)
    unet.save("model.safetensors"); unet = UNet2D.load("model.safetensors")

Module and parameter names are diffusers' (conv_in, time_embedding.linear_1, down_blocks.i.resnets.j.norm1, ...), so a
diffusers state dict loads as is once the deprecated attention names (query/key/value/proj_attn) are renamed.
Every GroupNorm(+SiLU) runs through `fastdiff.ops.group_norm_silu.group_norm_silu` (the time-embedding add fused into
the second GroupNorm of each ResBlock) and attention through `fastdiff.ops.attention.attention`; both dispatch by
device with `fastdiff._backend.resolve` (`backend=` on the model, or FASTDIFF_BACKEND; attention always uses SDPA).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu

FORMAT = "fastdiff.UNet2D/1"
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")

# diffusers' UNet2DModel defaults: a diffusers config that leaves a key out means these values.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1.0, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)


@dataclass
class UNet2DConfig:
    """The architecture. Field names and meanings are diffusers' `UNet2DModel` config keys; the defaults are the
    google/ddpm-cifar10-32 model (35,746,307 parameters). `attention_head_dim=None` means one head of width C."""

    sample_size: int | None = 32
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    freq_shift: float = 1
    flip_sin_to_cos: bool = False
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 0
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = None
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    time_embedding_type: str = "positional"
    downsample_type: str = "conv"
    upsample_type: str = "conv"

    def __post_init__(self):
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.validate()

    @classmethod
    def ddpm_cifar10(cls, **kw) -> "UNet2DConfig":
        """google/ddpm-cifar10-32 (the defaults)."""
        return cls(**kw)

    @classmethod
    def ddpm_celebahq(cls, **kw) -> "UNet2DConfig":
        """google/ddpm-celebahq-256 (also ddpm-church/bedroom/cat-256): 113,673,219 parameters."""
        base = dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_attention_levels(cls, attention_levels, **kw) -> "UNet2DConfig":
        """Per-level attention flags instead of block type names: level i (resolution / 2^i) has attention iff
        attention_levels[i]; the up path mirrors it."""
        flags = [bool(a) for a in attention_levels]
        return cls(down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in flags),
                   up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(flags)), **kw)

    @classmethod
    def from_diffusers(cls, config) -> "UNet2DConfig":
        """From a diffusers UNet2DModel config (a FrozenDict, dict, or a path to config.json); missing keys take
        diffusers' defaults; an unsupported setting is a ValueError naming the key."""
        if isinstance(config, (str, os.PathLike)):
            with open(config) as f:
                config = json.load(f)
        cfg = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}
        unsupported = {"class_embed_type": None, "num_class_embeds": None}
        for k, ok in unsupported.items():
            if cfg.get(k) != ok:
                raise ValueError(f"{k}={cfg[k]!r} is not supported by fastdiff.nn.UNet2D (class conditioning)")
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = {"num_train_timesteps", "class_embed_type", "num_class_embeds"}
        unknown = sorted(set(cfg) - names - ignored)
        if unknown:
            raise ValueError(f"unsupported UNet2DModel config key(s) {unknown}")
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def validate(self):
        n = len(self.block_out_channels)
        if n < 1 or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {self.block_out_channels}")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
        for key, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            bad = [t for t in getattr(self, key) if t not in allowed]
            if bad:
                raise ValueError(f"{key}: unsupported block type(s) {bad}; supported: {allowed}")
        checks = [("mid_block_type", self.mid_block_type in ("UNetMidBlock2D", None)),
                  ("act_fn", self.act_fn in ("silu", "swish")),
                  ("time_embedding_type", self.time_embedding_type == "positional"),
                  ("resnet_time_scale_shift", self.resnet_time_scale_shift in ("default", "scale_shift")),
                  ("downsample_type", self.downsample_type == "conv"),
                  ("upsample_type", self.upsample_type == "conv"),
                  ("layers_per_block", isinstance(self.layers_per_block, int) and self.layers_per_block >= 1),
                  ("norm_eps", self.norm_eps > 0), ("dropout", 0 <= self.dropout < 1)]
        for key, ok in checks:
            if not ok:
                raise ValueError(f"unsupported {key}={getattr(self, key)!r}")
        g = self.norm_num_groups
        for c in self.block_out_channels:
            if c % g:
                raise ValueError(f"norm_num_groups={g} must divide every block_out_channels entry, got {c}")
            hd = self.attention_head_dim
            if hd is not None and c % hd:
                raise ValueError(f"attention_head_dim={hd} must divide every block_out_channels entry, got {c}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["down_block_types"] = list(d["down_block_types"])
        d["up_block_types"] = list(d["up_block_types"])
        d["block_out_channels"] = list(d["block_out_channels"])
        return d

    # dict-style access, so code written for diffusers' FrozenDict config (config["in_channels"]) works too
    def __getitem__(self, key):
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key, default)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) → (B, dim) float32, as diffusers' get_timestep_embedding: frequencies
    exp(−ln(max_period)·i/(dim/2 − freq_shift)), [sin, cos] (or [cos, sin] if flip_sin_to_cos), zero-padded if odd."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


class _Ctx:
    """Per-forward settings handed down the blocks (the backend request)."""

    __slots__ = ("backend",)

    def __init__(self, backend: str):
        self.backend = backend


def _gn(norm: nn.GroupNorm, x, ctx, silu: bool, add=None):
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, add, backend=ctx.backend)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """h = conv1(SiLU(GN(x))); h = conv2(dropout(SiLU(GN(h + temb)))); out = (skip(x) + h) / output_scale_factor.
    With time_scale_shift="scale_shift": h = SiLU(GN(h)·(1 + s) + b) with (s, b) = time_emb_proj(SiLU(temb))."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, dropout: float,
                 output_scale_factor: float = 1.0, time_scale_shift: str = "default"):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout * (2 if time_scale_shift == "scale_shift" else 1))
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale_factor = output_scale_factor
        self.scale_shift = time_scale_shift == "scale_shift"

    def forward(self, x, temb_act, ctx):
        h = self.conv1(_gn(self.norm1, x, ctx, True))
        t = self.time_emb_proj(temb_act)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = _gn(self.norm2, h, ctx, False)
            h = nn.functional.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        else:
            h = _gn(self.norm2, h, ctx, True, add=t)
        h = self.conv2(self.dropout(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class AttnBlock(nn.Module):
    """x + to_out(attention(q, k, v)) over the H·W tokens of GN(x), `heads` heads of width C / heads."""

    def __init__(self, channels: int, heads: int, groups: int | None, eps: float, rescale: float = 1.0):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.heads = heads
        self.rescale = rescale

    def forward(self, x, ctx):
        B, C, H, W = x.shape
        h = x if self.group_norm is None else _gn(self.group_norm, x, ctx, False)
        tok = h.flatten(2).transpose(1, 2)  # (B, HW, C): a view for channels_last input
        # one GEMM for q, k and v
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight], dim=0)
        b = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias], dim=0)
        qkv = nn.functional.linear(tok, w, b).view(B, H * W, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, D)
        o = attention(q, k, v)  # SDPA on every device (the only attention backend so far)
        o = o.transpose(1, 2).reshape(B, H * W, C)
        o = self.to_out[0](o)
        o = o.transpose(1, 2).reshape(B, C, H, W)
        out = o + x
        if self.rescale != 1.0:
            out = out / self.rescale
        return out


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin, cout, temb, n, attn, heads, groups, eps, dropout, downsample, padding, tss):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(cin if i == 0 else cout, cout, temb, groups, eps, dropout,
                                               time_scale_shift=tss) for i in range(n)])
        self.attentions = nn.ModuleList([AttnBlock(cout, heads, groups, eps) for _ in range(n)] if attn else [])
        self.downsamplers = nn.ModuleList([Downsample(cout, padding)] if downsample else [])

    def forward(self, x, temb_act, ctx):
        skips = []
        for i, res in enumerate(self.resnets):
            x = res(x, temb_act, ctx)
            if len(self.attentions):
                x = self.attentions[i](x, ctx)
            skips.append(x)
        for d in self.downsamplers:
            x = d(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, cin, prev, cout, temb, n, attn, heads, groups, eps, dropout, upsample, tss):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResBlock((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, temb, groups, eps, dropout,
                     time_scale_shift=tss) for i in range(n)])
        self.attentions = nn.ModuleList([AttnBlock(cout, heads, groups, eps) for _ in range(n)] if attn else [])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x, skips, temb_act, ctx):
        for i, res in enumerate(self.resnets):
            x = res(torch.cat([x, skips.pop()], dim=1), temb_act, ctx)
            if len(self.attentions):
                x = self.attentions[i](x, ctx)
        for u in self.upsamplers:
            x = u(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, c, temb, heads, groups, attn_groups, eps, dropout, scale, add_attention, tss):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c, c, temb, groups, eps, dropout, scale, tss) for _ in range(2)])
        self.attentions = nn.ModuleList([AttnBlock(c, heads, attn_groups, eps, scale)] if add_attention else [])

    def forward(self, x, temb_act, ctx):
        x = self.resnets[0](x, temb_act, ctx)
        if len(self.attentions):
            x = self.attentions[0](x, ctx)
        return self.resnets[1](x, temb_act, ctx)


class UNet2D(nn.Module):
    """The DDPM U-Net. `UNet2D(config)`, `UNet2D(**config_fields)` or `UNet2D()` (google/ddpm-cifar10-32).

    forward(x (B, in_channels, H, W), t LongTensor (B,) / 0-d / int) → (B, out_channels, H, W), H and W divisible by
    2^(levels − 1). `backend` ("auto" | "torch" | "triton" | "cpp" | "cuda") applies to every fused op.
    """

    def __init__(self, config: UNet2DConfig | dict | None = None, *, backend: str = "auto", **kwargs):
        super().__init__()
        if config is None:
            config = UNet2DConfig(**kwargs)
        elif isinstance(config, dict):
            config = UNet2DConfig(**{**config, **kwargs})
        elif kwargs:
            raise TypeError("pass either a UNet2DConfig or keyword fields, not both")
        self.config = config.validate()
        self.backend = backend
        c = config
        ch = c.block_out_channels
        temb = c.time_embedding_dim or ch[0] * 4
        g, eps, tss = c.norm_num_groups, c.norm_eps, c.resnet_time_scale_shift

        def heads(cout):
            return 1 if c.attention_head_dim is None else cout // c.attention_head_dim

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(c.down_block_types):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(cin, cout, temb, c.layers_per_block, kind == "AttnDownBlock2D",
                                              heads(cout), g, eps, c.dropout, i < len(ch) - 1,
                                              c.downsample_padding, tss))
        self.mid_block = None
        if c.mid_block_type is not None:
            attn_groups = c.attn_norm_num_groups if c.attn_norm_num_groups is not None else (
                g if tss == "default" else None)
            self.mid_block = MidBlock(ch[-1], temb, heads(ch[-1]), g, attn_groups, eps, c.dropout,
                                      c.mid_block_scale_factor, c.add_attention, tss)
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        cout = rev[0]
        for i, kind in enumerate(c.up_block_types):
            prev, cout = cout, rev[i]
            cin = rev[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(cin, prev, cout, temb, c.layers_per_block + 1, kind == "AttnUpBlock2D",
                                          heads(cout), g, eps, c.dropout, i < len(ch) - 1, tss))
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, x: torch.Tensor, t, backend: str | None = None) -> torch.Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        f = 2 ** (len(c.block_out_channels) - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: H and W must be divisible by {f} (one halving per level), got {tuple(x.shape[2:])}")
        B = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, B):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        t = t.to(x.device).expand(B)
        ctx = _Ctx(backend or self.backend)
        if c.center_input_sample:
            x = 2 * x - 1.0
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(self.dtype)
        temb_act = nn.functional.silu(self.time_embedding(emb))  # every ResBlock applies SiLU to temb first
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down_blocks:
            h, s = blk(h, temb_act, ctx)
            skips += s
        if self.mid_block is not None:
            h = self.mid_block(h, temb_act, ctx)
        for blk in self.up_blocks:
            h = blk(h, skips, temb_act, ctx)
        h = _gn(self.conv_norm_out, h, ctx, True)
        return self.conv_out(h)

    # ------------------------------------------------------------------ diffusers interop

    @classmethod
    def from_diffusers(cls, unet_or_state_dict, config=None, *, backend: str = "auto") -> "UNet2D":
        """Convert a diffusers `UNet2DModel` (or its state dict plus `config`: a dict, FrozenDict or config.json
        path). Deprecated attention names (query/key/value/proj_attn) are renamed. The result has the weights'
        dtype and device; a missing, unexpected or misshapen tensor is a ValueError naming it."""
        if isinstance(unet_or_state_dict, nn.Module):
            sd = unet_or_state_dict.state_dict()
            config = unet_or_state_dict.config if config is None else config
        elif isinstance(unet_or_state_dict, dict):
            sd = dict(unet_or_state_dict)
            if config is None:
                raise ValueError("config: a state dict needs its diffusers config (config=...)")
        else:
            raise TypeError(f"unet_or_state_dict must be a UNet2DModel or a state dict, got "
                            f"{type(unet_or_state_dict).__name__}")
        cfg = config if isinstance(config, UNet2DConfig) else UNet2DConfig.from_diffusers(config)
        sd = convert_deprecated_attention_keys(sd)
        first = next(iter(sd.values()), None)
        with torch.device("meta"):
            model = cls(cfg, backend=backend)
        _check_state_dict(model, sd, source="diffusers state dict")
        model = model.to_empty(device=first.device if first is not None else "cpu")
        model = model.to(first.dtype if first is not None else torch.float32)
        model.load_state_dict(sd, strict=True)
        return model.eval()

    # ------------------------------------------------------------------ safetensors

    def save(self, path: str | os.PathLike) -> None:
        """Weights and config in one safetensors file (config as JSON in the metadata); no pickle."""
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(path), metadata={"format": FORMAT, "config": json.dumps(self.config.to_dict())})

    @classmethod
    def load(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
             backend: str = "auto") -> "UNet2D":
        """Load what `save` wrote. A corrupt file, a missing config, or tensors that do not match the config is a
        ValueError naming the bad keys and shapes; the model is built only after every check passed."""
        from safetensors import safe_open

        path = str(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated / malformed headers
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{path}: metadata lacks format={FORMAT!r} and a config: not saved by UNet2D.save "
                             f"(for diffusers weights use UNet2D.from_diffusers)")
        try:
            cfg = UNet2DConfig(**json.loads(meta["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad config in metadata: {e}") from e
        with torch.device("meta"):
            model = cls(cfg, backend=backend)
        _check_state_dict(model, sd, source=path)
        model = model.to_empty(device="cpu")
        model.load_state_dict(sd, strict=True)
        if dtype is None:
            dtype = next(iter(sd.values())).dtype
        return model.to(device=device or "cpu", dtype=dtype).eval()


def convert_deprecated_attention_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers' deprecated attention parameters: query/key/value/proj_attn → to_q/to_k/to_v/to_out.0."""
    ren = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for k, v in sd.items():
        parts = k.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in ren and ".attentions." in f".{parts[0]}." and parts[2] in ("weight", "bias"):
            k = f"{parts[0]}.{ren[parts[1]]}.{parts[2]}"
        out[k] = v
    return out


def _check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = sorted(f"{k}: expected {want[k]}, got {tuple(sd[k].shape)}" for k in set(want) & set(sd)
                 if tuple(sd[k].shape) != want[k])
    if missing or unexpected or bad:
        def cut(xs):
            return xs[:10] + ([f"... {len(xs) - 10} more"] if len(xs) > 10 else [])
        msg = [f"{source}: does not match the UNet2D config"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {cut(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {cut(unexpected)}")
        if bad:
            msg.append(f"shape mismatches ({len(bad)}): {cut(bad)}")
        raise ValueError("; ".join(msg))
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
        raise ValueError(f"{source}: tensors must share one floating dtype, got {sorted(map(str, dtypes))}")
