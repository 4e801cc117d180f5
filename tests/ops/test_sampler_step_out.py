"""sampler_step(..., out=, x0_out=): the step written into the caller's buffers (fastdiff::multistep_step_ or
multistep_step_triton with d_out = x0_out in float32) holds the functional call's values bit for bit, on every backend
and dtype."""
import pytest
import torch

from fastdiff._backend import backends, has_cuda_kernels
from fastdiff.ops import sampler_step as ss
from tests.conftest import requires_triton

pytestmark = pytest.mark.usefixtures("one_thread")

CPP = pytest.param("cpp", marks=pytest.mark.skipif(not backends()["cpp"]["available"], reason="fastdiff._C not built"))
TRITON = pytest.param("triton", marks=requires_triton)
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not has_cuda_kernels(),
                                                                         reason="CUDA kernels not built")])
BACKENDS = ["torch", CPP, TRITON, CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dev(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _inputs(dtype, device, shape=(3, 4, 5, 7), fmt=torch.contiguous_format):
    g = torch.Generator().manual_seed(1)
    x, o, oc, z = ((torch.randn(shape, generator=g) * 2).to(device, dtype).contiguous(memory_format=fmt)
                   for _ in range(4))
    return x, o, oc, z


# (kwargs of sampler_step, write_x0): the linear path, the general one (CFG, clip, noise), thresholding, Philox
CASES = [
    (dict(), False),
    (dict(cfg=True, clip=True, noise=True), True),
    (dict(thr=True, noise=True), True),
    (dict(rng=True, clip=True), False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_out_equals_functional_bit_for_bit(backend, dtype):
    dev = _dev(backend)
    coef = torch.tensor(ss.step_coefs("ddim", 0.4, 0.7, prediction_type="v_prediction", sigma=0.3,
                                      guidance_scale=2.5), dtype=torch.float64, device=dev)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x, o, oc, z = _inputs(dtype, dev, fmt=fmt)
        for opts, write_x0 in CASES:
            kw = dict(o_cond=oc if opts.get("cfg") else None, noise=z if opts.get("noise") else None,
                      rng=torch.tensor([9, 2**32 - 7], device=dev) if opts.get("rng") else None,
                      thr=torch.tensor([1.2, 2.0, 1.6], device=dev) if opts.get("thr") else None,
                      clip=bool(opts.get("clip")), backend=backend)
            want, want_x0 = ss.sampler_step(x, o, coef, write_x0=write_x0, **kw)
            out = torch.full_like(x, float("nan"))
            x0_out = torch.full_like(x, float("nan"), dtype=torch.float32) if write_x0 else None
            got, got_x0 = ss.sampler_step(x, o, coef, out=out, x0_out=x0_out, **kw)
            assert got is out and got_x0 is x0_out
            assert torch.equal(got, want), (opts, fmt)
            if write_x0:
                assert torch.equal(got_x0, want_x0), (opts, fmt)
            # x0_out alone implies write_x0; out is then allocated in x's layout
            if write_x0:
                got, got_x0 = ss.sampler_step(x, o, coef, x0_out=torch.empty_like(x, dtype=torch.float32), **kw)
                assert torch.equal(got, want) and torch.equal(got_x0, want_x0)
                assert got.stride() == x.stride()


@pytest.mark.parametrize("backend", [CPP, TRITON, CUDA])
def test_opcheck(backend):
    dev = _dev(backend)
    x, o, oc, z = _inputs(torch.float32, dev, shape=(2, 3, 4, 5))
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6, sigma=0.2, guidance_scale=2.0), dtype=torch.float64,
                     device=dev)
    c = ss.to_multistep_row(c)  # the step's 16-row as the one fused op's row
    op = torch.ops.fastdiff.multistep_step_triton if backend == "triton" else torch.ops.fastdiff.multistep_step_
    torch.library.opcheck(op, (x, o, oc, [], z, None, None, None, c, 1, torch.empty_like(x), None,
                               torch.empty_like(x, dtype=torch.float32)))
    xb, ob = x.bfloat16(), o.bfloat16()
    torch.library.opcheck(op, (xb, ob, None, [], None, torch.tensor([3, 4], device=dev), None,
                               torch.tensor([1.5, 1.0], device=dev), c, 0, torch.empty_like(xb), None, None))
    # DDPM with learned_range variances: v and the float32 x̂0 output
    cl = ss.to_multistep_row(torch.tensor(ss.step_coefs("ddpm", 0.3, 0.6, variance_type="learned_range"),
                                          dtype=torch.float64, device=dev))
    vb = torch.rand_like(xb) * 2 - 1
    torch.library.opcheck(op, (xb, ob, None, [], None, torch.tensor([5, 6], device=dev), vb, None, cl,
                               ss.VAR_MODES["learned_range"] << 1, torch.empty_like(xb), None,
                               torch.empty_like(xb, dtype=torch.float32)))


@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_torch_compile_fullgraph(backend):
    dev = _dev(backend)
    x, o, oc, z = _inputs(torch.float32, dev, shape=(2, 3, 4, 4))
    c = torch.tensor(ss.step_coefs("ddpm", 0.3, 0.6, sigma=0.2), dtype=torch.float64, device=dev)

    def f(x, o, z, c, out):
        return ss.sampler_step(x, o, c, noise=z, out=out, backend=backend)[0] + 1

    buf = torch.empty_like(x)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, o, z, c, buf)
    want = ss.sampler_step(x, o, c, noise=z, backend=backend)[0]
    torch.testing.assert_close(got, want + 1)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_outputs_are_refused(backend):
    dev = _dev(backend)
    x, o, oc, z = _inputs(torch.float32, dev, shape=(2, 3, 4))
    c = ss.step_coefs("ddim", 0.3, 0.6)
    f = lambda **kw: ss.sampler_step(x, o, c, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="output out overlaps x"):
        f(out=x)
    with pytest.raises(ValueError, match="output out overlaps noise"):
        f(out=z, noise=z)
    buf = torch.empty(2, 3, 4, device=dev)
    with pytest.raises(ValueError, match="output x0_out overlaps out"):
        f(out=buf, x0_out=buf)
    with pytest.raises(TypeError, match="x0_out has dtype torch.float16, expected torch.float32"):
        f(x0_out=torch.empty(2, 3, 4, dtype=torch.float16, device=dev))
    with pytest.raises(TypeError, match="out has dtype"):
        f(out=torch.empty(2, 3, 4, dtype=torch.bfloat16, device=dev))
    with pytest.raises(ValueError, match="out has shape"):
        f(out=torch.empty(2, 3, 5, device=dev))
    with pytest.raises(ValueError, match="out has strides"):
        f(out=torch.empty(4, 3, 2, device=dev).permute(2, 1, 0))


def test_cpp_op_refuses_aliasing():
    if not backends()["cpp"]["available"]:
        pytest.skip("fastdiff._C not built")
    x, o, oc, z = _inputs(torch.float32, "cpu", shape=(2, 3, 4))
    c = torch.tensor(ss.step_coefs("ddim", 0.3, 0.6), dtype=torch.float64)
    c = ss.to_multistep_row(c)
    op = torch.ops.fastdiff.multistep_step_  # what sampler_step runs
    with pytest.raises(RuntimeError, match="output out overlaps o"):
        op(x, o, None, [], None, None, None, None, c, 0, o, None, None)
    with pytest.raises(RuntimeError, match="output d_out overlaps out"):
        buf = torch.empty_like(x)
        op(x, o, None, [], None, None, None, None, c, 0, buf, None, buf)
    with pytest.raises(RuntimeError, match="d_out has dtype"):
        op(x, o, None, [], None, None, None, None, c, 0, torch.empty_like(x), None,
           torch.empty_like(x, dtype=torch.float16))
