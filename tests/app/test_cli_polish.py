"""The command line's surface: progress in steps × batches, help texts, --version, `python -m fastdiff -- ...`, the
grid image's format and gutter, output errors that name the path and the real cause, the compile notice."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.app import cli, jobs
from fastdiff.schedule import NoiseSchedule

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tests._ckpt import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=3)


class Bar:
    """A stand-in progress bar: counts updates."""

    def __init__(self):
        self.n = 0

    def update(self, k=1):
        self.n += k


def test_ddpm_progress_moves_at_every_step_of_every_batch():
    bar, seen = Bar(), []

    def model(x, t):
        seen.append(bar.n)  # where the bar stands at each model call
        return torch.zeros_like(x)

    T = 40
    cfg = jobs.SampleConfig("ddpm", None, 0.0, 0, "float32", 3)
    jobs.sample_images(model, list(range(5)), cfg, NoiseSchedule.linear(T), {}, (1, 4, 4), "cpu", bar=bar)
    assert jobs.steps_per_batch(cfg, NoiseSchedule.linear(T), {}) == T
    assert bar.n == 2 * T  # 2 batches × T steps
    assert seen == list(range(2 * T))  # one step further at every model call, not once per batch


def test_help_lists_every_sampler_and_the_step_defaults():
    from fastdiff.samplers import SAMPLERS

    h = cli._parser()._subparsers._group_actions[0].choices
    text = h["sample"].format_help()
    assert "DDIM or DDPM" not in text and all(s in text for s in SAMPLERS), text
    flat = " ".join(text.split())
    assert "50 for ddim, 20 for the multistep solvers" in flat, flat
    helps = {a.option_strings[-1]: _help(a) for a in h["sample"]._actions}
    assert helps["--batch-size"] and helps["--dtype"] and "float32" in helps["--dtype"]
    train = {a.option_strings[-1]: _help(a) for a in h["train"]._actions}
    for opt, default in (("--lr", "0.002"), ("--steps", "3000"), ("--batch-size", "64"), ("--save-every", "250"),
                         ("--ema-decay", "0.995"), ("--warmup", "100"), ("--seed", "0"), ("--out", "fastdiff-model")):
        assert f"default: {default}" in train[opt], (opt, train[opt])
    assert all(train.values()), [k for k, v in train.items() if not v]  # every train option has a help text


def _help(action):
    """The help text of an argparse action as --help prints it (%(default)s expanded)."""
    return (action.help or "") % dict(vars(action), prog="fastdiff")


def test_version_and_python_dash_m_with_a_leading_double_dash(tmp_path):
    import fastdiff

    r = subprocess.run([sys.executable, "-m", "fastdiff", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith(f"fastdiff {fastdiff.__version__} (torch "), r
    # the README's torchrun form, without torchrun: `--` before the subcommand is accepted
    r = subprocess.run([sys.executable, "-m", "fastdiff", "--", "sample", "--num", "2", "--no-progress", "--png",
                        str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape[0] == 2


@pytest.mark.parametrize("ext,fmt", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")])
def test_grid_is_written_in_the_format_of_its_extension(tmp_path, tiny_ckpt, capsys, ext, fmt):
    png = str(tmp_path / f"grid{ext}")
    assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--num", "4", "--steps", "2", "--no-progress",
                     "--png", png, "--npz", str(tmp_path / "s.npz")]) == 0
    with Image.open(png) as im:
        assert im.format == fmt


def test_grid_with_an_unknown_extension_is_refused_before_any_work(tmp_path, tiny_ckpt, capsys, monkeypatch):
    monkeypatch.setattr(jobs, "sample_images", lambda *a, **k: pytest.fail("sampled before refusing"))
    for name, why in (("g.xyz", "'.xyz' is not an image format Pillow writes"),
                      ("grid", "no file extension names the image format")):
        rc = cli.main(["sample", "--checkpoint", tiny_ckpt, "--num", "4", "--png", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert rc == 2 and f"--png '{tmp_path / name}'" in err and why in err, err
    assert os.listdir(tmp_path) == []


def test_grid_gutter_is_visible_grey_between_black_images(tmp_path):
    path = str(tmp_path / "g.png")
    jobs.save_grid(path, np.zeros((4, 3, 3, 1), np.uint8), scale=2)
    g = np.asarray(Image.open(path))
    pad = 2
    assert g.shape == (2 * (6 + pad) + pad,) * 2
    inner = np.zeros_like(g, bool)
    for r in range(2):
        for c in range(2):
            y, x = pad + r * (6 + pad), pad + c * (6 + pad)
            inner[y:y + 6, x:x + 6] = True
    assert (g[inner] == 0).all() and (g[~inner] == jobs.GUTTER).all() and jobs.GUTTER >= 96


def test_output_errors_name_the_path_and_the_real_cause(tmp_path, tiny_ckpt, capsys):
    f = tmp_path / "x.npz"
    f.write_bytes(b"a file")
    for png in (str(f / "a.png"), str(f / "sub" / "a.png")):
        rc = cli.main(["sample", "--checkpoint", tiny_ckpt, "--num", "2", "--png", png,
                       "--npz", str(tmp_path / "s.npz")])
        err = capsys.readouterr().err
        assert rc == 2 and f"--png: cannot write '{png}': '{f}' is a file, not a directory" in err, err
    if os.path.isdir("/proc") and os.path.exists("/proc/self"):
        rc = cli.main(["sample", "--checkpoint", tiny_ckpt, "--num", "2", "--png", "/proc/a.png",
                       "--npz", str(tmp_path / "s.npz")])
        err = capsys.readouterr().err
        assert rc == 2 and "--png" in err and "'/proc'" in err and "does not exist" not in err, err
        assert "does not accept new files" in err or "not writable" in err, err


def test_compile_says_it_is_compiling_on_its_first_call(monkeypatch):
    from fastdiff import optimize

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)  # no real inductor run
    m = torch.nn.Linear(2, 2)
    fc = optimize.FrozenCompiled(m, m.forward)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"compile=True\): compiling the U-Net with inductor on this call"):
            fc(torch.zeros(1, 2))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fc(torch.zeros(1, 2))  # the second call with the same weights compiles nothing and says nothing
    assert len(compiled) == 1
