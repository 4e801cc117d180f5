"""fastdiff.ops.group_norm_silu: parity per backend, dtype and layout; opcheck; bad input.

Tolerance (STYLE.md, flash-attention rule): with y64 the float64 reference on the same (already rounded) inputs,
err(backend) <= 2 * err(plain PyTorch in the same dtype) + atol, atol = 1e-5 (fp32), 2e-3 (fp16), 1.6e-2 (bf16):
about one rounding of an O(1..4) output in that dtype, since a kernel that rounds once on the way out can land one ulp
away from PyTorch's rounding.
"""
import os

import pytest
import torch

from fastdiff import _backend
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref
from tests.conftest import TRITON_OK, requires_cuda

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(ATOL)

CPU_BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not _backend.has_cpp(), reason="fastdiff._C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")),
]
# (shape, groups): batch 1; channels == groups; H·W not a power of two; 3-d (N, C, L)
SHAPES = [((1, 32, 5, 7), 32), ((2, 64, 17, 13), 32), ((3, 24, 9, 9), 8), ((2, 16, 10), 4)]


def make(shape, dtype, device="cpu", seed=0, offset=0.0, affine=True, add=True):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype).to(device)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(dtype).to(device) if affine else None
    b = (torch.randn(C, generator=g) * 0.5).to(dtype).to(device) if affine else None
    a = (torch.randn(shape[0], C, generator=g)).to(dtype).to(device) if add else None
    return x, w, b, a


def f64(t):
    return None if t is None else t.double()


def check(backend, shape, groups, dtype, channels_last, silu=True, affine=True, add=True, offset=0.0, device="cpu"):
    x, w, b, a = make(shape, dtype, device, offset=offset, affine=affine, add=add)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    want = group_norm_silu_ref(f64(x), f64(w), f64(b), groups, 1e-6, silu, f64(a))
    got = group_norm_silu(x, w, b, groups, 1e-6, silu, a, backend=backend)
    base = group_norm_silu_ref(x, w, b, groups, 1e-6, silu, a)
    assert got.dtype == dtype and got.shape == x.shape
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    err = (got.double() - want).abs().max().item()
    err_torch = (base.double() - want).abs().max().item()
    assert err <= 2 * err_torch + ATOL[dtype], f"{backend} {dtype}: err {err:.3g} vs torch {err_torch:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
def test_parity(backend, shape, groups, dtype):
    check(backend, shape, groups, dtype, channels_last=False)
    if len(shape) == 4:
        check(backend, shape, groups, dtype, channels_last=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS[:2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", [((1, 64, 40, 36), 8), ((2, 30, 33, 17), 3), ((1, 512, 16, 16), 32)], ids=str)
def test_parity_without_add(backend, shape, groups, dtype):
    """Without the fused add the CPU kernel tiles a group's statistics across channel boundaries (tiles of 4096
    elements; groups here are 11520, 5610 and 4096 elements): parity in both layouts, also at mean 1e3."""
    for cl in (False, True):
        check(backend, shape, groups, dtype, cl, add=False)
    check(backend, shape, groups, dtype, False, add=False, offset=1e3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("silu,affine,add", [(False, True, False), (True, False, True), (False, False, False)])
def test_options(backend, silu, affine, add):
    for cl in (False, True):
        check(backend, (2, 32, 6, 5), 8, torch.float32, cl, silu=silu, affine=affine, add=add)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_mean_is_stable(backend):
    """Inputs with mean 1e4 and std 2: E[x²] − E[x]² in float32 would lose every digit of the variance."""
    for cl in (False, True):
        check(backend, (2, 32, 16, 16), 32, torch.float32, cl, offset=1e4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_larger_group_split(backend):
    """A group larger than one tile / block, so the reduction splits and merges (Chan) across tiles and programs."""
    check(backend, (1, 64, 48, 40), 32, torch.float32, False)
    check(backend, (1, 64, 48, 40), 32, torch.float32, True)


def test_opcheck_cpp():
    if not _backend.has_cpp():
        pytest.skip("fastdiff._C not built")
    for cl in (False, True):
        x, w, b, a = make((2, 16, 5, 3), torch.float32)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, w, b, a, 4, 1e-6, True))
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, None, None, None, 4, 1e-5, False))


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_opcheck_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, a = make((2, 8, 3, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_triton.default, (x, w, b, a, 4, 1e-6, True))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_cuda(backend, dtype):
    if backend == "cuda" and not _backend.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    for shape, groups in SHAPES + [((1, 128, 64, 64), 32), ((4, 512, 16, 16), 32)]:
        check(backend, shape, groups, dtype, False, device="cuda")
        if len(shape) == 4:
            check(backend, shape, groups, dtype, True, device="cuda")


def test_bad_input():
    x, w, b, a = make((2, 12, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm_silu(x, w, b, 5)
    with pytest.raises(ValueError, match="weight"):
        group_norm_silu(x, w[:6], b, 4)
    with pytest.raises(ValueError, match="add"):
        group_norm_silu(x, w, b, 4, add=a[:, :3])
    with pytest.raises(TypeError, match="x must be"):
        group_norm_silu(x.long(), w, b, 4)
    with pytest.raises(ValueError, match="eps"):
        group_norm_silu(x, w, b, 4, eps=0.0)


def test_non_dense_input_is_accepted():
    x, w, b, a = make((2, 12, 8, 8), torch.float32)
    xs = x[:, :, ::2, ::2]  # strided view: the wrapper makes it contiguous
    for backend in ["torch"] + (["cpp"] if _backend.has_cpp() else []):
        torch.testing.assert_close(group_norm_silu(xs, w, b, 4, backend=backend),
                                   group_norm_silu_ref(xs, w, b, 4), rtol=1e-5, atol=1e-5)


# ---- the CUDA kernel (csrc/cuda/group_norm_silu.cu): GPU only, skipped cleanly without one ------------------------

def _needs_cuda_kernels():
    if not _backend.has_cuda_kernels():
        pytest.skip("fastdiff CUDA kernels not built")


# Each shape picks a different path of gns::plan / the launcher (batch-1 shapes split, batch-64 CIFAR is one fused
# kernel per group; HW or C not a multiple of 8 takes the scalar instantiation; channels == groups; 3-d input).
CUDA_SHAPES = [((1, 128, 32, 32), 32), ((64, 128, 32, 32), 32), ((1, 128, 256, 256), 32), ((2, 96, 33, 31), 32),
               ((3, 30, 7, 9), 30), ((1, 36, 40, 40), 4), ((2, 64, 100), 16)]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", CUDA_SHAPES, ids=str)
def test_cuda_kernel_parity_layouts(shape, groups, dtype):
    _needs_cuda_kernels()
    check("cuda", shape, groups, dtype, False, device="cuda")
    if len(shape) == 4:
        check("cuda", shape, groups, dtype, True, device="cuda")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("silu,affine,add", [(False, True, False), (True, False, True), (False, False, False)])
def test_cuda_kernel_options_and_stability(silu, affine, add):
    _needs_cuda_kernels()
    for cl in (False, True):
        check("cuda", (2, 32, 6, 5), 8, torch.float32, cl, silu=silu, affine=affine, add=add, device="cuda")
        check("cuda", (1, 64, 48, 40), 32, torch.float32, cl, silu=silu, affine=affine, add=add, offset=1e4,
              device="cuda")


@requires_cuda
@pytest.mark.gpu
def test_cuda_kernel_misaligned_and_mixed_param_dtypes():
    """x at an odd element offset (no 16-byte vectors), and fp32 weight/bias/add with fp16 x (autocast-style)."""
    _needs_cuda_kernels()
    x, w, b, a = make((2, 64, 16, 16), torch.float16, "cuda")
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    xm = buf[1:].view_as(x).copy_(x)
    assert xm.data_ptr() % 16 != 0
    want = group_norm_silu_ref(x.double(), w.double(), b.double(), 32, 1e-5, True, a.double())
    for xx, ww, bb, aa in ((xm, w, b, a), (x, w.float(), b.float(), a.float())):
        got = group_norm_silu(xx, ww, bb, 32, 1e-5, True, aa, backend="cuda")
        assert got.dtype == torch.float16
        assert (got.double() - want).abs().max().item() < 4e-3


@requires_cuda
@pytest.mark.gpu
def test_cuda_kernel_deterministic_and_graph_capturable():
    _needs_cuda_kernels()
    for shape, cl in (((1, 128, 64, 64), False), ((1, 128, 64, 64), True), ((8, 64, 16, 16), False)):
        x, w, b, a = make(shape, torch.float16, "cuda")
        if cl:
            x = x.to(memory_format=torch.channels_last)
        y1 = group_norm_silu(x, w, b, 32, 1e-5, True, a, backend="cuda")
        y2 = group_norm_silu(x, w, b, 32, 1e-5, True, a, backend="cuda")
        assert torch.equal(y1, y2)
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            group_norm_silu(static_x, w, b, 32, 1e-5, True, a, backend="cuda")  # warm-up off the default stream
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = group_norm_silu(static_x, w, b, 32, 1e-5, True, a, backend="cuda")
        x2 = x * 0.5 + 1
        static_x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, group_norm_silu(x2, w, b, 32, 1e-5, True, a, backend="cuda"))


@requires_cuda
@pytest.mark.gpu
def test_opcheck_cuda():
    _needs_cuda_kernels()
    for shape, cl in (((2, 16, 5, 3), False), ((2, 16, 5, 3), True), ((1, 64, 64, 64), False)):
        x, w, b, a = make(shape, torch.float32, "cuda")
        if cl:
            x = x.to(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, w, b, a, 4, 1e-6, True))
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, None, None, None, 4, 1e-5, False))


# ---- autograd (both ops share group_norm_silu_backward, the analytic formula in PyTorch ops) ---------------------

from fastdiff.ops.group_norm_silu import group_norm_silu_backward  # noqa: E402

OP_BACKENDS = [b for b in CPU_BACKENDS if not (isinstance(b, str) and b == "torch")]
GRAD_CASES = [((2, 8, 5, 3), 4, True, True, True), ((1, 6, 7, 5), 6, False, True, True),
              ((2, 8, 3, 3), 2, True, False, False), ((2, 8, 9), 4, True, True, True)]


def _op(backend):
    return torch.ops.fastdiff.group_norm_silu_triton if backend == "triton" else torch.ops.fastdiff.group_norm_silu


@pytest.mark.parametrize("shape,groups,silu,affine,add", GRAD_CASES, ids=str)
def test_backward_formula_matches_reference_autograd_float64(shape, groups, silu, affine, add):
    """The analytic backward against autograd through the plain-PyTorch reference, both in float64: agree to 1e-10."""
    for cl in (False, True) if len(shape) == 4 else (False,):
        x, w, b, a = (f64(t) for t in make(shape, torch.float32, affine=affine, add=add))
        if cl:
            x = x.to(memory_format=torch.channels_last)
        ins = [t.requires_grad_() for t in (x, w, b, a) if t is not None]
        y = group_norm_silu_ref(x, w, b, groups, 1e-5, silu, a)
        dy = torch.randn_like(y)
        want = dict(zip([id(t) for t in ins], torch.autograd.grad(y, ins, dy)))
        got = group_norm_silu_backward(dy, x, w, b, a, groups, 1e-5, silu)
        for t, g in zip((x, w, b, a), got):
            if t is None:
                assert g is None
                continue
            assert g.dtype == t.dtype and g.shape == t.shape
            torch.testing.assert_close(g, want[id(t)], rtol=1e-10, atol=1e-10)
        if cl:
            assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("silu", [True, False])
def test_gradcheck(backend, silu):
    """torch.autograd.gradcheck on the registered op, float64 in and out. Both kernels compute in float32 inside
    (forward error ~3e-7), so the finite-difference step is eps = 1e-3 and the tolerance atol = 2e-3, rtol = 1e-3
    (rounding/eps ≈ 3e-4 plus O(eps²) truncation); a wrong formula is off by O(1). The C++ op with SiLU checks the
    full Jacobian; the other cases use fast_mode (a random projection of it) to keep the time (and the Triton
    interpreter's launches) down."""
    op = _op(backend)
    for cl in (False, True):
        x, w, b, a = (f64(t) for t in make((2, 4, 3, 2), torch.float32))
        if cl:
            x = x.to(memory_format=torch.channels_last)
        args = [t.requires_grad_() for t in (x, w, b, a)]
        assert torch.autograd.gradcheck(lambda x, w, b, a: op(x, w, b, a, 2, 1e-5, silu), args, eps=1e-3,
                                        atol=2e-3, rtol=1e-3, fast_mode=backend == "triton" or not silu)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_parity(backend, dtype):
    """Gradients of x, weight, bias and add through group_norm_silu(backend=...) against the float64 reference's
    autograd: err <= 2 * err(eager PyTorch autograd in the same dtype) + atol·max(1, |grad|), atol as for the forward
    (fp32 1e-5, fp16 2e-3, bf16 1.6e-2). NCHW and channels_last, SiLU on and off."""
    for shape, groups, silu in (((2, 8, 5, 3), 4, True), ((1, 6, 7, 5), 6, False)):
        for cl in (False, True):
            base = make(shape, dtype)
            ref_in = [f64(t).requires_grad_() for t in base]
            ins = [t.clone().requires_grad_() for t in base]
            eag_in = [t.clone().requires_grad_() for t in base]
            if cl:
                ref_in[0], ins[0], eag_in[0] = (t.detach().to(memory_format=torch.channels_last).requires_grad_()
                                                for t in (ref_in[0], ins[0], eag_in[0]))
            y64 = group_norm_silu_ref(ref_in[0], ref_in[1], ref_in[2], groups, 1e-5, silu, ref_in[3])
            dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            want = torch.autograd.grad(y64, ref_in, dy.double())
            y = group_norm_silu(ins[0], ins[1], ins[2], groups, 1e-5, silu, ins[3], backend=backend)
            got = torch.autograd.grad(y, ins, dy)
            eag = torch.autograd.grad(group_norm_silu_ref(eag_in[0], eag_in[1], eag_in[2], groups, 1e-5, silu,
                                                          eag_in[3]), eag_in, dy)
            if cl:
                assert got[0].is_contiguous(memory_format=torch.channels_last)
            for name, g, e, w in zip(("x", "weight", "bias", "add"), got, eag, want):
                assert g.dtype == dtype
                err = (g.double() - w).abs().max().item()
                err_t = (e.double() - w).abs().max().item()
                tol = 2 * err_t + ATOL[dtype] * max(1.0, w.abs().max().item())
                assert err <= tol, f"{backend} {dtype} d{name}: err {err:.3g} vs torch {err_t:.3g}"


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck_autograd(backend):
    """opcheck with inputs that require grad: runs the autograd-registration check on the registered backward."""
    for cl in (False, True):
        x, w, b, a = (t.requires_grad_() for t in make((2, 8, 3, 5), torch.float32))
        if cl:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        torch.library.opcheck(_op(backend).default, (x, w, b, a, 4, 1e-6, not cl))


def test_unet_gradients_reach_every_parameter_through_fused_ops():
    """A tiny UNet2D trained through the fused C++ op: every parameter gets a finite, nonzero gradient equal to the
    plain-PyTorch backend's within fp32 tolerance."""
    if not _backend.has_cpp():
        pytest.skip("fastdiff._C not built")
    from fastdiff.nn import UNet2D

    torch.manual_seed(0)
    m = UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
               layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    grads = {}
    for backend in ("cpp", "torch"):
        m.zero_grad()
        m(x, t, backend=backend).square().mean().backward()
        grads[backend] = {k: p.grad.clone() for k, p in m.named_parameters()}
    for k, g in grads["cpp"].items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, k
        torch.testing.assert_close(g, grads["torch"][k], rtol=1e-4, atol=1e-5, msg=k)


def _isas():
    """The builds of the C++ kernels this CPU can run (FASTDIFF_CPU_ISA; csrc/cpu/group_norm_silu.cpp)."""
    if not _backend.has_cpp():
        return []
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["base"]
    if all(f in flags for f in (" avx2", " fma", " f16c")):
        isas.append("avx2")
        if all(f in flags for f in (" avx512f", " avx512vl", " avx512bw", " avx512dq", " avx512_bf16")):
            isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_isa_builds_parity(isa, dtype, monkeypatch):
    """Every build of the CPU kernels (AVX-512 16-lane SiLU, AVX2 8-lane, baseline) at sizes that reach the 32-element
    SiLU blocks, the 8-lane tails and the scalar tails in both layouts."""
    monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    for shape, groups in [((2, 96, 9, 11), 32), ((1, 67, 6, 7), 1), ((3, 40, 16, 16), 8)]:
        check("cpp", shape, groups, dtype, channels_last=False)
        check("cpp", shape, groups, dtype, channels_last=True)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_isa_silu_special_values(isa, dtype, monkeypatch):
    """SiLU at the extremes in every build and code path (16-lane, 8-lane, scalar): ±huge, ±inf, NaN, ±0, the exp
    overflow/underflow edges. Against PyTorch's SiLU of the same values; below 1e-30 in magnitude both are 'zero'
    (PyTorch flushes v·e^v to −0 from v ≈ −88.7, the kernels at slightly different points)."""
    monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    vals = torch.tensor([1e30, -1e30, 100.0, -100.0, 88.5, -88.5, 87.5, -87.5, float("inf"), -float("inf"),
                         float("nan"), 0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 103.5, -103.5, 104.5, -104.5, 20.0,
                         -20.0, 0.5] * 3)[:67]
    C = vals.numel()
    b = vals.to(dtype)
    for channels_last in (False, True):
        # x = 0 normalises to 0, so y = SiLU(bias) per channel; 72 pixels per channel reach every NCHW path,
        # 67 channels every channels_last path
        x = torch.zeros(1, C, 8, 9, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = group_norm_silu(x, torch.ones(C, dtype=dtype), b, 1, 1e-6, True, backend="cpp")
        want = torch.nn.functional.silu(b.float()).to(dtype)[None, :, None, None].expand_as(y)
        torch.testing.assert_close(y.float(), want.float(), rtol={torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype], atol=1e-30,
                                   equal_nan=True, msg=lambda m: f"{isa} {dtype} channels_last={channels_last}: {m}")


def test_cpu_isa_bad_request(monkeypatch):
    if not _backend.has_cpp():
        pytest.skip("fastdiff._C not built")
    monkeypatch.setenv("FASTDIFF_CPU_ISA", "sse9")
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(RuntimeError, match="FASTDIFF_CPU_ISA"):
        group_norm_silu(x, None, None, 2, 1e-6, True, backend="cpp")
