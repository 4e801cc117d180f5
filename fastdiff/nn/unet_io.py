"""The U-Net's I/O: diffusers weights in (`from_diffusers`: parameter renames, checks) and fastdiff's own safetensors
files (`save` / `load`: weights plus the config as JSON metadata; no pickle). Every check runs before a weight is
copied, so nothing loads half-way. `UNet2D.from_diffusers / save / load` call these.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastdiff.nn.config import UNet2DConfig

FORMAT = "fastdiff.UNet2D/1"


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
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})


def load(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
         backend: str = "auto"):
    """A `cls` (UNet2D) from what `save` wrote. A corrupt file, a missing config, or tensors that do not match the config is a
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
