"""`fastdiff sample --sampler <solver>` on the bundled model: images, the manifest of a resumable run, refusals."""
import json

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.app import checkpoint, cli, jobs

pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sampler", ["dpmsolver++", "unipc", "heun", "euler_ancestral", "plms"])
def test_sample_with_a_solver_matches_the_api(sampler, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sample", "--sampler", sampler, "--steps", "6", "-n", "6", "--batch-size", "4", "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert json.dumps(man).count(sampler) >= 1  # the sampler is recorded: a resume with another one is refused
    a = np.load(out / "samples.npz")["arr_0"]
    assert a.shape[0] == 6 and a.dtype == np.uint8
    # the same images as the API on the same per-image noise streams
    model, meta = checkpoint.load_checkpoint(checkpoint.bundled_checkpoint())
    cfg = jobs.SampleConfig(sampler, 6, 0.0, 0, "float32", 4).validate()
    sch = meta["scheduler"]
    from fastdiff.samplers.ddim import OPTIONS

    opts = {k: sch[k] for k in OPTIONS if k in sch}
    sched, _ = fastdiff.run.sampling.schedule_and_config(sch)
    x = jobs.sample_batch(model, [0, 1, 2, 3], cfg, sched, opts, (1, 8, 8), torch.device("cpu"))
    np.testing.assert_array_equal(jobs.to_uint8_nhwc(x), a[:4])
    capsys.readouterr()
    assert cli.main(argv) == 0  # rerun: nothing left, same file
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], a)
    other = ["sample", "--sampler", "ddim", "--steps", "6", "-n", "6", "--out", str(out), "--no-progress"]
    assert cli.main(other) != 0
    assert "sampler" in capsys.readouterr().err


def test_eta_with_a_solver_is_refused(capsys):
    assert cli.main(["sample", "--sampler", "unipc", "--eta", "0.5", "-n", "1", "--no-progress"]) != 0
    assert "--eta applies to --sampler ddim only" in capsys.readouterr().err
