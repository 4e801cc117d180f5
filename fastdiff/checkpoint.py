"""fastdiff checkpoints: one safetensors file with the model weights, and JSON metadata for the rest. No pickle.

Metadata key "fastdiff" holds {"format": "fastdiff-checkpoint", "version": 1, "model": "UNet2D", "config": the model
config, "scheduler": a diffusers-style scheduler config (beta_schedule, num_train_timesteps, prediction_type,
clip_sample, ...), "image": {"channels", "size", "source"}, "train": how it was made}. A training run's resumable
state (raw and EMA weights, optimizer state, step) is a second safetensors file, `<checkpoint>.train-state`.
"""
from __future__ import annotations

import hashlib
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
    """A freshly initialised model (for training)."""
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

class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The file is not there (also a FileNotFoundError)."""


def read_safetensors(path: str, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the safetensors metadata) of `path`, the whole file validated (header, offsets, sizes); a
    CheckpointError naming `path` if it is missing, not a regular file, or not safetensors. Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFound(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{what} {path!r} cannot be read: {e.strerror or e}") from None
    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        raw = header.get("__metadata__") or {}
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError("__metadata__ is not a map of strings")
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{what} {path!r} is not a readable safetensors file ({e})") from None
    return tensors, raw


_read = read_safetensors


def json_meta(raw: dict[str, str], key: str, path: str, what: str) -> dict[str, Any] | None:
    """The JSON object stored under metadata `key` (None if absent); CheckpointError if not a JSON object."""
    if key not in raw:
        return None
    try:
        obj = json.loads(raw[key])
    except ValueError as e:
        raise CheckpointError(f"{what} {path!r}: metadata {key!r} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path!r}: metadata {key!r} is not a JSON object (got "
                              f"{type(obj).__name__})")
    return obj


def _fastdiff_meta(raw: dict[str, str], path: str, what: str) -> dict[str, Any] | None:
    return json_meta(raw, META_KEY, path, what)


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, *,
                     finite: bool = False) -> None:
    """`sd` fits `model` exactly: the same keys, the same shapes, one floating dtype (and, with `finite`, no
    NaN/inf); else a CheckpointError naming the bad keys. Checked before anything is loaded."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = sorted(f"{k}: expected {want[k]}, got {tuple(sd[k].shape)}" for k in set(want) & set(sd)
                 if tuple(sd[k].shape) != want[k])
    if missing or unexpected or bad:
        def cut(xs):
            return xs[:10] + ([f"... {len(xs) - 10} more"] if len(xs) > 10 else [])
        msg = [f"{source}: does not match the {type(model).__name__} config"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {cut(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {cut(unexpected)}")
        if bad:
            msg.append(f"shape mismatches ({len(bad)}): {cut(bad)}")
        raise CheckpointError("; ".join(msg))
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
        raise CheckpointError(f"{source}: tensors must share one floating dtype, got {sorted(map(str, dtypes))}")
    if finite:
        bad = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{source}: non-finite weights (NaN/inf) in {len(bad)} tensor(s): {bad[:5]}"
                                  f"{' ...' if len(bad) > 5 else ''}; the run that wrote it diverged")


def tensors_digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and the JSON metadata: what a train state
    or checkpoint records and `verify_digest` checks (a flipped bit anywhere that matters changes it)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"\0{k}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def verify_digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str, what: str,
                  required: bool) -> None:
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    if "sha256" not in meta:
        if required:
            raise CheckpointError(f"{what} {path!r} carries no checksum (sha256): not written by this fastdiff, or "
                                  "damaged; refusing to use it")
        return
    if tensors_digest(tensors, rest) != meta["sha256"]:
        raise CheckpointError(f"{what} {path!r} fails its checksum (sha256): the file was damaged or altered "
                              "after it was written; refusing to use it")


def read_unet(path: str, what: str = "checkpoint") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(fastdiff metadata, tensors) of a fastdiff checkpoint or a UNet2D.save file (then with the default
    scheduler); checks the metadata's structure (config, scheduler and image are JSON objects) and the checksum
    when one was written. The config is not built here (see `build_unet`)."""
    tensors, raw = read_safetensors(path, what)
    meta = _fastdiff_meta(raw, path, what)
    if meta is None:  # a bare UNet2D.save file: weights and config, the default schedule
        if raw.get("format") != _unet_format() or "config" not in raw:
            raise CheckpointError(f"{what} {path!r} has neither fastdiff metadata (key {META_KEY!r}) nor a UNet2D "
                                  f"config (format {_unet_format()!r}): write one with `fastdiff train` or "
                                  "UNet2D.save (for diffusers weights use UNet2D.from_diffusers)")
        config = json_meta(raw, "config", path, what)
        meta = {"format": FORMAT, "version": 1, "model": "UNet2D", "config": config, "scheduler": {},
                "image": {"channels": config.get("in_channels"), "size": config.get("sample_size")}, "train": {}}
    else:
        verify_digest(tensors, meta, path, what, required=False)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{what} {path!r}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "config", "scheduler", "image"):
        if key not in meta:
            raise CheckpointError(f"{what} {path!r}: metadata lacks {key!r}")
        if key != "model" and not isinstance(meta[key], dict):
            raise CheckpointError(f"{what} {path!r}: metadata {key!r} is not a JSON object (got "
                                  f"{type(meta[key]).__name__})")
    return meta, tensors


def build_unet(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str, *,
               device=None, dtype: torch.dtype | None = None, backend: str = "auto",
               finite: bool = False, cls=None) -> torch.nn.Module:
    """The model `kind` built from `config` (on the meta device), checked against `tensors` (`check_state_dict`),
    then materialised with them, in eval mode, in `dtype` (default: the tensors' dtype) on `device`. Nothing is
    loaded half-way: every check runs before the weights are copied."""
    if kind != "UNet2D":
        raise CheckpointError(f"{source}: unknown model type {kind!r} (this fastdiff knows 'UNet2D')")
    if cls is None:
        from fastdiff.nn import UNet2D as cls

    try:
        with torch.device("meta"):
            model = cls(dict(config), backend=backend)
    except Exception as e:  # noqa: BLE001 - any bad value in the stored config
        raise CheckpointError(f"{source}: config does not build a {kind}: {type(e).__name__}: {e}") from None
    check_state_dict(model, tensors, source, finite=finite)
    model = model.to_empty(device="cpu")
    model.load_state_dict(tensors, strict=True)
    if dtype is None:
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    return model.to(device=device or "cpu", dtype=dtype).eval()


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
                       dtype=dtype or torch.float32, finite=finite)
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
    meta = _fastdiff_meta(raw, path, "training state") or {}
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
