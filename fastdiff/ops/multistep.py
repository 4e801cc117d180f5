"""The one fused sampler update: one pass per model call for DDIM, DDPM (learned variances included), DPM-Solver++,
UniPC (predictor and corrector), Euler, Euler ancestral, Heun and PLMS/PRK, on every backend.

Each of these updates is a linear combination, with per-call coefficients, of x_t, the model output turned into
x̂0 or ε̂ (`d`), up to four stored previous `d`s (the history) and noise. Per element, in float32 (the coefficients are
float64 in the table and rounded to float32 in the kernel; csrc/include/multistep_math.h has the same lines for the
C++ and CUDA kernels):

    o  = o_u + w·(o_c − o_u)                             classifier-free guidance, only when o_cond is given
    d  = p·x + q·o                                       x̂0 or ε̂, whatever the solver keeps
    d  = clamp(d, −clip, clip)                           when clip
    d  = clamp(d, −s_b, s_b) / s_b                       when thr: s_b = thr[b], b the sample (dynamic thresholding)
    y  = yx·x + yo·o + yd·d + Σ_k yh_k·h_k + σ·z         z: the noise tensor, or Philox N(0, 1) from rng; σ = yz, or
                                                         per element from the model's variance output v (var_mode)
    y2 = y2x·x + y2o·o + y2d·d + Σ_k y2h_k·h_k           only when out2 is given (e.g. UniPC's corrected sample)
    out ← y,  out2 ← y2,  d_out ← d                      in x's dtype, rounded once from float32 (d_out may also be
                                                         float32: x̂0 kept unrounded, as DDIM/DDPM's x0 output)

Learned variances (DDPM, Nichol & Dhariwal): var_mode "learned" σ = √v (FLAG_VAR_LEARNED), "learned_range"
σ = exp(½(f·logmax + (1−f)·logmin)) with f = (v + 1)/2 (FLAG_VAR_RANGE), in float32 from v.

Sums run left to right. z from rng = [seed, offset]: element i in memory order is N(0, 1) at Philox counter
offset + i (`philox_randn_ref` is the generator in NumPy). Without noise or rng there
is no z term. The coefficient layout is `COEF` (NUM_COEF float64 values, 21..23 reserved zero); `coef_row` builds a
row from names. Outputs are preallocated and written in place; no output may overlap an input or another output (a
sampling loop alternates between buffers it owns).

Registered ops: fastdiff::multistep_step_ (C++ CPU in csrc/cpu/multistep.cpp, CUDA in csrc/cuda/multistep.cu) and
fastdiff::multistep_step_triton (the kernel below), both mutating their outputs, with fake kernels (torch.compile,
opcheck). `multistep_step` is the checked entry; `resolve_op` hands a sampling loop the raw op, to be called per step
after one check per sampling call. fastdiff.ops.sampler_step.sampler_step (DDIM/DDPM with 16-coefficient rows) is a
thin wrapper over this op (`to_multistep_row`).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fastdiff._backend import compiled_op_loaded

NUM_COEF = 24
COEF = dict(p=0, q=1, w=2, clip=3,
            yx=4, yo=5, yd=6, yh0=7, yh1=8, yh2=9, yh3=10, yz=11,
            y2x=12, y2o=13, y2d=14, y2h0=15, y2h1=16, y2h2=17, y2h3=18,
            logmax=19, logmin=20)  # 21..23 reserved, 0
MAX_HIST = 4
FLAG_CLIP = 1
FLAG_VAR_LEARNED = 2  # σ = √v
FLAG_VAR_RANGE = 4  # σ = exp(½(f·logmax + (1−f)·logmin)), f = (v + 1)/2
VAR_MODES = {"scalar": 0, "learned": FLAG_VAR_LEARNED, "learned_range": FLAG_VAR_RANGE}
BACKENDS = ("torch", "triton", "cuda", "cpp")
_OP = "multistep_step"


def coef_row(**values: float) -> list[float]:
    """A NUM_COEF coefficient row from names of COEF (the rest 0): coef_row(p=1.0, yx=0.9, yd=0.1)."""
    row = [0.0] * NUM_COEF
    for k, v in values.items():
        if k not in COEF:
            raise ValueError(f"coef_row: unknown coefficient {k!r} (known: {', '.join(COEF)})")
        row[COEF[k]] = float(v)
    return row


def flags(clip: bool, var_mode: str = "scalar") -> int:
    """The raw op's `flags` argument: FLAG_CLIP when clip, and the variance mode's flag."""
    return (FLAG_CLIP if clip else 0) | VAR_MODES[var_mode]


def learned_sigma_ref(v, logmax, logmin, var_mode: str):
    """The z term's per-element σ from the model's variance output v (math dtype tensors / 0-dim coefficients)."""
    if var_mode == "learned":
        return v.sqrt()
    f = (v + 1) / 2
    return torch.exp(0.5 * (f * logmax + (1 - f) * logmin))


def multistep_ref(x, o, coef, *, o_cond=None, hist=(), noise=None, rng=None, v=None, var_mode="scalar", thr=None,
                  clip=False, want_out2=False, d_dtype=None):
    """The update's math in plain PyTorch, term by term (the "torch" backend) → (y, y2 or None, d) in x's dtype
    (d in `d_dtype` when given: float32 keeps x̂0 unrounded, as a float32 d_out).

    float32 math for fp32/fp16/bf16 inputs (float64 for float64 ones), with the coefficients read from the tensor
    (rounded to the math dtype, as the kernels do; nothing read back to the host except rng for Philox noise).
    """
    if var_mode not in VAR_MODES:
        raise ValueError(f"{_OP}: var_mode must be one of {tuple(VAR_MODES)}, got {var_mode!r}")
    if var_mode != "scalar" and v is None:
        raise ValueError(f"{_OP}: var_mode={var_mode!r} needs v (the model's variance output)")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not torch.is_tensor(coef):
        coef = torch.tensor(coef, dtype=torch.float64, device=x.device)
    c = coef.to(ct)
    k = {name: c[i] for name, i in COEF.items()}
    x32, o32 = x.to(ct), o.to(ct)
    if o_cond is not None:
        o32 = o32 + k["w"] * (o_cond.to(ct) - o32)
    d = k["p"] * x32 + k["q"] * o32
    if clip:
        d = torch.clamp(d, -k["clip"], k["clip"])
    if thr is not None:
        s = thr.to(ct).reshape(-1, *([1] * (x.dim() - 1)))
        d = torch.maximum(torch.minimum(d, s), -s) / s
    hs = [h.to(ct) for h in hist]
    y = k["yx"] * x32 + k["yo"] * o32 + k["yd"] * d
    for i, h in enumerate(hs):
        y = y + k[f"yh{i}"] * h
    if rng is not None:
        noise = _philox_like(x, rng)
    if noise is not None:
        sigma = k["yz"] if var_mode == "scalar" else learned_sigma_ref(v.to(ct), k["logmax"], k["logmin"], var_mode)
        y = y + sigma * noise.to(ct)
    y2 = None
    if want_out2:
        y2 = k["y2x"] * x32 + k["y2o"] * o32 + k["y2d"] * d
        for i, h in enumerate(hs):
            y2 = y2 + k[f"y2h{i}"] * h
        y2 = y2.to(x.dtype)
    return y.to(x.dtype), y2, d.to(x.dtype if d_dtype is None else d_dtype)


def _var_mode_of(flags: int) -> str:
    return "learned" if flags & FLAG_VAR_LEARNED else ("learned_range" if flags & FLAG_VAR_RANGE else "scalar")


def _ref_op(x, o, o_cond, hist, noise, rng, v, thr, coef, flags, out, out2, d_out):
    """The reference with the raw op's signature (resolve_op's "torch"): results copied into the outputs."""
    y, y2, d = multistep_ref(x, o, coef, o_cond=o_cond, hist=hist, noise=noise, rng=rng, v=v,
                             var_mode=_var_mode_of(flags), thr=thr, clip=bool(flags & FLAG_CLIP),
                             want_out2=out2 is not None, d_dtype=d_out.dtype if d_out is not None else None)
    out.copy_(y)
    if out2 is not None:
        out2.copy_(y2)
    if d_out is not None:
        d_out.copy_(d)


# ---- Triton ----------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and C++ paths work without triton
    triton = None

# The coefficient offsets as the kernel's constexprs, generated from COEF (the kernel has no literal offsets).
_K = {f"K_{name.upper()}": i for name, i in COEF.items()}

if triton is not None:

    @triton.jit
    def _guided_linear(x_ptr, o_ptr, oc_ptr, thr_ptr, coef_ptr, offs, mask, per_sample,
                       HAS_COND: tl.constexpr, CLIP: tl.constexpr, HAS_THR: tl.constexpr,
                       K_P: tl.constexpr, K_Q: tl.constexpr, K_W: tl.constexpr, K_CLIP: tl.constexpr):
        """The kernel's opening: x and o as float32, o guided (o + w·(o_c − o)) when HAS_COND, and d = p·x + q·o,
        clamped to ±clip when CLIP and thresholded with the sample's scale when HAS_THR. Returns (x, o, d)."""
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_COND:
            oc = tl.load(oc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            o = o + tl.load(coef_ptr + K_W).to(tl.float32) * (oc - o)
        d = tl.load(coef_ptr + K_P).to(tl.float32) * x + tl.load(coef_ptr + K_Q).to(tl.float32) * o
        if CLIP:
            r = tl.load(coef_ptr + K_CLIP).to(tl.float32)
            d = tl.minimum(tl.maximum(d, -r), r)
        if HAS_THR:
            s = tl.load(thr_ptr + offs // per_sample, mask=mask, other=1.0)
            d = tl.minimum(tl.maximum(d, -s), s) / s
        return x, o, d

    @triton.jit
    def _hist_term(y, y2, h_ptr, offs, mask, coef_ptr, KY: tl.constexpr, KY2: tl.constexpr, WRITE_OUT2: tl.constexpr):
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = y + tl.load(coef_ptr + KY).to(tl.float32) * h
        if WRITE_OUT2:
            y2 = y2 + tl.load(coef_ptr + KY2).to(tl.float32) * h
        return y, y2

    @triton.jit
    def _multistep_kernel(
        x_ptr, o_ptr, oc_ptr,  # (n,) x_t, model output (the unconditional one with CFG), conditional output
        h0_ptr, h1_ptr, h2_ptr, h3_ptr,  # (n,) history tensors (the first NHIST are read)
        z_ptr, rng_ptr,  # (n,) noise (NOISE == 1); (2,) int64 [seed, offset] (NOISE == 2)
        v_ptr,  # (n,) model variance output (VAR > 0)
        thr_ptr, coef_ptr,  # (B,) float32 thresholding scales (HAS_THR); (NUM_COEF,) float64
        out_ptr, out2_ptr, d_ptr,  # (n,) outputs, x's dtype (d: x's dtype or float32)
        n, per_sample,
        HAS_COND: tl.constexpr, NHIST: tl.constexpr, NOISE: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr,
        HAS_THR: tl.constexpr, WRITE_OUT2: tl.constexpr, WRITE_D: tl.constexpr, BLOCK: tl.constexpr,
        K_P: tl.constexpr, K_Q: tl.constexpr, K_W: tl.constexpr, K_CLIP: tl.constexpr,
        K_YX: tl.constexpr, K_YO: tl.constexpr, K_YD: tl.constexpr, K_YH0: tl.constexpr, K_YH1: tl.constexpr,
        K_YH2: tl.constexpr, K_YH3: tl.constexpr, K_YZ: tl.constexpr,
        K_Y2X: tl.constexpr, K_Y2O: tl.constexpr, K_Y2D: tl.constexpr, K_Y2H0: tl.constexpr, K_Y2H1: tl.constexpr,
        K_Y2H2: tl.constexpr, K_Y2H3: tl.constexpr, K_LOGMAX: tl.constexpr, K_LOGMIN: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x, o, d = _guided_linear(x_ptr, o_ptr, oc_ptr, thr_ptr, coef_ptr, offs, mask, per_sample, HAS_COND, CLIP,
                                 HAS_THR, K_P, K_Q, K_W, K_CLIP)
        y = (tl.load(coef_ptr + K_YX).to(tl.float32) * x + tl.load(coef_ptr + K_YO).to(tl.float32) * o
             + tl.load(coef_ptr + K_YD).to(tl.float32) * d)
        y2 = y
        if WRITE_OUT2:
            y2 = (tl.load(coef_ptr + K_Y2X).to(tl.float32) * x + tl.load(coef_ptr + K_Y2O).to(tl.float32) * o
                  + tl.load(coef_ptr + K_Y2D).to(tl.float32) * d)
        if NHIST > 0:
            y, y2 = _hist_term(y, y2, h0_ptr, offs, mask, coef_ptr, K_YH0, K_Y2H0, WRITE_OUT2)
        if NHIST > 1:
            y, y2 = _hist_term(y, y2, h1_ptr, offs, mask, coef_ptr, K_YH1, K_Y2H1, WRITE_OUT2)
        if NHIST > 2:
            y, y2 = _hist_term(y, y2, h2_ptr, offs, mask, coef_ptr, K_YH2, K_Y2H2, WRITE_OUT2)
        if NHIST > 3:
            y, y2 = _hist_term(y, y2, h3_ptr, offs, mask, coef_ptr, K_YH3, K_Y2H3, WRITE_OUT2)
        if NOISE != 0:
            if NOISE == 1:
                z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                z = tl.randn(tl.load(rng_ptr), tl.load(rng_ptr + 1) + offs)
            if VAR == 0:
                sigma = tl.load(coef_ptr + K_YZ).to(tl.float32)
            else:
                v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if VAR == 2:  # FLAG_VAR_LEARNED
                    sigma = tl.sqrt(v)
                else:  # FLAG_VAR_RANGE
                    f = 0.5 * (v + 1.0)
                    sigma = tl.exp(0.5 * (f * tl.load(coef_ptr + K_LOGMAX).to(tl.float32)
                                          + (1.0 - f) * tl.load(coef_ptr + K_LOGMIN).to(tl.float32)))
            y = y + sigma * z
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_OUT2:
            tl.store(out2_ptr + offs, y2.to(out2_ptr.dtype.element_ty), mask=mask)
        if WRITE_D:
            tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("fastdiff::multistep_step_triton", mutates_args=("out", "out2", "d_out"))
def _multistep_triton(x: torch.Tensor, o: torch.Tensor, o_cond: torch.Tensor | None, hist: list[torch.Tensor],
                      noise: torch.Tensor | None, rng: torch.Tensor | None, v: torch.Tensor | None,
                      thr: torch.Tensor | None, coef: torch.Tensor, flags: int, out: torch.Tensor,
                      out2: torch.Tensor | None,
                      d_out: torch.Tensor | None) -> None:
    """Triton launcher (the contract of the C++ op fastdiff::multistep_step_; `multistep_step` checks arguments)."""
    if triton is None:
        raise RuntimeError("fastdiff.multistep_step: backend 'triton' needs triton")
    n = x.numel()
    if n == 0:
        return
    h = list(hist) + [x] * (MAX_HIST - len(hist))
    BLOCK = 1024
    _multistep_kernel[(triton.cdiv(n, BLOCK),)](
        x, o, o_cond if o_cond is not None else x, h[0], h[1], h[2], h[3],
        noise if noise is not None else x, rng if rng is not None else coef, v if v is not None else x,
        thr if thr is not None else coef, coef,
        out, out2 if out2 is not None else out, d_out if d_out is not None else out, n, n // x.shape[0],
        HAS_COND=o_cond is not None, NHIST=len(hist), NOISE=1 if noise is not None else (2 if rng is not None else 0),
        VAR=flags & (FLAG_VAR_LEARNED | FLAG_VAR_RANGE) if v is not None else 0, CLIP=bool(flags & FLAG_CLIP), HAS_THR=thr is not None, WRITE_OUT2=out2 is not None,
        WRITE_D=d_out is not None, BLOCK=BLOCK, **_K)


def _multistep_fake(x, o, o_cond, hist, noise, rng, v, thr, coef, flags, out, out2, d_out):
    return None


_multistep_triton.register_fake(_multistep_fake)
if compiled_op_loaded("multistep_step_"):  # the C++/CUDA op's fake kernel, when the extension is loaded
    torch.library.register_fake("fastdiff::multistep_step_")(_multistep_fake)


# ---- the checks and references both ops' entries share ------------------------------------------------------

def philox_randn_ref(seed: int, offset: int, n: int) -> torch.Tensor:
    """n float32 N(0, 1) samples at Philox counters offset … offset+n−1 with key `seed`: what the fused kernels draw
    for noise="philox" (Philox4x32-10 + Box-Muller, bit-compatible with Triton's tl.randn). NumPy, for tests."""
    M32 = np.uint64(0xFFFFFFFF)
    ctr = np.arange(n, dtype=np.uint64) + np.uint64(offset)
    c0, c1 = ctr & M32, ctr >> np.uint64(32)
    c2 = np.zeros(n, np.uint64)
    c3 = np.zeros(n, np.uint64)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    RA, RB = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p2 = RA * c0, RB * c2  # exact: both factors < 2^32
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32

    def uniform(w):
        i = w.astype(np.uint32).view(np.int32)
        i = np.where(i < 0, ~i, i)
        return i.astype(np.float32) * np.float32(4.6566127342e-10)

    u1 = np.maximum(uniform(c0), np.float32(1e-7))
    u2 = uniform(c1)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return torch.from_numpy((r * np.cos(np.float32(6.283185307179586) * u2)).astype(np.float32))


def _dense_format(x):
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _check_tensor_like(t, x, name, op, dtype=None):
    """`t` is a tensor of x's shape, device and dtype (or `dtype`); errors name the op and the argument."""
    if not torch.is_tensor(t):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
    want = x.dtype if dtype is None else dtype
    if t.dtype != want:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {want}" if dtype is not None else
                        f"{op}: {name} has dtype {t.dtype}, x has {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def _like_x(t, x, name, op="multistep_step"):
    """`t` checked against x (shape, dtype, device) and laid out with x's strides (a copy only if they differ)."""
    if t is None:
        return None
    _check_tensor_like(t, x, name, op)
    if t.stride() != x.stride():
        t = torch.empty_like(x).copy_(t)
    return t


def _check_out(t, x, name, op, dtype=None):
    """A preallocated output: x's shape, device, dtype (or `dtype`) and strides (x is dense); it is written, never
    copied, so a different layout is an error."""
    _check_tensor_like(t, x, name, op, dtype)
    if t.numel() > 1 and t.stride() != x.stride():
        raise ValueError(f"{op}: {name} has strides {t.stride()}, x has {x.stride()} (outputs take x's layout)")
    return t


def _span(t):
    """[first, last byte + 1) of a tensor's elements in memory."""
    start = t.data_ptr()
    return start, start + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


def _check_no_alias(op, inputs: dict, outputs: dict):
    """No output overlaps an input or an earlier output in memory (None entries are absent arguments). Skipped while
    torch.compile traces (no data pointers then; the C++ ops check again when they run)."""
    if torch.compiler.is_compiling():
        return
    seen = [(k, t) for k, t in inputs.items() if t is not None and t.numel() > 0 and not t.is_meta]
    for name, t in outputs.items():
        if t is None or t.numel() == 0 or t.is_meta:  # meta tensors have no memory (every data pointer is 0)
            continue
        a0, a1 = _span(t)
        for other, u in seen:
            b0, b1 = _span(u)
            if u.device == t.device and a0 < b1 and b0 < a1:
                raise ValueError(f"{op}: output {name} overlaps {other} (outputs may alias no input and no other "
                                 f"output)")
        seen.append((name, t))


def _philox_like(x, rng):
    """The Philox noise for x (z_i at memory position i), for the reference backend (reads rng on the host)."""
    seed, off = (int(t) for t in rng.tolist())
    z = philox_randn_ref(seed, off, x.numel()).to(x.device)
    return torch.as_strided(z, x.shape, x.stride()) if _dense_format(x) is not None else z.view(x.shape)


def linear_threshold_scale(x, o, o_cond, p, q, w, ratio: float, max_value: float) -> torch.Tensor:
    """clamp(quantile(|d_b|, ratio), 1, max_value) per sample b of d = p·x + q·o (o guided with w when o_cond is
    given): (B,) float32. p, q, w: 0-dim float32 tensors (slices of a coefficient tensor), so nothing is read back to
    the host: torch.quantile's linear interpolation (rank = q·(n−1) in float32, lerp between floor and ceil) on a
    sort gives the same numbers, with positions that depend only on the shape (CUDA-graph safe). Shared by the
    sampler step and fastdiff.ops.multistep.
    """
    o32 = o.float()
    if o_cond is not None:
        o32 = o32 + w * (o_cond.float() - o32)
    d = p * x.float() + q * o32
    n = d[0].numel()
    pos = np.float32(ratio) * np.float32(n - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    srt = d.reshape(d.shape[0], -1).abs().sort(dim=1).values
    s = torch.lerp(srt[:, lo], srt[:, hi], float(np.float32(pos - np.float32(lo))))
    return s.clamp(min=1.0, max=max_value).contiguous()


# ---- the public op -----------------------------------------------------------------------------------------------

_RAW: dict = {}


def resolve_op(backend: str = "auto", device="cpu"):
    """The raw op for `backend` on `device` (after fastdiff._backend.resolve's rule), cached: a callable
    (x, o, o_cond, hist, noise, rng, v, thr, coef, flags, out, out2, d_out) -> None that checks nothing beyond the C++
    op's own argument checks (none for "torch" and "triton"). For sampling loops: check once with `multistep_step`,
    then call this per step."""
    key = (backend, str(device), os.environ.get("FASTDIFF_BACKEND"))
    op = _RAW.get(key)
    if op is None:
        from fastdiff._backend import resolve

        name = resolve(_OP, backend, torch.device(device))
        op = {"torch": _ref_op, "triton": torch.ops.fastdiff.multistep_step_triton.default}.get(name)
        if op is None:
            op = torch.ops.fastdiff.multistep_step_.default
        _RAW[key] = op
    return op


def multistep_step(x, o, coef, *, o_cond=None, hist=(), noise=None, rng=None, v=None, var_mode: str = "scalar",
                   thr=None, clip: bool = False, out=None, out2=None, d_out=None, backend: str = "auto",
                   check: bool = True):
    """One fused solver update (the formula in this module's docstring) → (out, out2 or None, d_out or None).

    x, o, o_cond, hist[k], noise: (B, ...) tensors of one dtype (fp32/fp16/bf16; math in float32) on one device.
    coef: (NUM_COEF,) float64 tensor on x's device (a list is moved there when check). hist: 0 to MAX_HIST tensors.
    noise: a tensor z, or rng: an int64 tensor [seed, offset] (in-kernel Philox); neither: no z term. thr: (B,)
    float32 thresholding scales (`threshold_scale`). clip: clamp d to ±coef[clip].
    v, var_mode: "scalar" (σ = coef[yz], no v) or "learned" / "learned_range" with v (B, ...) like x, the model's
    variance output: σ of the z term per element (module docstring).
    out, out2, d_out: preallocated outputs (x's shape, dtype and strides; d_out may be float32 instead, x̂0 kept
    unrounded), written in place; a missing out is
    allocated, out2 and d_out are written only when given. Layouts: contiguous and channels_last(_3d) run in place;
    inputs laid out unlike x are copied to x's layout, a non-dense x to contiguous (documented copies; outputs are
    never copied, so they must have x's dense strides). No output may overlap an input or another output.
    check=False skips every check and the backend resolution beyond a cached lookup (the caller has checked the same
    arguments once): the cost is then that of the raw op.
    """
    if not check:
        if out is None:
            out = torch.empty_like(x)
        resolve_op(backend, x.device)(x, o, o_cond, hist if isinstance(hist, list) else list(hist), noise, rng, v, thr,
                                      coef, flags(clip, var_mode), out, out2, d_out)
        return out, out2, d_out
    if not torch.is_tensor(x) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{_OP}: x must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have shape (B, ...), got a 0-dim tensor")
    if o is None:
        raise TypeError(f"{_OP}: o (the model output) must be a tensor, got None")
    if not isinstance(hist, (list, tuple)):
        raise TypeError(f"{_OP}: hist must be a list or tuple of tensors, got {type(hist).__name__}")
    if len(hist) > MAX_HIST:
        raise ValueError(f"{_OP}: hist has {len(hist)} tensors, at most {MAX_HIST}")
    if noise is not None and rng is not None:
        raise ValueError(f"{_OP}: pass noise (a tensor) or rng ([seed, offset]), not both")
    if var_mode not in VAR_MODES:
        raise ValueError(f"{_OP}: var_mode must be one of {tuple(VAR_MODES)}, got {var_mode!r}")
    if var_mode != "scalar" and v is None:
        raise ValueError(f"{_OP}: var_mode={var_mode!r} needs v (the model's variance output, like x), got None")
    if var_mode == "scalar" and v is not None:
        raise ValueError(f"{_OP}: v (the model's variance output) is used only with var_mode 'learned' or "
                         f"'learned_range', got var_mode='scalar'")
    if not torch.is_tensor(coef):
        coef = torch.tensor(coef, dtype=torch.float64, device=x.device)
    if coef.dtype != torch.float64 or coef.shape != (NUM_COEF,) or coef.device != x.device:
        raise ValueError(f"{_OP}: coef must be a float64 tensor of shape ({NUM_COEF},) on {x.device}, got "
                         f"{coef.dtype} {tuple(coef.shape)} on {coef.device}")
    if rng is not None and (not torch.is_tensor(rng) or rng.dtype != torch.int64 or rng.numel() != 2
                            or rng.device != x.device):
        raise ValueError(f"{_OP}: rng must be an int64 tensor [seed, offset] on {x.device}")
    if thr is not None and (not torch.is_tensor(thr) or thr.dtype != torch.float32 or thr.shape != (x.shape[0],)
                            or thr.device != x.device):
        raise ValueError(f"{_OP}: thr must be a float32 tensor of shape ({x.shape[0]},) on {x.device}")
    op = resolve_op(backend, x.device)
    if _dense_format(x) is None:
        x = x.contiguous()
    names = ["o", "o_cond"] + [f"hist[{i}]" for i in range(len(hist))] + ["noise", "v"]
    ins = dict(zip(names, (o, o_cond, *hist, noise, v)))
    ins = {k: _like_x(t, x, k, _OP) for k, t in ins.items()}
    if out is None:
        out = torch.empty_like(x)
    for name, t in (("out", out), ("out2", out2)):
        if t is not None:
            _check_out(t, x, name, _OP)
    if d_out is not None:  # x's dtype, or float32 (x̂0 unrounded)
        _check_out(d_out, x, "d_out", _OP, torch.float32 if getattr(d_out, "dtype", None) == torch.float32
                       else None)
    # aliasing is judged on the caller's tensors (a copied input cannot alias, the caller's original can)
    _check_no_alias(_OP, dict(x=x, **dict(zip(names, (o, o_cond, *hist, noise, v)))),
                        dict(out=out, out2=out2, d_out=d_out))
    hist = [ins[f"hist[{i}]"] for i in range(len(hist))]
    op(x, ins["o"], ins["o_cond"], hist, ins["noise"], rng.contiguous() if rng is not None else None, ins["v"],
       thr.contiguous() if thr is not None else None, coef.contiguous(), flags(clip, var_mode), out, out2, d_out)
    return out, out2, d_out


def threshold_scale(x, o, coef, *, o_cond=None, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding's per-sample scale for the update: clamp(quantile(|d|, ratio), 1, max_value), (B,)
    float32, with d = p·x + q·o before clipping (o guided when o_cond is given), formed from the coefficient
    *tensor* (no host read: CUDA-graph safe)."""
    c = coef.to(torch.float32)
    return linear_threshold_scale(x, o, o_cond, c[COEF["p"]], c[COEF["q"]], c[COEF["w"]], ratio, max_value)
