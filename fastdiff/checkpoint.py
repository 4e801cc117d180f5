"""fastdiff checkpoints: one safetensors file with the model weights, and JSON metadata for the rest. No pickle.

Metadata key "fastdiff" holds {"format": "fastdiff-checkpoint", "version": 1, "model": "UNet2D", "config": the model
config, "scheduler": a diffusers-style scheduler config (beta_schedule, num_train_timesteps, prediction_type,
clip_sample, ...), "image": {"channels", "size", "source"}, "train": how it was made}. A training run's resumable
state (raw and EMA weights, optimizer state, step) is a second safetensors file, `<checkpoint>.train-state`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

FORMAT = "fastdiff-checkpoint"
STATE_FORMAT = "fastdiff-train-state"
META_KEY = "fastdiff"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, not safetensors, not a fastdiff checkpoint, or inconsistent."""


def bundled_checkpoint() -> str:
    """The small digits model shipped in fastdiff/assets/ (what `fastdiff sample` uses by default)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits.safetensors")


def state_path(checkpoint: str) -> str:
    return checkpoint + ".train-state"


def build_model(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    if kind != "UNet2D":
        raise CheckpointError(f"unknown model type {kind!r} (this fastdiff knows 'UNet2D')")
    from fastdiff.nn import UNet2D

    return UNet2D(**config)


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .config to save")
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif not isinstance(cfg, dict):
        import dataclasses

        cfg = dataclasses.asdict(cfg)
    return json.loads(json.dumps(dict(cfg)))


def _write(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
           extra: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    from fastdiff.jobs import atomic_write

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={**(extra or {}), META_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(data))


def _read(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the safetensors metadata) of `path`; CheckpointError if it is missing or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)  # validates the whole file: header, offsets, sizes
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path!r} is not a readable safetensors file ({e})") from None
    return tensors, header.get("__metadata__") or {}


def _fastdiff_meta(raw: dict[str, str], path: str, what: str) -> dict[str, Any] | None:
    if META_KEY not in raw:
        return None
    try:
        meta = json.loads(raw[META_KEY])
    except ValueError as e:
        raise CheckpointError(f"{what} {path!r}: metadata {META_KEY!r} is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{what} {path!r}: metadata {META_KEY!r} is not a JSON object")
    return meta


def save_checkpoint(path: str, model: torch.nn.Module, *, scheduler: dict[str, Any], image: dict[str, Any],
                    train: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` (or `state_dict`, e.g. EMA weights, with the model's config) as a fastdiff checkpoint."""
    config = model_config(model)
    meta = {"format": FORMAT, "version": 1, "model": type(model).__name__, "config": config,
            "scheduler": scheduler, "image": image, "train": train or {}}
    # also the keys UNet2D.save writes, so UNet2D.load reads a fastdiff checkpoint as is
    extra = {"format": _unet_format(), "config": json.dumps(config)}
    _write(path, state_dict if state_dict is not None else model.state_dict(), meta, extra)


def _unet_format() -> str:
    from fastdiff.nn import unet

    return unet.FORMAT


def load_checkpoint(path: str, device="cpu", dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, metadata) from a fastdiff checkpoint; a clear CheckpointError on any problem."""
    tensors, raw = _read(path, "checkpoint")
    meta = _fastdiff_meta(raw, path, "checkpoint")
    if meta is None:  # a bare UNet2D.save file: weights and config, the default schedule
        if raw.get("format") != _unet_format() or "config" not in raw:
            raise CheckpointError(f"checkpoint {path!r} has neither fastdiff metadata (key {META_KEY!r}) nor a "
                                  "UNet2D config: write one with `fastdiff train` or UNet2D.save")
        try:
            config = json.loads(raw["config"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path!r}: config is not JSON ({e})") from None
        meta = {"format": FORMAT, "version": 1, "model": "UNet2D", "config": config, "scheduler": {},
                "image": {"channels": config.get("in_channels"), "size": config.get("sample_size")}, "train": {}}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "config", "scheduler", "image"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path!r}: metadata lacks {key!r}")
    try:
        model = build_model(meta["model"], meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: config does not build a {meta['model']}: {e}") from None
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    bad = [f"{k}: {tuple(tensors[k].shape)} in file, {tuple(want[k].shape)} in model"
           for k in sorted(set(want) & set(tensors)) if tensors[k].shape != want[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"checkpoint {path!r} does not match its config: missing {missing[:8]}, unexpected "
                              f"{unexpected[:8]}, wrong shapes {bad[:8]}")
    model.load_state_dict(tensors, strict=True)
    model.eval().to(device=device, dtype=dtype)
    return model, meta


def save_train_state(path: str, *, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None,
                     optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Raw weights ("model."), EMA weights ("ema."), optimizer tensors ("optim.<param>.<name>"); the rest JSON."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    sd = optimizer.state_dict()
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            tensors[f"optim.{idx}.{name}"] = v
    _write(path, tensors, {"format": STATE_FORMAT, "version": 1, "param_groups": sd["param_groups"], **meta})


def load_train_state(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Restore model and optimizer from a train-state file; returns (EMA weights or None, metadata)."""
    tensors, raw = _read(path, "training state")
    meta = _fastdiff_meta(raw, path, "training state") or {}
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"training state {path!r}: format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
    msd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    try:
        model.load_state_dict(msd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"training state {path!r} does not fit the model: {e}") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"training state {path!r}: optimizer state does not fit: {e}") from None
    return ema, meta
