"""fastdiff.ops.attention: SDPA dispatch and the Triton flash-attention kernel (fastdiff::attention_triton).

Tolerance (docs/math.md, "Precision"): with o64 the float64 reference on the same (already rounded) inputs,
err(backend) <= 2 * err(SDPA in the same dtype) + atol, atol = 1e-5 (fp32), 2e-3 (fp16), 1.6e-2 (bf16): about one
rounding of an O(1) output in that dtype. The Triton kernel runs under TRITON_INTERPRET=1 on CPU, so these shapes are
small: L = 16..40 tokens (not powers of two, not multiples of the 16-row tiles), head width 16/32, batch 1 and 2.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops.attention as attn_mod
from fastdiff.ops.attention import attention, attention_ref
from tests._tol import ATOL, DTYPES, assert_err_within, assert_rounded_once, max_err
from tests.conftest import requires_cuda, requires_triton

needs_triton = requires_triton
BACKENDS = [pytest.param("triton", marks=needs_triton)]  # the fused kernels under test ("torch" is SDPA itself)
# (B, heads, Lq, Lk, D, Dv)
SHAPES = [(1, 1, 16, 16, 16, 16), (2, 1, 37, 37, 32, 32), (1, 1, 40, 40, 16, 16), (2, 2, 21, 33, 16, 16),
          (1, 1, 19, 19, 16, 32)]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(B, H, Lq, Lk, D, Dv, dtype, device="cpu", seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g) * spread).to(dtype).to(device)
    k = (torch.randn(B, H, Lk, D, generator=g) * spread).to(dtype).to(device)
    v = torch.randn(B, H, Lk, Dv, generator=g).to(dtype).to(device)
    return q, k, v


def check(backend, q, k, v, scale=None):
    want = attention_ref(q.double(), k.double(), v.double(), scale)
    got = attention(q, k, v, scale, backend=backend)
    base = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert got.dtype == q.dtype and got.shape == (*q.shape[:3], v.shape[3])
    assert_err_within(got, want, base, atol=ATOL[q.dtype], what=f"{backend} {q.dtype} {tuple(q.shape)}")


def formula64(q, k, v, scale=None):
    """softmax(q kᵀ·scale) v in float64 NumPy (scale 1/√D by default), max-subtracted."""
    qn, kn, vn = (t.double().cpu().numpy() for t in (q, k, v))
    scale = 1 / math.sqrt(qn.shape[-1]) if scale is None else scale
    s = qn @ kn.swapaxes(-1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return torch.from_numpy((p / p.sum(-1, keepdims=True)) @ vn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_backend_matches_the_formula(shape, dtype):
    """backend="torch" and attention_ref against the float64 formula: fp32 within atol; fp16 on the CPU runs in
    float32 and rounds once (fastdiff._backend.cpu_half), so its output is the float64 result rounded once."""
    q, k, v = make(*shape, dtype)
    want = formula64(q, k, v)
    for got in (attention(q, k, v, backend="torch"), attention_ref(q, k, v)):
        assert got.dtype == dtype
        assert_err_within(got, want, atol=ATOL[dtype], what=f"torch {dtype}")
    q, k, v = make(*shape, dtype, spread=3.0)
    assert_err_within(attention(q, k, v, 0.3, backend="torch"), formula64(q, k, v, 0.3), atol=ATOL[dtype],
                      what=f"torch {dtype} scale 0.3")
    if dtype == torch.float16:
        got32 = attention(q.float(), k.float(), v.float(), 0.3, backend="torch")
        want = formula64(q, k, v, 0.3)
        err32 = 2 * max_err(got32, want) + 2.0**-24 * want.abs().max().item()
        assert_rounded_once(attention(q, k, v, 0.3, backend="torch"), want, err32, what="torch fp16 on CPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(backend, shape, dtype):
    check(backend, *make(*shape, dtype, DEV))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_scale(backend):
    """q, k, v as the U-Net makes them (views of one (B, L, 3, heads, D) projection), a non-default scale, and
    peaked scores (spread 4: the running max changes between key tiles, exercising the online rescale)."""
    B, L, H, D = 2, 27, 1, 32
    qkv = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(3), device="cpu").to(DEV) * 4
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    check(backend, q, k, v)
    check(backend, q, k, v, scale=0.3)


def test_auto_is_sdpa_on_cpu():
    """backend="auto" on CPU is SDPA (the measured winner there): bit-identical to calling SDPA, nothing measured."""
    q, k, v = make(2, 1, 20, 20, 16, 16, torch.float32, "cpu")
    before = attn_mod.autotune_choices()
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert attn_mod.autotune_choices() == before


@pytest.fixture
def autotune_here(monkeypatch):
    """Let "auto" measure on this device (CPU: the Triton kernel runs under the interpreter), with a fresh cache and
    scripted timings [sdpa ms, triton ms] per measurement."""
    monkeypatch.setattr(attn_mod, "AUTOTUNE_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(attn_mod, "_AUTO_CHOICE", {})
    timings = []

    def fake_time(fn, device, reps=5):
        fn()  # the callable must run
        return timings.pop(0)

    monkeypatch.setattr(attn_mod, "_time_ms", fake_time)
    return timings


@needs_triton
@pytest.mark.parametrize("t_sdpa,t_triton,winner", [(2.0, 1.0, "triton"), (1.0, 2.0, "torch")])
def test_auto_measures_once_and_keeps_the_winner(autotune_here, t_sdpa, t_triton, winner):
    autotune_here.extend([t_sdpa, t_triton])
    q, k, v = make(1, 1, 20, 20, 16, 16, torch.float32, DEV)
    first = attention(q, k, v)
    assert list(attn_mod.autotune_choices().values()) == [winner]
    assert autotune_here == []  # both backends were timed exactly once
    second = attention(q, k, v)  # cached: no timing left to pop, so a second measurement would raise
    direct = attention(q, k, v, backend=winner)
    assert torch.equal(first, direct) and torch.equal(second, direct)
    # another shape is another key, measured on its own
    autotune_here.extend([1.0, 2.0])
    attention(*make(1, 1, 24, 24, 16, 16, torch.float32, DEV))
    assert len(attn_mod.autotune_choices()) == 2


@needs_triton
def test_auto_rejects_a_kernel_that_disagrees(autotune_here, monkeypatch):
    """A Triton result outside the agreement bound never wins, however fast; SDPA is kept with a warning."""
    monkeypatch.setattr(attn_mod, "_AGREE_TOL", {dt: -1.0 for dt in attn_mod._AGREE_TOL})
    monkeypatch.setattr(attn_mod._backend, "_warned", set())
    autotune_here.extend([2.0, 1.0])
    q, k, v = make(1, 1, 20, 20, 16, 16, torch.float32, DEV)
    with pytest.warns(RuntimeWarning, match="disagrees with SDPA"):
        out = attention(q, k, v)
    assert list(attn_mod.autotune_choices().values()) == ["torch"]
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_auto_measurement_can_be_turned_off(autotune_here, monkeypatch):
    monkeypatch.setenv("FASTDIFF_ATTENTION_AUTOTUNE", "0")
    q, k, v = make(1, 1, 20, 20, 16, 16, torch.float32, DEV)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert attn_mod.autotune_choices() == {}


@needs_triton
def test_opcheck_and_grad_triton():
    q, k, v = make(1, 1, 18, 18, 16, 16, torch.float32, DEV)
    op = torch.ops.fastdiff.attention_triton.default
    torch.library.opcheck(op, (q, k, v, 0.25))
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(op, (*ins, 0.25), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    do = torch.randn_like(q)
    got = torch.autograd.grad(attention(*ins, backend="triton"), ins, do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attention_ref(*ref_in), ref_in, do.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_bad_input():
    q, k, v = make(1, 1, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="q must be a 4-d"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="shapes disagree"):
        attention(q, k[..., :8], v)
    with pytest.raises(TypeError, match="dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="backend must be"):
        attention(q, k, v, backend="nope")
    with pytest.raises(RuntimeError, match="not implemented"):
        attention(q, k, v, backend="cpp")


@needs_triton
def test_triton_head_width_limit():
    q, k, v = make(1, 1, 4, 4, 1024, 1024, torch.float32, DEV)
    with pytest.raises(ValueError, match="head width"):
        attention(q, k, v, backend="triton")


# ---- GPU: the DDPM shapes (one head of width 64..512 over 8×8..32×32 tokens); skipped cleanly without CUDA --------

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [64, 128, 256, 512])
def test_triton_cuda_ddpm_shapes(C, dtype):
    for B, L in ((1, 64), (4, 256), (2, 1024), (3, 100)):
        check("triton", *make(B, 1, L, L, C, C, dtype, "cuda"))
    q, k, v = make(2, 1, 256, 256, C, C, dtype, "cuda", spread=3.0)
    check("triton", q, k, v, scale=1 / math.sqrt(C))
