"""Ctrl-C and SIGTERM lose no finished work: `fastdiff sample --out` keeps every finished batch and says how many
images it kept; the resumed set is bit-identical to an uninterrupted run; `fastdiff train` saves on interrupt and
prints the command that resumes."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastdiff import cli, jobs
from tests._ckpt import save_tiny_checkpoint

# checkpoints and shards use safetensors and Pillow: a machine without them (the lent GPU box) skips this file
pytest.importorskip("safetensors")
pytest.importorskip("PIL.Image")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

NUM = 600
# default options (batch 64, default shard size, DDIM) but for fewer steps: ten batches of a tiny model
SAMPLE = ["--num", str(NUM), "--steps", "20", "--seed", "4", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=2)


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    assert torch.get_num_threads() == 1  # as the subprocesses (OMP_NUM_THREADS=1)
    assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--out", out, *SAMPLE]) == 0
    with np.load(os.path.join(out, "samples.npz")) as z:
        return out, z["arr_0"]


def _on_disk(out):
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        return 0
    return jobs.images_on_disk(out, NUM, jobs.default_shard_size(out, NUM), 64)


@pytest.mark.parametrize("sig,name,rc", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)])
def test_signal_at_60_percent_keeps_finished_images_and_resume_is_bit_identical(tmp_path, tiny_ckpt, reference, sig,
                                                                              name, rc):
    ref_dir, ref = reference
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "fastdiff", "sample", "--checkpoint", tiny_ckpt, "--out", out, *SAMPLE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         # SIGINT as a terminal's Ctrl-C delivers it (a child of a non-interactive shell may ignore it)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    t_end = time.monotonic() + 240
    while _on_disk(out) < 0.6 * NUM and p.poll() is None and time.monotonic() < t_end:
        time.sleep(0.01)
    made = _on_disk(out)  # images finished when the signal is sent (at least 60 %)
    assert p.poll() is None, f"the run ended before the signal (rc {p.returncode}): {p.stderr.read()}"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == rc, err
    m = re.search(rf"interrupted \({name}\): (\d+) of {NUM} images are kept in .*rerun the same command to resume",
                  err)
    assert m, err
    kept = int(m[1])
    assert kept == _on_disk(out), err  # the message tells the truth
    assert kept >= made >= 0.6 * NUM and kept >= made / 3, (kept, made)

    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}: {kept}/{NUM} images already there, {NUM - kept} to go" in r.stderr
    assert f"{NUM - kept} new images" in r.stderr
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], ref)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref_dir))  # no batch files or temporaries left


def test_interrupt_without_out_says_nothing_is_kept(tmp_path, tiny_ckpt, capsys, monkeypatch):
    calls = []

    def stop(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "sample_batch", stop)
    rc = cli.main(["sample", "--checkpoint", tiny_ckpt, "--num", "4", "--png", str(tmp_path / "a.png"),
                   "--npz", str(tmp_path / "a.npz"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and calls and "interrupted (Ctrl-C): no images are kept" in err and "--out DIR" in err, err
    assert os.listdir(tmp_path) == []
