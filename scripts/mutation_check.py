#!/usr/bin/env python3
"""Plant small bugs in the product code, one at a time, and check that the tests catch each one.

    python scripts/mutation_check.py             # every mutant; prints a Markdown table, exits 1 if one survives
    python scripts/mutation_check.py --list      # the mutants, nothing run
    python scripts/mutation_check.py -k bf16     # only mutants whose name contains "bf16"
    python scripts/mutation_check.py --json out.json

The working tree is never touched: HEAD (or, with --worktree, the working tree's tracked and untracked files) and the
built fastdiff/_C*.so are copied to a temporary directory, each mutant is written there, the relevant tests run there (`python -m pytest` from the copy
imports the copy's fastdiff: checked before anything runs), and the file is restored in a `finally` (Ctrl-C too).
A mutant in csrc/ rebuilds the copy's extension in place (`setup.py build_ext --inplace`, ninja: only the objects
that depend on the mutated file recompile) and puts the original .so back afterwards. The copy is deleted at the end
(--keep keeps it).

A mutant is "caught" when its tests fail (pytest exit status 1); status 2-4 (collection or usage error) is reported
as "error", and 5 (no tests ran) as "no tests": both count as not caught. Before the mutants, the unmutated copy runs
every selected test once and must pass, so a catch is the mutant's doing. A pattern that no longer occurs exactly once
in its file (the code moved on) is reported as "stale" and counts as not caught: update the mutant.

Time, measured on this project's 2-core CPU, lightly loaded (load average ~1), in three runs (-k): the 19 Python
mutants 3.1 min (baseline 101 s, mutants 2.5-13 s), the 10 C++ ones 3.2 + 2.9 min (baseline 12 s, mutants 29-36 s
each, the rebuild included). Shared with other jobs (load average 6-10) the former 27 took ~45 min (C++ rebuilds
1.5-5 min each). Run before releases; it is not part of CI (scripts/test.sh).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GNS = "tests/ops/test_group_norm_silu.py"
SS = "tests/ops/test_sampler_step.py"
MS = "tests/ops/test_multistep.py"
ATT = "tests/ops/test_attention.py"
ORACLE = "tests/run/test_sampling_oracle.py"
DIFF = "tests/run/test_sampling_diffusers.py"
SEEDS = "tests/test_image_seed.py"
BUILD = "tests/test_build_record.py"


@dataclass
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: list[str]  # pytest arguments (files, node ids, -k expressions)
    why: str = ""
    env: dict = field(default_factory=dict)

    @property
    def cxx(self) -> bool:
        return self.path.startswith("csrc/")


MUTANTS = [
    # ---- GroupNorm + SiLU ----
    Mutant("gns triton: 1/(sqrt(var)+eps)", "fastdiff/ops/group_norm_silu.py",
           "rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)", "rstd = 1.0 / (tl.sqrt(tl.maximum(var, 0.0)) + eps)",
           [GNS, "-k", "triton and (eps or parity)"], "eps inside vs outside the square root"),
    Mutant("gns triton: Chan merge term dropped", "fastdiff/ops/group_norm_silu.py",
           "m2 = m2 + tm2 + delta * delta * cnt * (tc / tot)", "m2 = m2 + tm2",
           [GNS, "-k", "triton and (parity or split)"], "tiles merged without the between-tile variance"),
    Mutant("gns triton: add ignored in the apply pass", "fastdiff/ops/group_norm_silu.py",
           "B = b + (a - mean) * A", "B = b - mean * A", [GNS, "-k", "triton and parity"]),
    Mutant("gns C++: 1/(sqrt(var)+eps)", "csrc/include/group_norm_silu_math.h",
           "return 1.0f / __builtin_sqrtf(v);", "return 1.0f / (__builtin_sqrtf(v - eps) + eps);",
           [GNS, "-k", "cpp and eps"]),
    Mutant("gns C++: Chan merge term dropped", "csrc/include/group_norm_silu_math.h",
           "r.m2 = a.m2 + b.m2 + d * d * a.count * fb;", "r.m2 = a.m2 + b.m2;",
           [GNS, "-k", "cpp and (parity or split or stable)"]),
    Mutant("gns C++ AVX-512: bf16 store truncates", "csrc/cpu/group_norm_silu_kernels.inc",
           "_mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));",
           "_mm256_storeu_si256(reinterpret_cast<__m256i*>(p), "
           "_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));",
           [GNS, "-k", "cpp and (rounded_once or isa_builds)"], "the bug class of issue 15"),
    Mutant("gns C++ AVX2: bf16 store truncates", "csrc/cpu/group_norm_silu_kernels.inc",
           "__m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);",
           "__m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_and_si256(lsb, _mm256_setzero_si256())), 16);",
           [GNS, "-k", "isa_builds"]),
    Mutant("CPU scalar bf16 conversion truncates", "csrc/cpu/fd_cpu_io.h",
           "const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;", "const uint32_t r = b >> 16;",
           [GNS, "-k", "isa_builds"]),
    Mutant("gns reference: add dropped", "fastdiff/ops/group_norm_silu.py",
           "        x = x + add.reshape(*add.shape, *([1] * (x.dim() - 2)))",
           "        x = x + 0 * add.reshape(*add.shape, *([1] * (x.dim() - 2)))",
           [GNS, "-k", "reference"], "the oracle itself is tested"),
    # ---- model-output conversions (fastdiff/prediction.py), the sampler_step wrapper's references ----
    Mutant("x0 coefs: eps-prediction sign of q", "fastdiff/prediction.py",
           "return _inv(alpha), (-sigma / alpha if alpha != 0.0 else -sigma * math.inf)",
           "return _inv(alpha), (sigma / alpha if alpha != 0.0 else -sigma * math.inf)",
           [ORACLE, "-k", "eta0"], "the rows of every VP sampler (DDIM's plan here)"),
    Mutant("x0 reference: eps-prediction sign", "fastdiff/prediction.py",
           "        return (x - sigma * o) / alpha", "        return (x + sigma * o) / alpha",
           [SS, "-k", "reference_steps"]),
    Mutant("DDIM sigma: (1 - abar_t/abar_p) factor dropped", "fastdiff/ops/sampler_step.py",
           "return eta * math.sqrt(max((1.0 - abar_p) / (1.0 - abar_t) * (1.0 - abar_t / abar_p), 0.0))",
           "return eta * math.sqrt(max((1.0 - abar_p) / (1.0 - abar_t), 0.0))",
           [SS, ORACLE, "-k", "reference_steps or k1_moment"], "ddim_sigma: the reference and DDIM's plan"),
    Mutant("step_coefs: DDPM posterior sqrt(alpha) -> alpha", "fastdiff/ops/sampler_step.py",
           "C = math.sqrt(alpha) * (1.0 - abar_p) / (1.0 - abar_t)", "C = alpha * (1.0 - abar_p) / (1.0 - abar_t)",
           [SS, "-k", "reference_steps or (parity_matrix and ddpm and cpp)"], "the sampler_step wrapper's rows"),
    Mutant("dynamic threshold reference: sample 0's scale for all", "fastdiff/ops/sampler_step.py",
           "s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)",
           "s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:1].unsqueeze(1)",
           [SS, "-k", "threshold"]),
    Mutant("fused op: inputs' shape/dtype checks skipped", "fastdiff/ops/multistep.py",
           "    _check_tensor_like(t, x, name, op)\n    if t.stride() != x.stride():",
           "    if t.stride() != x.stride():",
           [SS, "-k", "bad_inputs"], "multistep_step's checks, the reference (torch) path's only ones"),
    Mutant("DDPM fixed_large variance = fixed_small", "fastdiff/ops/sampler_step.py",
           "    if variance_type == \"fixed_large\":\n        return beta",
           "    if variance_type == \"fixed_large\":\n        return small",
           [SS, DIFF, "-k", "reference_steps or (ddpm_matches and linear and epsilon and cpp)"],
           "ddpm_variance: the reference and DDPM's plan"),
    # ---- the DDIM / DDPM plans (fastdiff/samplers/ddim.py, ddpm.py), through the sampling loop ----
    Mutant("DDIM plan: direction coefficient 2e-5 too large", "fastdiff/samplers/ddim.py",
           "B = math.sqrt(max(1.0 - ap - sig * sig, 0.0))", "B = math.sqrt(max(1.0 - ap - sig * sig, 0.0)) * (1 + 2e-5)",
           [DIFF, "-k", "ddim_matches and linear and cpp"], "small: against diffusers per element"),
    Mutant("DDIM plan: final alpha_bar ignores set_alpha_to_one", "fastdiff/samplers/ddim.py",
           "final = 1.0 if (kind == \"ddpm\" or o[\"set_alpha_to_one\"]) else float(schedule.alphas_cumprod[0])",
           "final = float(schedule.alphas_cumprod[0])", [ORACLE, "-k", "eta0"]),
    Mutant("DDPM plan: posterior sqrt(alpha) -> alpha", "fastdiff/samplers/ddpm.py",
           "(math.sqrt(at / ap) * (1.0 - ap) / (1.0 - at)) * c.x", "(at / ap * (1.0 - ap) / (1.0 - at)) * c.x",
           [DIFF, "-k", "ddpm_matches and linear and epsilon and cpp"]),
    # ---- the one fused op, fastdiff::multistep_step_ (C++ CPU kernel, Triton kernel) ----
    Mutant("multistep C++: per-sample threshold ignored", "csrc/cpu/multistep.cpp",
           "const float s = a.thr[b];", "const float s = a.thr[0];",
           [SS, "-k", "thresholding_learned_variance and cpp"]),
    Mutant("multistep C++: guidance w(oc - ou) sign", "csrc/include/multistep_math.h",
           "FD_HD float guide(float ou, float oc, float w) { return ou + w * (oc - ou); }",
           "FD_HD float guide(float ou, float oc, float w) { return ou + w * (ou - oc); }",
           [SS, "-k", "parity_matrix and cfg and cpp"]),
    Mutant("multistep C++: learned_range f = v/2", "csrc/include/multistep_math.h",
           "float f = 0.5f * (v + 1.0f);", "float f = 0.5f * v;",
           [SS, "-k", "thresholding_learned_variance and cpp"]),
    Mutant("multistep C++ linear_tiles: guidance dropped", "csrc/cpu/multistep.cpp",
           "const float o = CFG ? guide(os[j], cs[j], k.w) : os[j];", "const float o = os[j];",
           [MS, "-k", "cpp_linear_path and not threads"],
           "the fast path's scalar lanes (all of the baseline copy, the tails of the AVX2 one)"),
    Mutant("multistep C++ AVX2: bf16 tile store truncates", "csrc/cpu/fd_cpu_io.h",
           "_mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), one), bias)), 16);",
           "_mm256_add_epi32(u, _mm256_setzero_si256()), 16);",
           [SS, "-k", "parity_matrix and bfloat16 and cpp"]),
    Mutant("multistep triton: per-sample threshold ignored", "fastdiff/ops/multistep.py",
           "s = tl.load(thr_ptr + offs // per_sample, mask=mask, other=1.0)",
           "s = tl.load(thr_ptr + offs * 0, mask=mask, other=1.0)",
           [SS, "-k", "thresholding and triton"]),
    # ---- schedules, seeds, build ----
    Mutant("leading spacing: off by one step", "fastdiff/schedule/grids.py",
           "return (np.arange(0, n) * ratio).round()[::-1].copy().astype(dtype) + steps_offset",
           "return (np.arange(1, n + 1) * ratio).round()[::-1].copy().astype(dtype) + steps_offset - 1",
           [ORACLE, "-k", "grids or eta0"]),
    Mutant("image seed = seed + index", "fastdiff/app/jobs.py",
           "return int.from_bytes(h, \"little\") & ((1 << 63) - 1)", "return int(seed) + int(index)", [SEEDS]),
    Mutant("extension silently unavailable", "fastdiff/_backend.py",
           "    _EXT = True\n", "    _EXT = False\n", [BUILD]),
    Mutant("attention triton: softmax scale ignored", "fastdiff/ops/attention.py",
           "s = tl.where(cmask[None, :], s * qk_scale, float(\"-inf\"))",
           "s = tl.where(cmask[None, :], s * 1.4426950408889634, float(\"-inf\"))",
           [ATT, "-k", "triton and parity"]),
]


def _copy_tree(dst: str, worktree: bool) -> None:
    """HEAD's files (or the working tree's tracked + untracked, not ignored, files), and the built extension."""
    if not worktree:
        tar = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", dst], input=tar.stdout, check=True)
        files = []
    else:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    files += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "fastdiff", "_C*.so"))]
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def _env(extra=None):
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTDIFF_SKIP_CUDA_BUILD": "1", "MAX_JOBS": "2"}
    env.pop("FASTDIFF_BACKEND", None)
    env.update(extra or {})
    return env


def _pytest(copy: str, args: list[str], env=None, timeout=1200) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    try:
        r = subprocess.run(cmd, cwd=copy, env=_env(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timeout"
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    return r.returncode, lines[-1] if lines else r.stderr[-300:]


def _build(copy: str) -> None:
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy, env=_env(),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"build failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains one of these comma-separated words "
                    "(case-insensitive)")
    ap.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, uncommitted changes "
                    "included (default: a copy of HEAD, so other people's work in progress does not count)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    words = [w.strip().lower() for w in args.k.split(",")]
    mutants = [m for m in MUTANTS if any(w in m.name.lower() for w in words)]
    if args.list:
        for i, m in enumerate(mutants, 1):
            print(f"{i:2d}. {m.name}  [{m.path}]  tests: {' '.join(m.tests)}")
        return 0
    def _terminate(signum, frame):  # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C: files restored, copy removed
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    copy = tempfile.mkdtemp(prefix="fastdiff-mut-")
    t_start = time.time()
    results = []
    try:
        _copy_tree(copy, args.worktree)
        where = subprocess.run([sys.executable, "-c", "import fastdiff, fastdiff._backend as b; "
                                "print(fastdiff.__file__, b.has_cpp())"],
                               cwd=copy, env=_env(), capture_output=True, text=True).stdout.split()
        if not where or not os.path.realpath(where[0]).startswith(os.path.realpath(copy)):
            raise RuntimeError(f"python in the copy imports fastdiff from {where}, not from {copy}")
        print(f"copy: {copy} (fastdiff from the copy, C++ extension loaded: {where[1]})", flush=True)
        so = glob.glob(os.path.join(copy, "fastdiff", "_C*.so"))
        so_backup = {p: p + ".orig" for p in so}
        for p, b in so_backup.items():
            shutil.copy2(p, b)
        # the unmutated tree must pass every selected test, or a "catch" means nothing
        t0 = time.time()
        seen = set()
        for m in mutants:
            key = (tuple(m.tests), tuple(sorted(m.env.items())))
            if key in seen:
                continue
            seen.add(key)
            rc, last = _pytest(copy, m.tests, m.env)
            if rc != 0:
                raise RuntimeError(f"unmutated tree fails the tests of {m.name!r}: {' '.join(m.tests)} -> {last}")
        print(f"baseline: the tests of every mutant pass on the unmutated copy ({time.time() - t0:.0f} s)", flush=True)
        for i, m in enumerate(mutants, 1):
            path = os.path.join(copy, m.path)
            src = open(path).read()
            t0 = time.time()
            if src.count(m.old) != 1:
                res = dict(status="stale", detail=f"pattern found {src.count(m.old)} times")
            else:
                try:
                    with open(path, "w") as f:
                        f.write(src.replace(m.old, m.new))
                    if m.cxx:
                        _build(copy)
                    rc, last = _pytest(copy, m.tests, m.env)
                    status = {0: "NOT CAUGHT", 1: "caught", 5: "no tests", 124: "timeout"}.get(rc, "error")
                    res = dict(status=status, detail=last)
                except RuntimeError as e:
                    res = dict(status="build failed", detail=str(e)[-300:])
                finally:
                    with open(path, "w") as f:
                        f.write(src)
                    if m.cxx:
                        for p, b in so_backup.items():
                            shutil.copy2(b, p)
            res.update(name=m.name, path=m.path, tests=" ".join(m.tests), seconds=round(time.time() - t0, 1))
            results.append(res)
            print(f"[{i}/{len(mutants)}] {res['status']:10s} {m.name} ({res['seconds']} s): {res['detail']}",
                  flush=True)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    total = time.time() - t_start
    caught = sum(r["status"] == "caught" for r in results)
    print(f"\n| # | planted bug | file | tests run | result | s |\n|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {r['name']} | {r['path']} | `{r['tests']}` | {r['status']} | {r['seconds']:.0f} |")
    print(f"\n{caught}/{len(results)} caught, {total / 60:.1f} min in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, caught=caught, total=len(results), seconds=round(total)), f, indent=1)
    return 0 if caught == len(results) and len(results) == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
