"""The U-Net's I/O: diffusers weights in (`from_diffusers`: parameter renames, checks) and fastdiff's own safetensors
files (`save` / `load`: weights plus the config as JSON metadata; no pickle). Every check runs before a weight is
copied, so nothing loads half-way. `UNet2D.from_diffusers / save / load` call these.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastdiff.nn import files
from fastdiff.nn.config import UNet2DConfig
from fastdiff.nn.files import UNET_FORMAT as FORMAT


def from_diffusers(cls, unet_or_state_dict, config=None, *, backend: str = "auto"):
    """`cls` (UNet2D) from a diffusers `UNet2DModel` (or its state dict plus `config`: a dict, FrozenDict or config.json
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


def save(model, path: str | os.PathLike) -> None:
    """`model` (a UNet2D): weights and config in one safetensors file (config as JSON in the metadata); no pickle."""
    from safetensors.torch import save as to_bytes

    from fastdiff.fsutil import atomic_write

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = to_bytes(sd, metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})
    atomic_write(os.fspath(path), lambda f: f.write(data))  # all or nothing: a killed save leaves the old file


def load(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
         backend: str = "auto"):
    """A `cls` (UNet2D) from what `save` wrote (or a fastdiff checkpoint). A corrupt file, a missing config, or
    tensors that do not match the config is a ValueError naming the bad keys and shapes; the model is built only
    after every check passed. The reader and its checks are fastdiff.nn.files' (one for every file kind)."""
    meta, sd = files.read_unet(os.fspath(path), "UNet2D file")
    return files.build_unet(meta["model"], meta["config"], sd, os.fspath(path), device=device, dtype=dtype,
                            backend=backend, cls=cls)


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
    files.check_state_dict(model, sd, source)
