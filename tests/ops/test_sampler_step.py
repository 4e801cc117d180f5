"""fastdiff.ops.sampler_step: the fused step (sampler_step, a wrapper over the one fused op fastdiff::multistep_step_
through `to_multistep_row`) on every backend against the reference step functions, and the reference step functions
against the papers' formulas written out here in float64 NumPy.

Tolerances (tests/_tol.py, flash-attention style): the fused result and the reference run in the same I/O dtype are
both compared with a float64 reference; err(fused) <= 2·err(reference, same dtype) + atol·scale, with atol = 2e-6
(fp32), 1e-3 (fp16), 8e-3 (bf16) and scale = max|x_prev|. Both compute in float32, so the gap is float32 rounding of
the reordered arithmetic (the fused step folds the step into p, q, r, s, u, A, B, C scalars). fp16/bf16 outputs are
also checked to be the float64 result rounded once (tests/_tol.assert_rounded_once).
"""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.ops import sampler_step as ss
from tests._tol import ATOL_SCALED as ATOL
from tests._tol import assert_err_within, assert_rounded_once, interpreted_triton_bf16, max_err
from tests.conftest import HAS_CPP, requires_cpp, requires_cuda_kernels, requires_triton

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda_kernels])
BACKENDS = [pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton), "torch", CUDA]
HAS_CUDA = torch.cuda.is_available()


def _dev(backend):
    """Where a backend's test tensors live: CUDA for "cuda", and for "triton" when a GPU is present (else the
    interpreter runs it on the CPU)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"

DTYPES = list(ATOL)
PREDS = ["epsilon", "sample", "v_prediction"]
SHAPE = (3, 5, 7, 3)  # odd sizes, batch 3


def _inputs(shape, dtype, seed=0, n=4, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(n)]


def _check(got, want_same_dtype, want64, dtype):
    """err(got) <= 2·err(reference in the same dtype) + atol·scale, both against the float64 reference."""
    assert_err_within(got, want64, want_same_dtype, atol=ATOL[dtype], scale=want64.abs().max().item() + 1e-6,
                      what=str(dtype))


def _ref_step(kind, x, o, at, ap, *, z, pred, clip, cfg, w=2.5, o_c=None, **kw):
    if cfg:  # guidance in float32 (the fused op's math), then the reference step in float32/float64
        o = o.float() + w * (o_c.float() - o.float()) if x.dtype != torch.float64 else o + w * (o_c - o)
        x = x if x.dtype == torch.float64 else x.float()
        z = z if z is None or z.dtype == torch.float64 else z.float()
    if kind == "ddim":
        return ss.ddim_step_ref(x, o, at, ap, noise=z, prediction_type=pred, clip_sample=clip, **kw)
    return ss.ddpm_step_ref(x, o, at, ap, noise=z, prediction_type=pred, clip_sample=clip, **kw)


def _fused(kind, x, o, at, ap, *, z, pred, clip, cfg, backend, w=2.5, o_c=None, eta=0.5, use_clipped=False,
           variance_type="fixed_small", v=None, thr=None, write_x0=True):
    sigma = ss.ddim_sigma(at, ap, eta) if kind == "ddim" else (
        math.sqrt(ss.ddpm_variance(at, ap, variance_type)) if not variance_type.startswith("learned") else 0.0)
    c = ss.step_coefs(kind, at, ap, prediction_type=pred, sigma=sigma, use_clipped_model_output=use_clipped,
                      clip_sample_range=1.0, guidance_scale=w, variance_type=variance_type)
    vm = variance_type if variance_type.startswith("learned") else "scalar"
    return ss.sampler_step(x, o, c, o_cond=o_c if cfg else None, noise=z, v=v, thr=thr, clip=clip, var_mode=vm,
                           write_x0=write_x0, backend=backend)


STEPS = [(0.5, 0.7), (0.02, 0.05), (0.9999, 1.0)]  # mid, high noise, the last step (ᾱ_p = 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("clip,cfg", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "clip", "cfg", "clip-cfg"])
# x0-prediction skips the last step: ε̂ = (x − √ᾱ·x̂0)/√(1−ᾱ) is ill-conditioned at ᾱ_t → 1 (in the reference too)
@pytest.mark.parametrize("pred,j", [(p, j) for p in PREDS for j in range(len(STEPS)) if not (p == "sample" and j == 2)],
                         ids=lambda v: {0: "mid", 1: "high-noise", 2: "last"}.get(v, v) if isinstance(v, int) else v)
def test_parity_matrix(backend, dtype, kind, pred, clip, cfg, j):
    """Every backend × dtype × DDIM/DDPM × prediction type × clip × CFG × three (ᾱ_t, ᾱ_p) against the reference
    step functions (an independent implementation: ddim_step_ref / ddpm_step_ref work term by term, the fused step
    folds the coefficients)."""
    at, ap = STEPS[j]
    x, o, o_c, z = _inputs(SHAPE, dtype, seed=PREDS.index(pred) * 2 + (kind == "ddpm"), device=_dev(backend))
    kw = dict(eta=0.5) if kind == "ddim" else {}
    zz = z if j != 2 else None
    # j == 1 without x̂0: with neither clip nor CFG, the kernels' linear path x' = c_x·x + c_o·o
    got, x0 = _fused(kind, x, o, at, ap, z=zz, pred=pred, clip=clip, cfg=cfg, o_c=o_c, backend=backend,
                     write_x0=j != 1)
    want, x0w = _ref_step(kind, x, o, at, ap, z=zz, pred=pred, clip=clip, cfg=cfg, o_c=o_c, **kw)
    d = torch.float64
    want64, x0_64 = _ref_step(kind, x.to(d), o.to(d), at, ap, z=None if zz is None else zz.to(d),
                              pred=pred, clip=clip, cfg=cfg, o_c=o_c.to(d), **kw)
    assert got.dtype == dtype and got.shape == x.shape
    _check(got, want.to(dtype), want64, dtype)
    if j != 1:
        _check(x0, x0w, x0_64, torch.float32 if dtype == torch.float32 else dtype)
    else:
        assert x0 is None
    if dtype != torch.float32 and backend != "torch" and not interpreted_triton_bf16(backend, dtype, x.device):
        # rounded once: the fused step on the float32 copies of the same inputs measures float32's own error
        f = [t.float() for t in (x, o, o_c, z)]
        got32, _ = _fused(kind, f[0], f[1], at, ap, z=None if zz is None else f[3], pred=pred, clip=clip, cfg=cfg,
                          o_c=f[2], backend=backend)
        err32 = 2 * max_err(got32, want64) + 2.0**-24 * want64.abs().max().item()
        assert_rounded_once(got, want64, err32, what=f"{backend} {dtype} {kind} {pred}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_clipped_model_output_thresholding_learned_variance(backend, dtype):
    dev = _dev(backend)
    x, o, _, z = _inputs((2, 3, 9, 5), dtype, seed=3, device=dev)
    x = x * 3  # so that thresholding and clipping bite
    d = torch.float64
    # DDIM with use_clipped_model_output, clip on
    for pred in PREDS:
        got, _ = _fused("ddim", x, o, 0.3, 0.6, z=z, pred=pred, clip=True, cfg=False, backend=backend,
                        use_clipped=True, eta=1.0)
        kw = dict(eta=1.0, use_clipped_model_output=True)
        want, _ = _ref_step("ddim", x, o, 0.3, 0.6, z=z, pred=pred, clip=True, cfg=False, **kw)
        want64, _ = _ref_step("ddim", x.to(d), o.to(d), 0.3, 0.6, z=z.to(d), pred=pred, clip=True, cfg=False, **kw)
        _check(got, want, want64, dtype)
    # dynamic thresholding: the per-sample scale from threshold_scale, then the fused pass. Samples scaled 1x and 2x
    # (x/3: undo the 3x above), sample_max_value 10: both scales lie strictly inside (1, 10) and differ (neither clamped), so a kernel
    # that ignores the per-sample scale, or takes sample 0's for all, is off
    xt = x * torch.tensor([1 / 3, 2 / 3], device=dev).to(dtype).view(-1, 1, 1, 1)
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, sigma=ss.ddim_sigma(0.3, 0.6, 0.5)), dtype=d, device=dev)
    thr = ss.threshold_scale(xt, o, c, ratio=0.9, max_value=10.0)
    assert (thr > 1.5).all() and (thr < 10).all() and thr[1] > 1.5 * thr[0], thr
    got, _ = ss.sampler_step(xt, o, c, noise=z, thr=thr, backend=backend)
    kw = dict(eta=0.5, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=10.0)
    want, _ = ss.ddim_step_ref(xt, o, 0.3, 0.6, noise=z, **kw)
    want64, _ = ss.ddim_step_ref(xt.to(d), o.to(d), 0.3, 0.6, noise=z.to(d), **kw)
    _check(got, want, want64, dtype)
    # DDPM learned / learned_range variance: σ per element from the model's v
    for vt in ("learned", "learned_range"):
        v = torch.rand_like(x.float()).to(dtype) * (1.0 if vt == "learned" else 2.0) - (0.0 if vt == "learned" else 1.0)
        v = v.abs() if vt == "learned" else v
        got, _ = _fused("ddpm", x, o, 0.3, 0.6, z=z, pred="epsilon", clip=False, cfg=False, backend=backend,
                        variance_type=vt, v=v)
        want, _ = ss.ddpm_step_ref(x, o, 0.3, 0.6, noise=z, variance_type=vt, v=v)
        want64, _ = ss.ddpm_step_ref(x.to(d), o.to(d), 0.3, 0.6, noise=z.to(d), variance_type=vt, v=v.to(d))
        _check(got, want, want64, dtype)


def _step64(x, o, c, *, o_cond=None, noise=None, thr=None, clip=False):
    """The fused step's definition (the formula atop the fused section of fastdiff/ops/sampler_step.py), float64."""
    g = {k: float(c[i]) for k, i in ss.COEF.items()}
    x, o = x.double().cpu(), o.double().cpu()
    if o_cond is not None:
        o = o + g["w"] * (o_cond.double().cpu() - o)
    x0 = g["p"] * x + g["q"] * o
    if clip:
        x0 = x0.clamp(-g["clip"], g["clip"])
    if thr is not None:
        t = thr.double().cpu().view(-1, *([1] * (x.dim() - 1)))
        x0 = torch.maximum(torch.minimum(x0, t), -t) / t
    eps = g["r"] * x + g["s"] * o + g["u"] * x0
    out = g["A"] * x0 + g["B"] * eps + g["C"] * x
    if noise is not None:
        out = out + g["sigma"] * noise.double().cpu()
    return out, x0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_odd_shapes(backend):
    """Odd shapes, channels_last, mixed layouts, non-dense x, empty batch: every backend (the reference too) against
    the step's float64 formula."""
    dev = _dev(backend)
    c = ss.step_coefs("ddim", 0.4, 0.8, prediction_type="v_prediction", sigma=0.1)
    for shape in [(1,), (5, 1), (1, 1, 1, 1), (3, 7, 2, 5, 3), (2, 3, 33, 31)]:
        x, o, _, z = _inputs(shape, torch.float32, seed=len(shape), device=dev)
        got, x0 = ss.sampler_step(x, o, c, noise=z, write_x0=True, backend=backend)
        want, x0w = _step64(x, o, c, noise=z)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x0.double().cpu(), x0w, rtol=1e-5, atol=1e-6)
    x, o, _, z = _inputs((2, 3, 6, 5), torch.float16, seed=9, device=dev)
    want, _ = _step64(x, o, c, noise=z)
    # channels_last everywhere: runs in place and keeps the layout
    xl, ol, zl = (t.contiguous(memory_format=torch.channels_last) for t in (x, o, z))
    got, _ = ss.sampler_step(xl, ol, c, noise=zl, backend=backend)
    if backend != "torch":
        assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-3)
    # mixed layouts and a non-dense x (a transposed slice): documented copies, same values
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, :]
    got, _ = ss.sampler_step(xt[:, :, ::1], ol, c, noise=z, backend=backend)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-3)
    big = torch.randn(2, 3, 12, 5, dtype=torch.float16, device=dev)
    xs = big[:, :, ::2]  # non-dense
    got, _ = ss.sampler_step(xs, o, c, noise=z, backend=backend)
    torch.testing.assert_close(got.double().cpu(), _step64(xs, o, c, noise=z)[0], rtol=1e-3, atol=1e-3)
    # empty batch
    e = torch.empty(0, 3, device=dev)
    assert ss.sampler_step(e, e, c, backend=backend)[0].shape == (0, 3)


# ---- the reference step functions against the papers' formulas (float64 NumPy, written out here) -------------

def _x0_eps64(x, o, at, pred):
    a, b = np.sqrt(at), np.sqrt(1 - at)
    if pred == "epsilon":  # x_t = √ᾱ x0 + √(1−ᾱ) ε (Ho et al. eq. 4)
        return (x - b * o) / a, o
    if pred == "sample":
        return o, (x - a * o) / b
    return a * x - b * o, a * o + b * x  # v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022)


def _ddim64(x, o, at, ap, eta, z, pred):
    """Song et al. 2021 eq. 12 and 16."""
    x0, eps = _x0_eps64(x, o, at, pred)
    sig = eta * np.sqrt((1 - ap) / (1 - at)) * np.sqrt(1 - at / ap)
    return np.sqrt(ap) * x0 + np.sqrt(max(1 - ap - sig**2, 0.0)) * eps + sig * z, sig


def _ddpm64(x, o, at, ap, z, pred, variance_type):
    """Ho et al. 2020 eq. 6-7 between timesteps with ᾱ_t, ᾱ_p (β' = 1 − ᾱ_t/ᾱ_p)."""
    x0, _ = _x0_eps64(x, o, at, pred)
    beta = 1 - at / ap
    mean = np.sqrt(ap) * beta / (1 - at) * x0 + np.sqrt(1 - beta) * (1 - ap) / (1 - at) * x
    var = (1 - ap) / (1 - at) * beta if variance_type == "fixed_small" else beta
    return mean + np.sqrt(var) * z, var


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("at,ap", [(0.3, 0.6), (0.02, 0.05), (0.9, 0.97)])
def test_reference_steps_match_the_papers(pred, at, ap):
    """ddim_step_ref / ddpm_step_ref / ddim_sigma / ddpm_variance / step_coefs (via sampler_step_ref) in float64
    against the formulas written above: agree to 1e-12 relative."""
    x, o, _, z = (t.double() for t in _inputs((2, 3, 4, 5), torch.float32, seed=11))
    xn, on, zn = x.numpy(), o.numpy(), z.numpy()
    for eta in (0.0, 0.5, 1.0):
        want, sig = _ddim64(xn, on, at, ap, eta, zn, pred)
        assert ss.ddim_sigma(at, ap, eta) == pytest.approx(sig, rel=1e-12, abs=1e-15)
        got, _ = ss.ddim_step_ref(x, o, at, ap, eta=eta, noise=z, prediction_type=pred)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        c = ss.step_coefs("ddim", at, ap, prediction_type=pred, sigma=sig)
        np.testing.assert_allclose(_step64(x, o, c, noise=z if eta > 0 else None)[0].numpy(), want, rtol=1e-10,
                                   atol=1e-10)
    for vt in ("fixed_small", "fixed_large"):
        want, var = _ddpm64(xn, on, at, ap, zn, pred, vt)
        assert ss.ddpm_variance(at, ap, vt) == pytest.approx(var, rel=1e-12)
        got, _ = ss.ddpm_step_ref(x, o, at, ap, noise=z, prediction_type=pred, variance_type=vt)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        c = ss.step_coefs("ddpm", at, ap, prediction_type=pred, sigma=math.sqrt(var))
        np.testing.assert_allclose(_step64(x, o, c, noise=z)[0].numpy(), want, rtol=1e-10, atol=1e-10)


def test_reference_thresholding_and_clipping_match_the_formulas():
    """Imagen's dynamic thresholding (Saharia et al. 2022): s = clamp(quantile(|x̂0|, p), 1, max) per sample,
    x̂0 ← clamp(x̂0, ±s)/s; threshold_scale (the fused path's scales) gives the same s."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 2, 7, 5, generator=g, dtype=torch.float64) * torch.tensor([0.5, 2.0, 6.0]).view(-1, 1, 1, 1)
    flat = x0.reshape(3, -1).numpy()
    s = np.clip(np.quantile(np.abs(flat), 0.9, axis=1), 1.0, 4.0)
    assert s[0] == 1.0 and 1.0 < s[1] < 4.0 and s[2] == 4.0  # clamped below, free, clamped above
    want = (np.clip(flat, -s[:, None], s[:, None]) / s[:, None]).reshape(x0.shape)
    got = ss.dynamic_threshold_ref(x0, 0.9, 4.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    c = torch.tensor(ss.step_coefs("ddim", 0.25, 0.5, prediction_type="sample"), dtype=torch.float64)
    thr = ss.threshold_scale(x0.float(), x0.float(), c, ratio=0.9, max_value=4.0)  # x̂0 = o for x0-prediction
    np.testing.assert_allclose(thr.double().numpy(), s, rtol=1e-5)
    np.testing.assert_allclose(ss.clip_or_threshold_ref(x0, clip_sample=True, clip_sample_range=1.5).numpy(),
                               np.clip(x0.numpy(), -1.5, 1.5))


# ---- in-kernel Philox noise ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_matches_reference_generator(backend):
    """noise via rng=[seed, offset] is exactly z_i = philox_randn_ref(seed, offset + i) on every backend."""
    dev = _dev(backend)
    atol = 2e-6 if dev == "cpu" else 1e-5  # GPU logf/cosf (fast math) differ from the CPU's by a few ulp
    x = torch.zeros(3, 4, 5, 7, device=dev)
    c = [0.0] * ss.NUM_COEF
    c[ss.COEF["sigma"]] = 1.0  # x' = z
    seed, off = 0x1234_5678_9ABC, 2**32 - 50  # the counter crosses the 32-bit boundary
    got, _ = ss.sampler_step(x, x, c, rng=torch.tensor([seed, off], device=dev), backend=backend)
    want = ss.philox_randn_ref(seed, off, x.numel()).view(x.shape)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=atol)
    # channels_last: z is indexed in memory order
    xl = torch.zeros(2, 3, 4, 5, device=dev).contiguous(memory_format=torch.channels_last)
    got, _ = ss.sampler_step(xl, xl, c, rng=torch.tensor([7, 0], device=dev), backend=backend)
    mem = ss.philox_randn_ref(7, 0, xl.numel())
    torch.testing.assert_close(got.permute(0, 2, 3, 1).reshape(-1).cpu(), mem, rtol=0, atol=atol)


def test_philox_reference_is_tritons_randn():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")

    @triton.jit
    def k(out_ptr, seed, off, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.randn(seed, off + i.to(tl.int64)), mask=i < n)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(1000, device=dev)
    k[(1,)](out, 99, 5, 1000, BLOCK=1024)
    torch.testing.assert_close(out.cpu(), ss.philox_randn_ref(99, 5, 1000), rtol=0, atol=2e-6)


def test_philox_statistics():
    """Mean 0, variance 1, no correlation between neighbouring elements or between steps (offsets i·n), Gaussian
    tails; deterministic for a given (seed, offset); different seeds give independent streams."""
    n = 1 << 18
    a = ss.philox_randn_ref(2024, 0, n).double()
    b = ss.philox_randn_ref(2024, n, n).double()  # the next step's stream
    c = ss.philox_randn_ref(2025, 0, n).double()
    se = 1 / math.sqrt(n)
    assert abs(a.mean()) < 5 * se and abs(a.var() - 1) < 5 * math.sqrt(2) * se
    for u, w in ((a[:-1], a[1:]), (a, b), (a, c), (a[::2], a[1::2])):
        r = torch.corrcoef(torch.stack([u, w]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(u.numel()), r
    frac = (a.abs() > 2).double().mean().item()  # P(|z| > 2) = 0.0455
    assert abs(frac - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / n)
    assert torch.equal(ss.philox_randn_ref(2024, 0, 100), a[:100].float())
    assert torch.equal(ss.philox_randn_ref(2024, 10, 5), a[10:15].float())


@requires_cpp
def test_philox_kernel_statistics_and_determinism():
    x = torch.zeros(4, 256, 256)
    c = [0.0] * ss.NUM_COEF
    c[ss.COEF["sigma"]] = 1.0
    z1, _ = ss.sampler_step(x, x, c, rng=torch.tensor([11, 0]), backend="cpp")
    z2, _ = ss.sampler_step(x, x, c, rng=torch.tensor([11, 0]), backend="cpp")
    z3, _ = ss.sampler_step(x, x, c, rng=torch.tensor([11, x.numel()]), backend="cpp")
    assert torch.equal(z1, z2)
    n = x.numel()
    assert abs(z1.mean().item()) < 5 / math.sqrt(n) and abs(z1.var().item() - 1) < 8 / math.sqrt(n)
    r = torch.corrcoef(torch.stack([z1.flatten(), z3.flatten()]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(n)


# ---- registration ------------------------------------------------------------------------------------------------

def _op_args(dtype=torch.float32, device="cpu", kind="ddim", var_mode="scalar", **kw):
    """The arguments of fastdiff::multistep_step_ as sampler_step passes them: the step's 16-row as a multistep row,
    no history, d_out = x̂0 in float32."""
    x, o, oc, z = _inputs((2, 3, 5, 4), dtype, seed=1, device=device)
    c = torch.tensor(ss.step_coefs(kind, 0.3, 0.6, sigma=0.2, variance_type=var_mode if var_mode != "scalar" else
                                   "fixed_small"), dtype=torch.float64, device=device)
    v = None
    if var_mode != "scalar":
        v = (torch.rand_like(x) * 2 - 1) if var_mode == "learned_range" else torch.rand_like(x) * 0.05
    x0 = torch.empty_like(x, dtype=torch.float32) if kw.get("x0", True) else None
    return (x, o, kw.get("oc", oc), [], kw.get("z", z), kw.get("rng"), v, kw.get("thr"), ss.to_multistep_row(c),
            kw.get("flags", 1) | (ss.VAR_MODES[var_mode] << 1), torch.empty_like(x), None, x0)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp),
                                     pytest.param("triton", marks=requires_triton), CUDA])
def test_opcheck(backend):
    dev = _dev(backend)
    op = torch.ops.fastdiff.multistep_step_triton if backend == "triton" else torch.ops.fastdiff.multistep_step_
    torch.library.opcheck(op, _op_args(device=dev))
    torch.library.opcheck(op, _op_args(torch.bfloat16, dev, z=None, rng=torch.tensor([3, 4], device=dev), x0=False,
                                       thr=torch.tensor([1.5, 1.0], device=dev)))
    torch.library.opcheck(op, _op_args(torch.float16, dev, kind="ddpm", var_mode="learned"))
    torch.library.opcheck(op, _op_args(torch.bfloat16, dev, kind="ddpm", var_mode="learned_range", z=None,
                                       rng=torch.tensor([5, 6], device=dev)))


def test_to_multistep_row():
    """The 16-row → multistep row: p, q, w, clip, σ, logmax, logmin carried over, yx = B·r + C, yo = B·s,
    yd = A + B·u (float64); the list and the (N, 16) table forms agree bit for bit; the multistep update on the row is
    the step written out with A, B, C, r, s, u in float64."""
    from fastdiff.ops import multistep as ms

    rows = [ss.step_coefs(kind, at, ap, prediction_type=pred, sigma=sg, use_clipped_model_output=uc,
                          clip_sample_range=1.7, guidance_scale=3.0, variance_type=vt)
            for kind, vt in (("ddim", "fixed_small"), ("ddpm", "fixed_small"), ("ddpm", "learned_range"))
            for pred in ss.PREDICTION_TYPES for uc in (False, True) for at, ap, sg in ((0.3, 0.6, 0.2), (0.05, 0.2, 0.0))]
    table = ss.to_multistep_row(torch.tensor(rows, dtype=torch.float64))
    assert table.shape == (len(rows), ms.NUM_COEF) and table.dtype == torch.float64
    for r16, r24 in zip(rows, table.tolist()):
        assert ss.to_multistep_row(r16) == r24  # the same float64 operations, bit for bit
        g = {k: r16[i] for k, i in ss.COEF.items()}
        m = {k: r24[i] for k, i in ms.COEF.items()}
        for a, b in (("p", "p"), ("q", "q"), ("w", "w"), ("clip", "clip"), ("sigma", "yz"), ("logmax", "logmax"),
                     ("logmin", "logmin")):
            assert m[b] == g[a]
        assert m["yx"] == g["B"] * g["r"] + g["C"] and m["yo"] == g["B"] * g["s"]
        assert m["yd"] == g["A"] + g["B"] * g["u"]
        assert all(r24[ms.COEF[k]] == 0.0 for k in ms.COEF if k.startswith(("yh", "y2")))  # no history, no out2
        assert r24[max(ms.COEF.values()) + 1:] == [0.0] * (ms.NUM_COEF - max(ms.COEF.values()) - 1)  # reserved
    # the update on the row == the 16-form written out in float64 (on float64 inputs)
    x, o, _, z = (t.double() for t in _inputs((2, 3, 4, 4), torch.float32, seed=3))
    for r16 in rows:
        want, x0 = _step64(x, o, r16, noise=z)
        y, _, d = ms.multistep_ref(x, o, torch.tensor(ss.to_multistep_row(r16), dtype=torch.float64), noise=z)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d, x0, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="16 coefficients"):
        ss.to_multistep_row([0.0] * 15)
    with pytest.raises(ValueError, match="float64 tensor"):
        ss.to_multistep_row(torch.zeros(3, 16))


@requires_cpp
def test_torch_compile_fullgraph():
    x, o, oc, z = _inputs((2, 3, 4, 4), torch.float32, seed=2)
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, sigma=0.2, guidance_scale=3.0), dtype=torch.float64)

    def f(x, o, oc, z, c):
        return ss.sampler_step(x, o, c, o_cond=oc, noise=z, clip=True, backend="cpp")[0] * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, o, oc, z, c)
    torch.testing.assert_close(got, f(x, o, oc, z, c))


# ---- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_inputs_name_the_argument(backend):
    """The reference path ("torch") makes the fused ops' argument checks too."""
    x = torch.randn(2, 3)
    c = ss.step_coefs("ddim", 0.3, 0.6)
    with pytest.raises(TypeError, match="o has dtype"):
        ss.sampler_step(x, x.half(), c, backend=backend)
    with pytest.raises(TypeError, match="o_cond has dtype"):
        ss.sampler_step(x, x, c, o_cond=x.half(), backend=backend)
    with pytest.raises(ValueError, match="noise has shape"):
        ss.sampler_step(x, x, c, noise=torch.randn(2, 4), backend=backend)
    with pytest.raises(ValueError, match="v has shape"):
        ss.sampler_step(x, x, c, v=torch.randn(3, 3), var_mode="learned", backend=backend)
    with pytest.raises(ValueError, match="coef"):
        ss.sampler_step(x, x, c[:5], backend=backend)
    with pytest.raises(TypeError, match="x must be"):
        ss.sampler_step(x.double(), x.double(), c)
    with pytest.raises(ValueError, match="var_mode"):
        ss.sampler_step(x, x, c, var_mode="learned")
    with pytest.raises(ValueError, match="not both"):
        ss.sampler_step(x, x, c, noise=x, rng=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="thr"):
        ss.sampler_step(x, x, c, thr=torch.ones(3))
    with pytest.raises(RuntimeError, match="'cuda' needs CUDA tensors"):
        ss.sampler_step(x, x, c, backend="cuda")
    with pytest.raises(ValueError, match="prediction_type"):
        ss.step_coefs("ddim", 0.3, 0.6, prediction_type="eps")
    if HAS_CPP:
        op = torch.ops.fastdiff.multistep_step_  # what sampler_step runs
        row = torch.tensor(ss.to_multistep_row(c), dtype=torch.float64)
        with pytest.raises(RuntimeError, match="o has strides"):
            op(x, x.t().contiguous().t(), None, [], None, None, None, None, row, 0, torch.empty_like(x), None, None)
        with pytest.raises(RuntimeError, match="coef"):
            op(x, x, None, [], None, None, None, None, torch.tensor(c, dtype=torch.float64), 0, torch.empty_like(x),
               None, None)


# ---- sampler integration: fused loops == the reference loop --------------------------------------------------

class _Model(torch.nn.Module):
    """A small deterministic 'network': smooth in x and t, outputs of order 1 (a learned variance in [−1, 1])."""

    def __init__(self, learned=False, guided=False):
        super().__init__()
        self.learned, self.guided = learned, guided
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        tt = (t.float() / 1000).view(-1, *([1] * (x.dim() - 1)))
        o = torch.tanh(self.w * x + tt) + 0.1 * x
        if self.guided:  # doubled batch: the conditional half differs
            B = x.shape[0] // 2
            o = torch.cat([o[:B], o[B:] * 0.8 + 0.05])
        if self.learned:  # learned_range: v in [−1, 1]; learned: v is the variance itself (> 0)
            v = torch.sin(x + tt)
            o = torch.cat([o, v if self.learned == "learned_range" else 0.01 * (v + 1.5)], 1)
        return o.to(x.dtype)


LOOP_CASES = [  # (kind, options, eta/variance, guidance)
    ("ddim", dict(prediction_type="epsilon"), 0.0, None),
    ("ddim", dict(prediction_type="v_prediction", clip_sample=True), 1.0, None),
    ("ddim", dict(prediction_type="sample", use_clipped_model_output=True, clip_sample=True), 0.5, 3.0),
    ("ddim", dict(prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.9,
                  sample_max_value=1.5), 0.0, 2.0),
    ("ddpm", dict(prediction_type="epsilon", clip_sample=True), "fixed_small", None),
    ("ddpm", dict(prediction_type="v_prediction"), "fixed_large", 4.0),
    ("ddpm", dict(prediction_type="sample"), "learned_range", None),
    ("ddpm", dict(prediction_type="epsilon", clip_sample=True), "learned", 1.5),
]


class _DrawIn:
    """Noise source drawing each tensor in `dtype` from `g` (the values a loop in `dtype` draws), cast to the loop's
    dtype: a float64 loop then sees exactly the noise of the low-precision loop it is the reference for."""

    def __init__(self, g, dtype):
        self.g, self.dtype = g, dtype

    def draw(self, shape, device, dtype):
        return torch.randn(shape, generator=self.g, dtype=self.dtype).to(device, dtype)


def _loop(kind, opts, ev, w, backend, dtype, steps=6, noise="randn", shape=(2, 3, 5, 4), device="cpu",
          inputs_dtype=None):
    """A short sampling loop in `dtype`; with inputs_dtype, x_T, the model weight and every noise draw are those of
    a loop in inputs_dtype (rounded to it), so a float64 run is that loop's exact-arithmetic reference."""
    g = torch.Generator().manual_seed(5)
    src = inputs_dtype or dtype
    xT = torch.randn(shape, generator=g).to(device, src).to(dtype)
    learned = kind == "ddpm" and ev.startswith("learned") and ev
    model = _Model(learned=learned, guided=w is not None).to(device, src).to(dtype)
    gen = _DrawIn(g, src) if inputs_dtype is not None else g
    if kind == "ddim":
        return fastdiff.ddim_sample(model, steps, x_T=xT, eta=ev, generator=gen, backend=backend, guidance_scale=w,
                                    noise=noise, **opts)
    return fastdiff.ddpm_sample(model, steps=steps, x_T=xT, variance=ev, generator=gen, backend=backend,
                                guidance_scale=w, noise=noise, **opts)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp),
                                     pytest.param("triton", marks=requires_triton), CUDA])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(LOOP_CASES)))
def test_fused_loop_equals_reference_loop(backend, dtype, case):
    """6-step loops, noise drawn with the same generator in diffusers' order.
    fp32 / fp16: the fused loop vs the reference loop in the same dtype, |diff| <= tol·max|x|, tol = 2e-6 / 3e-3
    (measured worst over the 8 cases, C++ and Triton: 9.1e-7 / 1.5e-3).
    Every dtype, and the rule for bf16: against the float64 reference loop on the same inputs (x_T, weights and every
    noise draw rounded as in the bf16/fp16/fp32 loop), err <= 2·err(reference loop in the dtype) + slack·max|x|.
    Measured: err <= 2·err(reference) with no slack used in every case and dtype (C++; Triton fp32/fp16); slack is
    one rounding of the largest element: 1e-6 (fp32), 2^-11 (fp16), 2^-8 (bf16); Triton bf16 under the CPU
    interpreter, which truncates its bf16 stores (tests/_tol.py), 2^-6 (measured 8.6e-3).
    bf16 is not held to the same-dtype loop: the reference rounds the guided output and each step's terms to bf16
    where the fused step keeps them in fp32, so the two differ by up to ~6e-2 of max|x| depending on the draw
    (torch 2.11 and 2.13 draw different bf16 noise from one seed)."""
    kind, opts, ev, w = LOOP_CASES[case]
    dev = _dev(backend)
    got = _loop(kind, opts, ev, w, backend, dtype, device=dev)
    want = _loop(kind, opts, ev, w, "torch", dtype, device=dev)
    assert got.dtype == dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    if dtype != torch.bfloat16:
        err = (got.float() - want.float()).abs().max().item()
        assert err <= {torch.float32: 2e-6, torch.float16: 3e-3}[dtype] * scale, (err, scale)
    want64 = _loop(kind, opts, ev, w, "torch", torch.float64, device=dev, inputs_dtype=dtype)
    slack = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    if interpreted_triton_bf16(backend, dtype, dev):
        slack = 2.0**-6
    err, err_ref = (got.double() - want64).abs().max().item(), (want.double() - want64).abs().max().item()
    assert err <= 2 * err_ref + slack * scale, (err, err_ref, scale)


@requires_cpp
def test_auto_uses_the_fused_op_and_writes_x0_only_for_callbacks(monkeypatch):
    """The loop's first step goes through the checked entry (backend "cpp" under auto), every step runs the one fused
    op (fastdiff::multistep_step_: the raw op after the first), and x̂0 is written only when a callback asks for it."""
    from fastdiff.ops import multistep as ms

    calls, raw_calls = [], []
    real, real_resolve = ms.multistep_step, ms.resolve_op

    def spy(*a, **k):
        calls.append((k["backend"], k.get("d_out") is not None))
        return real(*a, **k)

    def spy_resolve(*a, **k):
        op = real_resolve(*a, **k)
        if op is ms._ref_op:  # the reference (float64 samples): not the fused op
            return op

        def raw(*args):
            raw_calls.append(args[-1] is not None)  # d_out
            return op(*args)
        return raw

    monkeypatch.setattr(ms, "multistep_step", spy)
    monkeypatch.setattr(ms, "resolve_op", spy_resolve)
    xT = torch.randn(2, 3, 4, 4)
    fastdiff.ddim_sample(_Model(), 3, x_T=xT)
    assert calls == [("cpp", False)] and raw_calls == [False] * 3  # the checked entry runs the same op
    calls.clear()
    raw_calls.clear()
    seen = []
    fastdiff.ddim_sample(_Model(), 3, x_T=xT, callback=lambda d: seen.append(d["x0"]))
    assert calls == [("cpp", True)] and raw_calls == [True] * 3
    assert len(seen) == 3 and all(s is not None and s.shape == xT.shape for s in seen)
    calls.clear()
    raw_calls.clear()
    fastdiff.ddim_sample(_Model(), 3, x_T=xT.double())  # float64 runs the reference in float64
    assert calls == [] and raw_calls == []


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp),
                                     pytest.param("triton", marks=requires_triton), CUDA])
def test_philox_noise_loop(backend):
    """noise='philox': the same seed → the same sample on every fused backend as on the reference (which draws
    philox_randn_ref); a different generator seed → a different sample."""
    kind, opts, ev, w = LOOP_CASES[4]
    dev = _dev(backend)
    a = _loop(kind, opts, ev, w, backend, torch.float32, noise="philox", device=dev)
    b = _loop(kind, opts, ev, w, "torch", torch.float32, noise="philox", device=dev)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 if dev == "cpu" else 5e-5)
    c = _loop(kind, opts, ev, w, backend, torch.float32, noise="randn", device=dev)
    assert (a - c).abs().max() > 1e-2


def test_sampler_backend_errors():
    with pytest.raises(RuntimeError, match="'cuda' needs CUDA tensors"):
        fastdiff.ddim_sample(_Model(), 2, x_T=torch.randn(1, 2, 3, 3), backend="cuda")
    if HAS_CPP:
        with pytest.raises(RuntimeError, match="float64"):
            fastdiff.ddim_sample(_Model(), 2, x_T=torch.randn(1, 2, 3, 3, dtype=torch.float64), backend="cpp")
    with pytest.raises(ValueError, match="noise must be"):
        fastdiff.ddim_sample(_Model(), 2, x_T=torch.randn(1, 2, 3, 3), noise="uniform")


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_baseline_copy_equals_avx2_copy(monkeypatch, dtype):
    """The CPU kernel has a baseline x86-64 copy and an AVX2/FMA/F16C copy picked at run time; both agree (to FMA
    contraction) with each other and with the reference, on the linear fast path and the general one."""
    x, o, oc, z = _inputs((3, 4, 5, 37), dtype, seed=4)
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, prediction_type="v_prediction", sigma=0.2), dtype=torch.float64)
    runs = {}
    for isa in ("0", "1"):
        monkeypatch.setenv("FASTDIFF_CPU_ISA", "base" if isa == "1" else "auto")
        runs[isa] = [ss.sampler_step(x, o, c, noise=z, backend="cpp")[0],
                     ss.sampler_step(x, o, c, o_cond=oc, noise=z, clip=True, write_x0=True, backend="cpp")[0]]
    want = [ss.sampler_step_ref(x, o, c, noise=z)[0], ss.sampler_step_ref(x, o, c, o_cond=oc, noise=z, clip=True)[0]]
    tol = dict(rtol=0, atol={torch.float32: 1e-5}.get(dtype, 2 * ATOL[dtype] * 8))
    for a, b, w in zip(runs["0"], runs["1"], want):
        torch.testing.assert_close(a.float(), b.float(), **tol)
        torch.testing.assert_close(a.float(), w.float(), **tol)


@requires_triton
def test_triton_op_under_torch_compile():
    dev = _dev("triton")
    x, o, _, z = _inputs((2, 3, 4, 4), torch.float32, seed=2, device=dev)
    c = torch.tensor(ss.step_coefs("ddpm", 0.3, 0.6, sigma=0.2), dtype=torch.float64, device=dev)
    f = lambda x, o, z, c: ss.sampler_step(x, o, c, noise=z, backend="triton")[0] + 1  # noqa: E731
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, o, z, c)
    torch.testing.assert_close(got, f(x, o, z, c))
