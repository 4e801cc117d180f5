"""`fastdiff sample --out DIR` under torchrun (2 processes, gloo on the CPU) gives the same set as 1 process."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.app import cli, jobs
from tests._ckpt import save_tiny_checkpoint

# checkpoints and shards use safetensors and Pillow: a machine without them (the lent GPU box) skips this file
pytest.importorskip("safetensors")
pytest.importorskip("PIL.Image")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--num", "14", "--shard-size", "2", "--batch-size", "2", "--steps", "4", "--sampler", "ddpm", "--seed", "3",
        "--no-progress"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=1)


def torchrun(ckpt, out, *extra):
    # `--` ends torchrun's own options (else it reads --num as an abbreviation of its --numa-binding)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastdiff",
           "--", "sample", "--checkpoint", ckpt, "--out", out, *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def rank_images(stderr):
    return {int(r): int(n) for r, n in re.findall(r"rank (\d): (\d+) images", stderr)}


def test_two_ranks_equal_one_process_and_resume_together(tmp_path, tiny_ckpt):
    one = str(tmp_path / "one")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same per-process setting as the torchrun workers
    try:
        assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--out", one, *ARGS]) == 0
    finally:
        torch.set_num_threads(n)
    with np.load(os.path.join(one, "samples.npz")) as z:
        ref = z["arr_0"]

    two = str(tmp_path / "two")
    r = torchrun(tiny_ckpt, two)
    assert r.returncode == 0, r.stderr
    assert rank_images(r.stderr) == {0: 8, 1: 6}, r.stderr  # 7 shards of 2: ranks take shards 0,2,4,6 and 1,3,5
    with np.load(os.path.join(two, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], ref)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))

    # a crashed 2-rank run: three shards and the merged set lost; the rerun shares out only the missing shards
    for k in (1, 2, 5):
        os.remove(jobs.shard_path(two, k))
    os.remove(os.path.join(two, "samples.npz"))
    r = torchrun(tiny_ckpt, two)
    assert r.returncode == 0, r.stderr
    assert rank_images(r.stderr) == {0: 4, 1: 2}, r.stderr
    with np.load(os.path.join(two, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], ref)

    # a mismatched resume is refused on every rank, with the message, not a hang
    r = torchrun(tiny_ckpt, two, "--steps", "5")
    assert r.returncode != 0
    assert r.stderr.count("refusing to resume") >= 2 and "steps: 4" in r.stderr, r.stderr


def test_small_run_is_shared_by_every_rank(tmp_path, tiny_ckpt):
    # --num 20 with the default shard size: one shard per rank (not one shard of 20 on rank 0 and nothing on rank 1)
    two = str(tmp_path / "two")
    argv = ["--num", "20", "--batch-size", "4", "--steps", "3", "--seed", "7", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastdiff",
           "--", "sample", "--checkpoint", tiny_ckpt, "--out", two, *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert rank_images(r.stderr) == {0: 10, 1: 10}, r.stderr
    one = str(tmp_path / "one")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process with the shard size the 2-rank run chose: the same batches, the same bits
        assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--out", one, "--shard-size", "10", *argv]) == 0
        os.remove(os.path.join(two, "samples.npz"))  # and a 1-process rerun of the 2-rank run adopts its shards
        assert cli.main(["sample", "--checkpoint", tiny_ckpt, "--out", two, *argv]) == 0
    finally:
        torch.set_num_threads(n)
    with np.load(os.path.join(one, "samples.npz")) as a, np.load(os.path.join(two, "samples.npz")) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
