"""Units of issue 13: fastdiff.fsutil (atomic writes, temp files, locks, output checks), fastdiff.validate (argument
checks for the API), and the one safetensors reader in fastdiff.app.checkpoint (checksums, metadata structure)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff import fsutil, validate
from fastdiff.app import checkpoint
from tests._ckpt import save_tiny_checkpoint

pytest.importorskip("safetensors")


# ---------------------------------------------------------------------------------------------------------------
# fsutil

def test_atomic_write_uses_an_exclusive_unpredictable_temp_and_keeps_the_old_file_on_error(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    seen = []

    def temp_name():
        return [n for n in os.listdir(tmp_path) if n != "f.bin"][0]

    def boom(f):
        seen.append(temp_name())
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        fsutil.atomic_write(str(p), boom)
    assert p.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.bin"]
    name = seen[0]
    assert fsutil.is_fastdiff_temp(name) and name.startswith(f".f.bin{fsutil.TEMP_TAG}{fsutil.host_tag()}-"
                                                              f"{os.getpid()}-")
    fsutil.atomic_write(str(p), lambda f: seen.append(temp_name()) or f.write(b"new"))
    assert p.read_bytes() == b"new" and seen[1] != seen[0]  # a fresh random name each time
    assert (p.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"outside")
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(victim, d / "out.npz")
    fsutil.atomic_write(str(d / "out.npz"), lambda f: f.write(b"data"))
    assert victim.read_bytes() == b"outside" and not os.path.islink(d / "out.npz")
    assert (d / "out.npz").read_bytes() == b"data"
    with pytest.raises(IsADirectoryError):
        fsutil.atomic_write(str(d), lambda f: f.write(b"x"))


def test_exclusive_create_refuses_an_existing_path_even_a_dangling_link(tmp_path):
    p = tmp_path / "m.json"
    assert fsutil.exclusive_create(str(p), b"first")
    assert not fsutil.exclusive_create(str(p), b"second") and p.read_bytes() == b"first"
    os.symlink(tmp_path / "nowhere", tmp_path / "l.json")
    assert not fsutil.exclusive_create(str(tmp_path / "l.json"), b"x")
    assert not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["l.json", "m.json"]


def test_clean_temps_removes_only_dead_owners_regular_files(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    me, host = os.getpid(), fsutil.host_tag()
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    names = {f".a{fsutil.TEMP_TAG}{host}-{dead}-x1": "remove",
             f".b{fsutil.TEMP_TAG}{host}-{me}-x2": "keep (alive)",
             f".c{fsutil.TEMP_TAG}ffffffff-{dead}-x3": "keep (other host)" if host != "ffffffff" else "remove",
             ".d.tmp123": "keep (not ours)", ".e.fdtmp-zz": "keep (not ours)", "f.txt": "keep"}
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    link = f".g{fsutil.TEMP_TAG}{host}-{dead}-x4"
    os.symlink(victim, tmp_path / link)
    removed = fsutil.clean_temps(str(tmp_path))
    assert sorted(removed) == sorted(n for n, w in names.items() if w == "remove")
    assert os.path.islink(tmp_path / link) and victim.exists()  # a planted link is not ours: left alone


# fastdiff/fsutil.py alone (no torch import: a second process in a fraction of a second)
_LOAD_FSUTIL = ("import importlib.util, sys\n"
                f"spec = importlib.util.spec_from_file_location('fsutil', {fsutil.__file__!r})\n"
                "fsutil = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(fsutil)\n")


def test_dir_lock_is_exclusive_across_processes_and_released_on_exit(tmp_path):
    lock = fsutil.DirLock(str(tmp_path))
    assert lock.acquire()
    code = _LOAD_FSUTIL + "l = fsutil.DirLock(sys.argv[1]); print(l.acquire(), l.holder().split()[0])"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.stdout.split() == ["False", str(os.getpid())], r.stderr
    lock.release()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.stdout.split()[0] == "True", r.stderr
    with fsutil.DirLock(str(tmp_path)):
        with pytest.raises(fsutil.LockBusy):
            with fsutil.DirLock(str(tmp_path)):
                pass


def test_output_checks_name_the_argument(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileNotFoundError, match="--npz: directory .*nodir.* does not exist"):
        fsutil.check_output_file(str(tmp_path / "nodir" / "a.npz"), "--npz")
    with pytest.raises(IsADirectoryError, match="--png: .* is a directory"):
        fsutil.check_output_file(str(tmp_path), "--png")
    with pytest.raises(NotADirectoryError, match="--out: .* is not a directory"):
        fsutil.check_output_dir(str(f), "--out")
    with pytest.raises(NotADirectoryError, match="--out"):
        fsutil.check_output_dir(str(f / "sub"), "--out")
    with pytest.raises(ValueError, match="--out"):
        fsutil.check_output_dir("", "--out")
    assert fsutil.check_output_dir(str(tmp_path / "new" / "deeper"), "--out").endswith("deeper")
    assert not (tmp_path / "new").exists()  # a check writes nothing


# ---------------------------------------------------------------------------------------------------------------
# validate

@pytest.mark.parametrize("v,kw,want", [(3, {}, 3.0), (np.float32(0.5), {}, 0.5), (np.int64(7), {"integer": True}, 7),
                                       (torch.tensor(2.0), {}, 2.0), (np.array(1.5), {}, 1.5),
                                       (float("inf"), {"finite": False}, float("inf"))])
def test_check_number_accepts_numbers(v, kw, want):
    got = validate.check_number("eta", v, **kw)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("v,kw,exc,msg", [
    ("0.5", {}, TypeError, "eta must be a number, got str '0.5'"),
    (True, {}, TypeError, "eta must be a number"),
    (None, {}, TypeError, "eta must be a number"),
    ([1.0], {}, TypeError, "eta must be a number"),
    (float("inf"), {}, ValueError, "eta must be finite"),
    (float("nan"), {"finite": False}, ValueError, "eta must be a number, got NaN"),
    (np.float64("nan"), {}, ValueError, "NaN"),
    (-1, {"min": 0}, ValueError, "eta must be >= 0"),
    (0, {"min": 0, "min_exclusive": True}, ValueError, "eta must be > 0"),
    (2.0, {"max": 1}, ValueError, "eta must be <= 1"),
    (2.0, {"integer": True}, TypeError, "eta must be an integer"),
    (torch.tensor([1.0, 2.0]), {}, TypeError, "eta must be a number"),
    (1j, {}, TypeError, "eta must be a number"),
])
def test_check_number_refuses_naming_the_argument(v, kw, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace("[", r"\[")):
        validate.check_number("eta", v, **kw)


def test_check_generator_shape_dtype():
    g = torch.Generator().manual_seed(0)
    assert validate.check_generator("generator", g) is g and validate.check_generator("generator", None) is None
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator.*manual_seed\(42\)"):
        validate.check_generator("generator", 42)
    with pytest.raises(TypeError, match="generator"):
        validate.check_generator("generator", "seed")
    assert validate.check_shape("shape", (2, np.int64(3), 4)) == (2, 3, 4)
    assert validate.check_shape("shape", torch.Size([1, 1])) == (1, 1)
    with pytest.raises(TypeError, match=r"shape must be a tuple of ints such as \(B, C, H, W\), got int 16"):
        validate.check_shape("shape", 16)
    for bad, exc in [((2, 0), ValueError), ((2, 3.5), TypeError), ((), ValueError), ("2,3", TypeError),
                     ((2, True), TypeError)]:
        with pytest.raises(exc, match="shape"):
            validate.check_shape("shape", bad)
    assert validate.check_dtype("dtype", torch.bfloat16) is torch.bfloat16
    assert validate.check_dtype("dtype", None) is None
    with pytest.raises(ValueError, match="dtype must be one of .*got torch.int64"):
        validate.check_dtype("dtype", torch.long)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        validate.check_dtype("dtype", "float32")


def test_check_model_output():
    x = torch.zeros(2, 3, 4, 4)
    o = torch.ones_like(x)

    class Out:
        sample = o

    for good in (o, Out(), (o,), [Out()], {"sample": o}):
        assert validate.check_model_output(good, x) is o
    cases = [((), TypeError, "model output at step 3 is an empty tuple"),
             (None, TypeError, "must be a tensor"),
             (torch.ones(2, 3, 4), ValueError, r"has shape \(2, 3, 4\), expected \(2, 3, 4, 4\)"),
             (o.long(), TypeError, "floating point"),
             (o.double(), TypeError, "dtype torch.float64, the sample torch.float32"),
             (o * float("nan"), FloatingPointError, "NaN/inf")]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            validate.check_model_output(bad, x, step=3, check_finite=True)
    assert validate.check_model_output(torch.ones(2, 6, 4, 4), x, channels_factor=2).shape[1] == 6


def test_check_scheduler_config():
    ok = validate.check_scheduler_config({"num_train_timesteps": np.int64(10), "beta_start": np.float32(1e-4),
                                          "beta_schedule": "linear", "clip_sample": np.bool_(True), "other": "x"})
    assert ok["num_train_timesteps"] == 10 and type(ok["beta_start"]) is float and ok["clip_sample"] is True
    bad = [({"beta_start": "0.0001"}, TypeError, "beta_start must be a number, got str"),
           ({"num_train_timesteps": 1000.0}, TypeError, "num_train_timesteps must be an integer"),
           ({"beta_end": float("nan")}, ValueError, "beta_end"),
           ({"beta_end": 2.0}, ValueError, "beta_end must be <= 1"),
           ({"clip_sample": "yes"}, TypeError, "clip_sample must be True or False"),
           ({"beta_schedule": "linaer"}, ValueError, "beta_schedule must be one of"),
           ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, ValueError,
            "trained_betas has 2 entries but num_train_timesteps is 3"),
           ({"trained_betas": [0.1, "x"]}, TypeError, r"trained_betas\[1\]"),
           ({"trained_betas": [0.1, 0.0]}, ValueError, r"trained_betas\[1\] must be > 0"),
           ({"trained_betas": "linear"}, TypeError, "trained_betas must be a list"),
           ([1, 2], TypeError, "scheduler config must be a dict")]
    for cfg, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            validate.check_scheduler_config(cfg)
    assert validate.check_scheduler_config({"trained_betas": np.full(3, 0.1), "num_train_timesteps": 3})[
        "trained_betas"] == [0.1] * 3


def test_check_betas_rescale_and_alpha_bar():
    with pytest.raises(TypeError, match=r"NoiseSchedule.from_name\('linear'\)"):
        validate.check_betas("betas", "linear")
    with pytest.raises(TypeError, match="betas"):
        validate.check_betas("betas", 0.1)
    with pytest.raises(ValueError, match=r"β\[1\] = 0.0"):
        validate.check_betas("betas", [0.1, 0.0])
    with pytest.raises(TypeError, match=r"betas\[1\] must be a number"):
        validate.check_betas("betas", [0.1, "0.2"])
    assert validate.check_betas("betas", np.array([0.1, 0.2])).dtype == torch.float64
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        validate.check_rescale_zero_snr(torch.tensor([0.1]))
    validate.check_rescale_zero_snr(torch.linspace(1e-4, 0.02, 10))
    from fastdiff.schedule import NoiseSchedule

    cos = NoiseSchedule.cosine().alphas_cumprod  # ᾱ_{T−1} ≈ 2.4e-9: below float16's smallest subnormal
    validate.check_alpha_bar(cos, torch.float32)
    validate.check_alpha_bar(torch.tensor([0.5, 0.0]), torch.float16)  # exactly 0 (zero SNR) is not underflow
    with pytest.raises(ValueError, match=r"schedule: ᾱ\[999\] = 2.43e-09 underflows torch.float16"):
        validate.check_alpha_bar(cos, torch.float16)


def test_sample_config_validates_numbers_of_any_number_type():
    from fastdiff.app import jobs

    cfg = jobs.SampleConfig("ddim", np.int64(5), np.float32(0.5), np.int32(3), "float32", np.int64(4)).validate()
    assert (cfg.steps, cfg.eta, cfg.seed, cfg.batch_size) == (5, 0.5, 3, 4)
    for kw, msg in [({"eta": "0.5"}, "eta must be a number"), ({"eta": float("inf")}, "eta must be finite"),
                    ({"steps": 5.0}, "steps must be an integer"), ({"seed": -1}, "seed must be >= 0"),
                    ({"batch_size": "8"}, "batch_size must be an integer"), ({"sampler": "frobnicate"}, "sampler")]:
        with pytest.raises((TypeError, ValueError), match=msg):
            jobs.SampleConfig(**{"sampler": "ddim", "steps": 5, **kw}).validate()


def test_train_config_numbers_are_checked():
    from fastdiff.app import trainer

    for kw, msg in [({"lr": "1e-3"}, "lr must be a number"), ({"lr": float("nan")}, "lr must be a number, got NaN"),
                    ({"lr": 0.0}, "lr must be > 0"), ({"steps": 10.5}, "steps must be an integer"),
                    ({"ema_decay": 1.0}, "ema_decay must be < 1"), ({"batch_size": 0}, "batch_size must be >= 1")]:
        with pytest.raises((TypeError, ValueError), match=msg):
            trainer.check_config(trainer.TrainConfig(**kw))


# ---------------------------------------------------------------------------------------------------------------
# the one reader: fastdiff checkpoints, UNet2D.save files, train states

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "m.safetensors")


def _resave(src, dst, meta_edit=None, raw_edit=None, tensor_edit=None):
    from safetensors.torch import save_file

    t, raw = checkpoint.read_safetensors(src)
    meta = json.loads(raw["fastdiff"])
    meta.pop("sha256")
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(t)
    raw = {**raw, "fastdiff": json.dumps(meta)}
    if raw_edit:
        raw_edit(raw)
    save_file(t, dst, metadata=raw)
    return dst


def test_checkpoint_checksum_catches_a_flipped_bit(ckpt, tmp_path):
    from fastdiff.nn import UNet2D

    checkpoint.load_checkpoint(ckpt)
    blob = bytearray(open(ckpt, "rb").read())
    blob[-3] ^= 0x01
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match="fails its checksum"):
        checkpoint.load_checkpoint(str(bad))
    with pytest.raises(ValueError, match="fails its checksum"):  # UNet2D.load reads through the same reader
        UNet2D.load(str(bad))


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.update(config="a string"), "metadata 'config' is not a JSON object"),
    (lambda m: m.update(config=[1, 2]), "metadata 'config' is not a JSON object"),
    (lambda m: m.update(scheduler=None), "metadata 'scheduler' is not a JSON object"),
    (lambda m: m.update(image=3), "metadata 'image' is not a JSON object"),
    (lambda m: m["config"].update(in_channels="1"), "config does not build a UNet2D"),
    (lambda m: m["config"].update(frobnicate=1), "config does not build a UNet2D"),
    (lambda m: m["scheduler"].update(beta_start="0.0001"), "beta_start must be a number, got str"),
    (lambda m: m["scheduler"].update(num_train_timesteps=float("nan")), "num_train_timesteps must be an integer"),
    (lambda m: m.pop("image"), "metadata lacks 'image'"),
    (lambda m: m.update(format="other"), "format 'other'"),
])
def test_checkpoint_metadata_structure_is_checked(ckpt, tmp_path, edit, msg):
    bad = _resave(ckpt, str(tmp_path / "b.safetensors"), meta_edit=edit)
    with pytest.raises(checkpoint.CheckpointError, match=msg):
        checkpoint.load_checkpoint(bad)


def test_unet_file_config_not_a_dict_and_nonfinite_weights(ckpt, tmp_path):
    from safetensors.torch import save_file

    from fastdiff.nn import UNet2D

    t, raw = checkpoint.read_safetensors(ckpt)
    save_file(t, str(tmp_path / "u.safetensors"), metadata={"format": raw["format"], "config": "[1, 2]"})
    for load in (checkpoint.load_checkpoint, UNet2D.load):
        with pytest.raises(ValueError, match="metadata 'config' is not a JSON object"):
            load(str(tmp_path / "u.safetensors"))
    nan = _resave(ckpt, str(tmp_path / "n.safetensors"), tensor_edit=lambda t: t["conv_in.bias"].fill_(float("inf")))
    with pytest.raises(checkpoint.CheckpointError, match=r"non-finite weights .*conv_in.bias"):
        checkpoint.load_checkpoint(nan)
    assert not torch.isfinite(UNet2D.load(nan).conv_in.bias).any()  # the plain loader leaves the policy to you
    with pytest.raises(checkpoint.CheckpointError, match="is not a file"):
        checkpoint.load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UNet2D.load(str(tmp_path / "missing.safetensors"))


def test_writers_refuse_nonfinite_tensors(ckpt, tmp_path):
    from fastdiff.nn import UNet2D

    model, meta = checkpoint.load_checkpoint(ckpt)
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
    out = tmp_path / "w.safetensors"
    with pytest.raises(FloatingPointError, match="conv_in.weight"):
        checkpoint.save_checkpoint(str(out), model, scheduler=meta["scheduler"], image=meta["image"])
    assert not out.exists()
    assert isinstance(model, UNet2D)


def test_train_state_without_checksum_is_refused(tmp_path):
    from fastdiff.app import trainer

    cfg = trainer.TrainConfig(block_out_channels=[8, 16], norm_num_groups=4, batch_size=2, steps=1, image_size=8)
    out = str(tmp_path / "m.safetensors")
    trainer.train(cfg, out, save_every=1, progress=False, log=lambda m: None)
    spath = checkpoint.state_path(out)
    _resave(spath, spath)  # the same content with its checksum removed
    model = checkpoint.build_model("UNet2D", trainer.unet_config(cfg, 1))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(checkpoint.CheckpointError, match="carries no checksum"):
        checkpoint.load_train_state(spath, model=model, optimizer=opt)


def test_special_files_are_never_replaced_and_errors_name_the_target(tmp_path):
    for check in (lambda: fsutil.atomic_write(os.devnull, lambda f: f.write(b"x")),
                  lambda: fsutil.check_output_file(os.devnull, "--npz")):
        with pytest.raises(OSError, match="not a regular file"):
            check()
    assert not os.path.isfile(os.devnull)  # still the device
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        fsutil.atomic_write(str(fifo), lambda f: f.write(b"x"))
    with pytest.raises(FileNotFoundError, match=r"cannot write '.*nodir/m.safetensors': directory .*nodir.* does not"):
        fsutil.atomic_write(str(tmp_path / "nodir" / "m.safetensors"), lambda f: f.write(b"x"))


def test_dir_lock_is_released_when_its_holder_is_killed(tmp_path):
    import signal

    holder = subprocess.Popen([sys.executable, "-c", _LOAD_FSUTIL + "import time\n"
                               "assert fsutil.DirLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    lock = fsutil.DirLock(str(tmp_path))
    assert not lock.acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.acquire()  # the kernel dropped the dead holder's flock: a killed run never wedges its --out
    lock.release()


def test_check_sampler_args_in_one_call():
    g = torch.Generator()
    got = validate.check_sampler_args(steps=np.int64(10), eta=np.float32(0.5), shape=[2, 1, 4, 4], generator=g,
                                      dtype=torch.float16, guidance_scale=7)
    assert got == {"steps": 10, "eta": 0.5, "shape": (2, 1, 4, 4), "generator": g, "dtype": torch.float16,
                   "guidance_scale": 7.0}
    for kw, msg in [({"generator": 42}, "generator"), ({"shape": 16}, "shape"), ({"dtype": torch.long}, "dtype"),
                    ({"eta": float("inf")}, "eta must be finite"), ({"steps": "50"}, "steps"),
                    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"steps_required": True}, "steps")]:
        with pytest.raises((TypeError, ValueError), match=msg):
            validate.check_sampler_args(**kw)


def test_noise_schedule_inputs_are_named():
    import fastdiff
    from fastdiff.schedule import NoiseSchedule

    with pytest.raises(TypeError, match=r"NoiseSchedule.from_name\('linear'\)"):
        NoiseSchedule("linear")
    with pytest.raises(TypeError, match="beta_start must be a number, got str"):
        NoiseSchedule.from_name("linear", 1000, "1e-4")
    with pytest.raises(TypeError, match="num_train_timesteps must be an integer"):
        NoiseSchedule.from_diffusers({"num_train_timesteps": "1000"})
    with pytest.raises(ValueError, match="trained_betas has 5 entries but num_train_timesteps is 1000"):
        fastdiff.ddim_sample(lambda x, t: x, 2, shape=(1, 1, 2, 2),
                             schedule={"trained_betas": [0.1] * 5, "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="rescale_zero_snr: needs at least 2 timesteps"):
        NoiseSchedule.linear(1, rescale_zero_snr=True)  # was 0/0: NaN betas
    # a switched-off setting may hold any number, as in diffusers
    x = fastdiff.ddim_sample(lambda x, t: 0 * x, 2, shape=(1, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                             schedule={"clip_sample": False, "clip_sample_range": 0.0, "num_train_timesteps": 10})
    assert torch.isfinite(x).all()
