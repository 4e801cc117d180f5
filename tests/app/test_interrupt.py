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

from fastdiff.app import cli, jobs
from tests._ckpt import save_tiny_checkpoint

# checkpoints and shards use safetensors and Pillow: a machine without them (the lent GPU box) skips this file
pytest.importorskip("safetensors")
pytest.importorskip("PIL.Image")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

NUM = 600
# default options (batch 64, default shard size, DDIM) but for fewer steps: ten batches of a tiny model
SAMPLE = ["--num", str(NUM), "--steps", "10", "--seed", "4", "--no-progress"]


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


TINY = ["--block-out-channels", "8,16", "--norm-groups", "4", "--batch-size", "4", "--warmup", "2"]


def _tensors(path):
    from fastdiff.app import checkpoint

    return checkpoint.read_safetensors(path, "x")[0]


def _assert_same_files(a, b):
    from fastdiff.app import checkpoint

    for x, y in ((a, b), (checkpoint.state_path(a), checkpoint.state_path(b))):
        tx, ty = _tensors(x), _tensors(y)
        assert tx.keys() == ty.keys()
        for k in tx:
            assert torch.equal(tx[k], ty[k]), k


def test_train_interrupted_before_the_first_save_keeps_its_steps_and_names_the_resume_command(tmp_path, capsys,
                                                                                            monkeypatch):
    from fastdiff.app import trainer

    ref = str(tmp_path / "ref.safetensors")
    assert cli.main(["train", "--steps", "5", "--out", ref, "--no-progress", *TINY]) == 0
    ref_loss = re.search(r"loss (\S+) \(EMA of the training loss", capsys.readouterr().err)[1]

    out = str(tmp_path / "m.safetensors")
    real, n = trainer._loss_and_grads, [0]

    def stop_at_step_3(*a, **k):
        if n[0] == 3:
            raise KeyboardInterrupt
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(trainer, "_loss_and_grads", stop_at_step_3)
    # --save-every 250: the interrupt comes before the first periodic save; --overwrite: not in the resume command
    argv = ["train", "--steps", "5", "--out", out, "--no-progress", "--overwrite", *TINY]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted (Ctrl-C): saved step 3 of 5 to {out}" in err, err
    m = re.search(r"Resume with:\n  (.*)\n", err)
    assert m, err
    cmd = m[1].split()
    assert cmd[cmd.index("train"):] == [a for a in argv if a != "--overwrite"] + ["--resume"], cmd
    assert _tensors(out) and checkpoint_step(out) == 3
    # the same command again (no --resume) is refused, and the refusal names the same resume command
    assert cli.main([a for a in argv if a != "--overwrite"]) == 2
    refused = capsys.readouterr().err
    assert "pass --resume" in refused and f"Resume with:\n  {m[1]}\n" in refused, refused

    monkeypatch.setattr(trainer, "_loss_and_grads", real)
    assert cli.main(cmd[cmd.index("train"):]) == 0  # the printed command resumes, and the result is bit-identical
    err = capsys.readouterr().err
    assert "resuming from step 3 of 5" in err
    _assert_same_files(out, ref)
    assert re.search(r"loss (\S+) \(EMA", err)[1] == ref_loss, err  # the reported loss survives the resume too


def checkpoint_step(path):
    from fastdiff.app import checkpoint

    return checkpoint.load_checkpoint(path)[1]["train"]["step"]


def test_train_interrupted_before_any_step_writes_nothing(tmp_path, capsys, monkeypatch):
    from fastdiff.app import trainer

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_loss_and_grads", stop)
    out = str(tmp_path / "m.safetensors")
    assert cli.main(["train", "--steps", "5", "--out", out, "--no-progress", *TINY]) == 130
    err = capsys.readouterr().err
    assert "stopped before the first step: nothing written; rerun the same command" in err, err
    assert not [f for f in os.listdir(tmp_path) if not f.endswith(".lock")]


def test_train_sigterm_saves_and_the_printed_command_resumes(tmp_path):
    out = str(tmp_path / "m.safetensors")
    log = tmp_path / "err.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastdiff", "train", "--steps", "100", "--out", out, *TINY]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)
        t_end = time.monotonic() + 240
        step = 0
        while step < 5 and p.poll() is None and time.monotonic() < t_end:  # the bar says how far it is
            time.sleep(0.05)
            steps = re.findall(r"(\d+)/100", log.read_text())
            step = int(steps[-1]) if steps else 0
        assert p.poll() is None, log.read_text()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    err = log.read_text()
    assert p.returncode == 143, err
    m = re.search(r"interrupted \(SIGTERM\): saved step (\d+) of 100 .*Resume with:\n  (.*)\n", err, re.S)
    assert m and 5 <= int(m[1]) < 100, err
    resume = m[2].split()
    assert resume[-1] == "--resume" and resume[resume.index("train"):-1] == cmd[cmd.index("train"):], resume
    assert checkpoint_step(out) == int(m[1])
    r = subprocess.run([sys.executable, "-m", "fastdiff", *resume[resume.index("train"):], "--no-progress"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"resuming from step {m[1]} of 100" in r.stderr, r.stderr
    assert checkpoint_step(out) == 100
