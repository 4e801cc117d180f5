"""Seeded randomized sweep of the samplers against diffusers' schedulers and the exact Gaussian oracle.

Each case draws a configuration from `random.Random(seed)` (fixed seeds: the sweep is deterministic and a failure
names its seed), the way a reviewer might: T, β schedule and range, trained β, prediction type, clipping /
thresholding, set_alpha_to_one, steps_offset, spacing, zero-terminal-SNR, variance type, η, use_clipped_model_output,
steps from 1 to T, sample ranks 2/3/4 with batch 1, float32 on the reference and fused backends, float16 on the fused
backend, and the scheduler object or its config dict.

Tolerance against diffusers, per element: |got − want| <= rtol·(|want| + 1) (tests/_tol.assert_close_per_element;
one tolerance from max|x| would let the O(1) elements of a sample whose largest reach 1e4 drift by 10). diffusers keeps
every per-step scalar in float32, fastdiff in float64, and over a loop the ~1e-6..5e-5 relative scalar differences
add up and are amplified by 1/√ᾱ_t in x̂0. float16 (fused backend, fp16 model and samples) is compared with the same
float32 diffusers loop: fp16 rounds every stored x_t and model output to 2^-11 relative, and the loop amplifies it the
same way. Measured over the 400 cases (diffusers 0.42.1, torch 2.13, this CPU): worst 8.8e-5 (float32, 262 cases,
median 7.4e-7; DDPM sigmoid β ε-prediction, 41 steps) and 4.7e-3 (float16, 26 cases, median 4.6e-4; DDIM cosine
ε-prediction, 27 steps). RTOL is ~3.3x that: 3e-4 and 1.5e-2.
"""
import math
import random

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.theory.toy import GaussianMixture
from tests._tol import assert_close_per_element
from tests.conftest import HAS_CPP
from tests.run.test_sampling_oracle import abar_of, moments

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = {torch.float32: 3e-4, torch.float16: 1.5e-2}


class Model(torch.nn.Module):
    """A smooth stand-in network: mixes dim 1 (channels), depends on t; `var` adds a variance half (2·C channels):
    "learned_range" v ∈ (−1, 1), "learned" a positive variance (diffusers takes it as σ² and square-roots it)."""

    def __init__(self, channels, seed, var=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        out = channels * (2 if var else 1)
        self.w = torch.nn.Parameter(torch.randn(out, channels, generator=g) * 0.6)
        self.b = torch.nn.Parameter(torch.randn(out, generator=g) * 0.2)
        self.var, self.c = var, channels

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) / 1000.0
        h = torch.einsum("oc,bc...->bo...", self.w.to(x.dtype), x)
        h = torch.tanh(h + self.b.to(x.dtype).reshape(-1, *([1] * (x.dim() - 2))) + t)
        if self.var == "learned":
            return torch.cat([h[:, : self.c], 0.01 * (h[:, self.c:] + 1.0)], 1)
        return h


class Float32Noise:
    """Noise source for the float16 runs: torch.randn in float32 from a seeded generator, then cast, so the fp16
    run sees the float32 diffusers loop's noise (torch.randn in float16 draws a different stream past 16 values)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def draw(self, shape, device, dtype):
        return torch.randn(shape, generator=self.g).to(device, dtype)


def draw_config(seed):
    r = random.Random(seed)
    kind = r.choice(["ddim", "ddpm"])
    T = r.choice([50, 64, 100, 97, 300, 1000, r.randint(50, 1000)])
    cfg = dict(num_train_timesteps=T, prediction_type=r.choice(["epsilon", "sample", "v_prediction"]),
               timestep_spacing=r.choice(["leading", "linspace", "trailing"]))
    schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (["sigmoid"] if kind == "ddpm" else [])
    u = r.random()
    if u < 0.1:  # trained β: increasing, in (1e-4, 0.05)
        lo, hi = r.uniform(1e-4, 1e-3), r.uniform(0.01, 0.05)
        cfg["trained_betas"] = [lo + (hi - lo) * (i / max(T - 1, 1)) ** r.uniform(0.5, 2) for i in range(T)]
    else:
        cfg["beta_schedule"] = r.choice(schedules)
        if cfg["beta_schedule"] == "scaled_linear":
            cfg.update(beta_start=r.uniform(5e-4, 1.5e-3), beta_end=r.uniform(0.008, 0.02))
        else:
            cfg.update(beta_start=10 ** r.uniform(-5, -3), beta_end=r.uniform(0.005, 0.04))
    if r.random() < 0.15:  # zero terminal SNR, as its paper uses it: v-prediction, trailing spacing (sometimes not)
        cfg["rescale_betas_zero_snr"] = True
        cfg["prediction_type"] = r.choice(["v_prediction", "v_prediction", "sample", "epsilon"])
        if r.random() < 0.7:
            cfg["timestep_spacing"] = "trailing"
    clip = r.choice(["none", "clip", "threshold"])
    cfg.update(clip_sample=clip == "clip", clip_sample_range=r.uniform(0.5, 3.0), thresholding=clip == "threshold",
               dynamic_thresholding_ratio=r.uniform(0.8, 0.999), sample_max_value=r.uniform(1.0, 3.0))
    if r.random() < 0.1:  # out-of-range values: ignored where the setting is off, a clear error where it is on
        cfg.update(clip_sample_range=0.0, dynamic_thresholding_ratio=1.5, sample_max_value=0.5)
    if cfg["timestep_spacing"] == "leading":
        cfg["steps_offset"] = r.choice([0, 0, 1])
    run = dict(seed=r.randrange(2**31), backend=r.choice(["torch", "auto"]), as_dict=r.random() < 0.3)
    if kind == "ddim":
        cfg["set_alpha_to_one"] = r.random() < 0.6
        eta = r.choice([0.0, 1.0, round(r.uniform(0, 1), 3), round(r.uniform(0, 1), 3), round(r.uniform(1, 2), 3)])
        run.update(eta=eta, use_clipped_model_output=r.random() < 0.3)
    else:
        cfg["variance_type"] = r.choice(["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range",
                                         "fixed_large_log"])
    steps_max = min(T, 60)  # loop cost; steps == T is drawn on the small T
    run["steps"] = r.choice([1, 2, T if T <= 100 else steps_max, r.randint(3, steps_max), r.randint(3, steps_max)])
    B = r.choice([1, 1, 2, 3])
    C = r.randint(1, 4)
    run["shape"] = r.choice([(B, r.randint(1, 9)), (B, C, r.randint(1, 6), r.randint(1, 5)), (B, C, r.randint(1, 11))])
    run["dtype"] = torch.float16 if run["backend"] == "auto" and r.random() < 0.2 else torch.float32
    return kind, cfg, run


def diffusers_loop(sched, model, steps, seed, shape, **step_kw):
    """diffusers' pipeline loop; returns (x, number of timesteps diffusers' grid has)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    sched.set_timesteps(steps)
    ts = sched.timesteps
    n = len(ts)
    # diffusers 0.42's trailing grid can hold steps + 1 entries, the last one timestep −1 (float np.arange); fastdiff
    # gives exactly `steps` (tests/schedule/test_schedule.py): compare with diffusers' first `steps`
    for t in ts[:steps]:
        x = sched.step(model(x, t), t, x, generator=g, **step_kw).prev_sample
    return x, n


def expected_error(kind, cfg, run):
    """The error(s) fastdiff may raise for a configuration it cannot sample, as one regex (None: it must sample it).
    Where several settings are wrong, naming any one of them is right."""
    T, steps = cfg["num_train_timesteps"], run["steps"]
    errs = []
    if cfg.get("variance_type") == "fixed_large_log":
        errs.append("variance_type")  # diffusers square-roots log β (< 0): NaN noise scale
    if cfg["thresholding"] and (cfg["sample_max_value"] < 1 or cfg["dynamic_thresholding_ratio"] > 1):
        # diffusers: torch.quantile raises at ratio > 1; the quantile clamped to [1, max < 1] is max (torch.clamp)
        errs.append("dynamic_thresholding_ratio|sample_max_value")
    if cfg["clip_sample"] and cfg["clip_sample_range"] <= 0:
        errs.append("clip_sample_range")  # diffusers clamps x̂0 to [0, 0]
    if cfg.get("timestep_spacing") == "leading" and (steps - 1) * (T // steps) + cfg.get("steps_offset", 0) >= T:
        errs.append("steps_offset")  # diffusers indexes ᾱ past T − 1 (IndexError)
    if cfg.get("rescale_betas_zero_snr") and cfg["prediction_type"] == "epsilon":
        grid = fastdiff.schedule.timesteps(T, steps, cfg["timestep_spacing"], cfg.get("steps_offset", 0))
        if grid.max() == T - 1:
            errs.append("epsilon")  # ε-prediction at ᾱ_t = 0: x̂0 = (x − ε̂)/0, diffusers gives inf/NaN
    return "|".join(errs) or None


CASES = list(range(400))


def _describe(seed):
    kind, cfg, run = draw_config(seed)
    keys = ("prediction_type", "timestep_spacing", "beta_schedule", "variance_type")
    return f"{seed}-{kind}-" + "-".join(str(cfg[k]) for k in keys if k in cfg) + f"-{run['steps']}"


@pytest.mark.parametrize("seed", CASES, ids=_describe)
def test_fuzz_matches_diffusers(seed):
    kind, cfg, run = draw_config(seed)
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls(**cfg)
    shape, steps, dtype = run["shape"], run["steps"], run["dtype"]
    model = Model(shape[1], seed, var=cfg.get("variance_type") if cfg.get("variance_type", "").startswith("learned")
                  else None)
    step_kw = dict(eta=run["eta"], use_clipped_model_output=run["use_clipped_model_output"]) if kind == "ddim" else {}
    schedule = dict(sched.config) if run["as_dict"] else sched
    gen = Float32Noise(run["seed"]) if dtype == torch.float16 else torch.Generator().manual_seed(run["seed"])
    sample = fastdiff.ddim_sample if kind == "ddim" else fastdiff.ddpm_sample
    backend = "cpp" if run["backend"] == "auto" and HAS_CPP else run["backend"]  # the fused op by name

    def ours():
        return sample(model.to(dtype), steps=steps, shape=shape, schedule=schedule, generator=gen, dtype=dtype,
                      backend=backend, **step_kw)

    err = expected_error(kind, cfg, run)
    if err is not None:
        with pytest.raises(ValueError, match=err):
            ours()
        return
    dshape = shape
    if cfg["thresholding"] and len(shape) == 2:
        # diffusers 0.42 cannot threshold (B, D) samples (reshape by np.prod(()) = 1.0, a float): run it on (B, D, 1),
        # the same per-sample quantile over the same values and the same noise stream
        with pytest.raises(TypeError):
            diffusers_loop(cls(**cfg), model, 1, run["seed"], shape, **step_kw)
        dshape = (*shape, 1)
    want, _ = diffusers_loop(sched, model.float(), steps, run["seed"], dshape, **step_kw)
    want = want.reshape(shape)
    got = ours()
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.isfinite(got).all(), f"fastdiff not finite ({kind} {cfg} {run})"
    if not torch.isfinite(want).all():
        # diffusers takes √(1 − ᾱ_p − σ²) of a negative number: η > 1 (σ² > 1 − ᾱ_p), or η = 1 at ᾱ_t = 0 where
        # float32 rounding puts it below 0; fastdiff clamps the argument at 0 (tests/run/test_sampling_diffusers.py)
        assert kind == "ddim" and (run["eta"] > 1 or cfg.get("rescale_betas_zero_snr") and run["eta"] == 1), \
            (cfg, run)
        return
    assert_close_per_element(got.float(), want, rtol=RTOL[dtype], floor=1.0, what=f"{kind} {cfg} {run}")


# ---------------------------------------------------------------------------------------------------------------
# the exact oracle: K = 1 moments through random configurations

N_ORACLE = 20000


def draw_oracle_config(seed):
    r = random.Random(1000 + seed)
    D = r.randint(1, 3)
    mean = [round(r.gauss(0, 1.5), 3) for _ in range(D)]
    std = r.uniform(0.1, 1.5)
    T = r.choice([100, 250, 1000, r.randint(50, 1000)])
    lo, hi = 10 ** r.uniform(-5, -3), r.uniform(0.01, 0.03)
    name, sched, abar = r.choice([("linear", fastdiff.NoiseSchedule.linear(T), abar_of("linear", T)),
                                  ("scaled_linear", fastdiff.NoiseSchedule.scaled_linear(T), abar_of("scaled_linear", T)),
                                  ("cosine", fastdiff.NoiseSchedule.cosine(T), abar_of("cosine", T)),
                                  ("linear", fastdiff.NoiseSchedule.linear(T, lo, hi), abar_of("linear", T, lo, hi))])
    kind = r.choice(["ddim", "ddpm"])
    opts = dict(prediction_type=r.choice(["epsilon", "sample", "v_prediction"]),
                timestep_spacing=r.choice(["leading", "linspace", "trailing"]))
    if kind == "ddpm":
        opts["variance_type"] = r.choice(["fixed_small", "fixed_large"])
    steps = r.choice([1, r.randint(2, 10), r.randint(10, 40)])
    eta = r.choice([0.0, 1.0, round(r.uniform(0, 1), 3)]) if kind == "ddim" else 0.0
    return kind, GaussianMixture([1.0], [mean], std=std), sched, abar, opts, steps, eta


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_k1_moment_recursion(seed):
    """K = 1: each step is affine + Gaussian, so the final mean and variance are the recursion's exactly; the
    recursion, ᾱ and the grid computed independently of the product (tests/run/test_sampling_oracle.py: float64 NumPy
    from the papers' formulas); float64 samples, 4 standard errors (mean: √(V/N); variance: V·√(2/(N−1)), the final
    law being Gaussian)."""
    kind, mix, sched, abar, opts, steps, eta = draw_oracle_config(seed)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), abar, rtol=1e-10)
    g = torch.Generator().manual_seed(seed)
    model = mix.model(sched, opts["prediction_type"])
    fn = fastdiff.ddim_sample if kind == "ddim" else fastdiff.ddpm_sample
    kw = dict(eta=eta) if kind == "ddim" else {}
    x = fn(model, steps=steps, shape=(N_ORACLE, mix.D), schedule=sched, generator=g, dtype=torch.float64, **kw,
           **opts)
    M, V = moments(kind, steps, eta, mix.means[0].numpy(), mix.std**2, spacing=opts["timestep_spacing"],
                   variance_type=opts.get("variance_type", "fixed_small"), abar=abar)
    se_mean = math.sqrt(V / N_ORACLE)
    assert np.abs(x.mean(0).numpy() - M).max() < 4 * se_mean, (x.mean(0), M, kind, opts, steps, eta)
    se_var = V * math.sqrt(2 / (N_ORACLE - 1))
    assert np.abs(x.var(0).numpy() - V).max() < 4 * se_var, (x.var(0), V, kind, opts, steps, eta)
