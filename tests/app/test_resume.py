"""Resumable sharded sampling: index-seeded noise, atomic shards, kill-and-resume bit-identity, mismatch refusal."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastdiff import fsutil
from fastdiff.app import jobs
from fastdiff.schedule import NoiseSchedule
from tests._ckpt import save_tiny_checkpoint

# checkpoints and shards use safetensors and Pillow: a machine without them (the lent GPU box) skips this file
pytest.importorskip("safetensors")
pytest.importorskip("PIL.Image")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


class TinyEps(torch.nn.Module):
    """A stand-in ε-model: one conv plus a timestep-dependent bias; batch rows never mix."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.fill_(0.1)

    def forward(self, x, t):
        return self.conv(x) + (t.float() / 1000).view(-1, 1, 1, 1)


SCHED = NoiseSchedule.linear()
OPTS = {"clip_sample": True}
SHAPE = (1, 6, 5)  # odd sizes on purpose


def _run_dir(tmp, name, num=11, shard=3, backend="auto", **kw):
    cfg = jobs.SampleConfig(**{"sampler": "ddpm", "steps": 4, "batch_size": 2, **kw})
    out = str(tmp / name)
    res = jobs.sample_to_dir(TinyEps(), out, num, cfg, schedule=SCHED, options=OPTS, image_shape=SHAPE,
                             device="cpu", run_id={"model": "tiny"}, shard_size=shard, progress=False,
                             backend=backend, log=lambda m: None)
    with np.load(res["npz"]) as z:
        return out, res, z["arr_0"]


def test_image_noise_depends_on_seed_and_index_only():
    a = jobs.IndexedNoise(7, [5, 6, 7], SHAPE)
    b = jobs.IndexedNoise(7, [7, 0, 6, 5], SHAPE)
    xa, xb = a.draw(), b.draw()  # x_T
    assert torch.equal(xa[0], xb[3]) and torch.equal(xa[2], xb[0]) and torch.equal(xa[1], xb[2])
    za, zb = a.draw(), b.draw()  # the first step noise: each image's own stream, not x_T again
    assert torch.equal(za[0], zb[3]) and not torch.equal(za[0], xa[0])
    assert not torch.equal(jobs.IndexedNoise(8, [5], SHAPE).draw()[0], xa[0])
    assert jobs.image_seed(1, 23) != jobs.image_seed(12, 3)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("ddim", 0.0)])
def test_batch_composition_does_not_change_an_image(sampler, eta):
    cfg = jobs.SampleConfig(sampler, 5, eta, 3, "float32", 8)
    full = jobs.sample_batch(TinyEps(), list(range(6)), cfg, SCHED, OPTS, SHAPE, "cpu")
    part = jobs.sample_batch(TinyEps(), [4, 1], cfg, SCHED, OPTS, SHAPE, "cpu")
    torch.testing.assert_close(part, full[[4, 1]], rtol=0, atol=1e-6)
    imgs = jobs.sample_images(TinyEps(), list(range(6)), jobs.SampleConfig(sampler, 5, eta, 3, "float32", 4),
                              SCHED, OPTS, SHAPE, "cpu")
    assert imgs.shape == (6, 6, 5, 1) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs, jobs.to_uint8_nhwc(full))


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.7), ("ddim", 0.0)])
def test_one_image_equals_the_public_sampler_with_its_generator(sampler, eta):
    """Image i is exactly fastdiff.ddpm_sample / ddim_sample run with a generator seeded image_seed(seed, i)."""
    import fastdiff

    cfg = jobs.SampleConfig(sampler, 6, eta, 11, "float32", 4)
    got = jobs.sample_batch(TinyEps(), [9], cfg, SCHED, OPTS, SHAPE, "cpu")
    g = torch.Generator().manual_seed(jobs.image_seed(11, 9))
    x_T = torch.randn((1, *SHAPE), generator=g)
    if sampler == "ddpm":
        want = fastdiff.ddpm_sample(TinyEps(), steps=6, x_T=x_T, schedule=SCHED, generator=g, **OPTS)
    else:
        want = fastdiff.ddim_sample(TinyEps(), 6, x_T=x_T, schedule=SCHED, eta=eta, generator=g, **OPTS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_to_uint8_nhwc_range_and_layout():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).repeat(1, 3, 2, 1)
    u = jobs.to_uint8_nhwc(x)
    assert u.shape == (1, 2, 5, 3)
    assert u[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_resume_after_lost_shards_is_bit_identical(tmp_path):
    out, res, ref = _run_dir(tmp_path, "a")
    assert ref.shape == (11, 6, 5, 1) and sorted(os.listdir(out)) == sorted(
        [".fastdiff.lock", "manifest.json", "samples.npz", "grid.png"] + [f"shard_{k:06d}.npz" for k in range(4)])
    # a killed run: some shards never written, a stale temporary file of a dead process left behind, no merged set;
    # and a user's own dotfile that looks like a temp file, which must survive
    os.remove(jobs.shard_path(out, 1))
    os.remove(jobs.shard_path(out, 3))
    os.remove(os.path.join(out, "samples.npz"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f".shard_000001.npz.fdtmp-{fsutil.host_tag()}-{int(dead.stdout)}-abc123"
    with open(os.path.join(out, stale), "wb") as f:
        f.write(b"half a shard")
    (tmp_path / "a" / ".notes.tmp1").write_bytes(b"mine")
    _, res2, again = _run_dir(tmp_path, "a")
    assert res2["images"] == 3 + 2  # only shards 1 and 3 were sampled again
    np.testing.assert_array_equal(again, ref)
    assert not [n for n in os.listdir(out) if ".fdtmp" in n]
    assert (tmp_path / "a" / ".notes.tmp1").read_bytes() == b"mine"


@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_interrupt_keeps_finished_batches_of_an_unfinished_shard(tmp_path, monkeypatch, stop_after):
    # 11 images in shards of 5 (batches of 2: [0,2) [2,4) [4,5) | [5,7) ...): Ctrl-C after `stop_after` batches
    _, _, ref = _run_dir(tmp_path, "ref", num=11, shard=5)
    real, n = jobs.sample_batch, [0]

    def counting(*a, **k):
        if n[0] == stop_after:
            raise KeyboardInterrupt
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(jobs, "sample_batch", counting)
    with pytest.raises(jobs.Interrupted) as e:
        _run_dir(tmp_path, "run", num=11, shard=5)
    kept = [2, 2, 1, 2][:stop_after]
    out = str(tmp_path / "run")
    assert str(e.value).startswith(f"{sum(kept)} of 11 images are kept in {out} ({sum(kept)} made by this run)")
    assert jobs.images_on_disk(out, 11, 5, 2) == sum(kept)
    assert os.path.isfile(jobs.shard_path(out, 0)) == (stop_after >= 3)
    assert not [f for f in os.listdir(out) if f.startswith("part_000000")] or stop_after < 3  # merged: removed
    monkeypatch.setattr(jobs, "sample_batch", real)
    _, res, again = _run_dir(tmp_path, "run", num=11, shard=5)
    assert res["images"] == 11 - sum(kept)  # only the batches not on disk were sampled again
    np.testing.assert_array_equal(again, ref)
    assert not [f for f in os.listdir(out) if f.startswith("part_")]


def test_interrupt_during_the_merge_keeps_every_image(tmp_path, monkeypatch):
    _, _, ref = _run_dir(tmp_path, "ref", num=11, shard=5)

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "merge_shards", stop)
    with pytest.raises(jobs.Interrupted, match="11 of 11 images are kept .*; the rerun only merges them"):
        _run_dir(tmp_path, "run", num=11, shard=5)
    monkeypatch.undo()
    _, res, again = _run_dir(tmp_path, "run", num=11, shard=5)
    assert res["images"] == 0
    np.testing.assert_array_equal(again, ref)


def test_default_shard_size_shares_small_runs_and_keeps_a_recorded_one(tmp_path):
    assert jobs.default_shard_size(None, 20, world=2) == 10  # each of 2 ranks gets 10 of 20 images
    assert jobs.default_shard_size(None, 50000, world=8) == 1000
    assert jobs.default_shard_size(None, 600) == 600
    out, _, _ = _run_dir(tmp_path, "rec", num=5, shard=3)
    assert jobs.default_shard_size(out, 5, world=4) == 3  # a resumed run keeps its shards


def test_shard_boundaries_do_not_matter_when_batches_align(tmp_path):
    # same batch composition (batch 2 inside shards of 2 or 4) → the same bits
    _, _, a = _run_dir(tmp_path, "s2", num=8, shard=2)
    _, _, b = _run_dir(tmp_path, "s4", num=8, shard=4)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", [{"steps": 5}, {"seed": 1}, {"sampler": "ddim", "eta": 1.0}, {"batch_size": 3},
                                    {"dtype": "bfloat16"}])
def test_resume_with_other_options_is_refused(tmp_path, change):
    out, _, ref = _run_dir(tmp_path, "m", num=4, shard=2)
    with pytest.raises(jobs.RunMismatch, match="refusing to resume") as e:
        _run_dir(tmp_path, "m", num=4, shard=2, **change)
    for k in change:
        assert k in str(e.value)
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], ref)  # nothing was touched


def test_other_num_or_model_refused_and_foreign_dir_refused(tmp_path):
    _run_dir(tmp_path, "n", num=4, shard=2)
    with pytest.raises(jobs.RunMismatch, match="num"):
        _run_dir(tmp_path, "n", num=6, shard=2)
    with pytest.raises(jobs.RunMismatch, match="shard_size"):
        _run_dir(tmp_path, "n", num=4, shard=4)
    with pytest.raises(jobs.RunMismatch, match="backend: 'auto' in .*, 'torch' now"):
        _run_dir(tmp_path, "n", num=4, shard=2, backend="torch")
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "shard_000000.npz").write_bytes(b"x")
    with pytest.raises(jobs.RunMismatch, match="no manifest.json"):
        _run_dir(tmp_path, "foreign")


def test_corrupt_shard_is_a_clear_error(tmp_path):
    out, _, _ = _run_dir(tmp_path, "c", num=4, shard=2)
    with open(jobs.shard_path(out, 1), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(RuntimeError, match="shard_000001.npz is unreadable.*delete it"):
        _run_dir(tmp_path, "c", num=4, shard=2)


# ---------------------------------------------------------------------------------------------------------------
# the real command, killed with SIGKILL at random moments

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


ARGS = ["--num", "24", "--shard-size", "3", "--batch-size", "3", "--steps", "6", "--sampler", "ddim", "--eta", "1",
        "--seed", "5", "--no-progress"]


def test_kill_and_resume_at_random_points_is_bit_identical(tmp_path, tiny_ckpt, monkeypatch):
    from fastdiff.app import cli

    n_shards = 8
    ref_dir = str(tmp_path / "ref")
    assert torch.get_num_threads() == 1  # as the subprocesses below (OMP_NUM_THREADS=1)
    assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--out", ref_dir, *ARGS]) == 0
    with np.load(os.path.join(ref_dir, "samples.npz")) as z:
        ref = z["arr_0"]
    seed = int(os.environ.get("FASTDIFF_KILL_SEED", "1201"))  # seeded: a failure reproduces (vary it by hand)
    rng = random.Random(seed)
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "fastdiff", "sample", "--checkpoint", tiny_ckpt, "--out", out, *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def n_done():
        return len([n for n in os.listdir(out) if n.startswith("shard_")]) if os.path.isdir(out) else 0

    kills = []
    for attempt in range(8):
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if len(kills) < 3 and n_done() < n_shards - 2:
            # a random point: once a random number of further shards exist, plus a random delay (mid-batch, mid-write)
            target = rng.randint(n_done(), n_shards - 2)
            while n_done() < target and p.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.1))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills.append(n_done())
                continue
            if not kills:  # it finished before the kill: start over, a test that kills nothing proves nothing
                assert p.returncode == 0, p.stderr.read().decode()
                shutil.rmtree(out)
                continue
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        break
    assert kills, f"no run was killed (seed {seed}); the test did not test resuming"
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], ref, err_msg=f"kill seed {seed}, shards on disk at kills {kills}")
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(ref_dir)), names  # no temporaries left, no extra shards
    for k in range(n_shards):
        with np.load(jobs.shard_path(out, k)) as a, np.load(jobs.shard_path(ref_dir, k)) as b:
            np.testing.assert_array_equal(a["indices"], b["indices"])
            np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
