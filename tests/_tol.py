"""The tolerance rules every test uses (one place; the tables below are the only copies).

1. Against a float64 oracle (flash-attention's rule): with want64 the float64 result on the same, already rounded
   inputs, a kernel's error may be at most twice plain PyTorch's own error in the same dtype plus an absolute slack
   of about one rounding of the output:  err(got) <= 2·err(base) + atol·scale   (`assert_err_within`).
   The oracle is never the implementation under test run again: "base" is plain PyTorch in the I/O dtype, "want64"
   the reference run in float64 (or a formula written in the test).
2. Exact rounding (`assert_rounded_once`): a fused fp16/bf16 kernel computes in float32 and rounds once on the way
   out, so each output element must be want64 rounded to the dtype, except where want64 sits within the float32
   computation's own error of a rounding boundary; there either neighbour is accepted, nothing further. A store
   that truncates instead of rounding is 1 ulp off on about half the elements and fails.
3. Per-element relative (`assert_close_per_element`): |got − want| <= rtol·(|want| + floor) element by element,
   for loops whose elements range over orders of magnitude (one tolerance from max|x| would hide the small ones).
"""
from __future__ import annotations

import torch

# one rounding of an O(1) output in that dtype (2^-23·~80, 2^-10·2, 2^-7·2)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(ATOL)
# the same, relative to the output's largest element (outputs not O(1): sampler steps, whose scale is max|x_prev|)
ATOL_SCALED = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# explicit mantissa bits and smallest normal exponent (value = m·2^e, m in [1, 2))
_MANT = {torch.float16: (10, -14), torch.bfloat16: (7, -126), torch.float32: (23, -126)}


def max_err(got: torch.Tensor, want64: torch.Tensor) -> float:
    return (got.double() - want64.double()).abs().max().item() if got.numel() else 0.0


def assert_err_within(got, want64, base=None, *, atol: float, scale: float = 1.0, what: str = ""):
    """err(got) <= 2·err(base) + atol·scale, errors as max |· − want64| (base None: err(got) <= atol·scale)."""
    err = max_err(got, want64)
    err_base = max_err(base, want64) if base is not None else 0.0
    bound = 2 * err_base + atol * scale
    assert err <= bound, (f"{what}: err {err:.3g} > bound {bound:.3g} (base err {err_base:.3g}, atol {atol:.3g}, "
                          f"scale {scale:.3g})")


def ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values at |y| (float64 tensor; subnormals get the smallest normal's spacing)."""
    p, emin = _MANT[dtype]
    _, e = torch.frexp(y.double())  # |y| = m·2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(y, dtype=torch.float64), (e - 1).clamp(min=emin) - p)


def assert_rounded_once(got: torch.Tensor, want64: torch.Tensor, err32, *, max_frac: float = 0.02, what: str = ""):
    """`got` (fp16/bf16) equals want64 rounded once to got's dtype, element by element.

    err32: the float32 computation's error bound (a float or a per-element tensor, absolute); where want64 is within
    err32 of the midpoint between two dtype values, either is accepted. At most `max_frac` of the elements may sit
    there (a larger share means err32 is too loose to test anything)."""
    dtype = got.dtype
    w = want64.double()
    g = got.double()
    exact = w.to(dtype).double()
    bad = g != exact
    both_nan = torch.isnan(g) & torch.isnan(w)
    bad &= ~both_nan
    if not bad.any():
        return
    half = 0.5 * ulp(w, dtype)
    # a correct rounding of some value within err32 of want64
    err32 = torch.as_tensor(err32, dtype=torch.float64).expand_as(w)
    ok_near = (g - w).abs() <= half + err32
    wrong = bad & ~ok_near
    assert not wrong.any(), (
        f"{what}: {int(wrong.sum())}/{g.numel()} elements are not want64 rounded once to {dtype} "
        f"(first: got {g[wrong][0].item():.8g}, want64 {w[wrong][0].item():.8g}, rounded {exact[wrong][0].item():.8g})")
    frac = bad.double().mean().item()
    assert frac <= max_frac, f"{what}: {frac:.2%} of elements at a rounding boundary: err32 too loose to test rounding"


def assert_close_per_element(got, want, *, rtol: float, floor: float = 1.0, what: str = ""):
    """|got − want| <= rtol·(|want| + floor) for every element (floor: the absolute scale of 'small')."""
    g, w = got.double(), want.double()
    tol = rtol * (w.abs() + floor)
    err = (g - w).abs()
    ratio = (err / tol).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, (f"{what}: worst element at {ratio:.3g}x the bound rtol={rtol:g}·(|want| + {floor:g}); "
                          f"max |diff| {err.max().item():.3g}")


# Triton's CPU interpreter (TRITON_INTERPRET=1, triton 3.6 and 3.9) converts float32 to bfloat16 by truncation
# (measured: 49.9% of random values 1 ulp off); compiled Triton rounds to nearest even. Exact-rounding checks of a
# Triton bf16 output therefore run on CUDA only.
TRITON_INTERPRETER_TRUNCATES_BF16 = "Triton's CPU interpreter truncates float32 -> bfloat16 stores (compiled Triton " \
    "rounds to nearest even): checked on CUDA"


def interpreted_triton_bf16(backend: str, dtype: torch.dtype, device) -> bool:
    return backend == "triton" and dtype == torch.bfloat16 and torch.device(device).type == "cpu"
