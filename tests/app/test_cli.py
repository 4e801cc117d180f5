"""The `fastdiff` command line end to end on the CPU: train → sample → files, resume of training, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.app import checkpoint, cli

# The CLI writes PNGs (Pillow) and safetensors checkpoints: a machine without them (the lent GPU box) skips this file.
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--block-out-channels", "8,16", "--norm-groups", "4", "--batch-size", "4", "--warmup", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of `fastdiff train` on the digits with a tiny U-Net, checkpointing every 2."""
    path = str(tmp_path_factory.mktemp("train") / "m.safetensors")
    assert cli.main(["train", "--steps", "4", "--save-every", "2", "--out", path, *TINY]) == 0
    return path


def test_train_writes_a_checkpoint_with_config_and_schedule(trained):
    model, meta = checkpoint.load_checkpoint(trained)
    assert meta["scheduler"]["num_train_timesteps"] == 1000 and meta["scheduler"]["prediction_type"] == "epsilon"
    assert meta["config"]["block_out_channels"] == [8, 16] and meta["config"]["sample_size"] == 8
    assert meta["train"]["step"] == 4 and meta["image"]["channels"] == 1
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).shape == (2, 1, 8, 8)
    from fastdiff.nn import UNet2D  # the same file reads as a plain UNet2D checkpoint too

    torch.testing.assert_close(UNet2D.load(trained).state_dict(), model.state_dict())
    with open(trained, "rb") as f:
        assert b"pickle" not in f.read(4096)


def test_every_parameter_learns(trained):
    from fastdiff.app import trainer
    from fastdiff.nn import UNet2D

    torch.manual_seed(0)  # the initial weights `fastdiff train --seed 0` starts from
    init = UNet2D(**trainer.unet_config(trainer.TrainConfig(block_out_channels=[8, 16], norm_num_groups=4), 1))
    raw = {k[6:]: v for k, v in checkpoint.read_safetensors(checkpoint.state_path(trained), "x")[0].items()
           if k.startswith("model.")}
    frozen = [k for k, v in init.state_dict().items() if torch.equal(v, raw[k])]
    assert not frozen, f"no gradient reached {frozen}"


def test_train_resume_continues_exactly(tmp_path, trained, capsys):
    part = str(tmp_path / "p.safetensors")
    assert run(capsys, "train", "--steps", "2", "--save-every", "2", "--out", part, *TINY)[0] == 0
    rc, _, err = run(capsys, "train", "--steps", "4", "--save-every", "2", "--out", part, "--resume", *TINY)
    assert rc == 0 and "resuming from step 2" in err
    for a, b in ((part, trained), (checkpoint.state_path(part), checkpoint.state_path(trained))):
        ta, tb = checkpoint.read_safetensors(a, "x")[0], checkpoint.read_safetensors(b, "x")[0]
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


def test_reported_loss_is_a_bias_corrected_ema_kept_across_resume(tmp_path, trained, capsys):
    from fastdiff.app import trainer

    state = checkpoint.load_checkpoint(trained)[1]["train"]
    assert state["loss_ema_steps"] == 4 and state["loss_is"] == trainer.LOSS_DESCRIPTION
    # recompute the reported value from the 4 per-step losses (the same seeded batches, noise and weights)
    from fastdiff.nn import UNet2D
    from fastdiff.schedule import NoiseSchedule

    cfg = trainer.TrainConfig(block_out_channels=[8, 16], norm_num_groups=4, batch_size=4, warmup=2, image_size=8,
                              steps=4)
    torch.manual_seed(cfg.seed)
    model = UNet2D(**trainer.unet_config(cfg, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    data, sched, losses = trainer.load_dataset(cfg), NoiseSchedule.from_name("linear", 1000), []
    for step in range(4):
        losses.append(float(trainer._loss_and_grads(cfg, step, model, opt, data, sched, "cpu").detach()))
        trainer._apply(cfg, step, model, opt, ema)
    b = trainer.LOSS_EMA_DECAY
    want = sum((1 - b) * b ** (3 - i) * v for i, v in enumerate(losses)) / (1 - b ** 4)
    assert state["loss"] == pytest.approx(want, rel=1e-12)
    # a finished run resumed reports the recorded loss, never "None"
    rc, _, err = run(capsys, "train", "--steps", "4", "--save-every", "2", "--out", trained, "--resume", *TINY)
    assert rc == 0 and "nothing to do" in err
    assert f"loss {state['loss']:.4f} (EMA of the training loss, decay 0.99 (~the last 100 steps))" in err, err


def test_train_refuses_to_clobber_or_resume_a_different_run(tmp_path, trained, capsys):
    rc, _, err = run(capsys, "train", "--steps", "4", "--out", trained, *TINY)
    assert rc == 2 and "pass --resume" in err
    rc, _, err = run(capsys, "train", "--steps", "6", "--out", trained, "--resume", "--lr", "1e-3", *TINY)
    assert rc == 2 and "other options" in err and "lr" in err
    rc, _, err = run(capsys, "train", "--out", str(tmp_path / "none.safetensors"), "--resume", *TINY)
    assert rc == 2 and "does not exist" in err


def test_sample_writes_png_grid_and_fid_npz(tmp_path, trained, capsys):
    png, npz = str(tmp_path / "g.png"), str(tmp_path / "s.npz")
    rc, _, err = run(capsys, "sample", "--checkpoint", trained, "--steps", "3", "--num", "5", "--batch-size", "2",
                     "--png", png, "--npz", npz, "--no-progress")
    assert rc == 0, err
    assert "images/s" in err
    with np.load(npz) as z:
        assert list(z.keys()) == ["arr_0"]
        a = z["arr_0"]
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8  # NHWC uint8, as FID tools read
    im = Image.open(png)
    assert im.size == (3 * (8 * 6 + 2) + 2, 2 * (8 * 6 + 2) + 2)  # 3 columns × 2 rows, 6× upscaled, 2 px gutters
    # the same seed gives the same images at another batch size; DDPM and η > 0 run too
    npz2 = str(tmp_path / "s2.npz")
    assert run(capsys, "sample", "--checkpoint", trained, "--steps", "3", "--num", "5", "--batch-size", "5",
               "--png", png, "--npz", npz2, "--no-progress")[0] == 0
    with np.load(npz2) as z:
        np.testing.assert_allclose(z["arr_0"].astype(int), a.astype(int), atol=1)
    for extra in (["--sampler", "ddpm", "--steps", "4"], ["--eta", "1.0", "--dtype", "bfloat16"]):
        assert run(capsys, "sample", "--checkpoint", trained, "--num", "2", "--png", png, "--npz", npz2,
                   "--no-progress", "--steps", "3", *extra)[0] == 0


def test_sample_without_arguments_uses_the_bundled_model(tmp_path, monkeypatch, capsys):
    if not os.path.isfile(checkpoint.bundled_checkpoint()):
        pytest.fail("the bundled checkpoint fastdiff/assets/digits.safetensors is missing")
    assert os.path.getsize(checkpoint.bundled_checkpoint()) <= 5 * 2**20
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "sample", "--no-progress")
    assert rc == 0, err
    with np.load(tmp_path / "samples.npz") as z:
        a = z["arr_0"]
    assert a.shape == (64, 8, 8, 1)
    # digits, not noise: mostly dark background, bright strokes, and the 64 images differ
    frac_dark = (a < 64).mean()
    assert 0.4 < frac_dark < 0.85, frac_dark
    assert (a > 160).mean() > 0.1
    assert len({x.tobytes() for x in a}) == 64
    # recognizable: a classifier fit on the real digits is confident on the samples, and finds most classes
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    clf = LogisticRegression(max_iter=300).fit(d.data / 16, d.target)
    p = clf.predict_proba(a.reshape(64, 64) / 255 * 1.0)
    assert p.max(1).mean() > 0.8, p.max(1).mean()
    assert len(set(p.argmax(1))) >= 8
    noise = np.random.default_rng(0).random((64, 64))
    assert clf.predict_proba(noise).max(1).mean() < p.max(1).mean() - 0.1  # the check can fail
    assert Image.open(tmp_path / "samples.png").size[0] >= 8 * 8 * 4


def test_python_dash_m_and_help():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and "--num" in r.stdout and "--out" in r.stdout


@pytest.mark.parametrize("argv,msg", [
    (["sample", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "--eta", "-1"], "--eta must be a finite number >= 0"),
    (["sample", "--num", "many"], "--num must be an integer"),
    (["sample", "--sampler", "no_such_sampler"], "invalid choice: 'no_such_sampler'"),
    (["sample", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["train", "--block-out-channels", "8,x"], "--block-out-channels must be comma-separated integers"),
    (["train", "--attention", "yes"], "--attention must be comma-separated 0/1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_are_usage_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["sample", "--device", "tpu"], "--device"),
    (["sample", "--device", "cuda:7"] if not torch.cuda.is_available() else ["sample", "--device", "meta"],
     "--device"),
    (["sample", "--sampler", "ddpm", "--eta", "0.5"], "--eta applies to --sampler ddim only"),
    (["sample", "--steps", "5000"], "exceeds the model's 1000 training timesteps"),
    (["sample", "--out", "d", "--png", "g.png"], "with --out the merged set is OUT/samples.npz"),
    (["sample", "--backend", "cuda"] if not torch.cuda.is_available() else ["sample", "--backend", "cuda",
                                                                            "--device", "cpu"], "--backend cuda"),
    (["train", "--norm-groups", "3", "--block-out-channels", "8,16"], "--norm-groups 3 must divide"),
    (["train", "--attention", "1", "--block-out-channels", "8,16"], "--attention has 1 flags for 2 levels"),
    (["train", "--image-size", "6", "--block-out-channels", "8,16,32"], "--image-size 6 must be divisible"),
    (["train", "--data", "/nonexistent/folder"], "'digits' or a folder of images"),
])
def test_bad_values_get_clear_errors(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, *argv, "--no-progress")
    assert rc == 2 and msg in err, err
    assert "Traceback" not in err


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path, trained, capsys):
    data = open(trained, "rb").read()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "garbage.safetensors": b"\x00" * 64,
        "text.safetensors": b"not a checkpoint at all",
    }
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    expect = {"truncated.safetensors": "not a readable safetensors file",
              "garbage.safetensors": "not a readable safetensors file",
              "text.safetensors": "not a readable safetensors file",
              "foreign.safetensors": "neither fastdiff metadata",
              "missing.safetensors": "does not exist"}
    for name, msg in expect.items():
        rc, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / name), "--num", "1", "--no-progress")
        assert rc == 2 and msg in err and name in err, (name, err)
    # right format, wrong tensors: the checksum catches it; without a checksum, the check names the offending keys
    t, raw = checkpoint.read_safetensors(trained, "x")
    t.pop("conv_in.weight")
    from safetensors.torch import save_file as sf

    sf(t, str(tmp_path / "short.safetensors"), metadata=raw)
    rc, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "short.safetensors"), "--no-progress")
    assert rc == 2 and "fails its checksum" in err
    meta = json.loads(raw["fastdiff"])
    del meta["sha256"]
    sf(t, str(tmp_path / "short.safetensors"), metadata={**raw, "fastdiff": json.dumps(meta)})
    rc, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "short.safetensors"), "--no-progress")
    assert rc == 2 and "conv_in.weight" in err


def test_train_on_a_folder_of_images(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (12 + i, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "notes.txt").write_text("ignored")
    out = str(tmp_path / "f.safetensors")
    rc, _, err = run(capsys, "train", "--data", str(d), "--steps", "1", "--out", out, "--hflip", *TINY)
    assert rc == 0, err
    _, meta = checkpoint.load_checkpoint(out)
    assert meta["config"]["in_channels"] == 3 and meta["train"]["dataset_size"] == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "train", "--data", str(empty), "--steps", "1", "--out", out + "2", *TINY)
    assert rc == 2 and "no images" in err


def test_bench_prints_a_table(capsys):
    rc, out, _ = run(capsys, "bench", "--quick", "--repeat", "1")
    assert rc == 0
    assert "backends:" in out and "reference" in out and "vs reference" in out
    assert "DDIM step" in out and "GroupNorm" in out and "bundled UNet2D" in out
    assert "failed" not in out and "could not build" not in out
