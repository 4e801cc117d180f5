"""Run diffusers' own scheduler tests with fastdiff's drop-in classes swapped in (a local check, not run in CI).

    git --git-dir=<diffusers.git> archive <rev> tests/schedulers tests/testing_utils.py tests/__init__.py \
        tests/conftest.py tests/others | tar -x -C /tmp/diffusers_tests
    OMP_NUM_THREADS=1 python scripts/diffusers_suite.py /tmp/diffusers_tests [--set original|newer|all] \
        [--json out.json] [-k EXPR]

The tests of the original eight classes (tests/schedulers/test_scheduler_{ddim,ddpm,dpm_multi,unipc,euler,
euler_ancestral,heun,pndm}.py; `--set original`, the default), of the ten newer ones (test_scheduler_{lms,dpm_single,
kdpm2_discrete,kdpm2_ancestral,deis,lcm,tcd,edm_euler,edm_dpmsolver_multistep,ipndm}.py; `--set newer`) or of all
eighteen run twice, each in its own process: once as diffusers ships them (the reference:
what diffusers' own classes pass with the installed diffusers) and once with `diffusers.<Name>` (and
`diffusers.schedulers.<Name>`) replaced by `fastdiff.diffusers.<Name>` before the tests are imported, so both the
test modules' imports and diffusers' `_compatibles` lookups resolve to fastdiff's classes. The score of a class is
the number of tests that pass with fastdiff's class among those that pass with diffusers'; every such test that
fails is listed with the first line of its error. "via diffusers" counts the passing tests in which a fastdiff class
handed a configuration it does not run fused to diffusers' own class (fastdiff.diffusers._Base._to_diffusers).

`--goldens` runs the golden-sum tests that fastdiff's classes fail by rounding alone three times: with diffusers'
class, with diffusers' class on exact float64 tables (β, ᾱ, σ), and with fastdiff's, printing the sum each gets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ORIGINAL = {
    "DDIMScheduler": "test_scheduler_ddim.py",
    "DDPMScheduler": "test_scheduler_ddpm.py",
    "DPMSolverMultistepScheduler": "test_scheduler_dpm_multi.py",
    "UniPCMultistepScheduler": "test_scheduler_unipc.py",
    "EulerDiscreteScheduler": "test_scheduler_euler.py",
    "EulerAncestralDiscreteScheduler": "test_scheduler_euler_ancestral.py",
    "HeunDiscreteScheduler": "test_scheduler_heun.py",
    "PNDMScheduler": "test_scheduler_pndm.py",
}
NEWER = {
    "LMSDiscreteScheduler": "test_scheduler_lms.py",
    "DPMSolverSinglestepScheduler": "test_scheduler_dpm_single.py",
    "KDPM2DiscreteScheduler": "test_scheduler_kdpm2_discrete.py",
    "KDPM2AncestralDiscreteScheduler": "test_scheduler_kdpm2_ancestral.py",
    "DEISMultistepScheduler": "test_scheduler_deis.py",
    "LCMScheduler": "test_scheduler_lcm.py",
    "TCDScheduler": "test_scheduler_tcd.py",
    "EDMEulerScheduler": "test_scheduler_edm_euler.py",
    "EDMDPMSolverMultistepScheduler": "test_scheduler_edm_dpmsolver_multistep.py",
    "IPNDMScheduler": "test_scheduler_ipndm.py",
}
SETS = {"original": ORIGINAL, "newer": NEWER, "all": {**ORIGINAL, **NEWER}}
FILES = ORIGINAL  # the set this run swaps and scores (main sets it from --set)


class _Plugin:
    """pytest plugin: swaps the classes (when asked) before collection and records each test's outcome."""

    def __init__(self, swap: bool):
        self.swap = swap
        self.results: dict = {}
        self.fallback: dict = {}  # test -> why a fastdiff class handed its configuration to diffusers' class
        self.current = None

    def pytest_configure(self, config):
        if not self.swap:
            return
        import diffusers
        import diffusers.schedulers

        import fastdiff.diffusers as fd

        for name in FILES:
            setattr(diffusers, name, getattr(fd, name))
            setattr(diffusers.schedulers, name, getattr(fd, name))
        orig = fd._Base._to_diffusers

        def to_diffusers(sched, why, *a, **kw):
            impl = orig(sched, why, *a, **kw)  # raises (nothing handed over) where diffusers refuses too
            self.fallback.setdefault(self.current, str(why).splitlines()[0][:160])
            return impl
        fd._Base._to_diffusers = to_diffusers

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid

    def pytest_runtest_logreport(self, report):
        nid = report.nodeid
        if report.when == "call" or report.outcome != "passed":
            prev = self.results.get(nid)
            if prev is None or prev[0] == "passed":
                msg = ""
                if report.outcome == "failed":
                    text = str(report.longrepr).strip().splitlines()
                    errs = [ln for ln in text if ln.startswith("E ")]
                    msg = (errs[0] if errs else text[-1] if text else "")[:300]
                self.results[nid] = (report.outcome, msg)


def _run_one(test_dir, swap, kexpr, out_path, which="original"):
    global FILES
    FILES = SETS[which]
    import pytest

    plugin = _Plugin(swap)
    paths = [os.path.join(test_dir, "tests", "schedulers", f) for f in FILES.values()]
    args = ["-q", "-p", "no:cacheprovider", "-W", "ignore", "--rootdir", test_dir, *paths]
    if kexpr:
        args += ["-k", kexpr]
    pytest.main(args, plugins=[plugin])
    with open(out_path, "w") as f:
        json.dump({n: (o, m, plugin.fallback.get(n)) for n, (o, m) in plugin.results.items()}, f)


# the golden-sum tests fastdiff's classes fail by float rounding alone (see --goldens)
GOLDENS = [("DDPMScheduler", "test_scheduler_ddpm", "DDPMSchedulerTest", "test_full_loop_with_noise"),
           ("EulerDiscreteScheduler", "test_scheduler_euler", "EulerDiscreteSchedulerTest", "test_full_loop_with_noise"),
           ("HeunDiscreteScheduler", "test_scheduler_heun", "HeunDiscreteSchedulerTest", "test_full_loop_with_noise")]
# and of the newer classes (their σ grids are not re-derived in float64 here: the float64-tables run is skipped)
NEWER_GOLDENS = [("LMSDiscreteScheduler", "test_scheduler_lms", "LMSDiscreteSchedulerTest", "test_full_loop_with_noise"),
                 ("LMSDiscreteScheduler", "test_scheduler_lms", "LMSDiscreteSchedulerTest",
                  "test_full_loop_device_karras_sigmas"),
                 ("KDPM2DiscreteScheduler", "test_scheduler_kdpm2_discrete", "KDPM2DiscreteSchedulerTest",
                  "test_full_loop_with_noise"),
                 ("KDPM2AncestralDiscreteScheduler", "test_scheduler_kdpm2_ancestral",
                  "KDPM2AncestralDiscreteSchedulerTest", "test_full_loop_no_noise")]


def _float64_tables(cls):
    """diffusers' class `cls` with exact float64 tables: β from a float64 linspace, ᾱ = cumprod in float64, and the
    σ grid re-interpolated in float64 at its timesteps after set_timesteps (diffusers casts σ to float32 there)."""
    import numpy as np
    import torch

    class Float64Tables(cls):
        def _tables(self):
            c = self.config
            if c.beta_schedule == "linear":
                b = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
            else:  # scaled_linear
                b = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
            self.betas, self.alphas, self.alphas_cumprod = b, 1 - b, torch.cumprod(1 - b, 0)
            if hasattr(self, "one"):
                self.one = torch.tensor(1.0, dtype=torch.float64)
            if getattr(self, "sigmas", None) is not None:
                table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().numpy()
                ts = self.timesteps.double().numpy()
                heun = cls.__name__ == "HeunDiscreteScheduler"
                base = np.concatenate([ts[:1], ts[1::2]]) if heun else ts
                sig = torch.from_numpy(np.concatenate([np.interp(base, np.arange(len(table)), table), [0.0]]))
                self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]]) if heun else sig

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._tables()

        def set_timesteps(self, *a, **k):
            out = super().set_timesteps(*a, **k)
            self._tables()
            return out

    Float64Tables.__name__ = cls.__name__
    return Float64Tables


def _goldens(test_dir):
    """Each golden-sum test run with diffusers' class, diffusers' class on exact float64 tables, and fastdiff's: the
    sum each gets (the test's message), so a failure of fastdiff's is seen to be the tables' precision (and float32
    rounding order) rather than a different computation."""
    import importlib
    import re
    import warnings

    import diffusers
    import torch

    import fastdiff.diffusers as fd

    warnings.simplefilter("ignore")
    sys.path.insert(0, os.path.abspath(test_dir))
    for name, mod, case, test in GOLDENS + NEWER_GOLDENS:
        m = importlib.import_module(f"tests.schedulers.{mod}")
        T = getattr(m, case)
        sums = []
        f64 = _float64_tables(getattr(diffusers, name)) if (name, mod, case, test) in GOLDENS else None
        for cls in (getattr(diffusers, name), f64, getattr(fd, name)):
            if cls is None:
                sums.append("(not run)")
                continue
            T.scheduler_classes = (cls,)
            seen, tsum = [], torch.sum  # the test's result_sum (its last full sum), for the bare-assert tests

            def rec(*a, **k):
                out = tsum(*a, **k)
                if len(a) == 1 and not k:
                    seen.append(out.item())
                return out
            torch.sum = rec
            try:
                getattr(T(test), test)()
                sums.append("pass")
            except AssertionError as e:
                got = re.search(r"but get (?:tensor\()?([-0-9.e]+)", str(e))
                sums.append(got.group(1) if got else f"{seen[-1]:.4f}" if seen else str(e)[:60])
            finally:
                torch.sum = tsum
        print(f"{case}::{test}: diffusers {sums[0]}, diffusers with float64 tables {sums[1]}, fastdiff {sums[2]}")


def _class_of(nodeid):
    fname = nodeid.split("::")[0].rsplit("/", 1)[-1]
    for cls, f in FILES.items():
        if f == fname:
            return cls
    return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("test_dir", help="a directory holding diffusers' tests/ (tests/schedulers, tests/testing_utils.py)")
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--set", default="original", choices=sorted(SETS), help="which drop-in classes' test files run "
                    "and are swapped: the original eight, the ten newer ones, or all")
    ap.add_argument("--json", default=None, help="write the per-test outcomes of both runs here")
    ap.add_argument("--goldens", action="store_true", help="only the golden-sum tests, with diffusers' classes on "
                    "float64 tables too")
    ap.add_argument("--_child", choices=["diffusers", "fastdiff"], help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.goldens:
        _goldens(a.test_dir)
        return 0
    if a._child:
        _run_one(os.path.abspath(a.test_dir), a._child == "fastdiff", a.k, a._out, a.set)
        return 0
    global FILES
    FILES = SETS[a.set]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("diffusers", "fastdiff"):
            out = os.path.join(tmp, mode + ".json")
            cmd = [sys.executable, os.path.abspath(__file__), a.test_dir, "--_child", mode, "--_out", out,
                   "--set", a.set]
            if a.k:
                cmd += ["-k", a.k]
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            with open(out) as f:
                runs[mode] = json.load(f)
    ref, got = runs["diffusers"], runs["fastdiff"]
    tot_ref = tot_ok = tot_fb = 0
    print(f"{'class':34s} {'diffusers passes':>16s} {'fastdiff passes':>16s} {'via diffusers':>14s}")
    failing = []
    for cls in FILES:
        ids = [n for n, (o, *_) in ref.items() if o == "passed" and _class_of(n) == cls]
        ok = [n for n in ids if got.get(n, ("missing",))[0] == "passed"]
        fb = [n for n in ok if got[n][2]]
        failing += [(n, got.get(n, ("missing", ""))[:2]) for n in ids if n not in ok]
        tot_ref, tot_ok, tot_fb = tot_ref + len(ids), tot_ok + len(ok), tot_fb + len(fb)
        print(f"{cls:34s} {len(ids):16d} {len(ok):16d} {len(fb):14d}")
    print(f"{'total':34s} {tot_ref:16d} {tot_ok:16d} {tot_fb:14d}  ({100.0 * tot_ok / max(tot_ref, 1):.0f} % pass, "
          f"{100.0 * (tot_ok - tot_fb) / max(tot_ref, 1):.0f} % fused only)")
    fbs = sorted(n for n, v in got.items() if v[0] == "passed" and v[2])
    if fbs:
        print("\npassing via diffusers' class (a configuration fastdiff does not run fused):")
        for n in fbs:
            print(f"  {n.split('tests/schedulers/')[-1]}: {got[n][2]}")
    if failing:
        print("\nfailing with fastdiff's classes (passing with diffusers'):")
        for n, (o, msg) in sorted(failing):
            print(f"  {n.split('tests/schedulers/')[-1]}  [{o}] {msg}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
