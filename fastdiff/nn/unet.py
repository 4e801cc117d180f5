"""The DDPM U-Net (Ho et al. 2020; diffusers' `UNet2DModel` for this family), built on fastdiff's fused ops.

    unet = UNet2D()                                   # google/ddpm-cifar10-32 architecture, random weights
    unet = UNet2D.from_diffusers(diffusers_unet)      # or (state_dict, config)
    eps = unet(x, t)                                  # x (B, C, H, W), t (B,) or scalar → (B, C_out, H, W)
    eps = unet(x, t, class_labels)                    # class-conditional configs
    unet.save("model.safetensors"); unet = UNet2D.load("model.safetensors")

What loads: every `UNet2DModel` config of the DDPM family, with diffusers' math and parameter names:
  - blocks: DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D / UpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D
    (also with diffusers' "UNetRes" name prefix); mid_block_type "UNetMidBlock2D" or None, add_attention,
    attn_norm_num_groups, mid_block_scale_factor;
  - downsample_type / upsample_type "conv" or "resnet" (honoured, as in diffusers, by the Attn* blocks only; the
    Resnet*sample blocks always resample with a ResnetBlock2D, DownBlock2D/UpBlock2D always with a conv);
    downsample_padding 0 or 1;
  - time_embedding_type "positional" (flip_sin_to_cos, freq_shift), "learned" (an nn.Embedding over
    num_train_timesteps) or "fourier" (GaussianFourierProjection of log t, scale 16, [sin, cos]; the output is
    divided by t, as diffusers does); time_embedding_dim;
  - class conditioning: num_class_embeds (class_embed_type None: nn.Embedding), class_embed_type "timestep" (the
    labels go through the time projection and their own TimestepEmbedding) or "identity" (labels are (B, temb) vectors);
  - act_fn silu/swish/mish/gelu/relu (case-insensitive, as diffusers' get_activation) in the ResnetBlock2Ds (both
    norms and the time-embedding input); the TimestepEmbedding MLP and the output conv_act are SiLU whatever act_fn
    is, as in diffusers;
  - in/out channels, block_out_channels, layers_per_block, norm_num_groups, norm_eps, attention_head_dim (None: one
    head of width C; else C // attention_head_dim heads of that width, also when it does not divide C),
    resnet_time_scale_shift "default" / "scale_shift", center_input_sample, dropout (identity at eval), sample_size
    an int or an (H, W) pair.
Not this family, rejected with a ValueError naming the key: Skip*, CrossAttn*, SimpleCrossAttn*, K* blocks, and
resnet_time_scale_shift "spatial"/"ada_group".

Module and parameter names are diffusers' (conv_in, time_embedding.linear_1, down_blocks.i.resnets.j.norm1, ...), so a
diffusers state dict loads as is once the deprecated attention names (query/key/value/proj_attn) are renamed.
Every GroupNorm(+SiLU) runs through `fastdiff.ops.group_norm_silu.group_norm_silu` (the time-embedding add fused into
the second GroupNorm of each ResBlock; with an act_fn other than SiLU the op runs with silu=False and the activation
follows), dispatched by device with `fastdiff._backend.resolve` (`backend=` on the model, or FASTDIFF_BACKEND), and
attention through `fastdiff.ops.attention.attention` with backend "auto" (SDPA on CPU; on CUDA SDPA or the Triton
kernel, whichever measured faster for the shape). float16 on the CPU: convolutions, linears and attention compute in
float32 and round once (fastdiff/nn/layers.py).
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
from torch.nn import functional as F

from fastdiff.nn.layers import Conv2d, Linear, linear
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu

FORMAT = "fastdiff.UNet2D/1"
# block type → (has attention, how it resamples: "conv", "resnet", or the config's downsample_type/upsample_type)
DOWN_TYPES = {"DownBlock2D": (False, "conv"), "AttnDownBlock2D": (True, "config"),
              "ResnetDownsampleBlock2D": (False, "resnet")}
UP_TYPES = {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, "config"),
            "ResnetUpsampleBlock2D": (False, "resnet")}
# diffusers' get_activation (lower-cased names); TimestepEmbedding and conv_act are SiLU regardless
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "gelu": F.gelu, "relu": F.relu}
TIME_EMBEDDING_TYPES = ("positional", "learned", "fourier")
CLASS_EMBED_TYPES = (None, "timestep", "identity")

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


def block_kind(name: str) -> str:
    """diffusers' get_down_block/get_up_block strip a leading "UNetRes" from the type name."""
    return name[7:] if name.startswith("UNetRes") else name


@dataclass
class UNet2DConfig:
    """The architecture. Field names and meanings are diffusers' `UNet2DModel` config keys; the defaults are the
    google/ddpm-cifar10-32 model (35,746,307 parameters). `attention_head_dim=None` means one head of width C."""

    sample_size: int | tuple[int, int] | None = 32
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
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    def __post_init__(self):
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if isinstance(self.sample_size, (list, tuple)):
            self.sample_size = tuple(int(s) for s in self.sample_size)
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unsupported UNet2DModel config key(s) {unknown}")
        return cls(**cfg)

    # ---- derived settings, one place for the model and the checks

    def level_resampling(self, i: int, up: bool) -> str | None:
        """How level i's down (up) block resamples: "conv", "resnet", or None (the last level)."""
        if i == len(self.block_out_channels) - 1:
            return None
        types, table = (self.up_block_types, UP_TYPES) if up else (self.down_block_types, DOWN_TYPES)
        how = table[block_kind(types[i])][1]
        if how == "config":
            how = (self.upsample_type if up else self.downsample_type) or "conv"
        return how

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of an attention over `channels` channels, as diffusers: heads =
        channels // attention_head_dim (attention_head_dim None: channels)."""
        hd = channels if self.attention_head_dim is None else self.attention_head_dim
        return channels // hd, hd

    def mid_attn_groups(self) -> int | None:
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_num_groups if self.resnet_time_scale_shift == "default" else None

    @property
    def temb_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def validate(self):
        n = len(self.block_out_channels)
        if n < 1 or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {self.block_out_channels}")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
        for key, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            bad = [t for t in getattr(self, key) if block_kind(t) not in allowed]
            if bad:
                raise ValueError(f"{key}: unsupported block type(s) {bad}; supported: {list(allowed)} (optionally "
                                 f"prefixed with 'UNetRes')")
        act = self.act_fn.lower() if isinstance(self.act_fn, str) else self.act_fn
        checks = [("mid_block_type", self.mid_block_type in ("UNetMidBlock2D", None)),
                  ("act_fn", act in ACTIVATIONS),
                  ("time_embedding_type", self.time_embedding_type in TIME_EMBEDDING_TYPES),
                  ("resnet_time_scale_shift", self.resnet_time_scale_shift in ("default", "scale_shift")),
                  ("downsample_type", self.downsample_type in ("conv", "resnet", None)),
                  ("upsample_type", self.upsample_type in ("conv", "resnet", None)),
                  ("downsample_padding", self.downsample_padding in (0, 1)),
                  ("class_embed_type", self.class_embed_type in CLASS_EMBED_TYPES),
                  ("in_channels", isinstance(self.in_channels, int) and self.in_channels >= 1),
                  ("out_channels", isinstance(self.out_channels, int) and self.out_channels >= 1),
                  ("layers_per_block", isinstance(self.layers_per_block, int) and self.layers_per_block >= 1),
                  ("time_embedding_dim", self.time_embedding_dim is None or self.time_embedding_dim >= 1),
                  ("norm_eps", self.norm_eps > 0), ("dropout", 0 <= self.dropout < 1)]
        for key, ok in checks:
            if not ok:
                raise ValueError(f"unsupported {key}={getattr(self, key)!r}")
        if self.time_embedding_type == "learned" and not (
                isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise ValueError(f"num_train_timesteps must be a positive int for time_embedding_type='learned', got "
                             f"{self.num_train_timesteps!r}")
        if self.class_embed_type is None and self.num_class_embeds is not None and not (
                isinstance(self.num_class_embeds, int) and self.num_class_embeds >= 1):
            raise ValueError(f"num_class_embeds must be a positive int or None, got {self.num_class_embeds!r}")
        half = self.block_out_channels[0] // 2
        if self.time_embedding_type == "positional" and half >= 1 and half == self.freq_shift:
            raise ValueError(f"freq_shift={self.freq_shift} with block_out_channels[0]={self.block_out_channels[0]}: "
                             f"the sinusoidal embedding divides by block_out_channels[0] // 2 - freq_shift = 0 "
                             f"(diffusers' output is NaN)")
        g = self.norm_num_groups
        if not isinstance(g, int) or g < 1:
            raise ValueError(f"norm_num_groups must be a positive int, got {g!r}")
        for c in self.block_out_channels:
            if c % g:
                raise ValueError(f"norm_num_groups={g} must divide every block_out_channels entry, got {c}")
        hd = self.attention_head_dim
        if hd is not None and (not isinstance(hd, int) or hd < 1):
            raise ValueError(f"attention_head_dim must be a positive int or None, got {hd!r}")
        attn_channels = [c for c, t in zip(self.block_out_channels, self.down_block_types)
                         if DOWN_TYPES[block_kind(t)][0]]
        attn_channels += [c for c, t in zip(reversed(self.block_out_channels), self.up_block_types)
                          if UP_TYPES[block_kind(t)][0]]
        if self.mid_block_type is not None and self.add_attention:
            attn_channels.append(self.block_out_channels[-1])
            ag = self.mid_attn_groups()
            if ag is not None and (not isinstance(ag, int) or ag < 1 or self.block_out_channels[-1] % ag):
                raise ValueError(f"attn_norm_num_groups={ag} must divide the mid block's channel count "
                                 f"{self.block_out_channels[-1]}")
        for c in attn_channels:
            if hd is not None and hd > c:
                raise ValueError(f"attention_head_dim={hd} is larger than the {c} channels of an attention block "
                                 f"(zero heads)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("down_block_types", "up_block_types", "block_out_channels"):
            d[k] = list(d[k])
        if isinstance(d["sample_size"], tuple):
            d["sample_size"] = list(d["sample_size"])
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


@dataclass(frozen=True)
class _Spec:
    """What every ResBlock of one model shares."""

    temb: int
    groups: int
    eps: float
    dropout: float
    time_scale_shift: str
    act_fn: str


def _gn(norm: nn.GroupNorm, x, ctx, silu: bool, add=None):
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, add, backend=ctx.backend)


class PositionalProjection(nn.Module):
    """diffusers' `Timesteps`: t (B,) → (B, dim) float32 sinusoidal embedding (no parameters)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t):
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


class FourierProjection(nn.Module):
    """diffusers' `GaussianFourierProjection` as UNet2DModel builds it (log=True, flip_sin_to_cos=False):
    t (B,) → [sin(2π·log t·w), cos(2π·log t·w)] (B, 2·dim). `weight` (dim,) is a frozen parameter (diffusers' key
    time_proj.weight)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * scale, requires_grad=False)

    def forward(self, t):
        x = torch.log(t)
        x_proj = x[:, None] * self.weight[None, :] * 2 * math.pi  # diffusers' order of operations, to the last bit
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_2(SiLU(linear_1(x))): diffusers' TimestepEmbedding as UNet2DModel builds it (SiLU whatever act_fn)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """h = conv1(SiLU(GN(x))); h = conv2(dropout(SiLU(GN(h + temb)))); out = (skip(x) + h) / output_scale_factor.
    With time_scale_shift="scale_shift": h = SiLU(GN(h)·(1 + s) + b) with (s, b) = time_emb_proj(SiLU(temb)).
    The common case (act_fn SiLU, no resampling), with every norm + SiLU in one fused op; `_resblock` builds
    `ResBlockGeneral` for the others."""

    def __init__(self, cin: int, cout: int, spec: _Spec, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(spec.groups, cin, eps=spec.eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(spec.temb, cout * (2 if spec.time_scale_shift == "scale_shift" else 1))
        self.norm2 = nn.GroupNorm(spec.groups, cout, eps=spec.eps)
        self.dropout = nn.Dropout(spec.dropout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale_factor = output_scale_factor
        self.scale_shift = spec.time_scale_shift == "scale_shift"

    def forward(self, x, temb_act, ctx):
        h = self.conv1(_gn(self.norm1, x, ctx, True))
        t = self.time_emb_proj(temb_act)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = _gn(self.norm2, h, ctx, False)
            h = nn.functional.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        else:
            h = _gn(self.norm2, h, ctx, True, add=t)
        return self._out(x, h)

    def _out(self, x, h):
        """(skip(x) + conv2(dropout(h))) / output_scale_factor: the end both ResBlock forms share."""
        h = self.conv2(self.dropout(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class ResBlockGeneral(ResBlock):
    """diffusers' ResnetBlock2D with any act_fn and optional resampling (up=True: nearest ×2; down=True: 2×2 average
    pool) of both x and SiLU(GN(x)) between norm1 and conv1. Same parameters as ResBlock. With act_fn SiLU the norms
    still use the fused op; otherwise GroupNorm(+temb add) runs fused with silu=False and the activation follows."""

    def __init__(self, cin: int, cout: int, spec: _Spec, output_scale_factor: float = 1.0,
                 resample: str | None = None):
        super().__init__(cin, cout, spec, output_scale_factor)
        act = spec.act_fn.lower()
        self.act = None if act in ("silu", "swish") else ACTIVATIONS[act]
        self.resample = resample

    def _norm_act(self, norm, h, ctx, add=None):
        if self.act is None:
            return _gn(norm, h, ctx, True, add)
        return self.act(_gn(norm, h, ctx, False, add))

    def forward(self, x, temb_act, ctx):
        h = self._norm_act(self.norm1, x, ctx)
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        elif self.resample == "down":
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
        h = self.conv1(h)
        t = self.time_emb_proj(temb_act)  # temb_act = act_fn(temb), computed once per forward by UNet2D
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = _gn(self.norm2, h, ctx, False) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
            h = nn.functional.silu(h) if self.act is None else self.act(h)
        else:
            h = self._norm_act(self.norm2, h, ctx, add=t)
        return self._out(x, h)


def _resblock(cin: int, cout: int, spec: _Spec, output_scale_factor: float = 1.0,
              resample: str | None = None) -> ResBlock:
    """The fused ResBlock for the common case, ResBlockGeneral otherwise: the branch is taken here, once."""
    if resample is None and spec.act_fn.lower() in ("silu", "swish"):
        return ResBlock(cin, cout, spec, output_scale_factor)
    return ResBlockGeneral(cin, cout, spec, output_scale_factor, resample)


class AttnBlock(nn.Module):
    """(x + to_out(attention(q, k, v))) / rescale over the H·W tokens of GN(x): `heads` heads of width `head_dim`
    (heads·head_dim may differ from C, as in diffusers' Attention)."""

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int | None, eps: float,
                 rescale: float = 1.0):
        super().__init__()
        inner = heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.to_q = Linear(channels, inner)
        self.to_k = Linear(channels, inner)
        self.to_v = Linear(channels, inner)
        self.to_out = nn.ModuleList([Linear(inner, channels), nn.Dropout(0.0)])
        self.heads = heads
        self.head_dim = head_dim
        self.rescale = rescale

    def forward(self, x, ctx):
        B, C, H, W = x.shape
        h = x if self.group_norm is None else _gn(self.group_norm, x, ctx, False)
        tok = h.flatten(2).transpose(1, 2)  # (B, HW, C): a view for channels_last input
        # one GEMM for q, k and v
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight], dim=0)
        b = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias], dim=0)
        qkv = linear(tok, w, b).view(B, H * W, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, D)
        o = attention(q, k, v)  # SDPA, or the Triton kernel where it measured faster (fastdiff.ops.attention)
        o = o.transpose(1, 2).reshape(B, H * W, self.heads * self.head_dim)
        o = self.to_out[0](o)
        o = o.transpose(1, 2).reshape(B, C, H, W)
        out = o + x
        if self.rescale != 1.0:
            out = out / self.rescale
        return out


class Downsample(nn.Module):
    """3×3 stride-2 conv (padding 1, or 0 after a right/bottom zero pad: diffusers' Downsample2D)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x, temb_act=None, ctx=None):
        if self.padding == 0:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv (diffusers' Upsample2D with use_conv=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, temb_act=None, ctx=None):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D: n ResBlocks (each followed by attention if `attn`),
    then the downsampler (a conv, a ResBlock with down=True, or none)."""

    def __init__(self, cin, cout, spec: _Spec, n, attn, heads, padding, downsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([_resblock(cin if i == 0 else cout, cout, spec) for i in range(n)])
        self.attentions = nn.ModuleList(
            [AttnBlock(cout, *heads, spec.groups, spec.eps) for _ in range(n)] if attn else [])
        self.downsamplers = nn.ModuleList(
            [] if downsample is None else
            [Downsample(cout, padding) if downsample == "conv" else _resblock(cout, cout, spec, resample="down")])

    def forward(self, x, temb_act, ctx):
        skips = []
        for i, res in enumerate(self.resnets):
            x = res(x, temb_act, ctx)
            if len(self.attentions):
                x = self.attentions[i](x, ctx)
            skips.append(x)
        for d in self.downsamplers:
            x = d(x, temb_act, ctx)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D / ResnetUpsampleBlock2D: n ResBlocks over [x, skip] (each followed by attention if
    `attn`), then the upsampler (nearest ×2 + conv, a ResBlock with up=True, or none)."""

    def __init__(self, cin, prev, cout, spec: _Spec, n, attn, heads, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([
            _resblock((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, spec) for i in range(n)])
        self.attentions = nn.ModuleList(
            [AttnBlock(cout, *heads, spec.groups, spec.eps) for _ in range(n)] if attn else [])
        self.upsamplers = nn.ModuleList(
            [] if upsample is None else
            [Upsample(cout) if upsample == "conv" else _resblock(cout, cout, spec, resample="up")])

    def forward(self, x, skips, temb_act, ctx):
        for i, res in enumerate(self.resnets):
            x = res(torch.cat([x, skips.pop()], dim=1), temb_act, ctx)
            if len(self.attentions):
                x = self.attentions[i](x, ctx)
        for u in self.upsamplers:
            x = u(x, temb_act, ctx)
        return x


class MidBlock(nn.Module):
    def __init__(self, c, spec: _Spec, heads, attn_groups, scale, add_attention):
        super().__init__()
        self.resnets = nn.ModuleList([_resblock(c, c, spec, scale) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [AttnBlock(c, *heads, attn_groups, spec.eps, scale)] if add_attention else [])

    def forward(self, x, temb_act, ctx):
        x = self.resnets[0](x, temb_act, ctx)
        if len(self.attentions):
            x = self.attentions[0](x, ctx)
        return self.resnets[1](x, temb_act, ctx)


def _check_indices(name: str, v: torch.Tensor, n: int, what: str) -> None:
    """v must be integer indices into an n-row nn.Embedding. The range is checked only for CPU tensors (elsewhere it
    would cost a device sync; a CUDA nn.Embedding raises its own device-side assert)."""
    if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise ValueError(f"{name} must be integer {what} in [0, {n}), got dtype {v.dtype}")
    if v.device.type == "cpu" and v.numel() and not torch.compiler.is_compiling() and (
            int(v.min()) < 0 or int(v.max()) >= n):
        raise ValueError(f"{name} must be integer {what} in [0, {n}), got values in [{int(v.min())}, {int(v.max())}]")


class UNet2D(nn.Module):
    """The DDPM U-Net. `UNet2D(config)`, `UNet2D(**config_fields)` or `UNet2D()` (google/ddpm-cifar10-32).

    forward(x (B, in_channels, H, W), t (B,) / 0-d / number, class_labels=None) → (B, out_channels, H, W), H and W
    divisible by 2^(levels − 1). t is integer for time_embedding_type "learned", > 0 for "fourier" (log t); a Python
    float t stays a float (diffusers casts a non-tensor t to long), and the fourier output keeps the model's dtype.
    class_labels (class-conditional configs only): integer (B,) for num_class_embeds, (B,) timesteps-like for
    class_embed_type "timestep", (B, temb_dim) for "identity"; a scalar / size-1 batch broadcasts.
    `backend` ("auto" | "torch" | "triton" | "cpp" | "cuda") applies to every fused op.
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
        temb = c.temb_dim
        spec = _Spec(temb, c.norm_num_groups, c.norm_eps, c.dropout, c.resnet_time_scale_shift, c.act_fn)
        self._temb_act = ACTIVATIONS[c.act_fn.lower()]  # the ResnetBlock2Ds' act_fn(temb), applied once
        self._fourier = c.time_embedding_type == "fourier"
        self._learned = c.time_embedding_type == "learned"

        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        if self._fourier:
            self.time_proj = FourierProjection(ch[0])
            t_in = 2 * ch[0]
        elif self._learned:
            self.time_proj = nn.Embedding(c.num_train_timesteps, ch[0])
            t_in = ch[0]
        else:
            self.time_proj = PositionalProjection(ch[0], c.flip_sin_to_cos, c.freq_shift)
            t_in = ch[0]
        self.time_embedding = TimestepEmbedding(t_in, temb)
        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, temb)
        elif c.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(t_in, temb)
        elif c.class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        else:
            self.class_embedding = None

        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(c.down_block_types):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(cin, cout, spec, c.layers_per_block, DOWN_TYPES[block_kind(kind)][0],
                                              c.heads(cout), c.downsample_padding, c.level_resampling(i, up=False)))
        self.mid_block = None
        if c.mid_block_type is not None:
            self.mid_block = MidBlock(ch[-1], spec, c.heads(ch[-1]), c.mid_attn_groups(), c.mid_block_scale_factor,
                                      c.add_attention)
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        cout = rev[0]
        for i, kind in enumerate(c.up_block_types):
            prev, cout = cout, rev[i]
            cin = rev[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(cin, prev, cout, spec, c.layers_per_block + 1, UP_TYPES[block_kind(kind)][0],
                                          c.heads(cout), c.level_resampling(i, up=True)))
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def _class_embedding(self, class_labels, B: int, device) -> torch.Tensor:
        c = self.config
        if not torch.is_tensor(class_labels):
            class_labels = torch.as_tensor(class_labels, device=device)
        class_labels = class_labels.to(device)
        if c.class_embed_type == "identity":
            want = f"(B, {c.temb_dim}) = ({B}, {c.temb_dim})"
            ok = class_labels.dim() in (1, 2) and class_labels.shape[-1] == c.temb_dim and (
                class_labels.dim() == 1 or class_labels.shape[0] in (1, B))
        else:
            want = f"({B},) (or a scalar)"
            ok = class_labels.dim() <= 1 and class_labels.numel() in (1, B)
            if c.class_embed_type is None:  # nn.Embedding(num_class_embeds)
                _check_indices("class_labels", class_labels, c.num_class_embeds, "class indices")
            elif self._learned:  # the labels index the learned time embedding
                _check_indices("class_labels", class_labels, c.num_train_timesteps, "timesteps")
        if not ok:
            raise ValueError(f"class_labels must have shape {want} for this model, got {tuple(class_labels.shape)} "
                             f"{class_labels.dtype}")
        if c.class_embed_type != "identity":
            class_labels = class_labels.reshape(-1).expand(B)
        if c.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(self.dtype)
        return self.class_embedding(class_labels).to(self.dtype)

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        f = 2 ** (len(c.block_out_channels) - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: H and W must be divisible by {f} (one halving per level), got {tuple(x.shape[2:])}")
        B = x.shape[0]
        if not torch.is_tensor(t):  # a Python number becomes a long timestep, as in diffusers (500.7 -> 500)
            t = torch.tensor([t], dtype=torch.long, device=x.device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, B):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        if self._learned:
            _check_indices("t", t, c.num_train_timesteps, "timesteps (learned time embedding)")
        t = t.to(x.device).expand(B)
        ctx = _Ctx(backend or self.backend)
        if c.center_input_sample:
            x = 2 * x - 1.0
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: this model is class-conditional (num_class_embeds="
                                 f"{c.num_class_embeds}, class_embed_type={c.class_embed_type!r})")
            emb = emb + self._class_embedding(class_labels, B, x.device)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this model has no class embedding (num_class_embeds and "
                             "class_embed_type are None)")
        temb_act = self._temb_act(emb)  # every ResBlock applies act_fn to temb first
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down_blocks:
            h, s = blk(h, temb_act, ctx)
            skips += s
        if self.mid_block is not None:
            h = self.mid_block(h, temb_act, ctx)
        for blk in self.up_blocks:
            h = blk(h, skips, temb_act, ctx)
        h = _gn(self.conv_norm_out, h, ctx, True)  # conv_act is SiLU whatever act_fn is
        h = self.conv_out(h)
        if self._fourier:
            h = h / t.reshape(B, 1, 1, 1).to(h.dtype)
        return h

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
