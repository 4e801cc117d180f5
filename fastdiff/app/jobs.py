"""Large sampling runs that lose nothing: index-seeded noise, atomic numbered shards, resume, torch.distributed.

The unit of work is a shard: images [k·S, min((k+1)·S, num)) of a run, sampled in batches of `batch_size` and
written as DIR/shard_{k:06d}.npz (uint8 NHWC under "arr_0", the global indices under "indices") through a temporary
file and `os.replace`, so a shard on disk is always complete. Image i draws its x_T and every step noise from its own
generator seeded from (seed, i), never from the batch or the resume point; a shard is always computed with the same
batches, so a killed run rerun with the same command fills in the missing shards and the set is bit-identical to an
uninterrupted run. DIR/manifest.json records every option that changes the pixels; a rerun with other options is
refused. Under `torchrun`, rank 0 lists the missing shards and broadcasts them; rank r takes every world-th one; at
the end rank 0 merges the shards into DIR/samples.npz and DIR/grid.png (ranks must share DIR: one file system).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastdiff.run import sampling
from fastdiff._util import Interrupted  # noqa: F401  (sample_to_dir raises it: str() says how many images are kept)
from fastdiff._util import deferred_signals
from fastdiff._util import progress as _progress
from fastdiff.samplers import SAMPLERS  # every sampler fastdiff.sample runs
from fastdiff.fsutil import DirLock, atomic_write, clean_temps, exclusive_create, is_fastdiff_temp, LOCK_NAME
from fastdiff.schedule import NoiseSchedule

MANIFEST = "manifest.json"
MERGED = "samples.npz"
GRID = "grid.png"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RunMismatch(ValueError):
    """DIR holds a run made with other options: resuming would mix two sets."""


def image_seed(seed: int, index: int) -> int:
    """The 63-bit seed of image `index` of a run seeded `seed` (blake2b of both: no collisions across seeds)."""
    h = hashlib.blake2b(f"fastdiff:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class IndexedNoise:
    """One CPU generator per image: `draw(shape)` returns the next (B, *image_shape) draw, row b from image b's stream.

    Each image's first draw is its x_T, the following ones its step noise in step order, whatever batch it sits in.
    The samplers take it as `generator=` (fastdiff.run.loop.randn calls `draw`).
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        self.gens = [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in indices]

    def draw(self, shape=None, device=None, dtype=None) -> torch.Tensor:
        want = (len(self.gens), *self.shape)
        if shape is not None and tuple(shape) != want:
            raise ValueError(f"IndexedNoise draws {want}, asked for {tuple(shape)}")
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.gens])
        return z.to(device=device, dtype=dtype)


@dataclass
class SampleConfig:
    """Every option that changes the pixels of a run (and is recorded in its manifest)."""

    sampler: str = "ddim"
    steps: int | None = 50  # None: DDPM over all T steps
    eta: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    batch_size: int = 64
    timesteps: tuple | None = None  # the model-call times as data (fastdiff calibrate's grid; None: the sampler's)

    def validate(self) -> "SampleConfig":
        from fastdiff.validate import check_choice, check_number

        check_choice("sampler", self.sampler, SAMPLERS)
        if self.steps is not None:
            self.steps = check_number("steps", self.steps, integer=True, min=1)
        if self.sampler != "ddpm" and self.steps is None:
            raise ValueError(f"steps: {self.sampler} needs a number of steps")
        self.eta = check_number("eta", self.eta, min=0)
        if self.sampler != "ddim" and self.eta != 0:
            raise ValueError(f"eta applies to DDIM only ({self.sampler}'s noise, if any, is set by the solver)")
        check_choice("dtype", self.dtype, tuple(DTYPES))
        self.batch_size = check_number("batch_size", self.batch_size, integer=True, min=1)
        self.seed = check_number("seed", self.seed, integer=True, min=0)
        if self.timesteps is not None:
            self.timesteps = tuple(float(t) for t in self.timesteps)
            if self.steps is not None and self.steps != len(self.timesteps):
                raise ValueError(f"steps: {self.steps} but the grid has {len(self.timesteps)} timesteps")
            self.steps = len(self.timesteps)
        return self

    def record(self) -> dict:
        """What a run's manifest records (a run without a grid records no `timesteps`, as runs made before grids
        existed did, so those still resume)."""
        d = dataclasses.asdict(self)
        if d["timesteps"] is None:
            del d["timesteps"]
        else:
            d["timesteps"] = list(d["timesteps"])
        return d


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Model-space images (B, C, H, W) in [−1, 1] → uint8 (B, H, W, C): round((x + 1)·127.5), clipped."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


@torch.no_grad()
def sample_batch(model: Callable, indices: Sequence[int], cfg: SampleConfig, schedule: NoiseSchedule,
                 options: dict[str, Any], image_shape: Sequence[int], device, backend: str = "auto",
                 check_nan: bool = False, bar=None) -> torch.Tensor:
    """Sample the images `indices` of a run as one batch; returns (B, C, H, W) in the model's space.

    Row b depends only on (cfg.seed, indices[b]) and on the batch's composition through the model's rounding.
    `bar` (tqdm) advances by one per model step: at every step on the CPU, after the batch on CUDA (where a
    per-step host update would turn off the CUDA-graph loop).
    """
    dtype = DTYPES[cfg.dtype]
    plan = sampling.plan_for(cfg.sampler, schedule, dict(options), cfg.steps, cfg.eta, cfg.timesteps)
    noise = IndexedNoise(cfg.seed, indices, image_shape)
    x = noise.draw(device=device, dtype=dtype)
    per_step = bar is not None and x.device.type != "cuda"
    # the public loop (fused kernels and CUDA graphs included), drawing step noise from the per-image streams
    x = sampling.run_plan(plan, model, x, generator=noise, backend=backend, check_nan=check_nan, scale_x_T=True,
                          progress=bar if per_step else False)
    if bar is not None and not per_step:
        bar.update(plan.steps)
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if bad.any():
        rows = [int(indices[b]) for b in bad.nonzero().flatten().tolist()]
        raise FloatingPointError(f"non-finite samples (NaN/inf) for image(s) {rows[:8]}"
                                 f"{' ...' if len(rows) > 8 else ''} of seed {cfg.seed}: the model or the sampler "
                                 "options diverge; nothing was written for them")
    return x


def steps_per_batch(cfg: SampleConfig, schedule: NoiseSchedule, options: dict[str, Any]) -> int:
    """Model steps of one batch (the unit of the progress bars: steps × batches)."""
    return sampling.plan_for(cfg.sampler, schedule, dict(options), cfg.steps, cfg.eta, cfg.timesteps).steps


def sample_images(model: Callable, indices: Sequence[int], cfg: SampleConfig, schedule: NoiseSchedule,
                  options: dict[str, Any], image_shape: Sequence[int], device, backend: str = "auto",
                  bar=None, check_nan: bool = False) -> np.ndarray:
    """Images `indices` in batches of cfg.batch_size, as uint8 NHWC; `bar` (tqdm, total steps × batches) advances
    by one per model step."""
    out = []
    bs = cfg.batch_size
    for s in range(0, len(indices), bs):
        idx = list(indices[s:s + bs])
        out.append(to_uint8_nhwc(sample_batch(model, idx, cfg, schedule, options, image_shape, device, backend,
                                              check_nan, bar=bar)))
    if not out:
        return np.zeros((0, image_shape[1], image_shape[2], image_shape[0]), np.uint8)
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------------
# files

def save_npz(path: str, images: np.ndarray, **extra) -> None:
    """uint8 NHWC images under "arr_0" (the key FID tools read), written atomically."""
    atomic_write(path, lambda f: np.savez(f, arr_0=images, **extra))


GUTTER = 128  # the grid's lines between images: mid-grey, visible against dark and light images alike


def image_format(path: str, what: str = "--png") -> str:
    """Pillow's format name for `path`'s extension (.png → PNG, .jpg → JPEG, ...); ValueError naming `what` and the
    formats Pillow can write if it has none."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        why = f"{ext!r} is not an image format Pillow writes" if ext else "no file extension names the image format"
        raise ValueError(f"{what} {path!r}: {why} (use .png, .jpg, .webp, .bmp, .tif, ...)")
    return fmt


def save_grid(path: str, images: np.ndarray, nrow: int | None = None, scale: int = 1, pad: int = 2) -> None:
    """A grid of uint8 NHWC images (nearest-neighbour upscaled by `scale`, `pad`-pixel grey gutters), written
    atomically in the format of `path`'s extension (PNG, JPEG, WebP, ...: `image_format`)."""
    from PIL import Image

    fmt = image_format(path, "grid")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("save_grid: no images")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    hs, ws = h * scale, w * scale
    grid = np.full((ncol * (hs + pad) + pad, nrow * (ws + pad) + pad, c), GUTTER, np.uint8)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (hs + pad), pad + q * (ws + pad)
        grid[y:y + hs, x:x + ws] = big[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_write(path, lambda f: img.save(f, format=fmt))


def shard_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, f"shard_{k:06d}.npz")


def part_path(out_dir: str, k: int, j: int) -> str:
    """Batch j of shard k, written as soon as it is sampled (so an interrupted shard keeps its finished batches);
    removed once shard k is on disk."""
    return os.path.join(out_dir, f"part_{k:06d}_{j:06d}.npz")


_PART_RE = re.compile(r"^part_(\d{6})_(\d{6})\.npz$")


def shard_batches(k: int, num: int, shard_size: int, batch_size: int) -> list[tuple[int, int]]:
    """The batches [lo, hi) of shard k: always the same ones (a batch's composition can change its images' last
    bits through the model's rounding), so a resumed shard equals an uninterrupted one."""
    lo, hi = k * shard_size, min((k + 1) * shard_size, num)
    return [(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]


def images_on_disk(out_dir: str, num: int, shard_size: int, batch_size: int) -> int:
    """How many of a run's images are kept in DIR: whole shards plus the finished batches of unfinished ones."""
    n = 0
    for k in range(math.ceil(num / shard_size)):
        if os.path.isfile(shard_path(out_dir, k)):
            n += min((k + 1) * shard_size, num) - k * shard_size
        else:
            n += sum(hi - lo for j, (lo, hi) in enumerate(shard_batches(k, num, shard_size, batch_size))
                     if os.path.isfile(part_path(out_dir, k, j)))
    return n


def _clean_parts(out_dir: str, n_shards: int) -> None:
    """Batch files of shards that are complete (a run killed between writing a shard and removing its batches)."""
    for name in os.listdir(out_dir):
        m = _PART_RE.match(name)
        if m and int(m[1]) < n_shards and os.path.isfile(shard_path(out_dir, int(m[1]))):
            try:
                os.remove(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass


def default_shard_size(out_dir: str | None, num: int, world: int = 1, cap: int = 1000) -> int:
    """--shard-size when not given: the one DIR's manifest records (a resumed run keeps its shards), else
    min(cap, ⌈num / world⌉), so that every rank of a small torchrun run gets a share of the images."""
    if out_dir is not None:
        try:
            with open(os.path.join(out_dir, MANIFEST)) as f:
                size = json.load(f)["run"]["shard_size"]
            if isinstance(size, int) and size >= 1:
                return size
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no manifest (or not ours): claim_run_dir reports what is wrong with it
    return max(1, min(cap, math.ceil(num / max(1, world))))




def run_tag(run: dict) -> np.ndarray:
    """16 bytes identifying a run (blake2b of its manifest record), stored in each of its shards as "run": a shard
    copied from another run (same indices, other seed or model) is refused at the merge instead of mixed in."""
    h = hashlib.blake2b(json.dumps(json.loads(json.dumps(run)), sort_keys=True).encode(), digest_size=16)
    return np.frombuffer(h.digest(), np.uint8).copy()


def _load_shard(path: str, k: int, lo: int, hi: int, hwc, tag: np.ndarray | None = None,
                what: str = "shard") -> np.ndarray:
    try:
        with np.load(path) as z:
            arr, idx = z["arr_0"], z["indices"]
            have = z["run"] if "run" in z.files else None
    except Exception as e:
        raise RuntimeError(f"{what} {path} is unreadable ({e}); delete it and rerun the same command") from e
    if arr.shape != (hi - lo, *hwc) or arr.dtype != np.uint8 or not np.array_equal(idx, np.arange(lo, hi)):
        raise RuntimeError(f"{what} {path} does not hold images {lo}..{hi - 1} of this run; delete it and rerun")
    if tag is not None and have is not None and not np.array_equal(have, tag):
        raise RuntimeError(f"{what} {path} was written by another run (its run tag differs from the manifest's): "
                           "delete it and rerun the same command")
    return arr


def merge_shards(out_dir: str, num: int, shard_size: int, hwc, tag: np.ndarray | None = None) -> str:
    """Stream every shard, in index order, into DIR/samples.npz ("arr_0": uint8 (num, H, W, C)); return its path.

    The .npy inside the zip is written piece by piece, so a 50,000-image set never sits in memory at once.
    """
    path = os.path.join(out_dir, MERGED)
    n_shards = math.ceil(num / shard_size)

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as a:
                np.lib.format.write_array_header_1_0(
                    a, {"descr": "|u1", "fortran_order": False, "shape": (num, *hwc)})
                for k in range(n_shards):
                    lo, hi = k * shard_size, min((k + 1) * shard_size, num)
                    a.write(_load_shard(shard_path(out_dir, k), k, lo, hi, hwc, tag).tobytes())

    atomic_write(path, write)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the manifest

def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunBusy(RuntimeError):
    """Another process is writing DIR right now."""


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != "fastdiff-samples" or not isinstance(doc.get("run"), dict):
            raise ValueError("no fastdiff-samples 'run' record")
        return doc["run"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunMismatch(f"{path} is not a fastdiff sampling manifest ({e}); use another --out") from None


def _compare(out_dir: str, have: dict, want: dict) -> None:
    if have != want:
        diffs = [f"{k}: {have.get(k)!r} in {out_dir}, {want.get(k)!r} now"
                 for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
        raise RunMismatch(f"refusing to resume: {out_dir} holds a run made with other options ("
                          + "; ".join(diffs) + "). Rerun with the recorded options, or use another --out.")


def _foreign_entries(out_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n != LOCK_NAME and not is_fastdiff_temp(n))


def _refuse_foreign(out_dir: str) -> None:
    """RunMismatch naming what is there if DIR (which has no manifest) holds anything but fastdiff's lock/temps."""
    foreign = _foreign_entries(out_dir)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 8 else "")
        what = "shards but" if any(n.startswith("shard_") for n in foreign) else "files but"
        raise RunMismatch(f"refusing to use {out_dir}: it holds {what} no {MANIFEST} ({shown}); it is not a "
                          "fastdiff run directory: use a new or empty --out")


def check_manifest(out_dir: str, run: dict) -> bool:
    """Create DIR/manifest.json for `run` exclusively, or check that the one there records the same run.

    Call it holding DIR's lock (`claim_run_dir`). Returns True when resuming. Raises RunMismatch naming each
    differing option, or when DIR is not empty but holds no manifest (naming what is there).
    """
    path = os.path.join(out_dir, MANIFEST)
    want = json.loads(json.dumps(run))  # the JSON round trip the stored copy went through
    if os.path.lexists(path):
        _compare(out_dir, _read_manifest(path), want)
        return True
    _refuse_foreign(out_dir)
    doc = {"format": "fastdiff-samples", "version": 1, "run": want,
           "layout": "shard_{k:06d}.npz: arr_0 uint8 (n, H, W, C), indices int64 (n,); images k*shard_size ...",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not exclusive_create(path, json.dumps(doc, indent=1, sort_keys=True).encode()):
        # someone not holding the lock created it meanwhile: the generic path compares it
        _compare(out_dir, _read_manifest(path), want)
        return True
    return False


def claim_run_dir(out_dir: str, run: dict, *, wait: bool = True, log: Callable[[str], None] = print,
                  poll_s: float = 0.05, manifest_timeout_s: float = 10.0) -> tuple[DirLock, bool]:
    """Claim DIR for `run`: (the held lock, resuming?). Creates DIR if needed; takes DIR/.fastdiff.lock (flock,
    held until `lock.release()` or the process ends), then checks or creates the manifest.

    If another process holds DIR: a run with other options is refused (RunMismatch naming them) as soon as the
    holder's manifest shows it; a run with the same options waits for the holder (`wait=True`; then resumes what
    it left, usually nothing) or is refused with RunBusy (`wait=False`). Nothing is written to DIR before the claim.
    """
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise RunMismatch(f"--out {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.lexists(os.path.join(out_dir, MANIFEST)) and _foreign_entries(out_dir) and \
            not os.path.lexists(os.path.join(out_dir, MANIFEST)):
        _refuse_foreign(out_dir)  # a foreign directory is refused before a lock file is put in it
    lock = DirLock(out_dir)
    if not lock.acquire():
        path = os.path.join(out_dir, MANIFEST)
        t_end = time.monotonic() + manifest_timeout_s
        while not os.path.lexists(path) and time.monotonic() < t_end:
            if lock.acquire():  # the holder finished (or died) meanwhile
                break
            time.sleep(poll_s)
        if lock.fd is None:
            if os.path.lexists(path):
                _compare(out_dir, _read_manifest(path), json.loads(json.dumps(run)))
            if not wait or not os.path.lexists(path):
                raise RunBusy(f"{out_dir} is being written by another fastdiff run ({lock.holder()}); wait for it "
                              "to finish, or use another --out")
            log(f"{out_dir} is being written by another fastdiff run with the same options ({lock.holder()}): "
                "waiting for it")
            lock.acquire(blocking=True)
    try:
        return lock, check_manifest(out_dir, run)
    except BaseException:
        lock.release()
        raise


# ---------------------------------------------------------------------------------------------------------------
# torch.distributed

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group (and destroy it at the end)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    import datetime

    # the final barrier waits for the slowest rank's last shards: allow far more than the 30-minute default (a rank
    # that dies is not waited for: torchrun stops the whole group)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(hours=12))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned=True)


def _broadcast(obj, info: DistInfo):
    if info.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, info: DistInfo) -> list:
    if info.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def missing_shards(out_dir: str, n_shards: int) -> list[int]:
    """Shards not on disk yet; a shard name that is not a regular file (a symlink, a directory) is an error."""
    todo = []
    for k in range(n_shards):
        p = shard_path(out_dir, k)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            todo.append(k)
            continue
        if not stat.S_ISREG(st.st_mode):
            raise RuntimeError(f"{p} is not a regular file (a symlink or a directory?); fastdiff writes shards as "
                               "plain files: remove it and rerun")
    return todo


def sample_to_dir(model: Callable, out_dir: str, num: int, cfg: SampleConfig, *, schedule: NoiseSchedule,
                  options: dict[str, Any], image_shape: Sequence[int], device, run_id: dict[str, Any],
                  shard_size: int = 1000, backend: str = "auto", progress: bool = True,
                  dist_info: DistInfo | None = None, grid_count: int = 64, grid_scale: int = 1,
                  log: Callable[[str], None] = print, check_nan: bool = False, wait: bool = True) -> dict[str, Any]:
    """Sample images 0 … num−1 into DIR as shards, resuming what is there; merge them on rank 0.

    `run_id`: what identifies the model (e.g. the checkpoint's sha256); recorded with cfg, num, shard_size, the image
    shape, the sampler options and the device type in the manifest. Rank 0 claims DIR for the whole run
    (`claim_run_dir`: a second run with other options is refused, one with the same options waits if `wait`, else
    is refused). Non-finite samples are an error (FloatingPointError naming the images); `check_nan` also checks the
    model's output at every step. Returns a summary dict (rank 0 has the merged paths; every rank its own
    images/second).
    """
    from fastdiff.validate import check_number

    cfg.validate()
    num = check_number("num", num, integer=True, min=1)
    shard_size = check_number("shard_size", shard_size, integer=True, min=1)
    info = dist_info or DistInfo()
    device = torch.device(device)
    c, h, w = (int(s) for s in image_shape)
    n_shards = math.ceil(num / shard_size)
    from fastdiff._backend import backends

    # what changes the bits: the model, the options, and where and with what the kernels run ("auto" resolves by
    # what was built, so the available backends are part of it)
    run = {"model": run_id, "num": num, "shard_size": shard_size, "image_shape": [c, h, w],
           "device_type": device.type, "options": {k: options[k] for k in sorted(options)},
           "backend": backend, "kernels": sorted(b for b, st in backends().items() if st["available"]),
           "torch": torch.__version__, **cfg.record()}
    runs = _gather(run, info)
    todo: dict[str, Any] = {}
    err: Exception | None = None
    lock = None
    if info.rank == 0:
        try:
            odd = [r for r, other in enumerate(runs) if other != run]
            if odd:
                diffs = sorted(k for r in odd for k in set(run) | set(runs[r]) if runs[r].get(k) != run.get(k))
                raise RunMismatch(f"ranks {odd} differ from rank 0 in {diffs}: every rank must run the same "
                                  "software with the same options")
            lock, resumed = claim_run_dir(out_dir, run, wait=wait, log=log)
            clean_temps(out_dir)
            _clean_parts(out_dir, n_shards)
            todo = {"shards": missing_shards(out_dir, n_shards), "resumed": resumed}
        except Exception as e:  # every rank must learn of it, or the others would wait forever below
            if lock is not None:
                lock.release()
            err, todo = e, {"error": str(e), "mismatch": isinstance(e, RunMismatch)}
    try:
        todo = _broadcast(todo, info)
        if err is not None:
            raise err
        if "error" in todo:
            raise (RunMismatch if todo["mismatch"] else RuntimeError)(f"rank 0: {todo['error']}")
        return _fill_and_merge(model, out_dir, num, cfg, schedule, options, (c, h, w), device, shard_size, backend,
                               progress, info, todo, grid_count, grid_scale, log, check_nan, run)
    finally:
        if lock is not None:
            lock.release()


def _fill_and_merge(model, out_dir, num, cfg, schedule, options, chw, device, shard_size, backend, progress, info,
                    todo, grid_count, grid_scale, log, check_nan, run) -> dict[str, Any]:
    c, h, w = chw
    tag = run_tag(run)
    mine = todo["shards"][info.rank::info.world]
    bs = cfg.batch_size

    def parts_left(k):  # (j, lo, hi) of shard k's batches not on disk yet
        return [(j, lo, hi) for j, (lo, hi) in enumerate(shard_batches(k, num, shard_size, bs))
                if not os.path.isfile(part_path(out_dir, k, j))]

    if info.rank == 0 and todo["resumed"]:
        done_before = images_on_disk(out_dir, num, shard_size, bs)
        log(f"resuming {out_dir}: {done_before}/{num} images already there, {num - done_before} to go")
    work = [b for k in mine for b in parts_left(k)]
    n_mine = sum(hi - lo for _, lo, hi in work)
    # the bar counts model steps × batches (a 1000-step DDPM batch moves it too); it says how many images are done
    per_batch = steps_per_batch(cfg, schedule, options)
    if info.world == 1:  # the whole run, resumed part included
        n_batches = sum(len(shard_batches(k, num, shard_size, bs)) for k in range(math.ceil(num / shard_size)))
        bar = _progress(None, progress, total=n_batches * per_batch, initial=(n_batches - len(work)) * per_batch,
                        unit="step", desc="sampling")
    else:
        bar = _progress(None, progress, total=len(work) * per_batch, unit="step", desc=f"sampling rank {info.rank}",
                        position=info.rank)
    t0 = time.perf_counter()
    made = 0
    try:
        for k in mine:
            lo, hi = k * shard_size, min((k + 1) * shard_size, num)
            for j, blo, bhi in parts_left(k):
                idx = list(range(blo, bhi))
                imgs = to_uint8_nhwc(sample_batch(model, idx, cfg, schedule, options, (c, h, w), device, backend,
                                                  check_nan, bar=bar))
                with deferred_signals():  # a finished batch is kept even if Ctrl-C comes while it is written
                    save_npz(part_path(out_dir, k, j), imgs, indices=np.asarray(idx, np.int64), run=tag)
                    made += len(idx)
                if bar is not None:
                    bar.set_postfix_str(f"{made} new images", refresh=False)
            imgs = np.concatenate([_load_shard(part_path(out_dir, k, j), k, blo, bhi, (h, w, c), tag, what="batch")
                                   for j, (blo, bhi) in enumerate(shard_batches(k, num, shard_size, bs))])
            save_npz(shard_path(out_dir, k), imgs, indices=np.arange(lo, hi, dtype=np.int64), run=tag)
            for j in range(len(shard_batches(k, num, shard_size, bs))):
                os.remove(part_path(out_dir, k, j))
        dt = time.perf_counter() - t0
        if bar is not None:
            bar.close()
            bar = None
        _barrier(info)
        result = {"images": n_mine, "seconds": dt, "images_per_second": n_mine / dt if dt > 0 and n_mine else None}
        if info.rank == 0:  # an interrupt here keeps every image: the rerun only merges
            result["npz"] = merge_shards(out_dir, num, shard_size, (h, w, c), tag)
            first = np.concatenate([_load_shard(shard_path(out_dir, k), k, k * shard_size,
                                                min((k + 1) * shard_size, num), (h, w, c), tag)
                                    for k in range(math.ceil(min(grid_count, num) / shard_size))])[:grid_count]
            result["png"] = os.path.join(out_dir, GRID)
            save_grid(result["png"], first, scale=grid_scale)
        _barrier(info)
    except KeyboardInterrupt as e:
        if bar is not None:
            bar.close()
        kept = images_on_disk(out_dir, num, shard_size, bs)
        who = f"rank {info.rank}: " if info.world > 1 else ""
        rest = "; the rerun only merges them" if kept == num else ""
        raise Interrupted(f"{who}{kept} of {num} images are kept in {out_dir} ({made} made by this run); rerun the "
                          f"same command to resume{rest}") from e
    return result
