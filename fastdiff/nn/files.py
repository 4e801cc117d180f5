"""fastdiff's model files: safetensors with JSON metadata (no pickle), read and checked before anything is built.

Two kinds share one reader: a fastdiff checkpoint (metadata key "fastdiff": format FORMAT, the model config, the
scheduler config, image facts, how it was trained; written by fastdiff.app.checkpoint) and a bare `UNet2D.save`
file (metadata "format": UNET_FORMAT and "config"). `read_unet` returns the metadata and tensors of either,
`build_unet` builds the model from them after `check_state_dict` has compared every key and shape.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

FORMAT = "fastdiff-checkpoint"
UNET_FORMAT = "fastdiff.UNet2D/1"  # UNet2D.save's files
META_KEY = "fastdiff"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, not safetensors, not a fastdiff checkpoint, or inconsistent."""


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
        if raw.get("format") != UNET_FORMAT or "config" not in raw:
            raise CheckpointError(f"{what} {path!r} has neither fastdiff metadata (key {META_KEY!r}) nor a UNet2D "
                                  f"config (format {UNET_FORMAT!r}): write one with `fastdiff train` or "
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
               finite: bool = False, cls) -> torch.nn.Module:
    """The model `kind` (its class `cls`) built from `config` (on the meta device), checked against `tensors` (`check_state_dict`),
    then materialised with them, in eval mode, in `dtype` (default: the tensors' dtype) on `device`. Nothing is
    loaded half-way: every check runs before the weights are copied."""
    if kind != "UNet2D":
        raise CheckpointError(f"{source}: unknown model type {kind!r} (this fastdiff knows 'UNet2D')")
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
