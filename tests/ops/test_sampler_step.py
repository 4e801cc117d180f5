"""fastdiff.ops.sampler_step: the fused step on every backend against the reference step functions.

Tolerances (flash-attention style): the fused result and the reference run in the same I/O dtype are both compared
with a float64 reference; err(fused) <= 2·err(reference, same dtype) + atol·scale, with atol = 2e-6 (fp32),
1e-3 (fp16), 8e-3 (bf16) and scale = max|x_prev|. Both compute in float32, so the gap is float32 rounding of the
reordered arithmetic (the fused step folds the step into p, q, r, s, u, A, B, C scalars).
"""
import math

import pytest
import torch

import fastdiff
from fastdiff._backend import backends, has_cuda_kernels
from fastdiff.ops import sampler_step as ss
from tests.conftest import requires_triton

HAS_CPP = backends()["cpp"]["available"]
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdiff._C not built")
requires_cuda_kernels = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda_kernels(), reason="CUDA kernels not built")]
CUDA = pytest.param("cuda", marks=requires_cuda_kernels)
BACKENDS = [pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton), "torch", CUDA]
HAS_CUDA = torch.cuda.is_available()


def _dev(backend):
    """Where a backend's test tensors live: CUDA for "cuda", and for "triton" when a GPU is present (else the
    interpreter runs it on the CPU)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
PREDS = ["epsilon", "sample", "v_prediction"]
SHAPE = (3, 5, 7, 3)  # odd sizes, batch 3


def _inputs(shape, dtype, seed=0, n=4, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(n)]


def _check(got, want_same_dtype, want64, dtype):
    """err(got) <= 2·err(reference in the same dtype) + atol·scale, both against the float64 reference."""
    scale = want64.abs().max().item() + 1e-6
    err = (got.double() - want64).abs().max().item()
    err_ref = (want_same_dtype.double() - want64).abs().max().item()
    assert err <= 2 * err_ref + ATOL[dtype] * scale, f"err {err:.3g}, reference's own {err_ref:.3g}, scale {scale:.3g}"


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("pred", PREDS)
def test_parity_matrix(backend, dtype, kind, pred):
    """Every backend × dtype × DDIM/DDPM × prediction type × clip × CFG × three (ᾱ_t, ᾱ_p) against the reference."""
    x, o, o_c, z = _inputs(SHAPE, dtype, seed=PREDS.index(pred) * 2 + (kind == "ddpm"), device=_dev(backend))
    for clip in (False, True):
        for cfg in (False, True):
            for j, (at, ap) in enumerate(STEPS):
                if pred == "sample" and at > 0.99:
                    continue  # ε̂ = (x − √ᾱ·x̂0)/√(1−ᾱ) is ill-conditioned at ᾱ_t → 1 (in the reference too)
                eta = 0.5
                kw = dict(eta=eta) if kind == "ddim" else {}
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
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
    # dynamic thresholding: the per-sample scale from threshold_scale, then the fused pass
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, sigma=ss.ddim_sigma(0.3, 0.6, 0.5)), dtype=d, device=dev)
    thr = ss.threshold_scale(x, o, c, ratio=0.9, max_value=2.0)
    got, _ = ss.sampler_step(x, o, c, noise=z, thr=thr, backend=backend)
    kw = dict(eta=0.5, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    want, _ = ss.ddim_step_ref(x, o, 0.3, 0.6, noise=z, **kw)
    want64, _ = ss.ddim_step_ref(x.to(d), o.to(d), 0.3, 0.6, noise=z.to(d), **kw)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_odd_shapes(backend):
    dev = _dev(backend)
    c = ss.step_coefs("ddim", 0.4, 0.8, prediction_type="v_prediction", sigma=0.1)
    for shape in [(1,), (5, 1), (1, 1, 1, 1), (3, 7, 2, 5, 3), (2, 3, 33, 31)]:
        x, o, _, z = _inputs(shape, torch.float32, seed=len(shape), device=dev)
        got, x0 = ss.sampler_step(x, o, c, noise=z, write_x0=True, backend=backend)
        want, x0w = ss.sampler_step_ref(x, o, c, noise=z, write_x0=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x0, x0w, rtol=1e-5, atol=1e-6)
    x, o, _, z = _inputs((2, 3, 6, 5), torch.float16, seed=9, device=dev)
    want, _ = ss.sampler_step_ref(x, o, c, noise=z)
    # channels_last everywhere: runs in place and keeps the layout
    xl, ol, zl = (t.contiguous(memory_format=torch.channels_last) for t in (x, o, z))
    got, _ = ss.sampler_step(xl, ol, c, noise=zl, backend=backend)
    if backend != "torch":
        assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # mixed layouts and a non-dense x (a transposed slice): documented copies, same values
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, :]
    got, _ = ss.sampler_step(xt[:, :, ::1], ol, c, noise=z, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    big = torch.randn(2, 3, 12, 5, dtype=torch.float16, device=dev)
    xs = big[:, :, ::2]  # non-dense
    got, _ = ss.sampler_step(xs, o, c, noise=z, backend=backend)
    torch.testing.assert_close(got, ss.sampler_step_ref(xs, o, c, noise=z)[0], rtol=1e-3, atol=1e-3)
    # empty batch
    e = torch.empty(0, 3, device=dev)
    assert ss.sampler_step(e, e, c, backend=backend)[0].shape == (0, 3)


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

def _op_args(dtype=torch.float32, device="cpu", **kw):
    x, o, oc, z = _inputs((2, 3, 5, 4), dtype, seed=1, device=device)
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, sigma=0.2), dtype=torch.float64, device=device)
    return (x, o, kw.get("oc", oc), kw.get("z", z), kw.get("rng"), None, kw.get("thr"), c, kw.get("flags", 1),
            kw.get("x0", True))


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp),
                                     pytest.param("triton", marks=requires_triton), CUDA])
def test_opcheck(backend):
    dev = _dev(backend)
    op = torch.ops.fastdiff.sampler_step_triton if backend == "triton" else torch.ops.fastdiff.sampler_step
    torch.library.opcheck(op, _op_args(device=dev))
    torch.library.opcheck(op, _op_args(torch.bfloat16, dev, z=None, rng=torch.tensor([3, 4], device=dev), x0=False,
                                       thr=torch.tensor([1.5, 1.0], device=dev)))


@requires_cpp
def test_torch_compile_fullgraph():
    x, o, oc, z = _inputs((2, 3, 4, 4), torch.float32, seed=2)
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, sigma=0.2, guidance_scale=3.0), dtype=torch.float64)

    def f(x, o, oc, z, c):
        return ss.sampler_step(x, o, c, o_cond=oc, noise=z, clip=True, backend="cpp")[0] * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, o, oc, z, c)
    torch.testing.assert_close(got, f(x, o, oc, z, c))


# ---- errors --------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3)
    c = ss.step_coefs("ddim", 0.3, 0.6)
    with pytest.raises(TypeError, match="o has dtype"):
        ss.sampler_step(x, x.half(), c, backend="auto")
    with pytest.raises(ValueError, match="noise has shape"):
        ss.sampler_step(x, x, c, noise=torch.randn(2, 4), backend="auto")
    with pytest.raises(ValueError, match="coef"):
        ss.sampler_step(x, x, c[:5], backend="auto")
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
        with pytest.raises(RuntimeError, match="o has strides"):
            torch.ops.fastdiff.sampler_step(x, x.t().contiguous().t(), None, None, None, None, None,
                                            torch.tensor(c, dtype=torch.float64), 0, False)
        with pytest.raises(RuntimeError, match="coef"):
            torch.ops.fastdiff.sampler_step(x, x, None, None, None, None, None, torch.zeros(3), 0, False)


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(LOOP_CASES)))
def test_fused_loop_equals_reference_loop(backend, dtype, case):
    """6-step loops, noise drawn with the same generator in diffusers' order.
    fp32 / fp16: the fused loop vs the reference loop in the same dtype, |diff| <= tol·max|x|, tol = 5e-6 / 4e-3.
    Every dtype, and the rule for bf16: against the float64 reference loop on the same inputs (x_T, weights and every
    noise draw rounded as in the bf16/fp16/fp32 loop), err <= 2·err(reference loop in the dtype) + 4·atol·max|x|
    (STYLE.md). bf16 is not held to the same-dtype loop: the reference rounds the guided output and each step's terms
    to bf16 where the fused step keeps them in fp32, so the two differ by up to ~6e-2 of max|x| depending on the draw
    (torch 2.11 and 2.13 draw different bf16 noise from one seed)."""
    kind, opts, ev, w = LOOP_CASES[case]
    dev = _dev(backend)
    got = _loop(kind, opts, ev, w, backend, dtype, device=dev)
    want = _loop(kind, opts, ev, w, "torch", dtype, device=dev)
    assert got.dtype == dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    if dtype != torch.bfloat16:
        err = (got.float() - want.float()).abs().max().item()
        assert err <= {torch.float32: 5e-6, torch.float16: 4e-3}[dtype] * scale, (err, scale)
    want64 = _loop(kind, opts, ev, w, "torch", torch.float64, device=dev, inputs_dtype=dtype)
    err, err_ref = (got.double() - want64).abs().max().item(), (want.double() - want64).abs().max().item()
    assert err <= 2 * err_ref + 4 * ATOL[dtype] * scale, (err, err_ref, scale)


@requires_cpp
def test_auto_uses_the_fused_op_and_writes_x0_only_for_callbacks(monkeypatch):
    calls = []
    real = ss.sampler_step

    def spy(*a, **k):
        calls.append((k["backend"], k["write_x0"]))
        return real(*a, **k)

    monkeypatch.setattr(ss, "sampler_step", spy)
    xT = torch.randn(2, 3, 4, 4)
    fastdiff.ddim_sample(_Model(), 3, x_T=xT)
    assert calls == [("cpp", False)] * 3
    calls.clear()
    seen = []
    fastdiff.ddim_sample(_Model(), 3, x_T=xT, callback=lambda d: seen.append(d["x0"]))
    assert calls == [("cpp", True)] * 3 and all(s is not None and s.shape == xT.shape for s in seen)
    calls.clear()
    fastdiff.ddim_sample(_Model(), 3, x_T=xT.double())  # float64 runs the reference in float64
    assert calls == []


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp),
                                     pytest.param("triton", marks=requires_triton), "torch", CUDA])
def test_philox_noise_loop(backend):
    """noise='philox': the same seed → the same sample on every backend (the reference draws philox_randn_ref);
    a different generator seed → a different sample."""
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
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_baseline_copy_equals_avx2_copy(monkeypatch, dtype):
    """The CPU kernel has a baseline x86-64 copy and an AVX2/FMA/F16C copy picked at run time; both agree (to FMA
    contraction) with each other and with the reference, on the linear fast path and the general one."""
    x, o, oc, z = _inputs((3, 4, 5, 37), dtype, seed=4)
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, prediction_type="v_prediction", sigma=0.2), dtype=torch.float64)
    runs = {}
    for isa in ("0", "1"):
        monkeypatch.setenv("FASTDIFF_CPU_NO_AVX2", isa)
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
