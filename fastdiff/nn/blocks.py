"""The U-Net's building blocks (diffusers' module and parameter names): time embeddings, ResBlocks, attention,
resampling, and the down / mid / up blocks. Every GroupNorm(+SiLU) runs through the fused
`fastdiff.ops.group_norm_silu.group_norm_silu`, attention through `fastdiff.ops.attention.attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from fastdiff.nn.config import ACTIVATIONS
from fastdiff.nn.layers import Conv2d, Linear, linear
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu


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
        H, W = x.shape[-2:]
        h = x if self.group_norm is None else _gn(self.group_norm, x, ctx, False)
        tok = rearrange(h, "b c h w -> b (h w) c")  # a view (for channels_last input too)
        # one GEMM for q, k and v
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight], dim=0)
        b = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias], dim=0)
        q, k, v = rearrange(linear(tok, w, b), "b n (qkv heads d) -> qkv b heads n d", qkv=3, heads=self.heads)
        o = attention(q, k, v)  # SDPA, or the Triton kernel where it measured faster (fastdiff.ops.attention)
        o = self.to_out[0](rearrange(o, "b heads n d -> b n (heads d)"))
        o = rearrange(o, "b (h w) c -> b c h w", h=H, w=W)
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

