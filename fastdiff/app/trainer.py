"""`fastdiff train`: fit a UNet2D with L_simple on scikit-learn's 8×8 digits or a folder of images.

Every training step s draws its batch indices, timesteps and noise from a generator seeded from (seed, s), so a run
resumed from its train-state file continues exactly as the uninterrupted run would have (same batches, same noise).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastdiff.app import checkpoint as ckpt
from fastdiff._util import Interrupted, deferred_signals
from fastdiff._util import progress as _progress
from fastdiff.schedule import NoiseSchedule
from fastdiff.theory.training import training_loss

# Training runs the U-Net's plain-PyTorch path (sampling with the trained model uses the fused ops). The fused
# group_norm_silu ops do have a backward now, and tests/app/test_cli.py passes with "auto", but "auto" changes the weights
# (~5e-6 after 40 steps), so `fastdiff train --seed 0` would no longer reproduce fastdiff/assets/digits.safetensors
# bit for bit (docs/benchmarks.md), and on this CPU it was not faster (40 default-config steps, 1 thread: 6.6 s
# "auto" vs 6.2 s "torch", noisy shared machine). Revisit when a GPU measurement shows training through them pays.
TRAIN_BACKEND = "torch"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The reported loss: an exponential moving average of the per-step L_simple with this decay (about the last 100
# steps), bias-corrected as Adam's moments are (divided by 1 − decay^n after n steps, so the first steps are not
# pulled towards 0). Its running sum and n are kept in the train state: a resumed run reports what the uninterrupted one
# would, bit for bit, and a finished run resumed reports its recorded value.
LOSS_EMA_DECAY = 0.99
LOSS_DESCRIPTION = (f"EMA of the training loss, decay {LOSS_EMA_DECAY} (~the last {round(1 / (1 - LOSS_EMA_DECAY))} "
                    "steps)")


def loss_ema(total: float, n: int) -> float | None:
    """The reported loss from the running sum m_n = decay·m_{n−1} + (1 − decay)·loss_n: m_n / (1 − decay^n)."""
    return total / (1 - LOSS_EMA_DECAY ** n) if n > 0 else None


@dataclass
class TrainConfig:
    data: str = "digits"
    image_size: int = 16
    channels: int | None = None  # None: 1 for digits, 3 for a folder
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention: list[bool] | None = None  # per level; None: attention at the lowest resolution only
    norm_num_groups: int = 8
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.995
    seed: int = 0
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    hflip: bool = False

    # what must match for --resume (steps may grow)
    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("steps")
        return d


def _dataset_from_digits(size: int) -> torch.Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("--data digits needs scikit-learn: pip install 'fastdiff[train]'") from None
    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    return (x * 2 - 1).clamp(-1, 1)


MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels (8192²): larger images in --data are refused as decompression bombs


def _high_depth_gray(im, path: str):
    """A 16/32-bit integer ("I;16*", "I") or float ("F") grayscale image as an "F" image on the 0 … 255 scale (PIL's
    convert("L") would clip every value above 255): integers are scaled by their range (65535 for 16-bit)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        if not np.isfinite(a).all():
            raise ValueError(f"--data: image {path!r} holds NaN/inf pixels")
        hi = 1.0 if a.size == 0 or (a.min() >= 0 and a.max() <= 1) else None
        if hi is None:
            raise ValueError(f"--data: float image {path!r} has values in [{a.min():.4g}, {a.max():.4g}]; "
                             "expected [0, 1]")
    else:
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else 2.0**32 - 1
    return Image.fromarray((a.clip(0, hi) * (255.0 / hi)).astype(np.float32), mode="F")


def _dataset_from_folder(path: str, size: int, channels: int) -> torch.Tensor:
    import warnings

    import numpy as np
    from PIL import Image

    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"--data {path!r}: no images ({', '.join(IMAGE_EXTS)}) found")
    mode = {1: "L", 3: "RGB"}[channels]
    out = []
    for f in files:
        if not os.path.isfile(f):  # a FIFO or device named *.png would block or never end
            raise ValueError(f"--data: {f!r} is not a regular file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as src:
                    if src.width * src.height > MAX_IMAGE_PIXELS:
                        raise Image.DecompressionBombError(f"{src.width}x{src.height} pixels")
                    src.load()
                    if src.mode.startswith("I;16") or src.mode in ("I", "F"):
                        im = _high_depth_gray(src, f)
                    else:
                        im = src.convert(mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"--data: image {f!r} is too large ({e}); refused as a possible decompression bomb "
                             f"(limit {MAX_IMAGE_PIXELS:,} pixels)") from None
        except ValueError as e:
            if str(e).startswith("--data"):
                raise
            raise ValueError(f"--data: cannot read image {f!r}: {type(e).__name__}: {e}") from None
        except (OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"--data: cannot read image {f!r}: {type(e).__name__}: {e}") from None
        s = min(im.size)  # center crop to a square, then resize
        l, t = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((l, t, l + s, t + s)).resize((size, size), Image.BICUBIC)
        if im.mode == "F":  # high bit depth: kept in float, on the 0 … 255 scale
            a = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).clamp(0, 255).unsqueeze(0)
            out.append(a.expand(channels, size, size))
        else:
            a = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, channels)
            out.append(a.permute(2, 0, 1).float())
    return torch.stack(out) / 127.5 - 1


def load_dataset(cfg: TrainConfig) -> torch.Tensor:
    """(N, C, S, S) float32 in [−1, 1]."""
    if cfg.data == "digits":
        if cfg.channels not in (None, 1):
            raise ValueError("--channels: the digits are grayscale (1 channel)")
        return _dataset_from_digits(cfg.image_size)
    if not os.path.isdir(cfg.data):
        raise ValueError(f"--data must be 'digits' or a folder of images; {cfg.data!r} is neither")
    return _dataset_from_folder(cfg.data, cfg.image_size, cfg.channels or 3)


def unet_config(cfg: TrainConfig, channels: int) -> dict[str, Any]:
    levels = len(cfg.block_out_channels)
    attn = cfg.attention if cfg.attention is not None else [False] * (levels - 1) + [True]
    if len(attn) != levels:
        raise ValueError(f"--attention has {len(attn)} flags for {levels} levels")
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    return {"sample_size": cfg.image_size, "in_channels": channels, "out_channels": channels,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "down_block_types": down, "up_block_types": up, "norm_num_groups": cfg.norm_num_groups}


def scheduler_config(cfg: TrainConfig) -> dict[str, Any]:
    """diffusers-style scheduler config stored in the checkpoint (samplers read their defaults from it)."""
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule,
            "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": cfg.prediction_type, "clip_sample": True,
            "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
            "variance_type": "fixed_small"}


def _step_generator(seed: int, step: int) -> torch.Generator:
    h = hashlib.blake2b(f"fastdiff-train:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


class NonFiniteLoss(FloatingPointError):
    """Training diverged: a NaN/inf loss (or weights). The last checkpoint written before it is kept."""


def check_config(cfg: TrainConfig, save_every: int = 500) -> None:
    """Every number of `cfg` of a number type and in range (ValueError/TypeError naming the field)."""
    from fastdiff.validate import check_number

    for name in ("steps", "batch_size", "image_size", "layers_per_block", "norm_num_groups", "num_train_timesteps"):
        check_number(name, getattr(cfg, name), integer=True, min=1)
    for name in ("warmup", "seed"):
        check_number(name, getattr(cfg, name), integer=True, min=0)
    check_number("lr", cfg.lr, min=0, min_exclusive=True)
    check_number("ema_decay", cfg.ema_decay, min=0)
    if not cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be < 1, got {cfg.ema_decay}")
    check_number("save_every", save_every, integer=True, min=1)


def check_outputs(out: str, *, resume: bool, overwrite: bool) -> str:
    """Up front: `out` and `out`.train-state can be written, and an existing model is not overwritten by a new
    run unless `overwrite` (a resumed run rewrites its own checkpoint)."""
    from fastdiff.fsutil import check_output_file

    check_output_file(out, "--out")
    spath = ckpt.state_path(out)
    check_output_file(spath, "--out (train state)")
    if resume:
        if not os.path.exists(spath):
            raise ValueError(f"--resume: {spath} does not exist (nothing to resume)")
    elif os.path.exists(spath) and not overwrite:
        raise ValueError(f"{spath} exists: pass --resume to continue that run, --overwrite to start again, or "
                         "choose another --out")
    elif os.path.lexists(out) and not overwrite:
        raise ValueError(f"--out {out} exists and no train state says it is this run's: refusing to overwrite it "
                         "(pass --overwrite to replace it, or choose another --out)")
    return spath


def train(cfg: TrainConfig, out: str, *, resume: bool = False, device="cpu", save_every: int = 500,
          progress: bool = True, log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume) and write `out` (EMA weights + config + schedule) and `out`.train-state.

    Refuses, before any work, an existing `out` without its train state (unless `overwrite`), outputs that cannot
    be written, and bad numbers. Stops with NonFiniteLoss at the first NaN/inf loss; no non-finite weights are
    ever written (the last good checkpoint stays). Holds OUT's lock (.OUT.lock beside it) for the run: a second
    `train` on the same OUT at the same time is refused (TrainBusy), so a checkpoint and its train state always
    come from one run."""
    from fastdiff.fsutil import DirLock, clean_temps

    check_config(cfg, save_every)
    check_outputs(out, resume=resume, overwrite=overwrite)
    lock = DirLock(os.path.dirname(os.path.abspath(out)), name=f".{os.path.basename(out)}.lock")
    if not lock.acquire():
        raise TrainBusy(f"another fastdiff train is writing {out} ({lock.holder()}): wait for it, or choose another "
                        "--out")
    try:
        check_outputs(out, resume=resume, overwrite=overwrite)  # again under the lock: another run may have written
        # a killed earlier run's half-written temp files of these two outputs (and only of these)
        clean_temps(os.path.dirname(os.path.abspath(out)),
                    [os.path.basename(out), os.path.basename(ckpt.state_path(out))])
        return _train(cfg, out, resume=resume, device=device, save_every=save_every, progress=progress, log=log)
    finally:
        lock.release()


class TrainBusy(RuntimeError):
    """Another process is training into the same --out."""


def _train(cfg: TrainConfig, out: str, *, resume: bool, device, save_every: int, progress: bool,
           log: Callable[[str], None]) -> dict[str, Any]:
    data = load_dataset(cfg)
    channels = data.shape[1]
    sched = NoiseSchedule.from_name(cfg.beta_schedule, cfg.num_train_timesteps)
    ucfg = unet_config(cfg, channels)
    torch.manual_seed(cfg.seed)
    model = ckpt.build_model("UNet2D", ucfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = None
    start = 0
    loss_sum, loss_n = 0.0, 0  # the running loss EMA (LOSS_EMA_DECAY) and the steps in it
    spath = ckpt.state_path(out)
    if resume:
        ema, meta = ckpt.load_train_state(spath, model=model, optimizer=opt)
        have = meta.get("config", {})
        want = json.loads(json.dumps(cfg.identity()))
        diffs = [f"{k}: {have.get(k)!r} recorded, {want.get(k)!r} now" for k in sorted(set(have) | set(want))
                 if have.get(k) != want.get(k)]
        if diffs:
            raise ValueError(f"--resume: {spath} was made with other options ({'; '.join(diffs)})")
        start = int(meta["step"])
        loss_sum, loss_n = float(meta.get("loss_ema_sum", 0.0)), int(meta.get("loss_ema_steps", 0))
        if start >= cfg.steps:
            log(f"{spath} is already at step {start} >= --steps {cfg.steps}: nothing to do")
        else:
            log(f"resuming from step {start} of {cfg.steps}")
    if ema is None:
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    else:
        ema = {k: v.to(device) for k, v in ema.items()}
    n = data.shape[0]
    data = data.to(device)
    image = {"channels": channels, "size": cfg.image_size, "source": "digits" if cfg.data == "digits" else "folder"}

    saved = [start if resume else None]

    def save(step: int):
        from fastdiff.validate import check_finite_tensors

        try:
            check_finite_tensors(f"weights at step {step}", model.state_dict())
            check_finite_tensors(f"EMA weights at step {step}", ema)
        except FloatingPointError as e:
            raise NonFiniteLoss(f"training diverged: {e}; nothing written for step {step} (the last checkpoint "
                                "is kept): lower --lr or raise --warmup") from None
        train_meta = {"step": step, "config": cfg.identity(), "steps": cfg.steps, "loss_ema_sum": loss_sum,
                      "loss_ema_steps": loss_n}
        with deferred_signals():  # a Ctrl-C now takes effect after both files are written (they match)
            ckpt.save_train_state(spath, model=model, ema=ema, optimizer=opt, meta=train_meta)
            ckpt.save_checkpoint(out, model, scheduler=scheduler_config(cfg), image=image,
                                 train={**train_meta, "command": "fastdiff train", "dataset_size": n,
                                        "loss": loss_ema(loss_sum, loss_n), "loss_is": LOSS_DESCRIPTION},
                                 state_dict={k: v.to(model.state_dict()[k].dtype) for k, v in ema.items()})
        saved[0] = step

    bar = _progress(None, progress and start < cfg.steps, total=cfg.steps, initial=start, unit="step", desc="training")
    model.train()
    t0 = time.perf_counter()
    done = start  # optimizer steps applied to `model`, `opt` and `ema` so far
    try:
        for step in range(start, cfg.steps):
            loss = _loss_and_grads(cfg, step, model, opt, data, sched, device)
            with deferred_signals():  # weights, optimizer, EMA and the step count change together or not at all
                _apply(cfg, step, model, opt, ema)
                lv = float(loss.detach())
                loss_sum, loss_n = LOSS_EMA_DECAY * loss_sum + (1 - LOSS_EMA_DECAY) * lv, loss_n + 1
                done = step + 1
            if not math.isfinite(lv):
                kept = (f"{out} and its train state are those of step {saved[0]}" if saved[0] is not None
                        else "no checkpoint was written")
                raise NonFiniteLoss(f"training diverged: loss is {lv} at step {step + 1} (lr {cfg.lr:g}); stopped "
                                    f"({kept}): lower --lr or raise --warmup")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema(loss_sum, loss_n):.4f}")
            if done % save_every == 0 or done == cfg.steps:
                save(done)
    except KeyboardInterrupt as e:
        if bar is not None:
            bar.close()
        if done == 0:
            raise Interrupted("stopped before the first step: nothing written") from e
        if saved[0] != done:  # keep every finished step (also before the first periodic save)
            save(done)
        raise Interrupted(f"saved step {done} of {cfg.steps} to {out} and {spath} (loss {_fmt(loss_sum, loss_n)}, "
                          f"{LOSS_DESCRIPTION})") from e
    if bar is not None:
        bar.close()
    if start >= cfg.steps and not os.path.exists(out):
        save(start)
    return {"steps": cfg.steps, "start": start, "seconds": time.perf_counter() - t0,
            "loss": loss_ema(loss_sum, loss_n), "loss_is": LOSS_DESCRIPTION, "checkpoint": out, "state": spath,
            "parameters": sum(p.numel() for p in model.parameters())}


def _fmt(loss_sum: float, loss_n: int) -> str:
    v = loss_ema(loss_sum, loss_n)
    return "not recorded" if v is None else f"{v:.4f}"


def _loss_and_grads(cfg, step, model, opt, data, sched, device) -> torch.Tensor:
    """Step `step`'s loss, its gradients in `model` (batch, timesteps and noise from (seed, step)); nothing else
    changes (the step is applied by `_apply`)."""
    n = data.shape[0]
    g = _step_generator(cfg.seed, step)
    idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
    x0 = data[idx.to(device)]
    if cfg.hflip:
        flip = torch.rand(cfg.batch_size, generator=g) < 0.5
        x0 = torch.where(flip.to(device).view(-1, 1, 1, 1), x0.flip(-1), x0)
    t = torch.randint(0, len(sched), (cfg.batch_size,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    loss = training_loss(lambda x, tt: model(x, tt, backend=TRAIN_BACKEND), x0, sched, t=t, noise=noise,
                         prediction_type=cfg.prediction_type)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return loss


@torch.no_grad()
def _apply(cfg, step, model, opt, ema) -> None:
    """The optimizer step (warm-up LR) and the EMA weights' update."""
    for grp in opt.param_groups:
        grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    opt.step()
    d = min(cfg.ema_decay, (1 + step) / (10 + step))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].mul_(d).add_(v.float(), alpha=1 - d)
        else:
            ema[k].copy_(v)
