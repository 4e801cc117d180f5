"""The `fastdiff` command line (also `python -m fastdiff`): train, sample, bench.

    fastdiff sample                                 # 64 digits from the bundled model → samples.png, samples.npz
    fastdiff sample --num 50000 --out runs/fid     # numbered shards, resumable, torchrun-aware; merged at the end
    torchrun --nproc_per_node 2 -m fastdiff -- sample --num 50000 --out runs/fid   # `--` ends torchrun's options
    fastdiff train --data digits --out model.safetensors   [--resume]
    fastdiff bench                                  # fused backends vs the reference on this machine
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

# every sampler fastdiff.sample runs (the package imports torch anyway; a copy spelled out here went stale)
from fastdiff.samplers import SAMPLERS as _SAMPLERS

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A user-facing error: printed as `fastdiff <cmd>: error: ...`, exit status 2, no traceback."""


def _int_at_least(name, lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {v}")
        return v
    return parse


def _positive_int(name):
    return _int_at_least(name, 1)


def _nonneg_int(name):
    return _int_at_least(name, 0)


def _nonneg_float(name):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not v >= 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {s}")
        return v
    return parse


def _int_list(name):
    def parse(s):
        try:
            v = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {s!r}") from None
        if not v or any(c < 1 for c in v):
            raise argparse.ArgumentTypeError(f"{name} must be positive integers, got {s!r}")
        return v
    return parse


def _flag_list(s):
    flags = [p.strip().lower() for p in s.split(",") if p.strip()]
    bad = [f for f in flags if f not in ("0", "1", "true", "false")]
    if bad or not flags:
        raise argparse.ArgumentTypeError(f"--attention must be comma-separated 0/1 per level, got {s!r}")
    return [f in ("1", "true") for f in flags]




def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff", description="Fast diffusion sampling (DDIM, DDPM and multistep "
                                "solvers): sample, train, bench.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", metavar="{sample,calibrate,train,bench}")

    s = sub.add_parser("sample", help="sample images (DDIM, DDPM or a multistep solver) to an image grid and a .npz",
                       description="Sample images. Without --out: one grid (--png) and one .npz (--npz). With --out "
                       "DIR: numbered shards written atomically, every finished batch kept (also on Ctrl-C or "
                       "SIGTERM); rerun the same command to resume; under torchrun "
                       "(torchrun ... -m fastdiff -- sample ...) every rank takes disjoint images; the merged set is "
                       "DIR/samples.npz.")
    s.add_argument("--checkpoint", default=None, help="a fastdiff checkpoint (default: the bundled digits model)")
    s.add_argument("--sampler", choices=_SAMPLERS, default=None, metavar="SAMPLER",
                   help=f"one of {', '.join(_SAMPLERS)} (default: ddim, or the sampler of --grid)")
    s.add_argument("--grid", default=None, metavar="GRID.json",
                   help="a grid from `fastdiff calibrate`: its timesteps replace the sampler's grid (refused if its "
                   "checkpoint, sampler or steps differ from this run's)")
    s.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="sampling steps (default: 50 for ddim, 20 for the multistep solvers, all the model's training "
                   "timesteps for ddpm)")
    s.add_argument("--eta", type=_nonneg_float("--eta"), default=0.0, help="DDIM η (0 = deterministic)")
    s.add_argument("--seed", type=_nonneg_int("--seed"), default=0,
                   help="image i's noise is seeded from (seed, i): the same at any batch size or resume point")
    s.add_argument("-n", "--num", type=_positive_int("--num"), default=64, help="number of images (default 64)")
    s.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64,
                   help="images per model call (default: 64); part of a run's record: it can change the last bits")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    s.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="the model's weights and activations (default: float32; the sampler's per-step coefficients "
                   "are float64 either way)")
    s.add_argument("--backend", choices=("auto", "torch", "triton", "cuda", "cpp"), default="auto",
                   help="kernel backend for the sampler step (default auto)")
    s.add_argument("--out", default=None,
                   help="directory for a resumable, sharded run (new, empty, or one of fastdiff's runs); claimed for "
                   "the run: a concurrent run with other options is refused, one with the same options waits")
    s.add_argument("--shard-size", type=_positive_int("--shard-size"), default=None,
                   help="images per shard file with --out (default: min(1000, num / ranks), so that every torchrun "
                   "rank gets images; a resumed run keeps its recorded shard size). Finished batches are kept as "
                   "they are made, so an interrupted shard loses at most the batch in flight")
    s.add_argument("--png", default=None, help="grid image path; its extension picks the format (.png, .jpg, .webp, "
                   "...; default samples.png; DIR/grid.png with --out)")
    s.add_argument("--npz", default=None, help="uint8 NHWC images under 'arr_0' (default samples.npz)")
    s.add_argument("--grid-scale", type=_positive_int("--grid-scale"), default=None,
                   help="nearest-neighbour upscale of the grid (default: to at least 48 px per image)")
    s.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="CPU intra-op threads (default: torch's; 1 is best on a CPU shared with other jobs)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="train a UNet2D on scikit-learn's digits or a folder of images",
                       description="Train a UNet2D with L_simple. Writes OUT (EMA weights, config, schedule) and "
                       "OUT.train-state (raw weights, optimizer, step, loss) every --save-every steps and on Ctrl-C or "
                       "SIGTERM; --resume continues exactly. The reported loss is an exponential moving average of "
                       "the per-step loss (decay 0.99, about the last 100 steps), kept across --resume.")
    t.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn, no download) or a folder of images (default: digits)")
    t.add_argument("--out", default="fastdiff-model.safetensors",
                   help="checkpoint path (default: fastdiff-model.safetensors)")
    t.add_argument("--resume", action="store_true", help="continue the run recorded in OUT.train-state")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (and OUT.train-state) with a new run (default: refuse)")
    t.add_argument("--steps", type=_positive_int("--steps"), default=3000,
                   help="optimizer steps in total (default: %(default)s)")
    t.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64,
                   help="training images per step (default: %(default)s)")
    t.add_argument("--lr", type=_nonneg_float("--lr"), default=2e-3,
                   help="AdamW learning rate, reached after --warmup steps (default: %(default)s)")
    t.add_argument("--warmup", type=_nonneg_int("--warmup"), default=100,
                   help="linear learning-rate warm-up steps (default: %(default)s)")
    t.add_argument("--ema-decay", type=_nonneg_float("--ema-decay"), default=0.995,
                   help="decay of the EMA weights written to OUT (default: %(default)s)")
    t.add_argument("--seed", type=_nonneg_int("--seed"), default=0,
                   help="initial weights, and step s's batch and noise from (seed, s) (default: %(default)s)")
    t.add_argument("--image-size", type=_positive_int("--image-size"), default=8,
                   help="training resolution (digits are 8×8; default 8)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="image channels (digits: 1; folder default 3)")
    t.add_argument("--block-out-channels", type=_int_list("--block-out-channels"), default=[32, 64],
                   help="U-Net width per level (default: 32,64)")
    t.add_argument("--layers-per-block", type=_positive_int("--layers-per-block"), default=1,
                   help="ResNet blocks per level (default: %(default)s)")
    t.add_argument("--attention", type=_flag_list, default=None,
                   help="attention per level, e.g. 0,1 (default: lowest resolution only)")
    t.add_argument("--norm-groups", type=_positive_int("--norm-groups"), default=8,
                   help="GroupNorm groups; must divide every width (default: %(default)s)")
    t.add_argument("--timesteps", type=_positive_int("--timesteps"), default=1000,
                   help="training timesteps T (default: %(default)s)")
    t.add_argument("--beta-schedule", choices=("linear", "scaled_linear", "cosine", "squaredcos_cap_v2",
                                               "sigmoid"), default="linear", help="β schedule (default: %(default)s)")
    t.add_argument("--prediction-type", choices=("epsilon", "sample", "v_prediction"), default="epsilon",
                   help="what the network predicts (default: %(default)s)")
    t.add_argument("--hflip", action="store_true", help="random horizontal flips (not for digits)")
    t.add_argument("--save-every", type=_positive_int("--save-every"), default=250,
                   help="write OUT and its train state every N steps (and at the end, and on Ctrl-C; default: "
                   "%(default)s)")
    t.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    t.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="CPU intra-op threads (default: torch's; 1 is best on a CPU shared with other jobs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("calibrate", help="compute a time grid for a checkpoint and sampler (fastdiff.calibrate)",
                       description="Compute the model-call times that minimise a sampler's error on this model "
                       "(a teacher trajectory on a fine grid, GITS dynamic programming, then a search on the final "
                       "error, checked on held-out noise) and write them to a JSON file for `fastdiff sample --grid`.")
    c.add_argument("--checkpoint", default=None, help="a fastdiff checkpoint (default: the bundled digits model)")
    c.add_argument("--sampler", choices=_SAMPLERS, default="unipc", metavar="SAMPLER",
                   help=f"one of {', '.join(_SAMPLERS)} (default: %(default)s)")
    c.add_argument("--steps", type=_positive_int("--steps"), default=10,
                   help="model-call times of the grid (default: %(default)s)")
    c.add_argument("--out", required=True, help="the grid file to write (JSON)")
    c.add_argument("--batch", type=_positive_int("--batch"), default=64,
                   help="calibration batch; as many held-out x_T's check the result (default: %(default)s)")
    c.add_argument("--seed", type=_nonneg_int("--seed"), default=0, help="seeds the x_T's (default: %(default)s)")
    c.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="the model's dtype during calibration (default: %(default)s; the grid is float64)")
    c.add_argument("--threads", type=_positive_int("--threads"), default=None, help="CPU intra-op threads")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="time the fused backends against the plain-PyTorch reference here")
    b.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    b.add_argument("--repeat", type=_positive_int("--repeat"), default=5,
                   help="least number of clean interleaved rounds per figure; more run until the ratios settle, "
                        "else the figure is marked noisy (default: %(default)s)")
    b.add_argument("--quick", action="store_true", help="small sizes only")
    b.add_argument("--threads", type=_positive_int("--threads"), default=None, help="CPU intra-op threads")
    return p


def _version() -> str:
    import platform

    from fastdiff import __version__

    torch = sys.modules.get("torch")  # already imported with the package; --version never imports it itself
    parts = ([f"torch {torch.__version__}"] if torch else []) + [f"Python {platform.python_version()}"]
    return f"fastdiff {__version__} ({', '.join(parts)})"


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device: {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA device is visible")
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name}: only cpu and cuda are supported")
    return dev


# ---------------------------------------------------------------------------------------------------------------
# sample

def _sampler_spec(a) -> tuple[str, int | None, float]:
    """(sampler, steps, eta) of `fastdiff sample`'s options: the one place that maps --sampler and its options to
    what jobs.SampleConfig records in the manifest (a new --sampler is one more branch here)."""
    if a.sampler == "ddim":
        return "ddim", a.steps if a.steps is not None else 50, a.eta
    if a.eta:
        raise CliError("--eta applies to --sampler ddim only")
    if a.sampler == "ddpm":
        return "ddpm", a.steps, 0.0
    if a.sampler in _SAMPLERS:  # the multistep solvers: 20 steps unless told
        return a.sampler, a.steps if a.steps is not None else 20, 0.0
    raise CliError(f"--sampler {a.sampler!r} is not known")


GRID_FORMAT = "fastdiff-grid/1"


def _read_grid(a, checkpoint_path: str) -> dict | None:
    """--grid's file, checked against this run: the checkpoint (by checksum), the sampler and the steps must be the
    ones it was calibrated for; --sampler/--steps default to its own."""
    if a.grid is None:
        a.sampler = a.sampler or "ddim"
        return None
    import json

    from fastdiff.app import jobs

    try:
        with open(a.grid, encoding="utf-8") as f:
            g = json.load(f)
    except OSError as e:
        raise CliError(f"--grid {a.grid!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise CliError(f"--grid {a.grid!r} is not JSON ({e})") from None
    if not isinstance(g, dict) or g.get("format") != GRID_FORMAT or not isinstance(g.get("timesteps"), list):
        raise CliError(f"--grid {a.grid!r} is not a fastdiff grid file (format {GRID_FORMAT}, from fastdiff calibrate)")
    digest = jobs.file_digest(checkpoint_path)
    if g.get("checkpoint_sha256") != digest:
        raise CliError(f"--grid {a.grid!r} was calibrated for another checkpoint ({g.get('checkpoint')!r}, sha256 "
                       f"{str(g.get('checkpoint_sha256'))[:12]}…), not {checkpoint_path!r} ({digest[:12]}…)")
    if a.sampler is not None and a.sampler != g.get("sampler"):
        raise CliError(f"--grid {a.grid!r} was calibrated for sampler {g.get('sampler')!r}, not --sampler {a.sampler}")
    if a.steps is not None and a.steps != g.get("steps"):
        raise CliError(f"--grid {a.grid!r} holds {g.get('steps')} steps, not --steps {a.steps}")
    a.sampler, a.steps = g["sampler"], int(g["steps"])
    return g


def _calibrate(a) -> int:
    import json

    import torch

    from fastdiff.app import checkpoint as ckpt
    from fastdiff.app import jobs
    from fastdiff import samplers as S
    from fastdiff.run.calibration import calibrate_report
    from fastdiff.fsutil import atomic_write, check_output_file
    from fastdiff.samplers.ddim import OPTIONS
    from fastdiff.run.sampling import sample_hw, schedule_and_config

    path = a.checkpoint or ckpt.bundled_checkpoint()
    try:
        check_output_file(a.out, "--out")
    except OSError as e:
        raise CliError(e.strerror or str(e)) from None
    dev = _device(a.device)
    model, meta = ckpt.load_checkpoint(path, device=dev, dtype=jobs.DTYPES[a.dtype])
    sch = meta["scheduler"]
    schedule, _ = schedule_and_config(sch or None)
    options = {k: sch[k] for k in OPTIONS if k in sch}
    if a.sampler not in ("ddim", "ddpm"):  # a solver takes the recorded settings it has (as `fastdiff sample` does)
        options = S.solver_options(a.sampler, options, {})
        options = {k: v for k, v in options.items() if k in sch}
    if a.steps >= len(schedule):
        raise CliError(f"--steps {a.steps} must be below the model's {len(schedule)} training timesteps")
    size = model.config.sample_size or meta["image"].get("size")
    h, w = sample_hw(size)
    shape = (a.batch, int(model.config.in_channels), h, w)
    print(f"fastdiff calibrate: {a.sampler}, {a.steps} steps, {path}, batch {a.batch} (+{a.batch} held out), "
          f"{a.dtype} on {dev}", file=sys.stderr)
    r = calibrate_report(model, a.steps, sampler=a.sampler, shape=shape, schedule=schedule,
                         generator=torch.Generator().manual_seed(a.seed), device=dev, progress=not a.no_progress,
                         **options)
    rec = {"format": GRID_FORMAT, "timesteps": [float(t) for t in r.timesteps], "sampler": a.sampler,
           "steps": a.steps, "options": options, "checkpoint": os.path.abspath(path),
           "checkpoint_sha256": jobs.file_digest(path), "seed": a.seed, "batch": a.batch, "dtype": a.dtype,
           "errors": r.errors, "error_measure": "held-out mean RMS distance to the teacher's x0 (DPM-Solver++ 3M on "
           f"{r.teacher['fine_points']} fine points)", "model_calls": r.model_calls, "seconds": round(r.seconds, 2),
           "gits_timesteps": [float(t) for t in r.gits_timesteps]}
    atomic_write(a.out, lambda f: f.write(json.dumps(rec, indent=1).encode()))
    e = r.errors
    print(f"held-out error: default grid {e['default']:.4g}, calibrated {e['calibrated']:.4g} ({e['chosen']}); "
          f"{r.model_calls} model calls of batch {a.batch} in {r.seconds:.1f}s", file=sys.stderr)
    print(f"wrote {a.out}: fastdiff sample --grid {a.out}" + (f" --checkpoint {a.checkpoint}" if a.checkpoint else ""),
          file=sys.stderr)
    return 0


def _check_sample_outputs(a) -> None:
    """Every output can be written, checked before the model is loaded or any image sampled."""
    from fastdiff.fsutil import check_output_dir, check_output_file

    try:
        if a.out is not None:
            check_output_dir(a.out, "--out")
            for name in ("samples.npz", "grid.png"):  # what the run replaces at its end
                if os.path.lexists(os.path.join(a.out, name)):
                    check_output_file(os.path.join(a.out, name), "--out")
        else:
            png = check_output_file(a.png or "samples.png", "--png")
            from fastdiff.app.jobs import image_format

            image_format(a.png or "samples.png", "--png")  # an extension Pillow writes (.png, .jpg, ...)
            npz = check_output_file(a.npz or "samples.npz", "--npz")
            if png == npz:
                raise CliError(f"--png and --npz name the same file {png!r}")
    except OSError as e:
        raise CliError(e.strerror or str(e)) from None


def _sample(a) -> int:
    import torch

    from fastdiff.app import checkpoint as ckpt
    from fastdiff.app import jobs

    path = a.checkpoint or ckpt.bundled_checkpoint()
    if a.checkpoint is None and not os.path.isfile(path):
        raise CliError(f"the bundled checkpoint {path} is missing from this install; pass --checkpoint")
    grid = _read_grid(a, path)
    _sampler_spec(a)  # the option combination, before anything is loaded
    if a.out is not None and (a.npz is not None or a.png is not None):
        raise CliError("--npz/--png: with --out the merged set is OUT/samples.npz and the grid OUT/grid.png")
    _check_sample_outputs(a)
    info = jobs.DistInfo()
    dev = _device(a.device)
    if a.backend != "auto":
        from fastdiff import backends

        st = backends()[a.backend]
        if not st["available"]:
            raise CliError(f"--backend {a.backend} is unavailable here: {st['why']}")
        if (a.backend == "cpp") != (dev.type == "cpu") and a.backend != "torch":
            raise CliError(f"--backend {a.backend} does not run on {dev.type}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if a.out is None:
            raise CliError("under torchrun pass --out DIR: the ranks write shards there and rank 0 merges them")
        if dev.type == "cuda" and a.device in (None, "cuda"):  # one GPU per local rank, chosen before NCCL starts
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        info = jobs.init_distributed(dev.type)
    try:
        model, meta = ckpt.load_checkpoint(path, device=dev, dtype=jobs.DTYPES[a.dtype])
        sch = meta["scheduler"]
        from fastdiff.samplers.ddim import OPTIONS
        from fastdiff.run.sampling import sample_hw, schedule_and_config

        schedule, _ = schedule_and_config(sch or None)
        options = {k: sch[k] for k in OPTIONS if k in sch}
        T = len(schedule)
        sampler, steps, eta = _sampler_spec(a)
        if steps is not None and steps > T:
            raise CliError(f"--steps {steps} exceeds the model's {T} training timesteps")
        cfg = jobs.SampleConfig(sampler, steps, eta, a.seed, a.dtype, a.batch_size,
                                timesteps=grid["timesteps"] if grid else None).validate()
        c = int(model.config.in_channels)
        size = model.config.sample_size or meta["image"].get("size")
        if size is None:
            raise CliError(f"checkpoint {path!r} records no sample size (config sample_size, image size)")
        h, w = sample_hw(size)
        shape = (c, h, w)
        scale = a.grid_scale or max(1, -(-48 // min(h, w)))
        progress = not a.no_progress
        log = (lambda m: print(m, file=sys.stderr)) if info.rank == 0 else (lambda m: None)
        desc = f"{a.sampler.upper()} {steps if steps is not None else T} steps" + (f", eta={a.eta}" if a.eta else "")
        log(f"fastdiff sample: {a.num} images from {path} ({desc}, seed {a.seed}, {a.dtype} on {dev})")
        # NaN checks: every sample is checked at the end (jobs: non-finite images are an error naming them, nothing
        # written); on the CPU every model output too (names the step). On CUDA the per-step check would need the
        # host at every step and so turn off the CUDA-graph loop: there the end check alone runs.
        step_nan = dev.type != "cuda"
        if a.out is not None:
            run_id = {"checkpoint_sha256": jobs.file_digest(path)}
            shard_size = a.shard_size or jobs.default_shard_size(a.out, a.num, info.world)
            res = jobs.sample_to_dir(model, a.out, a.num, cfg, schedule=schedule, options=options,
                                     image_shape=shape, device=dev, run_id=run_id, shard_size=shard_size,
                                     backend=a.backend, progress=progress, dist_info=info, grid_scale=scale, log=log,
                                     check_nan=step_nan)
            ips = res["images_per_second"]
            rate = f"{ips:.1f} images/s" if ips else "nothing left to sample"
            if info.world > 1:
                print(f"rank {info.rank}: {res['images']} images in {res['seconds']:.1f}s ({rate})", file=sys.stderr)
            else:
                log(f"{res['images']} new images in {res['seconds']:.1f}s: {rate}")
            if info.rank == 0:
                log(f"wrote {res['npz']} ({a.num} images, uint8 NHWC under 'arr_0') and {res['png']}")
        else:
            from fastdiff._util import progress as _progress

            per_batch = jobs.steps_per_batch(cfg, schedule, options)  # the bar counts steps × batches
            bar = _progress(None, progress, total=-(-a.num // a.batch_size) * per_batch, unit="step",
                            desc="sampling")
            t0 = time.perf_counter()
            try:
                imgs = jobs.sample_images(model, list(range(a.num)), cfg, schedule, options, shape, dev, a.backend,
                                          bar, check_nan=step_nan)
            except KeyboardInterrupt:
                if bar is not None:
                    bar.close()
                raise jobs.Interrupted("no images are kept: without --out they are written at the end (use --out DIR "
                                       "for a run that keeps every finished batch and resumes)") from None
            dt = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            png, npz = a.png or "samples.png", a.npz or "samples.npz"
            from fastdiff.fsutil import clean_temps

            for p in (npz, png):  # a killed earlier run's temp files of these outputs (only theirs)
                clean_temps(os.path.dirname(os.path.abspath(p)), [os.path.basename(p)])
            jobs.save_npz(npz, imgs)
            jobs.save_grid(png, imgs[:min(len(imgs), 256)], scale=scale)
            log(f"{a.num} images in {dt:.1f}s: {a.num / dt:.1f} images/s")
            log(f"wrote {png} and {npz} (uint8 NHWC {tuple(imgs.shape)} under 'arr_0')")
    finally:
        if info.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------------------
# train

def _train(a) -> int:
    from fastdiff.app import trainer

    cfg = trainer.TrainConfig(
        data=a.data, image_size=a.image_size, channels=a.channels, block_out_channels=a.block_out_channels,
        layers_per_block=a.layers_per_block, attention=a.attention, norm_num_groups=a.norm_groups, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, ema_decay=a.ema_decay, seed=a.seed,
        num_train_timesteps=a.timesteps, beta_schedule=a.beta_schedule, prediction_type=a.prediction_type,
        hflip=a.hflip)
    if not a.lr > 0:
        raise CliError("--lr must be > 0")
    if not a.ema_decay < 1:
        raise CliError("--ema-decay must be < 1")
    if any(c % a.norm_groups for c in a.block_out_channels):
        raise CliError(f"--norm-groups {a.norm_groups} must divide every --block-out-channels entry "
                       f"{a.block_out_channels}")
    if a.attention is not None and len(a.attention) != len(a.block_out_channels):
        raise CliError(f"--attention has {len(a.attention)} flags for {len(a.block_out_channels)} levels")
    if a.image_size % (2 ** (len(a.block_out_channels) - 1)):
        raise CliError(f"--image-size {a.image_size} must be divisible by 2^(levels-1) = "
                       f"{2 ** (len(a.block_out_channels) - 1)}")
    if a.resume and a.overwrite:
        raise CliError("--resume continues OUT's run and --overwrite starts a new one: pass one of them")
    dev = _device(a.device)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        trainer.check_outputs(a.out, resume=a.resume, overwrite=a.overwrite)
    except OSError as e:
        raise CliError(e.strerror or str(e)) from None
    except ValueError as e:
        if "pass --resume" in str(e):  # the same command after an interrupt: say exactly what continues it
            raise CliError(f"{e}. Resume with:\n  {_resume_command(a)}") from None
        raise
    from fastdiff._util import Interrupted

    try:
        res = trainer.train(cfg, a.out, resume=a.resume, device=dev, save_every=a.save_every,
                            progress=not a.no_progress, log=log, overwrite=a.overwrite)
    except Interrupted as e:
        if str(e).startswith("saved step"):
            raise Interrupted(f"{e}. Resume with:\n  {_resume_command(a)}") from e
        raise Interrupted(f"{e}; rerun the same command to start") from e
    done = res["steps"] - res["start"]
    rate = f" ({done / res['seconds']:.2f} steps/s)" if done and res["seconds"] > 0 else ""
    loss = ("not recorded (the train state predates the loss record)" if res["loss"] is None
            else f"{res['loss']:.4f} ({res['loss_is']})")
    log(f"trained {res['parameters']:,}-parameter UNet2D to step {res['steps']}{rate}; loss {loss}")
    log(f"wrote {res['checkpoint']} and {res['state']}")
    return 0


def _resume_command(a) -> str:
    """The command line that continues an interrupted `fastdiff train`: the same arguments, --overwrite (and any
    abbreviation of it) dropped, --resume added."""
    import shlex

    args = [t for t in a.argv if not (len(t) > 3 and ("--overwrite".startswith(t) or "--resume".startswith(t)))]
    prog = "fastdiff" if os.path.basename(sys.argv[0]) == "fastdiff" else \
        f"{os.path.basename(sys.executable) or 'python'} -m fastdiff"
    return shlex.join([*shlex.split(prog), *args, "--resume"])


def _set_threads(a) -> None:
    """--threads, else torch's default, except on a CPU that other jobs already saturate: there, several OpenMP
    threads spin at every barrier while their siblings wait for a core (measured: the default `fastdiff sample` took
    47 s with 2 threads and 7 s with 1 on this 2-core machine at load 4.5), so CPU runs drop to one thread and say
    so."""
    import torch

    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
        return
    if a.cmd not in ("sample", "train") or (a.device or "cpu").startswith("cuda") or torch.get_num_threads() == 1:
        return
    if a.device is None and torch.cuda.is_available():
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return
    cores = os.cpu_count() or 1
    if load >= cores:
        torch.set_num_threads(1)
        print(f"fastdiff {a.cmd}: the CPU is busy (load {load:.1f} on {cores} cores): using 1 thread "
              "(--threads N to choose)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `python -m fastdiff -- sample ...`: the torchrun form, run without torchrun
        argv = argv[1:]
    a = parser.parse_args(argv)
    a.argv = argv
    if a.cmd is None:
        parser.print_help()
        return EXIT_USAGE
    from fastdiff.app.checkpoint import CheckpointError
    from fastdiff.app.jobs import RunBusy, RunMismatch

    _set_threads(a)
    signals: list[str] = []
    restore = _interrupt_on_sigterm(signals)
    try:
        if a.cmd == "sample":
            return _sample(a)
        if a.cmd == "train":
            return _train(a)
        if a.cmd == "calibrate":
            return _calibrate(a)
        from fastdiff.app import benchtable

        return benchtable.run(device=_device(a.device), repeat=a.repeat, quick=a.quick, threads=a.threads)
    except (CliError, CheckpointError, RunMismatch, ValueError) as e:
        if os.environ.get("FASTDIFF_DEBUG") == "1":  # the traceback, for bug reports
            raise
        print(f"fastdiff {a.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, RunBusy, OSError, RuntimeError) as e:  # the run failed: nothing half-written
        if os.environ.get("FASTDIFF_DEBUG") == "1":
            raise
        print(f"fastdiff {a.cmd}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        from fastdiff._util import Interrupted

        how = signals[0] if signals else "Ctrl-C"
        what = f": {e}" if isinstance(e, Interrupted) else ""
        print(f"fastdiff {a.cmd}: interrupted ({how}){what}", file=sys.stderr)
        return 143 if signals else 130
    finally:
        restore()


def _interrupt_on_sigterm(seen: list) -> Callable[[], None]:
    """SIGTERM (kill, a batch scheduler, torchrun stopping its workers) unwinds like Ctrl-C, so a job keeps what it
    finished and says so; returns the function that puts the previous handler back."""
    import signal

    def handler(signum, frame):
        if not seen:
            seen.append("SIGTERM")
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
