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

from fastdiff.nn import UNet2D
from fastdiff.nn.files import (FORMAT, META_KEY, CheckpointError, CheckpointNotFound, UNET_FORMAT,  # noqa: F401
                               build_unet, check_state_dict, json_meta, read_safetensors, read_unet, tensors_digest,
                               verify_digest)

STATE_FORMAT = "fastdiff-train-state"


def bundled_checkpoint() -> str:
    """The small digits model shipped in fastdiff/assets/ (what `fastdiff sample` uses by default)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits.safetensors")


def state_path(checkpoint: str) -> str:
    return checkpoint + ".train-state"


def build_model(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised model (for training)."""
    if kind != "UNet2D":
        raise CheckpointError(f"unknown model type {kind!r} (this fastdiff knows 'UNet2D')")
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
    """Atomically write a safetensors file whose metadata META_KEY is `meta` plus its checksum ("sha256", see
    `tensors_digest`). Refuses (FloatingPointError, nothing written) if any floating tensor holds NaN/inf."""
    from safetensors.torch import save

    from fastdiff.fsutil import atomic_write
    from fastdiff.validate import check_finite_tensors

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    check_finite_tensors(f"refusing to write {path!r}", cpu)
    meta = json.loads(json.dumps(meta))  # the JSON round trip the reader sees
    meta["sha256"] = tensors_digest(cpu, meta)
    data = save(cpu, metadata={**(extra or {}), META_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------------------------
# the one reader and validator (fastdiff checkpoints, UNet2D.save files, train states)

def save_checkpoint(path: str, model: torch.nn.Module, *, scheduler: dict[str, Any], image: dict[str, Any],
                    train: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` (or `state_dict`, e.g. EMA weights, with the model's config) as a fastdiff checkpoint."""
    config = model_config(model)
    meta = {"format": FORMAT, "version": 1, "model": type(model).__name__, "config": config,
            "scheduler": scheduler, "image": image, "train": train or {}}
    # also the keys UNet2D.save writes, so UNet2D.load reads a fastdiff checkpoint as is
    extra = {"format": UNET_FORMAT, "config": json.dumps(config)}
    _write(path, state_dict if state_dict is not None else model.state_dict(), meta, extra)


def load_checkpoint(path: str, device="cpu", dtype: torch.dtype | None = None, *,
                    finite: bool = True) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, metadata) from a fastdiff checkpoint (or a UNet2D.save file); a clear CheckpointError
    on any problem: unreadable, damaged (checksum), inconsistent config or tensors, non-finite weights (`finite`),
    a scheduler config with bad values."""
    meta, tensors = read_unet(path, "checkpoint")
    from fastdiff.validate import check_scheduler_config

    try:
        meta["scheduler"] = check_scheduler_config(meta["scheduler"], "scheduler")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {e}") from None
    model = build_unet(meta["model"], meta["config"], tensors, f"checkpoint {path!r}", device=device,
                       dtype=dtype or torch.float32, finite=finite, cls=UNet2D)
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
    """Restore model and optimizer from a train-state file; returns (EMA weights or None, metadata). The file's
    checksum is verified first (a damaged or altered state is refused, nothing restored), then its weights and EMA
    weights are checked against the model (keys, shapes, finite) before anything is loaded."""
    tensors, raw = read_safetensors(path, "training state")
    meta = json_meta(raw, META_KEY, path, "training state") or {}
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"training state {path!r}: format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
    verify_digest(tensors, meta, path, "training state", required=True)
    msd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    check_state_dict(model, msd, f"training state {path!r}", finite=True)
    if ema is not None:
        check_state_dict(model, ema, f"training state {path!r} (EMA weights)", finite=True)
    model.load_state_dict(msd, strict=True)
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
