"""The U-Net's configuration: `UNet2DConfig` (diffusers' `UNet2DModel` config keys) and its validation.

The block types, activations and time/class embedding types this family supports are listed here; everything else is
rejected by `UNet2DConfig.validate` with a ValueError naming the key (the model docstring, fastdiff/nn/unet.py, says
what each setting means).
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass
from typing import Any

from torch.nn import functional as F

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
        for f in dataclasses.fields(self):  # NumPy numbers are numbers (a config read with NumPy, np.int64(4) groups)
            v = getattr(self, f.name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v) is not int:
                setattr(self, f.name, int(v))
            elif isinstance(v, numbers.Real) and not isinstance(v, (int, float)):
                setattr(self, f.name, float(v))
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

