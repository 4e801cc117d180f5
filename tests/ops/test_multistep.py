"""fastdiff.ops.multistep: the fused solver update on every backend against a float64 formula written here.

Tolerances: the float64 formula runs on the same (already rounded) inputs with the coefficients rounded to float32
(as the kernels round them). The reference ("torch") in float32 must be within 16 float32 roundings of the largest
sum of |terms|; every backend in every dtype within 2·err(reference in that dtype) + atol·scale (PyTorch's own error in
the dtype, plus about one rounding); and in fp16/bf16 a fused backend must equal its own float32 run rounded once
(bit for bit: the kernels compute in float32 and round once on the way out).
"""
import itertools
import random

import pytest
import torch

from fastdiff._backend import backends, has_cuda_kernels
from fastdiff.ops import multistep as ms
from fastdiff.ops import sampler_step as ss
from tests.conftest import requires_triton

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CPP = backends()["cpp"]["available"]
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdiff._C not built")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not has_cuda_kernels(),
                                                                         reason="CUDA kernels not built")])
CPP = pytest.param("cpp", marks=requires_cpp)
TRITON = pytest.param("triton", marks=requires_triton)
BACKENDS = ["torch", CPP, TRITON, CUDA]
FUSED = [CPP, TRITON, CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
EPS32 = 2.0 ** -23
HAS_CUDA = torch.cuda.is_available()


def _dev(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


# ---- the float64 formula -------------------------------------------------------------------------------------

def _sigma64(v, c, var_mode):
    """The z term's σ per element in float64 (the formula of multistep's docstring, written out here)."""
    v = v.double()
    if var_mode == "learned":
        return v.sqrt()
    f = (v + 1) / 2
    return (0.5 * (f * c["logmax"] + (1 - f) * c["logmin"])).exp()


def _formula64(x, o, coef, *, o_cond=None, hist=(), z=None, thr=None, clip=False, v=None, var_mode="scalar"):
    """(y, y2, d, scale) in float64 from the module docstring's formula; scale = max over elements of the sum of
    |terms| of y and y2 (the size float32 rounding is relative to)."""
    c32 = torch.as_tensor(coef, dtype=torch.float64).cpu().float()
    c = {k: c32[i].item() for k, i in ms.COEF.items()}
    x, o = x.double(), o.double()
    if o_cond is not None:
        o = o + c["w"] * (o_cond.double() - o)
    d = c["p"] * x + c["q"] * o
    mag_d = (c["p"] * x).abs() + (c["q"] * o).abs()
    if clip:
        d = d.clamp(-c["clip"], c["clip"])
    if thr is not None:
        s = thr.double().view(-1, *([1] * (x.dim() - 1)))
        d = torch.minimum(torch.maximum(d, -s), s) / s
        mag_d = mag_d / s
    hs = [h.double() for h in hist]
    y = c["yx"] * x + c["yo"] * o + c["yd"] * d
    y2 = c["y2x"] * x + c["y2o"] * o + c["y2d"] * d
    mag = (c["yx"] * x).abs() + (c["yo"] * o).abs() + abs(c["yd"]) * mag_d
    mag2 = (c["y2x"] * x).abs() + (c["y2o"] * o).abs() + abs(c["y2d"]) * mag_d
    for i, h in enumerate(hs):
        y = y + c[f"yh{i}"] * h
        y2 = y2 + c[f"y2h{i}"] * h
        mag, mag2 = mag + (c[f"yh{i}"] * h).abs(), mag2 + (c[f"y2h{i}"] * h).abs()
    if z is not None:
        sigma = c["yz"] if var_mode == "scalar" else _sigma64(v, c, var_mode)
        y = y + sigma * z.double()
        mag = mag + (sigma * z.double()).abs()
    scale = max(mag.max().item(), mag2.max().item(), mag_d.max().item()) if x.numel() else 1.0
    return y, y2, d, scale


def _coefs(rng: random.Random):
    """A random coefficient row of the sizes solvers use (x̂0 coefficients ~1, history weights of either sign)."""
    vals = dict(p=rng.uniform(0.5, 2.0), q=-rng.uniform(0.2, 1.5), w=rng.uniform(1.0, 7.5), clip=1.5,
                yx=rng.uniform(0.3, 1.2), yo=rng.uniform(-0.5, 0.5), yd=rng.uniform(-1.0, 1.5),
                yz=rng.uniform(0.05, 0.9), y2x=rng.uniform(0.3, 1.2), y2o=rng.uniform(-0.5, 0.5),
                y2d=rng.uniform(-1.0, 1.5))
    for i in range(ms.MAX_HIST):
        vals[f"yh{i}"] = rng.uniform(-1.0, 1.0)
        vals[f"y2h{i}"] = rng.uniform(-1.0, 1.0)
    return ms.coef_row(**vals)


# Cases: every number of history tensors with every noise source; out2, d_out, CFG, clip, thresholding and
# channels_last take both values across the list (bits of a multiplicative pattern; checked below).
_FLAGS = ("out2", "d_out", "cfg", "clip", "thr", "cl")
CASES = []
for _i, (_nh, _noise) in enumerate(itertools.product(range(ms.MAX_HIST + 1), ("none", "tensor", "philox"))):
    for _j in range(2):
        _bits = (_i * 2 + _j) * 23 + 5
        CASES.append(dict(nh=_nh, noise=_noise, **{f: bool(_bits >> k & 1) for k, f in enumerate(_FLAGS)}))
# Triton under the interpreter: fewer cases (each is a kernel specialization that scripts/triton_aot_check.py compiles)
TRITON_CASES = [CASES[i] for i in (1, 6, 11, 16, 21, 26, 29)]


def test_cases_cover_every_option():
    for cases in (CASES, TRITON_CASES):
        assert {c["nh"] for c in cases} == set(range(ms.MAX_HIST + 1))
        assert {c["noise"] for c in cases} == {"none", "tensor", "philox"}
        for f in _FLAGS:
            assert {c[f] for c in cases} == {False, True}, f


def _make(case, dtype, device, shape=(3, 5, 7, 3), seed=0):
    """Inputs of one case: tensors rounded to dtype, and the kwargs of multistep_step."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if case["cl"] and len(shape) == 4 else torch.contiguous_format

    def t(scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device, dtype).contiguous(memory_format=fmt)

    x, o = t(1.5), t(1.5)  # |d| up to ~8: clipping and thresholding bite
    kw = dict(o_cond=t(1.5) if case["cfg"] else None, hist=[t() for _ in range(case["nh"])], clip=case["clip"])
    if case["noise"] == "tensor":
        kw["noise"] = t()
    elif case["noise"] == "philox":
        kw["rng"] = torch.tensor([0x5EED + seed, 2**32 - 100], device=device)  # counters cross 2^32
    if case["thr"]:  # different per-sample thresholds, none of them 1 (the clamp bites on every sample)
        kw["thr"] = torch.tensor([1.3, 2.1, 1.7, 1.1, 2.5][: shape[0]] * (shape[0] // 5 + 1), device=device)[: shape[0]]
    coef = torch.tensor(_coefs(random.Random(seed)), dtype=torch.float64, device=device)
    return x, o, coef, kw


def _run(backend, x, o, coef, kw, case):
    out2 = torch.empty_like(x) if case["out2"] else None
    d_out = torch.empty_like(x) if case["d_out"] else None
    return ms.multistep_step(x, o, coef, out2=out2, d_out=d_out, backend=backend, **kw)


def _z_of(x, kw):
    if "rng" in kw:
        return ss._philox_like(x, kw["rng"])
    return kw.get("noise")


def _case_ids(cases):
    return [f"h{c['nh']}-{c['noise']}-" + "".join(f[0] if c[f] else "_" for f in _FLAGS) for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_case_ids(CASES))
def test_reference_against_float64_formula(case):
    """The plain-PyTorch reference in float32 against the float64 formula, and its outputs' presence rules."""
    x, o, coef, kw = _make(case, torch.float32, "cpu")
    y, y2, d = ms.multistep_ref(x, o, coef, want_out2=case["out2"], **kw)
    w, w2, wd, scale = _formula64(x, o, coef, z=_z_of(x, kw), **{k: v for k, v in kw.items()
                                                                  if k not in ("noise", "rng")})
    tol = 16 * EPS32 * scale
    for got, want in ((y, w), (d, wd)) + (((y2, w2),) if case["out2"] else ()):
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert (got.double() - want).abs().max().item() <= tol
    assert (y2 is None) == (not case["out2"])
    # a wrong coefficient offset is far outside the tolerance (the test can fail)
    bad = coef.clone()
    bad[ms.COEF["yh0"] if case["nh"] else ms.COEF["yx"]] += 0.25
    yb, _, _ = ms.multistep_ref(x, o, bad, **kw)
    assert (yb.double() - w).abs().max().item() > 100 * tol


def _cases_for(backend):
    return TRITON_CASES if backend == "triton" else CASES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_backend_matrix(backend, dtype):
    """Every case on every backend × dtype: within 2·err(reference in the dtype) + atol·scale of the float64 formula;
    out2 / d_out written exactly when given; fp16/bf16 results == the backend's float32 run rounded once."""
    dev = _dev(backend)
    for n, case in enumerate(_cases_for(backend)):
        x, o, coef, kw = _make(case, dtype, dev, seed=n)
        out, out2, d_out = _run(backend, x, o, coef, kw, case)
        assert (out2 is None) == (not case["out2"]) and (d_out is None) == (not case["d_out"])
        ry, ry2, rd = ms.multistep_ref(x, o, coef, want_out2=True, **kw)
        w, w2, wd, scale = _formula64(x.cpu(), o.cpu(), coef.cpu(), z=None if _z_of(x, kw) is None else
                                      _z_of(x, kw).cpu(),
                                      **{k: ([h.cpu() for h in v] if k == "hist" else
                                             (v.cpu() if torch.is_tensor(v) else v))
                                         for k, v in kw.items() if k not in ("noise", "rng")})
        pairs = [(out, ry, w, "out")]
        pairs += [(out2, ry2, w2, "out2")] if case["out2"] else []
        pairs += [(d_out, rd, wd, "d_out")] if case["d_out"] else []
        for got, ref, want, what in pairs:
            assert got.dtype == dtype and got.shape == x.shape and got.stride() == x.stride(), what
            err = (got.cpu().double() - want).abs().max().item()
            err_ref = (ref.cpu().double() - want).abs().max().item()
            bound = 2 * err_ref + ATOL[dtype] * scale
            assert err <= bound, (case, what, err, err_ref, scale)
        # the same backend on the float32 values, rounded once == bit for bit. Not for Triton's CPU interpreter in
        # bf16: its float32 -> bf16 cast truncates (-0.7989 -> -0.7969, where a GPU and torch round to -0.8008)
        if dtype != torch.float32 and not (backend == "triton" and dtype == torch.bfloat16 and dev == "cpu"):
            kw32 = {k: ([h.float() for h in v] if k == "hist" else
                        (v.float() if torch.is_tensor(v) and v.dtype == dtype else v)) for k, v in kw.items()}
            f = _run(backend, x.float(), o.float(), coef, kw32, case)
            for got, want in zip((out, out2, d_out), f):
                if got is not None:
                    assert torch.equal(got, want.to(dtype)), case


def shifted(t):
    """The same values at storage offset 1 (one element past an aligned address)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buf[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("var", [False, True], ids=["scalar", "learned_range"])
def test_sizes_and_misaligned_pointers(backend, var):
    """Sizes around the vector width and the CPU tile (512), thresholds straddling tiles, and every tensor starting
    one element past an aligned address (CUDA: the scalar path; CPU: unaligned loads); with var, v (learned_range)
    and a float32 d_out too."""
    dev = _dev(backend)
    case = dict(nh=2, noise="tensor", out2=True, d_out=True, cfg=True, clip=True, thr=True, cl=False)
    shapes = [(1,), (2, 3), (3, 5, 7), (2, 1, 17, 31)] + ([(3, 7, 11, 13)] if backend != "triton" else [])
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x, o, coef, kw = _make(case, dtype, dev, shape=shape, seed=len(shape))
            if var:
                coef[ms.COEF["logmax"]], coef[ms.COEF["logmin"]] = -2.0, -4.0
                kw.update(v=_v_like(x, "learned_range", seed=len(shape)), var_mode="learned_range")
            d_dtype = torch.float32 if var else dtype
            want = ms.multistep_step(x, o, coef, out2=torch.empty_like(x), d_out=torch.empty_like(x, dtype=d_dtype),
                                     backend="torch", **kw)
            outs = [shifted(torch.zeros_like(x)), shifted(torch.zeros_like(x)),
                    shifted(torch.zeros_like(x, dtype=d_dtype))]
            kw_s = dict(kw, o_cond=shifted(kw["o_cond"]), hist=[shifted(h) for h in kw["hist"]],
                        noise=shifted(kw["noise"]), **({"v": shifted(kw["v"])} if var else {}))
            got = ms.multistep_step(shifted(x), shifted(o), coef, out=outs[0], out2=outs[1], d_out=outs[2],
                                    backend=backend, **kw_s)
            assert all(g is t for g, t in zip(got, outs))
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **(tol if g.dtype == dtype else dict(rtol=1e-5, atol=1e-5)))


@requires_cpp
def test_cpp_threads_and_isa_copies(monkeypatch):
    """Two threads over many tiles, and the baseline x86-64 copy against the AVX2 one: equal up to FMA contraction."""
    case = dict(nh=3, noise="philox", out2=True, d_out=True, cfg=True, clip=False, thr=True, cl=True)
    x, o, coef, kw = _make(case, torch.float16, "cpu", shape=(3, 8, 40, 37), seed=3)
    want = _run("torch", x, o, coef, kw, case)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = {}
        for isa in ("0", "1"):
            monkeypatch.setenv("FASTDIFF_CPU_ISA", "base" if isa == "1" else "auto")
            runs[isa] = _run("cpp", x, o, coef, kw, case)
    finally:
        torch.set_num_threads(n)
    for a, b, w in zip(runs["0"], runs["1"], want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(a, w, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_layouts_are_copied(backend):
    """Inputs laid out unlike x are copied to x's layout (same values); a non-dense x runs as contiguous."""
    dev = _dev(backend)
    case = dict(nh=1, noise="none", out2=False, d_out=True, cfg=False, clip=False, thr=False, cl=True)
    x, o, coef, kw = _make(case, torch.float32, dev, shape=(2, 3, 4, 5))
    want = _run("torch", x, o, coef, kw, case)
    got = ms.multistep_step(x, o.contiguous(), coef, hist=[kw["hist"][0].contiguous()], d_out=torch.empty_like(x),
                            backend=backend)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    big = torch.randn(2, 3, 8, 5, device=dev)
    xs = big[:, :, ::2]  # non-dense
    got, _, _ = ms.multistep_step(xs, o, coef, backend=backend)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ms.multistep_ref(xs, o, coef)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_is_sampler_steps_generator(backend):
    """z from rng = [seed, offset]: element i in memory order is philox_randn_ref(seed, offset + i), also for
    channels_last (the generator of fastdiff.ops.sampler_step)."""
    dev = _dev(backend)
    atol = 2e-6 if dev == "cpu" else 1e-5
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.zeros(2, 3, 4, 5, device=dev).contiguous(memory_format=fmt)
        coef = torch.tensor(ms.coef_row(yz=1.0), dtype=torch.float64, device=dev)
        seed, off = 0x1234_5678_9ABC, 2**32 - 50
        y, _, _ = ms.multistep_step(x, x.clone(), coef, rng=torch.tensor([seed, off], device=dev), backend=backend)
        mem = y.permute(0, 2, 3, 1) if fmt == torch.channels_last else y
        torch.testing.assert_close(mem.reshape(-1).cpu(), ss.philox_randn_ref(seed, off, x.numel()), rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_and_resolve_op(backend):
    """check=False (and the raw op from resolve_op) gives the checked call's results."""
    dev = _dev(backend)
    case = dict(nh=2, noise="tensor", out2=True, d_out=True, cfg=True, clip=True, thr=False, cl=False)
    x, o, coef, kw = _make(case, torch.float32, dev, shape=(2, 3, 4, 4))
    want = _run(backend, x, o, coef, kw, case)
    bufs = [torch.empty_like(x) for _ in range(3)]
    got = ms.multistep_step(x, o, coef, out=bufs[0], out2=bufs[1], d_out=bufs[2], backend=backend, check=False, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    op = ms.resolve_op(backend, x.device)
    assert op is ms.resolve_op(backend, x.device)
    bufs = [torch.empty_like(x) for _ in range(3)]
    op(x, o, kw["o_cond"], kw["hist"], kw["noise"], None, None, None, coef, ms.FLAG_CLIP, *bufs)
    for g, w in zip(bufs, want):
        assert torch.equal(g, w)


def test_threshold_scale():
    """The per-sample quantile of |d| (before clipping, CFG applied), clamped to [1, max_value], from the coefficient
    tensor: equal to torch.quantile on the float64 formula's d."""
    case = dict(nh=0, noise="none", out2=False, d_out=False, cfg=True, clip=False, thr=False, cl=False)
    x, o, coef, kw = _make(case, torch.float32, "cpu", shape=(4, 3, 8, 8))
    for t in (x, o, kw["o_cond"]):
        t[0] *= 0.01  # one sample below 1: clamped up to 1
    x[3] *= 10  # one above max_value: clamped down
    s = ms.threshold_scale(x, o, coef, o_cond=kw["o_cond"], ratio=0.9, max_value=25.0)
    _, _, d, _ = _formula64(x, o, coef, o_cond=kw["o_cond"])
    want = torch.quantile(d.reshape(4, -1).abs(), 0.9, dim=1).clamp(1.0, 25.0)
    assert s.dtype == torch.float32 and s.shape == (4,)
    torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=1e-6)
    assert s[0] == 1.0 and s[3] == 25.0 and (s[1:3] > 1.0).all() and (s[1:3] < 25.0).all()
    # used as thr: the fused update thresholds with it
    got, _, dd = ms.multistep_step(x, o, coef, o_cond=kw["o_cond"], thr=s, d_out=torch.empty_like(x))
    assert (dd.abs() <= 1.0 + 1e-6).all()


# ---- learned variances and the float32 d output (DDPM's learned σ, x̂0 kept in float32) -----------------------

def _v_like(x, var_mode, seed=0):
    """A variance output like x: v ∈ [1e-3, 5e-2] for "learned" (σ = √v), v ∈ [−1, 1] for "learned_range"."""
    g = torch.Generator().manual_seed(100 + seed)
    u = torch.rand(x.shape, generator=g)
    v = 1e-3 + 4.9e-2 * u if var_mode == "learned" else 2 * u - 1
    return v.to(x.device, x.dtype).contiguous(memory_format=torch.channels_last if x.dim() == 4 and not
                                              x.is_contiguous() else torch.contiguous_format)


VAR_CASES = [dict(nh=0, noise="tensor", out2=False, d_out=True, cfg=False, clip=False, thr=False, cl=False),
             dict(nh=1, noise="philox", out2=True, d_out=True, cfg=True, clip=True, thr=False, cl=True),
             dict(nh=2, noise="tensor", out2=False, d_out=True, cfg=True, clip=False, thr=True, cl=False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("var_mode", ["learned", "learned_range"])
def test_learned_variance_and_float32_d(backend, dtype, var_mode):
    """σ of the z term per element from v, on every backend × dtype: within 2·err(reference in the dtype) +
    atol·scale of the float64 formula; d_out in float32 holds d unrounded (the float64 formula's d within float32
    accuracy, equal bit for bit to the same backend's float32 run); fp16/bf16 outputs == the float32 run rounded
    once. A scalar σ (yz) in place of σ(v) is far outside the bound (the test can fail)."""
    dev = _dev(backend)
    for n, case in enumerate(VAR_CASES):
        x, o, coef, kw = _make(case, dtype, dev, seed=n)
        coef[ms.COEF["logmax"]] = -3.9 + 0.3 * n  # log β', log β̃ of a DDPM step (β' > β̃)
        coef[ms.COEF["logmin"]] = -5.2 - 0.2 * n
        v = _v_like(x, var_mode, seed=n)
        out2 = torch.empty_like(x) if case["out2"] else None
        d32 = torch.empty_like(x, dtype=torch.float32)
        out, _, d_out = ms.multistep_step(x, o, coef, v=v, var_mode=var_mode, out2=out2, d_out=d32,
                                          backend=backend, **kw)
        assert d_out is d32 and d32.stride() == x.stride()
        ry, _, rd = ms.multistep_ref(x, o, coef, v=v, var_mode=var_mode, **kw)
        _, _, rd32 = ms.multistep_ref(x, o, coef, v=v, var_mode=var_mode, d_dtype=torch.float32, **kw)
        z = _z_of(x, kw)
        args64 = {k: ([h.cpu() for h in val] if k == "hist" else (val.cpu() if torch.is_tensor(val) else val))
                  for k, val in kw.items() if k not in ("noise", "rng")}
        w, _, wd, scale = _formula64(x.cpu(), o.cpu(), coef.cpu(), z=z.cpu(), v=v.cpu(), var_mode=var_mode,
                                     **args64)
        err = (out.cpu().double() - w).abs().max().item()
        err_ref = (ry.cpu().double() - w).abs().max().item()
        assert err <= 2 * err_ref + ATOL[dtype] * scale, (case, "out", err, err_ref, scale)
        err_d = (d32.cpu().double() - wd).abs().max().item()
        err_d_ref = (rd32.cpu().double() - wd).abs().max().item()
        assert err_d <= 2 * err_d_ref + ATOL[torch.float32] * scale, (case, "d_out", err_d, err_d_ref)
        assert torch.equal(rd32.to(dtype), rd)  # the float32 d rounds to the x-dtype d
        if dtype == torch.float32:  # σ = yz: a different update, far outside the float32 bound
            ws, _, _, _ = _formula64(x.cpu(), o.cpu(), coef.cpu(), z=z.cpu(), **args64)
            assert (ws - w).abs().max().item() > 100 * (2 * err_ref + ATOL[dtype] * scale)
        if dtype != torch.float32:
            kw32 = {k: ([h.float() for h in val] if k == "hist" else
                        (val.float() if torch.is_tensor(val) and val.dtype == dtype else val)) for k, val in kw.items()}
            f32 = ms.multistep_step(x.float(), o.float(), coef, v=v.float(), var_mode=var_mode,
                                    out2=torch.empty_like(x, dtype=torch.float32) if case["out2"] else None,
                                    d_out=torch.empty_like(x, dtype=torch.float32), backend=backend, **kw32)
            assert torch.equal(d32, f32[2]), case  # float32 d: the same bits as the float32 run's d
            if not (backend == "triton" and dtype == torch.bfloat16 and dev == "cpu"):  # interpreter truncates
                assert torch.equal(out, f32[0].to(dtype)), case
                if case["out2"]:
                    assert torch.equal(out2, f32[1].to(dtype)), case
        # check=False and the raw op give the same bits
        raw = [torch.empty_like(x), torch.empty_like(x, dtype=torch.float32)]
        ms.multistep_step(x, o, coef, v=v, var_mode=var_mode, out=raw[0], d_out=raw[1], backend=backend,
                          check=False, **kw)
        assert torch.equal(raw[0], out) and torch.equal(raw[1], d32)


# ---- the C++ kernel's linear path (rows with no d_out, history, out2, clip, threshold or learned σ) ------------

LINEAR_CASES = [dict(nh=0, noise=nz, out2=False, d_out=False, cfg=cfg, clip=False, thr=False, cl=cl)
                for nz in ("none", "tensor", "philox") for cfg in (False, True) for cl in (False, True)]


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("isa", ["auto", "base"])
def test_cpp_linear_path(monkeypatch, dtype, isa):
    """DDIM/DDPM-shaped rows (y = yx·x + yo·o + yd·(p·x + q·o) [+ yz·z], o guided or not) take linear_tiles in
    csrc/cpu/multistep.cpp: within 2·err(reference) + atol·scale of the float64 formula (the matrix's bound), the
    same bits as the general tile path (FASTDIFF_CPU_LINEAR=0: same per-element order, d in a register), and in
    fp16/bf16 the float32 run rounded once. Sizes: one element, below and across the 8 lanes and the 512-element
    tile, tails of every tile, channels_last."""
    monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    shapes = [(1,), (2, 7), (3, 5, 7, 3), (2, 4, 33, 37), (1, 1, 1, 1031)]
    for n, (case, shape) in enumerate(itertools.product(LINEAR_CASES, shapes)):
        x, o, coef, kw = _make(case, dtype, "cpu", shape=shape, seed=n)
        monkeypatch.setenv("FASTDIFF_CPU_LINEAR", "1")
        out, _, _ = _run("cpp", x, o, coef, kw, case)
        monkeypatch.setenv("FASTDIFF_CPU_LINEAR", "0")
        general, _, _ = _run("cpp", x, o, coef, kw, case)
        assert torch.equal(out, general), (case, shape)
        ry, _, _ = ms.multistep_ref(x, o, coef, **kw)
        z = _z_of(x, kw)
        w, _, _, scale = _formula64(x, o, coef, z=z, **{k: v for k, v in kw.items() if k not in ("noise", "rng")})
        err = (out.double() - w).abs().max().item()
        err_ref = (ry.double() - w).abs().max().item()
        assert err <= 2 * err_ref + ATOL[dtype] * scale, (case, shape, err, err_ref, scale)
        assert out.stride() == x.stride()
        monkeypatch.setenv("FASTDIFF_CPU_LINEAR", "1")
        if dtype != torch.float32:
            kw32 = {k: (v.float() if torch.is_tensor(v) and v.dtype == dtype else v) for k, v in kw.items()}
            f32, _, _ = _run("cpp", x.float(), o.float(), coef, kw32, case)
            assert torch.equal(out, f32.to(dtype)), (case, shape)


@requires_cpp
def test_cpp_linear_path_threads_and_philox_offsets(monkeypatch):
    """The linear path over many tiles on two threads, Philox counters crossing 2^32 (the same z as the reference
    generator's), equal to one thread's run and to the general path."""
    case = dict(nh=0, noise="philox", out2=False, d_out=False, cfg=True, clip=False, thr=False, cl=True)
    x, o, coef, kw = _make(case, torch.bfloat16, "cpu", shape=(3, 8, 40, 37), seed=7)
    one, _, _ = _run("cpp", x, o, coef, kw, case)
    monkeypatch.setenv("FASTDIFF_CPU_LINEAR", "0")
    general, _, _ = _run("cpp", x, o, coef, kw, case)
    monkeypatch.setenv("FASTDIFF_CPU_LINEAR", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two, _, _ = _run("cpp", x, o, coef, kw, case)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two) and torch.equal(one, general)
    ry, _, _ = ms.multistep_ref(x, o, coef, **kw)  # Philox z as the reference generator draws it
    w, _, _, scale = _formula64(x, o, coef, z=_z_of(x, kw), o_cond=kw["o_cond"])
    err, err_ref = ((t.double() - w).abs().max().item() for t in (one, ry))
    assert err <= 2 * err_ref + ATOL[torch.bfloat16] * scale, (err, err_ref, scale)


# ---- registration ------------------------------------------------------------------------------------------------

def _op_args(device="cpu", dtype=torch.float32, nh=2, rng=False):
    case = dict(nh=nh, noise="philox" if rng else "tensor", out2=True, d_out=True, cfg=True, clip=True, thr=True,
                cl=False)
    x, o, coef, kw = _make(case, dtype, device, shape=(2, 3, 4, 5))
    thr = kw["thr"][:2].contiguous()
    return (x, o, kw["o_cond"], kw["hist"], kw.get("noise"), kw.get("rng"), None, thr, coef, ms.FLAG_CLIP,
            torch.empty_like(x), torch.empty_like(x), torch.empty_like(x))


def _var_op_args(device="cpu", dtype=torch.bfloat16, var_mode="learned_range", rng=True):
    """The raw op's arguments with v (a learned variance) and a float32 d_out."""
    args = list(_op_args(device, dtype, nh=1, rng=rng))
    x = args[0]
    args[6] = _v_like(x, var_mode, seed=5)
    args[9] = ms.FLAG_CLIP | ms.VAR_MODES[var_mode]
    args[12] = torch.empty_like(x, dtype=torch.float32)
    return tuple(args)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    dev = _dev(backend)
    op = torch.ops.fastdiff.multistep_step_triton if backend == "triton" else torch.ops.fastdiff.multistep_step_
    torch.library.opcheck(op, _op_args(dev))
    args = list(_op_args(dev, torch.bfloat16, nh=0, rng=True))
    args[11] = None  # no out2
    torch.library.opcheck(op, tuple(args))
    # learned variances (v) with a float32 d_out, Philox and a noise tensor
    torch.library.opcheck(op, _var_op_args(dev, torch.bfloat16, "learned_range", rng=True))
    torch.library.opcheck(op, _var_op_args(dev, torch.float16, "learned", rng=False))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    dev = _dev(backend)
    case = dict(nh=2, noise="tensor", out2=True, d_out=True, cfg=True, clip=True, thr=False, cl=False)
    x, o, coef, kw = _make(case, torch.float32, dev, shape=(2, 3, 4, 4))

    def f(x, o, oc, h0, h1, z, coef, out, out2, d_out):
        y, y2, d = ms.multistep_step(x, o, coef, o_cond=oc, hist=(h0, h1), noise=z, clip=True, out=out, out2=out2,
                                     d_out=d_out, backend=backend)
        return y * 2 + y2, d

    bufs = [torch.empty_like(x) for _ in range(3)]
    args = (x, o, kw["o_cond"], *kw["hist"], kw["noise"], coef)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args, *bufs)
    want = f(*args, *[torch.empty_like(x) for _ in range(3)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(bufs[2], want[1])  # the compiled graph wrote the caller's buffer


# ---- errors --------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4)
    h = [torch.randn(2, 3, 4) for _ in range(5)]
    c = ms.coef_row(p=1.0, yx=1.0)
    f = ms.multistep_step
    with pytest.raises(TypeError, match="x must be"):
        f(x.double(), x.double(), c)
    with pytest.raises(TypeError, match="o has dtype"):
        f(x, x.half(), c)
    with pytest.raises(ValueError, match=r"hist\[2\] has shape"):
        f(x, h[0], c, hist=[h[1], h[2], torch.randn(2, 3, 5)])
    with pytest.raises(TypeError, match=r"hist\[0\] has dtype"):
        f(x, h[0], c, hist=[h[1].bfloat16()])
    with pytest.raises(ValueError, match="o_cond is on meta"):
        f(x, h[0], c, o_cond=torch.empty(2, 3, 4, device="meta"))
    with pytest.raises(ValueError, match="noise has shape"):
        f(x, h[0], c, noise=torch.randn(2, 3))
    with pytest.raises(ValueError, match="hist has 5 tensors, at most 4"):
        f(x, h[0], c, hist=h)
    with pytest.raises(TypeError, match="hist must be a list"):
        f(x, h[0], c, hist=h[1])
    with pytest.raises(ValueError, match="coef"):
        f(x, h[0], c[:16])
    with pytest.raises(ValueError, match="coef"):
        f(x, h[0], torch.tensor(c, dtype=torch.float32))
    with pytest.raises(ValueError, match="not both"):
        f(x, h[0], c, noise=h[1], rng=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="rng"):
        f(x, h[0], c, rng=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="thr"):
        f(x, h[0], c, thr=torch.ones(3))
    with pytest.raises(TypeError, match="out has dtype"):
        f(x, h[0], c, out=torch.empty(2, 3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="d_out has shape"):
        f(x, h[0], c, d_out=torch.empty(2, 3, 5))
    with pytest.raises(ValueError, match="out2 has strides"):
        f(x, h[0], c, out2=torch.empty(4, 3, 2).permute(2, 1, 0))
    with pytest.raises(RuntimeError, match="'cuda' needs CUDA tensors"):
        f(x, h[0], c, backend="cuda")
    with pytest.raises(ValueError, match="unknown coefficient 'yh4'"):
        ms.coef_row(yh4=1.0)
    # learned variances
    with pytest.raises(ValueError, match=r"var_mode='learned' needs v"):
        f(x, h[0], c, noise=h[1], var_mode="learned")
    with pytest.raises(ValueError, match="var_mode must be one of"):
        f(x, h[0], c, v=h[1], var_mode="fixed_small")
    with pytest.raises(ValueError, match="v .the model's variance output. is used only with var_mode"):
        f(x, h[0], c, v=h[1])
    with pytest.raises(ValueError, match="v has shape"):
        f(x, h[0], c, v=torch.randn(2, 3), var_mode="learned_range")
    with pytest.raises(TypeError, match="v has dtype"):
        f(x, h[0], c, v=h[1].half(), var_mode="learned")
    with pytest.raises(ValueError, match="v is on meta"):
        f(x, h[0], c, v=torch.empty(2, 3, 4, device="meta"), var_mode="learned")
    with pytest.raises(TypeError, match="d_out has dtype"):  # x's dtype or float32
        f(x.half(), h[0].half(), c, d_out=torch.empty(2, 3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="var_mode must be one of"):
        ms.multistep_ref(x, h[0], c, v=h[1], var_mode="learnt")


@pytest.mark.parametrize("backend", BACKENDS)
def test_aliasing_is_refused_naming_both(backend):
    dev = _dev(backend)
    x, o, h0, h1 = (torch.randn(2, 3, 4, device=dev) for _ in range(4))
    c = torch.tensor(ms.coef_row(p=1.0, yx=1.0), dtype=torch.float64, device=dev)
    f = lambda **kw: ms.multistep_step(x, o, c, hist=[h0, h1], backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="output out overlaps x"):
        f(out=x)
    with pytest.raises(ValueError, match=r"output out2 overlaps hist\[1\]"):
        f(out2=h1)
    with pytest.raises(ValueError, match="output d_out overlaps out"):
        buf = torch.empty(2, 3, 4, device=dev)
        f(out=buf, d_out=buf)
    big = torch.empty(3, 3, 4, device=dev)  # partial overlap: d_out's rows 1..2 are out's rows 0..1... of one buffer
    with pytest.raises(ValueError, match="output d_out overlaps out"):
        f(out=big[:2], d_out=big[1:])


@requires_cpp
def test_cpp_op_checks_its_arguments():
    """The raw C++ op (what resolve_op hands the loops) refuses bad arguments too, naming them."""
    args = list(_op_args())
    op = torch.ops.fastdiff.multistep_step_
    bad = list(args)
    bad[10] = args[0]  # out is x
    with pytest.raises(RuntimeError, match="output out overlaps x"):
        op(*bad)
    bad = list(args)
    bad[3] = [args[1]] * 5
    with pytest.raises(RuntimeError, match="hist has 5 tensors"):
        op(*bad)
    bad = list(args)
    bad[8] = torch.zeros(16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="coef"):
        op(*bad)
    bad = list(args)
    bad[3] = [args[1], args[1][:, :2].contiguous()]
    with pytest.raises(RuntimeError, match=r"hist\[1\] has shape"):
        op(*bad)
    bad = list(args)
    bad[12] = torch.empty_like(args[0], dtype=torch.float16)
    with pytest.raises(RuntimeError, match="d_out has dtype"):
        op(*bad)
    # learned variances: v exactly with a VAR flag, one VAR flag at most, v like x
    vargs = list(_var_op_args("cpu", torch.float32))
    bad = list(vargs)
    bad[6] = None
    with pytest.raises(RuntimeError, match="v .the model's variance output. is needed"):
        op(*bad)
    bad = list(vargs)
    bad[9] = ms.FLAG_CLIP
    with pytest.raises(RuntimeError, match="v .the model's variance output. is needed"):
        op(*bad)
    bad = list(vargs)
    bad[9] = ms.FLAG_VAR_LEARNED | ms.FLAG_VAR_RANGE
    with pytest.raises(RuntimeError, match="invalid flags 6"):
        op(*bad)
    bad = list(vargs)
    bad[9] = 8
    with pytest.raises(RuntimeError, match="invalid flags 8"):
        op(*bad)
    bad = list(vargs)
    bad[6] = vargs[6][:, :2].contiguous()
    with pytest.raises(RuntimeError, match="v has shape"):
        op(*bad)
    bad = list(vargs)
    bad[6] = vargs[6].half()
    with pytest.raises(RuntimeError, match="v has dtype"):
        op(*bad)
    bad = list(vargs)
    bad[10] = vargs[6]  # out is v
    with pytest.raises(RuntimeError, match="output out overlaps v"):
        op(*bad)
    op(*vargs)  # the unchanged arguments run
