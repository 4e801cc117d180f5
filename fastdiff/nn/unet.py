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

Layout: fastdiff/nn/config.py (UNet2DConfig and its validation), fastdiff/nn/blocks.py (the blocks),
fastdiff/nn/unet_io.py (diffusers conversion, safetensors save/load), this file (the model). The names below are
re-exported here, so `from fastdiff.nn.unet import ...` keeps working for each of them.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from fastdiff.nn import unet_io
from fastdiff.nn.blocks import (AttnBlock, Downsample, DownBlock, FourierProjection, MidBlock,  # noqa: F401
                                PositionalProjection, ResBlock, ResBlockGeneral, TimestepEmbedding, Upsample, UpBlock,
                                _Ctx, _gn, _resblock, _Spec, timestep_embedding)
from fastdiff.nn.layers import Conv2d, Linear, linear  # noqa: F401
from fastdiff.nn.config import (ACTIVATIONS, CLASS_EMBED_TYPES, DIFFUSERS_DEFAULTS, DOWN_TYPES,  # noqa: F401
                                TIME_EMBEDDING_TYPES, UP_TYPES, UNet2DConfig, block_kind)
from fastdiff.nn.unet_io import FORMAT, _check_state_dict, convert_deprecated_attention_keys  # noqa: F401


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

    # ---- I/O (fastdiff/nn/unet_io.py)

    @classmethod
    def from_diffusers(cls, unet_or_state_dict, config=None, *, backend: str = "auto") -> "UNet2D":
        """Convert a diffusers `UNet2DModel` (or its state dict plus `config`: a dict, FrozenDict or config.json
        path). Deprecated attention names (query/key/value/proj_attn) are renamed. The result has the weights'
        dtype and device; a missing, unexpected or misshapen tensor is a ValueError naming it."""
        return unet_io.from_diffusers(cls, unet_or_state_dict, config, backend=backend)

    def save(self, path: str | os.PathLike) -> None:
        """Weights and config in one safetensors file (config as JSON in the metadata); no pickle."""
        unet_io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
             backend: str = "auto") -> "UNet2D":
        """Load what `save` wrote. A corrupt file, a missing config, or tensors that do not match the config is a
        ValueError naming the bad keys and shapes; the model is built only after every check passed."""
        return unet_io.load(cls, path, device, dtype, backend)
