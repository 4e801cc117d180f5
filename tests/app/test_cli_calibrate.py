"""`fastdiff calibrate --out grid.json` and `fastdiff sample --grid grid.json`: a calibrated grid kept and reused,
refused for another checkpoint, sampler or step count."""
import json

import numpy as np
import pytest

from fastdiff.app.cli import main
from tests._ckpt import save_tiny_checkpoint


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    ck = save_tiny_checkpoint(str(d / "tiny.safetensors"))
    out = str(d / "grid.json")
    assert main(["calibrate", "--checkpoint", ck, "--sampler", "unipc", "--steps", "4", "--batch", "4", "--out", out,
                 "--no-progress"]) == 0
    return d, ck, out


def test_calibrate_writes_a_grid_file(calibrated):
    d, ck, out = calibrated
    g = json.load(open(out))
    assert g["format"] == "fastdiff-grid/1" and g["sampler"] == "unipc" and g["steps"] == 4
    ts = g["timesteps"]
    assert len(ts) == 4 and all(a > b for a, b in zip(ts, ts[1:]))
    assert len(g["checkpoint_sha256"]) == 64 and g["model_calls"] > 0
    assert {"default", "calibrated", "gits"} <= set(g["errors"])


def test_sample_with_the_grid_uses_its_timesteps(calibrated, tmp_path):
    d, ck, out = calibrated
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    assert main(["sample", "--checkpoint", ck, "--grid", out, "-n", "4", "--npz", a, "--png", str(tmp_path / "a.png"),
                 "--no-progress"]) == 0
    assert main(["sample", "--checkpoint", ck, "--sampler", "unipc", "--steps", "4", "-n", "4", "--npz", b,
                 "--png", str(tmp_path / "b.png"), "--no-progress"]) == 0
    assert not np.array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])  # another grid, other pixels
    # a resumable run records the grid: the same command resumes, another grid is refused
    run = str(tmp_path / "run")
    assert main(["sample", "--checkpoint", ck, "--grid", out, "-n", "4", "--out", run, "--no-progress"]) == 0
    m = json.load(open(tmp_path / "run" / "manifest.json"))
    assert json.dumps(json.load(open(out))["timesteps"]) in json.dumps(m)


@pytest.mark.parametrize("extra, match", [(["--sampler", "ddim"], "calibrated for sampler 'unipc'"),
                                          (["--steps", "5"], "holds 4 steps, not --steps 5")])
def test_grid_for_another_sampler_or_steps_is_refused(calibrated, tmp_path, capsys, extra, match):
    d, ck, out = calibrated
    assert main(["sample", "--checkpoint", ck, "--grid", out, "-n", "2", "--npz", str(tmp_path / "x.npz"),
                 "--png", str(tmp_path / "x.png"), *extra]) == 2
    assert match in capsys.readouterr().err


def test_grid_for_another_checkpoint_is_refused(calibrated, tmp_path, capsys):
    d, ck, out = calibrated
    other = save_tiny_checkpoint(str(tmp_path / "other.safetensors"), seed=1)
    assert main(["sample", "--checkpoint", other, "--grid", out, "-n", "2", "--npz", str(tmp_path / "x.npz"),
                 "--png", str(tmp_path / "x.png")]) == 2
    assert "calibrated for another checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["sample", "--checkpoint", ck, "--grid", str(bad), "-n", "2"]) == 2
    assert "is not a fastdiff grid file" in capsys.readouterr().err
