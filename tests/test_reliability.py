"""Nothing lost, nothing unclear (issue 13), end to end: claims on --out by real processes started together, planted
symlinks and temp files, outputs checked before any work, NaN guards, a damaged train state, images in --data.

Every test here drives the public surface (the `fastdiff` command, fastdiff.app.jobs, fastdiff.app.trainer) so it states
the behaviour, not the implementation."""
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastdiff.app import checkpoint, cli, jobs, trainer
from tests._ckpt import save_tiny_checkpoint

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--block-out-channels", "8,16", "--norm-groups", "4", "--batch-size", "4", "--warmup", "2", "--no-progress"]
SAMPLE = ["--num", "6", "--shard-size", "2", "--batch-size", "2", "--steps", "3", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _rewrite(src, dst, edit):
    """Copy checkpoint `src` to `dst` with its tensors changed by `edit(tensors)`, bypassing fastdiff's writer (which
    refuses non-finite tensors) and dropping the checksum (as a file from elsewhere would have none)."""
    from safetensors.torch import save_file

    t, raw = checkpoint.read_safetensors(src)
    edit(t)
    meta = json.loads(raw["fastdiff"])
    meta.pop("sha256", None)
    save_file(t, dst, metadata={**raw, "fastdiff": json.dumps(meta)})
    return dst


# ---------------------------------------------------------------------------------------------------------------
# exclusive claims: real processes released together by a file barrier

_RACER = r"""
import contextlib, os, sys, time
import torch, fastdiff.app.jobs, fastdiff.app.checkpoint, fastdiff.run.sampling  # the slow imports, once, before the rounds
from fastdiff.app import cli
prefix, rounds, out, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
me = str(os.getpid())
for r in range(rounds):
    open(f"{prefix}.{r}.{me}.ready", "w").close()
    while not os.path.exists(f"{prefix}.{r}.go"):   # the barrier: both processes are released together
        time.sleep(0.0005)
    with open(f"{prefix}.{r}.{me}.err", "w") as err, contextlib.redirect_stderr(err):
        rc = cli.main(["sample", "--out", f"{out}{r}", *argv])
    with open(f"{prefix}.{r}.{me}.rc.tmp", "w") as f:
        f.write(str(rc))
    os.replace(f"{prefix}.{r}.{me}.rc.tmp", f"{prefix}.{r}.{me}.rc")  # the round's result, complete
"""


def _race(tmp_path, ckpt, seeds, rounds):
    """Start one process per seed, then `rounds` times release them together on a fresh --out each round.
    Returns (out dirs, [[(rc, stderr) per process] per round])."""
    prefix = str(tmp_path / "barrier")
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, prefix, str(rounds), out, "--checkpoint", ckpt,
                               "--seed", str(s), *SAMPLE], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for s in seeds]
    results = []
    try:
        for r in range(rounds):
            t_end = time.time() + 180
            for suffix in ("ready", "rc"):
                while not all(os.path.exists(f"{prefix}.{r}.{p.pid}.{suffix}") for p in procs):
                    assert time.time() < t_end and all(p.poll() is None for p in procs), \
                        [p.stderr.read() for p in procs if p.poll() is not None]
                    time.sleep(0.005)
                if suffix == "ready":
                    open(f"{prefix}.{r}.go", "w").close()
            results.append([(int(open(f"{prefix}.{r}.{p.pid}.rc").read()), open(f"{prefix}.{r}.{p.pid}.err").read())
                            for p in procs])
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [f"{out}{r}" for r in range(rounds)], results


@pytest.fixture(scope="module")
def reference_sets(tiny_ckpt, tmp_path_factory):
    """The merged set of seeds 0 and 1, each from one uninterrupted, uncontested run."""
    ref = {}
    for s in (0, 1):
        d = str(tmp_path_factory.mktemp("ref") / f"seed{s}")
        assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--out", d, "--seed", str(s), *SAMPLE]) == 0
        with np.load(os.path.join(d, "samples.npz")) as z:
            ref[s] = z["arr_0"]
    assert not np.array_equal(ref[0], ref[1])
    return ref


def _listing_ok(out):
    names = set(os.listdir(out))
    assert not [n for n in names if ".fdtmp" in n or ".tmp" in n], names  # no temp file left behind
    assert {"manifest.json", "samples.npz", "grid.png"} <= names


def test_two_runs_with_other_options_on_one_new_out(tmp_path, tiny_ckpt, reference_sets):
    """--seed 0 and --seed 1 started together on one new --out (5 tries): one wins, the other is refused naming the
    option, and the directory holds exactly the winner's set (never a mix, never a manifest that contradicts it)."""
    outs, rounds = _race(tmp_path, tiny_ckpt, [0, 1], 5)
    for out, res in zip(outs, rounds):
        ok = [s for s, (rc, _) in zip((0, 1), res) if rc == 0]
        assert len(ok) == 1, res
        loser_rc, loser_err = res[1 - ok[0]]
        assert loser_rc == 2 and "seed" in loser_err and "refusing" in loser_err, loser_err
        with open(os.path.join(out, "manifest.json")) as f:
            assert json.load(f)["run"]["seed"] == ok[0]
        with np.load(os.path.join(out, "samples.npz")) as z:
            np.testing.assert_array_equal(z["arr_0"], reference_sets[ok[0]])
        for k in range(3):
            with np.load(jobs.shard_path(out, k)) as z:
                np.testing.assert_array_equal(z["arr_0"], reference_sets[ok[0]][2 * k:2 * k + 2])
        _listing_ok(out)


def test_two_runs_with_the_same_options_never_corrupt(tmp_path, tiny_ckpt, reference_sets):
    """The same command twice at once (3 tries): each either succeeds (the second waited for the first) or is
    refused as busy; the set on disk is the uncontested one."""
    outs, rounds = _race(tmp_path, tiny_ckpt, [0, 0], 3)
    for out, res in zip(outs, rounds):
        assert any(rc == 0 for rc, _ in res), res
        for rc, err in res:
            assert rc == 0 or "being written by another fastdiff run" in err, err
        with np.load(os.path.join(out, "samples.npz")) as z:
            np.testing.assert_array_equal(z["arr_0"], reference_sets[0])
        _listing_ok(out)


def _stdin_race(script, argvs, rounds):
    """One process per argv running `script`; each round, once every process printed "ready", release them all
    within microseconds (one byte written to each stdin) and yield (round, [its next output line, split])."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for argv in argvs]
    try:
        for r in range(rounds):
            for p in procs:
                assert p.stdout.readline().strip() == b"ready", p.stderr.read().decode()
            for p in procs:
                p.stdin.write(b"g")
            for p in procs:
                p.stdin.flush()
            yield r, [p.stdout.readline().decode().split() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


_API_RACER = r"""
import os, sys
import torch
from fastdiff.app import jobs
out, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
model = lambda x, t: 0.1 * x + (t.float() / 1000).view(-1, 1, 1, 1)  # rows never mix
cfg = jobs.SampleConfig("ddim", 2, 0.0, seed, "float32", 1)
for r in range(rounds):
    print("ready", flush=True)
    sys.stdin.buffer.read(1)  # the barrier: the parent writes one byte to every racer at once
    try:
        jobs.sample_to_dir(model, f"{out}{r}", 8, cfg, schedule=None, options={}, image_shape=(1, 4, 4), device="cpu",
                           run_id={"model": "toy"}, shard_size=1, progress=False, log=lambda m: None)
        print("ok", flush=True)
    except jobs.RunMismatch as e:
        print("refused", "seed" in str(e), flush=True)
"""


def test_api_race_on_one_new_out_many_tries(tmp_path):
    """jobs.sample_to_dir in two processes released within microseconds of each other (a byte written to both
    stdins), 10 tries: always exactly one run owns the directory and its set is that run's alone."""
    rounds = 10
    out = str(tmp_path / "o")
    for r, res in _stdin_race(_API_RACER, [[out, str(s), str(rounds)] for s in (0, 1)], rounds):
        assert sorted(x[0] if x else "crashed" for x in res) == ["ok", "refused"], (r, res)
        assert all(x[1] == "True" for x in res if x[0] == "refused"), res
        winner = [s for s, x in zip((0, 1), res) if x[0] == "ok"][0]
        with open(f"{out}{r}/manifest.json") as f:
            assert json.load(f)["run"]["seed"] == winner
        alone = jobs.sample_images(lambda x, t: 0.1 * x + (t.float() / 1000).view(-1, 1, 1, 1), list(range(8)),
                                   jobs.SampleConfig("ddim", 2, 0.0, winner, "float32", 1), None, {}, (1, 4, 4), "cpu")
        with np.load(f"{out}{r}/samples.npz") as z:
            np.testing.assert_array_equal(z["arr_0"], alone)


def test_run_waiting_on_a_busy_dir_is_refused_when_options_differ(tmp_path, tiny_ckpt):
    """A run holding --out (the lock taken by another process) refuses a run with other options at once."""
    out = tmp_path / "held"
    assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--out", str(out), "--seed", "0", *SAMPLE]) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True)\ntime.sleep(60)", str(out / ".fastdiff.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {n: (out / n).read_bytes() for n in os.listdir(out)}
        with pytest.raises(jobs.RunMismatch, match="seed"):
            jobs.sample_to_dir(lambda x, t: x, str(out), 6, jobs.SampleConfig("ddim", 3, 0.0, 1, "float32", 2),
                               schedule=None, options={}, image_shape=(1, 8, 8), device="cpu", run_id={},
                               progress=False, shard_size=2, log=lambda m: None)
        with pytest.raises(jobs.RunBusy, match="being written by another fastdiff run"):
            run_same = json.load(open(out / "manifest.json"))["run"]
            jobs.claim_run_dir(str(out), run_same, wait=False, log=lambda m: None, manifest_timeout_s=0.2)
        assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_foreign_nonempty_dir_is_refused_naming_what_is_there(tmp_path, tiny_ckpt, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    (d / ".cache.tmp5").write_text("a dotfile that looks like a temp file")
    (d / "samples.npz").write_bytes(b"my own samples")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", d, *SAMPLE)
    assert rc == 2 and "notes.txt" in err and "samples.npz" in err and "no manifest.json" in err, err
    assert (d / "notes.txt").read_text() == "keep me" and (d / "samples.npz").read_bytes() == b"my own samples"
    assert sorted(os.listdir(d)) == [".cache.tmp5", "notes.txt", "samples.npz"]  # not even a lock file


# ---------------------------------------------------------------------------------------------------------------
# temp files: planted symlinks, other processes' temp files

def _victims(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"victim{i}"
        p.write_bytes(b"outside --out")
        paths.append(p)
    return paths


def test_planted_symlinks_never_redirect_a_write(tmp_path, tiny_ckpt, capsys):
    """Symlinks planted at every name the old code would have used for its temp files (.NAME.tmpPID), and at the
    outputs themselves: nothing outside --out is written, and the outputs end up as regular files."""
    out = tmp_path / "out"
    out.mkdir()
    names = [f"shard_{k:06d}.npz" for k in range(3)] + ["samples.npz", "grid.png", "manifest.json"]
    victims = _victims(tmp_path, len(names) + 2)
    for n, v in zip(names, victims):
        os.symlink(v, out / f".{n}.tmp{os.getpid()}")
    os.symlink(victims[-2], out / "grid.png.tmp")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out, "--seed", "0", *SAMPLE)
    # the planted links are foreign entries: the directory is refused, nothing is written through them
    assert rc == 2 and "no manifest.json" in err, err
    assert all(v.read_bytes() == b"outside --out" for v in victims)
    # a fresh --out, with links planted where the outputs go once the run has claimed it
    out2 = tmp_path / "out2"
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out2, "--seed", "0", *SAMPLE)
    assert rc == 0, err
    for n in ("samples.npz", "grid.png"):
        os.remove(out2 / n)
    os.symlink(victims[0], out2 / "samples.npz")
    os.symlink(victims[1], out2 / "grid.png")
    for n in names:
        if not (out2 / f".{n}.tmp{os.getpid()}").exists():
            os.symlink(victims[-1], out2 / f".{n}.tmp{os.getpid()}")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out2, "--seed", "0", *SAMPLE)
    assert rc == 0, err
    assert all(v.read_bytes() == b"outside --out" for v in victims)
    assert not os.path.islink(out2 / "samples.npz") and not os.path.islink(out2 / "grid.png")
    # a planted lock-file symlink is refused, not followed
    out3 = tmp_path / "out3"
    out3.mkdir()
    os.symlink(victims[2], out3 / ".fastdiff.lock")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out3, *SAMPLE)
    assert rc != 0 and ".fastdiff.lock" in err and "symlink" in err, err
    assert victims[2].read_bytes() == b"outside --out"


def test_planted_symlink_next_to_npz_and_png(tmp_path, tiny_ckpt, capsys):
    d = tmp_path / "o"
    d.mkdir()
    victims = _victims(tmp_path, 2)
    os.symlink(victims[0], d / f".s.npz.tmp{os.getpid()}")
    os.symlink(victims[1], d / f".s.png.tmp{os.getpid()}")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--num", "2", "--steps", "2", "--no-progress",
                     "--npz", d / "s.npz", "--png", d / "s.png")
    assert rc == 0, err
    assert all(v.read_bytes() == b"outside --out" for v in victims)
    assert os.path.islink(d / f".s.npz.tmp{os.getpid()}")  # not ours to delete either
    with np.load(d / "s.npz") as z:
        assert z["arr_0"].shape[0] == 2 and z["arr_0"].dtype == np.uint8


def test_cleanup_spares_live_temp_files_and_other_dotfiles(tmp_path, tiny_ckpt, capsys):
    """A resumed run removes only fastdiff temp files of dead processes: a live process's temp file (new or old
    naming) and the user's own dotfiles stay."""
    from fastdiff import fsutil

    out = tmp_path / "out"
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out, *SAMPLE)
    assert rc == 0, err
    os.remove(jobs.shard_path(str(out), 1))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        keep = [f".shard_000001.npz{fsutil.TEMP_TAG}{fsutil.host_tag()}-{live.pid}-abcdef",
                f".shard_000001.npz.tmp{live.pid}", ".bashrc.tmp", ".my.tmp.notes",
                f".x{fsutil.TEMP_TAG}00000000-{int(dead.stdout)}-abcdef"]  # another host's: its pid means nothing
        gone = f".shard_000001.npz{fsutil.TEMP_TAG}{fsutil.host_tag()}-{int(dead.stdout)}-abcdef"
        for n in keep + [gone]:
            (out / n).write_bytes(b"partial")
        rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out, *SAMPLE)
        assert rc == 0, err
        names = set(os.listdir(out))
        assert set(keep) <= names and gone not in names
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------------------------
# outputs checked before any work starts

@pytest.mark.parametrize("what", ["npz", "png"])
def test_output_into_a_missing_directory_fails_at_once(tmp_path, tiny_ckpt, capsys, monkeypatch, what):
    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking the outputs")

    monkeypatch.setattr(jobs, "sample_images", no_sampling)
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, f"--{what}", tmp_path / "nodir" / f"x.{what}",
                     "--npz" if what == "png" else "--png", tmp_path / f"y.{'npz' if what == 'png' else 'png'}",
                     "--no-progress")
    assert rc == 2 and f"--{what}" in err and "nodir" in err and "does not exist" in err, err
    assert "Traceback" not in err


def test_out_naming_a_file_or_a_directory_path_clash(tmp_path, tiny_ckpt, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", f, *SAMPLE)
    assert rc == 2 and "--out" in err and "not a directory" in err, err
    assert f.read_text() == "x"
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--npz", tmp_path, "--no-progress")
    assert rc == 2 and "--npz" in err and "is a directory" in err, err
    rc, _, err = run(capsys, "train", "--out", tmp_path, "--steps", "1", *TINY)
    assert rc == 2 and "--out" in err and "is a directory" in err, err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write into: chattr +i as root (root ignores mode bits), chmod 0o500 otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["chattr", "+i", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"running as root and chattr +i is unavailable: {r.stderr.decode().strip()}")
        yield d
        subprocess.run(["chattr", "-i", str(d)], check=True)
    else:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)


def test_read_only_outputs_fail_before_any_work(read_only_dir, tiny_ckpt, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started before checking the outputs")

    monkeypatch.setattr(jobs, "sample_images", no_work)
    monkeypatch.setattr(trainer, "load_dataset", no_work)
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", read_only_dir, *SAMPLE)
    assert rc == 2 and "--out" in err and "not writable" in err, err
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", read_only_dir / "new", *SAMPLE)
    assert rc == 2 and "not writable" in err, err
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--npz", read_only_dir / "x.npz", "--no-progress")
    assert rc == 2 and "--npz" in err and "not writable" in err, err
    rc, _, err = run(capsys, "train", "--out", read_only_dir / "m.safetensors", "--steps", "1", *TINY)
    assert rc == 2 and "--out" in err and "not writable" in err, err


def test_train_into_a_missing_directory_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "load_dataset", lambda *a: (_ for _ in ()).throw(AssertionError("trained")))
    rc, _, err = run(capsys, "train", "--out", tmp_path / "nodir" / "m.safetensors", "--steps", "1", *TINY)
    assert rc == 2 and "nodir" in err and "does not exist" in err, err


def test_train_refuses_to_overwrite_an_existing_model(tmp_path, capsys):
    model = tmp_path / "existing.safetensors"
    model.write_bytes(b"somebody's model")
    rc, _, err = run(capsys, "train", "--out", model, "--steps", "1", *TINY)
    assert rc == 2 and "--overwrite" in err and "exists" in err, err
    assert model.read_bytes() == b"somebody's model"
    rc, _, err = run(capsys, "train", "--out", model, "--steps", "1", "--overwrite", *TINY)
    assert rc == 0, err
    checkpoint.load_checkpoint(str(model))


# ---------------------------------------------------------------------------------------------------------------
# NaN guards

def test_train_stops_at_the_first_nonfinite_loss(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, _, err = run(capsys, "train", "--out", out, "--steps", "8", "--save-every", "1", "--lr", "2e3", *TINY)
    assert rc == 1 and "diverged" in err and "nan" in err.lower(), err
    # whatever was written is finite: a checkpoint from before the divergence, or none at all
    if out.exists():
        model, _ = checkpoint.load_checkpoint(str(out))
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_train_never_writes_nonfinite_weights(tmp_path, monkeypatch):
    """Finite loss but weights gone non-finite in the last update: the save refuses, nothing is written."""
    real = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        r = real(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return r

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "m.safetensors"
    cfg = trainer.TrainConfig(block_out_channels=[8, 16], norm_num_groups=4, batch_size=4, steps=1, image_size=8)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train(cfg, str(out), save_every=1, progress=False, log=lambda m: None)
    assert not out.exists() and not os.path.exists(checkpoint.state_path(str(out)))


def test_sample_refuses_a_checkpoint_with_nonfinite_weights(tmp_path, tiny_ckpt, capsys):
    bad = _rewrite(tiny_ckpt, str(tmp_path / "nan.safetensors"), lambda t: t["conv_out.bias"].fill_(float("nan")))
    rc, _, err = run(capsys, "sample", "--checkpoint", bad, "--num", "2", "--steps", "2", "--no-progress",
                     "--npz", tmp_path / "s.npz", "--png", tmp_path / "s.png")
    assert rc == 2 and "non-finite" in err and "conv_out.bias" in err, err
    assert not (tmp_path / "s.npz").exists()


def test_sample_reports_nonfinite_samples(tmp_path, tiny_ckpt, capsys):
    """Finite weights whose output overflows: the command fails (exit 1) naming NaN/inf; no images are written."""
    big = _rewrite(tiny_ckpt, str(tmp_path / "big.safetensors"), lambda t: t["conv_out.weight"].fill_(3e38))
    rc, _, err = run(capsys, "sample", "--checkpoint", big, "--num", "2", "--steps", "2", "--no-progress",
                     "--npz", tmp_path / "s.npz", "--png", tmp_path / "s.png")
    assert rc == 1 and "NaN/inf" in err, err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.png").exists()
    rc, _, err = run(capsys, "sample", "--checkpoint", big, "--out", tmp_path / "d", *SAMPLE)
    assert rc == 1 and "NaN/inf" in err, err
    assert not [n for n in os.listdir(tmp_path / "d") if n.startswith("shard_") or n == "samples.npz"]


def test_jobs_refuse_nonfinite_samples_from_any_model():
    cfg = jobs.SampleConfig("ddim", 3, 0.0, 0, "float32", 2)

    def nan_model(x, t):
        return torch.where(t.view(-1, 1, 1, 1) > 500, x, torch.full_like(x, float("nan")))

    with pytest.raises(FloatingPointError, match=r"image\(s\) \[4, 5\]"):
        jobs.sample_images(nan_model, [4, 5], cfg, None, {}, (1, 4, 4), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# integrity of the train state

def _data_offset(path):
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("where", ["tensor data", "metadata"])
def test_flipped_byte_in_train_state_is_refused_on_resume(tmp_path, capsys, where):
    out = str(tmp_path / "m.safetensors")
    rc, _, err = run(capsys, "train", "--out", out, "--steps", "2", "--save-every", "2", *TINY)
    assert rc == 0, err
    spath = checkpoint.state_path(out)
    blob = bytearray(open(spath, "rb").read())
    if where == "tensor data":
        i = _data_offset(spath) + (len(blob) - _data_offset(spath)) // 2
        blob[i] ^= 0x01  # the lowest mantissa bit of some weight: a valid float, silently different
    else:
        i = blob.index(b'\\"step\\": 2')
        blob[i + len(b'\\"step\\": ')] = ord("1")  # the recorded step, 2 -> 1: valid JSON, a different run
    open(spath, "wb").write(bytes(blob))
    rc, _, err = run(capsys, "train", "--out", out, "--steps", "4", "--resume", *TINY)
    assert rc == 2 and "checksum" in err, err


def test_truncated_or_foreign_train_state_is_refused(tmp_path, capsys):
    out = str(tmp_path / "m.safetensors")
    assert run(capsys, "train", "--out", out, "--steps", "1", *TINY)[0] == 0
    spath = checkpoint.state_path(out)
    data = open(spath, "rb").read()
    open(spath, "wb").write(data[: len(data) // 3])
    rc, _, err = run(capsys, "train", "--out", out, "--steps", "2", "--resume", *TINY)
    assert rc == 2 and "not a readable safetensors file" in err and "train-state" in err, err


# ---------------------------------------------------------------------------------------------------------------
# images in --data

def _load(d, channels, size):
    return trainer.load_dataset(trainer.TrainConfig(data=str(d), channels=channels, image_size=size))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    d = tmp_path / "d16"
    d.mkdir()
    v = (np.arange(64, dtype=np.float64).reshape(8, 8) * 1040).astype(np.uint16)  # 0 … 65520
    Image.fromarray(v).save(d / "a.png")
    assert Image.open(d / "a.png").mode.startswith("I")
    for channels in (1, 3):
        x = _load(d, channels, 8)
        assert x.shape == (1, channels, 8, 8)
        want = torch.from_numpy(v / 65535.0 * 2 - 1).float()
        torch.testing.assert_close(x[0, 0], want, rtol=0, atol=1e-4)
        assert len(torch.unique(x)) == 64  # every level kept (8-bit clipping left 2 of them)


def test_palette_png_goes_through_its_palette(tmp_path):
    d = tmp_path / "dp"
    d.mkdir()
    idx = np.array([[0, 1], [2, 3]], np.uint8)
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    im = Image.fromarray(idx, mode="P")
    im.putpalette(pal)
    im.save(d / "p.png")
    rgb = _load(d, 3, 2)[0]
    want = torch.tensor(pal, dtype=torch.float32).view(2, 2, 3).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(rgb, want, rtol=0, atol=1e-6)
    gray = _load(d, 1, 2)[0, 0]
    lum = torch.tensor([[76, 150], [29, 18]], dtype=torch.float32) / 127.5 - 1  # ITU-R 601 luma of the palette
    torch.testing.assert_close(gray, lum, rtol=0, atol=1e-6)


def _png_chunk(kind, data):
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_decompression_bomb_and_unreadable_images_are_named(tmp_path, capsys):
    import zlib

    d = tmp_path / "bomb"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "fine.png")
    # a 100000 x 100000 PNG in a few hundred bytes (IHDR says so; PIL refuses before decoding)
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                 + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b""))
    rc, _, err = run(capsys, "train", "--data", d, "--out", tmp_path / "m.safetensors", "--steps", "1", *TINY)
    assert rc == 2 and "bomb.png" in err and "decompression bomb" in err, err
    os.remove(d / "bomb.png")
    (d / "broken.png").write_bytes(open(d / "fine.png", "rb").read()[:40])
    (d / "text.jpg").write_text("not an image")
    rc, _, err = run(capsys, "train", "--data", d, "--out", tmp_path / "m.safetensors", "--steps", "1", *TINY)
    assert rc == 2 and ("broken.png" in err or "text.jpg" in err) and "cannot read image" in err, err


def test_train_resume_and_overwrite_together_is_refused(tmp_path, capsys):
    rc, _, err = run(capsys, "train", "--out", tmp_path / "m.safetensors", "--resume", "--overwrite", *TINY)
    assert rc == 2 and "--resume" in err and "--overwrite" in err, err


def test_shard_from_another_run_or_with_a_flipped_bit_is_refused_at_the_merge(tmp_path, tiny_ckpt, capsys):
    """A shard copied in from a run with another seed (same indices, valid file) is not mixed in; a shard with one
    flipped byte fails its zip CRC; both are named, exit 1, and samples.npz is not rewritten from them."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, seed in ((a, "0"), (b, "1")):
        rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", d, "--seed", seed, *SAMPLE)
        assert rc == 0, err
    good = (a / "samples.npz").read_bytes()
    os.replace(b / "shard_000001.npz", a / "shard_000001.npz")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", a, "--seed", "0", *SAMPLE)
    assert rc == 1 and "shard_000001.npz was written by another run" in err, err
    assert (a / "samples.npz").read_bytes() == good
    os.remove(a / "shard_000001.npz")
    assert run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", a, "--seed", "0", *SAMPLE)[0] == 0
    assert (a / "samples.npz").read_bytes() == good  # resampled, bit-identical
    blob = bytearray((a / "shard_000002.npz").read_bytes())
    blob[len(blob) // 3] ^= 0x10
    (a / "shard_000002.npz").write_bytes(bytes(blob))
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", a, "--seed", "0", *SAMPLE)
    assert rc == 1 and "shard_000002.npz is unreadable" in err, err
    assert (a / "samples.npz").read_bytes() == good


def test_special_files_in_data_and_directories_at_output_names_are_refused_up_front(tmp_path, tiny_ckpt, capsys,
                                                                                      monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    os.mkfifo(d / "b.png")  # Image.open on it would block forever
    rc, _, err = run(capsys, "train", "--data", d, "--out", tmp_path / "m.safetensors", "--steps", "1", *TINY)
    assert rc == 2 and "b.png" in err and "not a regular file" in err, err
    out = tmp_path / "out"
    assert run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out, *SAMPLE)[0] == 0
    os.remove(out / "samples.npz")
    (out / "samples.npz").mkdir()
    monkeypatch.setattr(jobs, "sample_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_ckpt, "--out", out, *SAMPLE)
    assert rc == 2 and "samples.npz" in err and "is a directory" in err, err


_TRAIN_RACER = r"""
import sys
import torch
from fastdiff.app import trainer
torch.set_num_threads(1)
out, seed, rounds, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = trainer.TrainConfig(data=data, channels=1, block_out_channels=[8, 16], norm_num_groups=4, batch_size=4, steps=3,
                          image_size=8, seed=seed)
for r in range(rounds):
    print("ready", flush=True)
    sys.stdin.buffer.read(1)
    try:
        trainer.train(cfg, f"{out}{r}.safetensors", save_every=1, progress=False, log=lambda m: None)
        print("ok", flush=True)
    except (trainer.TrainBusy, ValueError) as e:
        print("refused", type(e).__name__, flush=True)
"""


def test_two_trainings_into_one_out_never_mix(tmp_path):
    """Two `train` runs (seeds 0 and 1) released together onto one --out, 3 tries: one trains, the other is refused
    (busy, or the model exists by the time it looks); the checkpoint and the train state are the winner's both."""
    rounds = 3
    out = str(tmp_path / "m")
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8), dtype=np.uint8)).save(data / f"{i}.png")
    for r, res in _stdin_race(_TRAIN_RACER, [[out, str(s), str(rounds), str(data)] for s in (0, 1)], rounds):
        assert sorted(x[0] if x else "crashed" for x in res) == ["ok", "refused"], (r, res)
        winner = [s for s, x in zip((0, 1), res) if x[0] == "ok"][0]
        path = f"{out}{r}.safetensors"
        _, meta = checkpoint.load_checkpoint(path)
        state = json.loads(checkpoint.read_safetensors(checkpoint.state_path(path))[1]["fastdiff"])
        assert meta["train"]["config"]["seed"] == state["config"]["seed"] == winner
        assert meta["train"]["step"] == state["step"] == 3


def test_train_cleans_only_its_own_outputs_dead_temp_files(tmp_path, capsys):
    from fastdiff import fsutil

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    tag = f"{fsutil.TEMP_TAG}{fsutil.host_tag()}-{dead}-abc"
    mine = [f".m.safetensors{tag}", f".m.safetensors.train-state{tag}"]
    other = [f".other.npz{tag}", ".m.safetensors.tmp1"]
    for n in mine + other:
        (tmp_path / n).write_bytes(b"half")
    rc, _, err = run(capsys, "train", "--out", tmp_path / "m.safetensors", "--steps", "1", *TINY)
    assert rc == 0, err
    names = set(os.listdir(tmp_path))
    assert not set(mine) & names and set(other) <= names
