"""fastdiff.ops.group_norm_silu: every fused backend against float64 oracles; opcheck; bad input.

The reference (`group_norm_silu_ref`, backend "torch") is the oracle, not a backend under test: it is checked once
against the float64 formula written out in this file (test_reference_matches_the_formula), and every fused backend
("cpp", "triton", "cuda") against the reference run in float64. Tolerances: tests/_tol.py (err <= 2·err(plain PyTorch
in the same dtype) + atol; fp16/bf16 outputs must be the float64 result rounded once).
Inputs chosen so that each part of the math shows: eps comparable to the group variance and near-constant groups
(eps handling), means far from 0 (cancellation), groups split across tiles/programs (Chan merges).
"""
import os

import numpy as np
import pytest
import torch

from fastdiff import _backend
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref
from tests._tol import (ATOL, DTYPES, TRITON_INTERPRETER_TRUNCATES_BF16, assert_err_within, assert_rounded_once,
                        interpreted_triton_bf16, max_err)
from tests.conftest import requires_cpp, requires_cuda, requires_cuda_kernels, requires_triton

# the fused backends that run on this machine's CPU ("torch" is the oracle, not tested against itself)
CPU_BACKENDS = [pytest.param("cpp", marks=requires_cpp), pytest.param("triton", marks=requires_triton)]
# (shape, groups): batch 1; channels == groups; H·W not a power of two; 3-d (N, C, L)
SHAPES = [((1, 32, 5, 7), 32), ((2, 64, 17, 13), 32), ((3, 24, 9, 9), 8), ((2, 16, 10), 4)]


def make(shape, dtype, device="cpu", seed=0, offset=0.0, affine=True, add=True, spread=2.0, ramp=0.0):
    """ramp: add ramp·(−1 … 1) along the flattened spatial axis, so tiles / programs of one group see different
    means (the between-tile term of Chan's merge then matters)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g) * spread + offset
    if ramp:
        hw = x[0, 0].numel()
        x = x + ramp * torch.linspace(-1, 1, hw).reshape(x.shape[2:])
    x = x.to(dtype).to(device)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(dtype).to(device) if affine else None
    b = (torch.randn(C, generator=g) * 0.5).to(dtype).to(device) if affine else None
    a = (torch.randn(shape[0], C, generator=g)).to(dtype).to(device) if add else None
    return x, w, b, a


def f64(t):
    return None if t is None else t.double()


def formula64(x, w, b, groups, eps, silu, add):
    """act((x + add − μ_g)/√(σ²_g + eps)·w + b) in float64 NumPy, σ² the biased group variance (GroupNorm)."""
    xn = x.double().cpu().numpy()
    N, C = xn.shape[:2]
    if add is not None:
        xn = xn + add.double().cpu().numpy().reshape(N, C, *([1] * (xn.ndim - 2)))
    xg = xn.reshape(N, groups, -1)
    mu = xg.mean(-1, keepdims=True)
    var = ((xg - mu) ** 2).mean(-1, keepdims=True)
    y = ((xg - mu) / np.sqrt(var + eps)).reshape(xn.shape)
    shp = (1, C) + (1,) * (xn.ndim - 2)
    if w is not None:
        y = y * w.double().cpu().numpy().reshape(shp)
    if b is not None:
        y = y + b.double().cpu().numpy().reshape(shp)
    if silu:
        y = y / (1 + np.exp(-y))
    return torch.from_numpy(y)


def check(backend, shape, groups, dtype, channels_last, silu=True, affine=True, add=True, offset=0.0, device="cpu",
          eps=1e-6, spread=2.0, seed=0, ramp=0.0):
    x, w, b, a = make(shape, dtype, device, offset=offset, affine=affine, add=add, spread=spread, seed=seed, ramp=ramp)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    want = group_norm_silu_ref(f64(x), f64(w), f64(b), groups, eps, silu, f64(a))
    got = group_norm_silu(x, w, b, groups, eps, silu, a, backend=backend)
    base = group_norm_silu_ref(x, w, b, groups, eps, silu, a)
    assert got.dtype == dtype and got.shape == x.shape
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert_err_within(got, want, base, atol=ATOL[dtype], what=f"{backend} {dtype} {shape} eps={eps}")
    return got, want


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("silu,affine,add", [(True, True, True), (False, True, False), (True, False, False)])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_reference_matches_the_formula(dtype, silu, affine, add, eps):
    """The oracle itself: group_norm_silu_ref (and backend="torch", which is it) against the formula in float64,
    3-d and 4-d, eps small and comparable to the variance (inputs of variance ~0.04)."""
    for shape, groups in (((2, 12, 5, 3), 4), ((3, 8, 7), 2)):
        x, w, b, a = make(shape, dtype, affine=affine, add=add, spread=0.2)
        want = formula64(x, w, b, groups, eps, silu, a)
        outs = [group_norm_silu_ref(x, w, b, groups, eps, silu, a)]
        if dtype != torch.float64:  # the op takes fp32/fp16/bf16
            outs.append(group_norm_silu(x, w, b, groups, eps, silu, a, backend="torch"))
        for got in outs:
            assert got.dtype == dtype
            atol = 1e-12 if dtype == torch.float64 else ATOL[dtype]
            assert_err_within(got, want, atol=atol, what=f"reference {dtype}")


LAYOUT_CASES = [(shape, groups, cl) for shape, groups in SHAPES for cl in (False, True) if len(shape) == 4 or not cl]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,channels_last", LAYOUT_CASES, ids=str)
def test_parity(backend, shape, groups, dtype, channels_last):
    check(backend, shape, groups, dtype, channels_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["eps~var", "eps>var", "near-constant", "constant"])
def test_eps_comparable_to_the_variance(backend, dtype, channels_last, case):
    """eps is visible only when it is not negligible against the group variance: groups of variance ~1e-3 with
    eps = 1e-3 and 1e-2, near-constant groups (std 1e-3 around 3, eps 1e-5; float32 only: fp16/bf16 cannot hold
    them: std 1e-3 around 0 there) and exactly constant groups (y = act(b): x̂ = 0/√eps). A kernel computing 1/(√var + eps), or adding eps
    twice, or dropping it, is off by O(1) here."""
    shape, groups = (2, 16, 6, 5), 4
    if case == "eps~var":
        check(backend, shape, groups, dtype, channels_last, eps=1e-3, spread=0.03)
    elif case == "eps>var":
        check(backend, shape, groups, dtype, channels_last, eps=1e-2, spread=0.03, affine=True, add=False)
    elif case == "near-constant":  # fp16/bf16 cannot hold std 1e-3 around 3: around 0 there
        offset = 3.0 if dtype == torch.float32 else 0.0
        check(backend, shape, groups, dtype, channels_last, eps=1e-5, spread=1e-3, offset=offset)
    else:
        x, w, b, _ = make(shape, dtype, affine=True, add=False)
        x = torch.full(shape, 1.5, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        got = group_norm_silu(x, w, b, groups, 1e-5, True, None, backend=backend)
        want = torch.nn.functional.silu(b.double())[None, :, None, None].expand(shape)
        base = group_norm_silu_ref(x, w, b, groups, 1e-5, True, None)
        assert_err_within(got, want, base, atol=ATOL[dtype], what=f"{backend} constant groups")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("silu,add", [(True, True), (False, False)])
def test_low_precision_output_is_rounded_once(backend, dtype, channels_last, silu, add):
    """fp16/bf16 kernels compute in float32 and round once: every output is the float64 result rounded to the dtype,
    except within the float32 computation's own error (measured: the same backend on the float32 copy of the inputs)
    of a rounding boundary. A truncating store fails on about half of the elements."""
    if interpreted_triton_bf16(backend, dtype, "cpu"):
        pytest.skip(TRITON_INTERPRETER_TRUNCATES_BF16)
    check_rounding(backend, (2, 32, 9, 11), 8, dtype, channels_last, silu=silu, add=add)


def check_rounding(backend, shape, groups, dtype, channels_last, silu=True, add=True, device="cpu"):
    x, w, b, a = make(shape, dtype, device, add=add)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    want = group_norm_silu_ref(f64(x), f64(w), f64(b), groups, 1e-5, silu, f64(a))
    got = group_norm_silu(x, w, b, groups, 1e-5, silu, a, backend=backend)
    f32 = [None if t is None else t.float() for t in (x, w, b, a)]
    got32 = group_norm_silu(f32[0], f32[1], f32[2], groups, 1e-5, silu, f32[3], backend=backend)
    err32 = 2 * max_err(got32, want) + 2.0**-24 * want.abs().max().item()
    assert_rounded_once(got, want, err32, what=f"{backend} {dtype} {shape} channels_last={channels_last}")


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", [((1, 64, 40, 36), 8), ((2, 30, 33, 17), 3), ((1, 512, 16, 16), 32)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nchw-mean1e3"])
def test_parity_without_add(backend, shape, groups, dtype, layout):
    """Without the fused add the CPU kernel tiles a group's statistics across channel boundaries (tiles of 4096
    elements; groups here are 11520, 5610 and 4096 elements): parity in both layouts, also at mean 1e3."""
    check(backend, shape, groups, dtype, layout == "nhwc", add=False, offset=1e3 if layout.endswith("1e3") else 0.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("silu,affine,add", [(False, True, False), (True, False, True), (False, False, False)])
def test_options(backend, silu, affine, add, channels_last):
    check(backend, (2, 32, 6, 5), 8, torch.float32, channels_last, silu=silu, affine=affine, add=add)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_is_stable(backend, channels_last):
    """Inputs with mean 1e4 and std 2: E[x²] − E[x]² in float32 would lose every digit of the variance."""
    check(backend, (2, 32, 16, 16), 32, torch.float32, channels_last, offset=1e4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_larger_group_split(backend, channels_last):
    """A group larger than one tile / block, so the reduction splits and merges (Chan) across tiles and programs;
    with a ramp over the pixels, so tiles differ in mean: (1, 64, 48, 40) / 32 groups splits a group across
    programs, (2, 64, 40, 40) / 4 groups walks 7 tiles inside one Triton program and several CPU tiles."""
    check(backend, (1, 64, 48, 40), 32, torch.float32, channels_last)
    check(backend, (1, 64, 48, 40), 32, torch.float32, channels_last, ramp=4.0)
    check(backend, (2, 64, 40, 40), 4, torch.float32, channels_last, ramp=4.0, add=False)


@requires_cpp
def test_opcheck_cpp():
    for cl in (False, True):
        x, w, b, a = make((2, 16, 5, 3), torch.float32)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, w, b, a, 4, 1e-6, True))
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, None, None, None, 4, 1e-5, False))


@requires_triton
def test_opcheck_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, a = make((2, 8, 3, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_triton.default, (x, w, b, a, 4, 1e-6, True))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=requires_cuda_kernels)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_cuda(backend, dtype):
    for shape, groups in SHAPES + [((1, 128, 64, 64), 32), ((4, 512, 16, 16), 32)]:
        check(backend, shape, groups, dtype, False, device="cuda")
        if len(shape) == 4:
            check(backend, shape, groups, dtype, True, device="cuda")
    for cl in (False, True):
        check(backend, (2, 16, 6, 5), 4, dtype, cl, device="cuda", eps=1e-3, spread=0.03)
        if dtype != torch.float32:
            check_rounding(backend, (2, 32, 9, 11), 8, dtype, cl, device="cuda")


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_dense_input_is_accepted(backend):
    x, w, b, a = make((2, 12, 8, 8), torch.float32)
    xs = x[:, :, ::2, ::2]  # strided view: the wrapper makes it contiguous
    want = formula64(xs, w, b, 4, 1e-5, True, None)
    assert_err_within(group_norm_silu(xs, w, b, 4, backend=backend), want, atol=ATOL[torch.float32], what=backend)


# ---- the CUDA kernel (csrc/cuda/group_norm_silu.cu): GPU only, skipped cleanly without one ------------------------

# Each shape picks a different path of gns::plan / the launcher (batch-1 shapes split, batch-64 CIFAR is one fused
# kernel per group; HW or C not a multiple of 8 takes the scalar instantiation; channels == groups; 3-d input).
CUDA_SHAPES = [((1, 128, 32, 32), 32), ((64, 128, 32, 32), 32), ((1, 128, 256, 256), 32), ((2, 96, 33, 31), 32),
               ((3, 30, 7, 9), 30), ((1, 36, 40, 40), 4), ((2, 64, 100), 16)]


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", CUDA_SHAPES, ids=str)
def test_cuda_kernel_parity_layouts(shape, groups, dtype):
    check("cuda", shape, groups, dtype, False, device="cuda")
    if len(shape) == 4:
        check("cuda", shape, groups, dtype, True, device="cuda")


@requires_cuda_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("silu,affine,add", [(False, True, False), (True, False, True), (False, False, False)])
def test_cuda_kernel_options_and_stability(silu, affine, add):
    for cl in (False, True):
        check("cuda", (2, 32, 6, 5), 8, torch.float32, cl, silu=silu, affine=affine, add=add, device="cuda")
        check("cuda", (1, 64, 48, 40), 32, torch.float32, cl, silu=silu, affine=affine, add=add, offset=1e4,
              device="cuda")


@requires_cuda_kernels
@pytest.mark.gpu
def test_cuda_kernel_misaligned_and_mixed_param_dtypes():
    """x at an odd element offset (no 16-byte vectors), and fp32 weight/bias/add with fp16 x (autocast-style)."""
    x, w, b, a = make((2, 64, 16, 16), torch.float16, "cuda")
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    xm = buf[1:].view_as(x).copy_(x)
    assert xm.data_ptr() % 16 != 0
    want = group_norm_silu_ref(x.double(), w.double(), b.double(), 32, 1e-5, True, a.double())
    for xx, ww, bb, aa in ((xm, w, b, a), (x, w.float(), b.float(), a.float())):
        got = group_norm_silu(xx, ww, bb, 32, 1e-5, True, aa, backend="cuda")
        assert got.dtype == torch.float16
        assert (got.double() - want).abs().max().item() < 4e-3


@requires_cuda_kernels
@pytest.mark.gpu
def test_cuda_kernel_deterministic_and_graph_capturable():
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


@requires_cuda_kernels
@pytest.mark.gpu
def test_opcheck_cuda():
    for shape, cl in (((2, 16, 5, 3), False), ((2, 16, 5, 3), True), ((1, 64, 64, 64), False)):
        x, w, b, a = make(shape, torch.float32, "cuda")
        if cl:
            x = x.to(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, w, b, a, 4, 1e-6, True))
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, None, None, None, 4, 1e-5, False))


# ---- autograd (both ops share group_norm_silu_backward, the analytic formula in PyTorch ops) ---------------------

from fastdiff.ops.group_norm_silu import group_norm_silu_backward  # noqa: E402

OP_BACKENDS = CPU_BACKENDS
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


@requires_cpp
def test_unet_gradients_reach_every_parameter_through_fused_ops():
    """A tiny UNet2D trained through the fused C++ op: every parameter gets a finite, nonzero gradient equal to the
    plain-PyTorch backend's within fp32 tolerance."""
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
    SiLU blocks, the 8-lane tails and the scalar tails in both layouts, with eps small and comparable to the variance;
    fp16/bf16 outputs rounded once (each build has its own store: vcvtneps2bf16, AVX2 integer rounding, scalar)."""
    monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    for shape, groups in [((2, 96, 9, 11), 32), ((1, 67, 6, 7), 1), ((3, 40, 16, 16), 8)]:
        for cl in (False, True):
            check("cpp", shape, groups, dtype, channels_last=cl)
            check("cpp", shape, groups, dtype, channels_last=cl, eps=1e-3, spread=0.03)
            if dtype != torch.float32:
                check_rounding("cpp", shape, groups, dtype, cl)
                check_rounding("cpp", shape, groups, dtype, cl, silu=False, add=False)


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


@requires_cpp
def test_cpu_isa_bad_request(monkeypatch):
    monkeypatch.setenv("FASTDIFF_CPU_ISA", "sse9")
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(RuntimeError, match="FASTDIFF_CPU_ISA"):
        group_norm_silu(x, None, None, 2, 1e-6, True, backend="cpp")
