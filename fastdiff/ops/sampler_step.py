"""The sampler update x_t, model output → x_{t−1}: reference math in plain PyTorch (`*_ref`), and the fused step.

Fused step (second half of this file): `sampler_step(x, o, coef, ...)` does a whole DDPM or DDIM step in one pass. It
is a thin wrapper over the one fused op, fastdiff::multistep_step_ (fastdiff/ops/multistep.py: C++ CPU, CUDA, Triton
and the plain-PyTorch reference): `step_coefs` builds a step's 16 scalars, `to_multistep_row` turns them (a row or a
(N, 16) table) into the op's coefficient row, `threshold_scale` gives the dynamic-thresholding scales,
`philox_randn_ref` is the in-kernel noise generator in NumPy.

Every `*_ref` function here follows docs/math.md ("Model outputs", "DDPM", "DDIM") and the order of operations of
diffusers' `DDPMScheduler.step` / `DDIMScheduler.step`, so that a reference loop and a diffusers loop agree to float32
rounding. Per-step scalars are Python floats computed in float64; tensor math runs in float32 (fp16/bf16 inputs are
upcast, the result cast back).
"""
from __future__ import annotations

import math

import torch

from fastdiff import prediction
from fastdiff.ops import multistep as ms
from fastdiff.ops.multistep import (_check_no_alias, _check_tensor_like, _dense_format, _philox_like,  # noqa: F401
                                    linear_threshold_scale, philox_randn_ref)


PREDICTION_TYPES = prediction.VP_PREDICTION_TYPES
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def predict_x0_eps_ref(x_t: torch.Tensor, o: torch.Tensor, abar_t: float, prediction_type: str = "epsilon"):
    """x̂0 and ε̂ from the model output `o` at a timestep with cumulative ᾱ_t (docs/math.md, "Model outputs").

    x_t, o: (B, ...) same shape. Returns float32 (or float64) tensors (x̂0, ε̂).
    """
    x, o = _f32(x_t), _f32(o)
    a, b = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    return (prediction.to_x0(x, o, a, b, prediction_type, types=PREDICTION_TYPES),
            prediction.to_eps(x, o, a, b, prediction_type, types=PREDICTION_TYPES))


def dynamic_threshold_ref(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen dynamic thresholding: per sample s = clamp(quantile(|x̂0|, ratio), 1, max_value), x̂0 ← clamp(x̂0, ±s)/s."""
    flat = _f32(x0).reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold_ref(x0, *, clip_sample=False, clip_sample_range=1.0, thresholding=False,
                          dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """Thresholding takes precedence over clipping, as in diffusers."""
    if thresholding:
        return dynamic_threshold_ref(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def posterior_mean_variance_ref(x0: torch.Tensor, x_t: torch.Tensor, abar_t: float, abar_p: float):
    """q(x_{t−1} | x_t, x0) = N(μ̃, β̃) between two (possibly strided) timesteps with ᾱ_t and ᾱ_p (Ho et al. eq. 6–7).

    Returns (μ̃ tensor, β̃ float, log β̃ clipped at 1e-20 as diffusers clamps it).
    """
    beta = 1.0 - abar_t / abar_p
    alpha = abar_t / abar_p
    c0 = math.sqrt(abar_p) * beta / (1.0 - abar_t)
    ct = math.sqrt(alpha) * (1.0 - abar_p) / (1.0 - abar_t)
    mean = c0 * _f32(x0) + ct * _f32(x_t)
    var = (1.0 - abar_p) / (1.0 - abar_t) * beta
    return mean, var, math.log(max(var, 1e-20))


def ddpm_variance(abar_t: float, abar_p: float, variance_type: str = "fixed_small", v: torch.Tensor | None = None):
    """σ_t² of the DDPM reverse step (a float; a tensor for learned_range given the model's v ∈ [−1, 1]).

    fixed_small: β̃ = (1−ᾱ_p)/(1−ᾱ_t)·β′, clamped at 1e-20 like diffusers; fixed_large: β′ = 1 − ᾱ_t/ᾱ_p;
    learned: v itself; learned_range: exp(f·log β′ + (1−f)·log β̃), f = (v+1)/2 (Nichol & Dhariwal eq. 15).
    """
    beta = 1.0 - abar_t / abar_p
    small = max((1.0 - abar_p) / (1.0 - abar_t) * beta, 1e-20)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return small
    if variance_type == "fixed_large":
        return beta
    if variance_type in ("learned", "learned_range") and v is None:
        raise ValueError(f"variance_type={variance_type!r} needs the model's variance output v")
    if variance_type == "learned":
        return _f32(v)
    if variance_type == "learned_range":
        f = (_f32(v) + 1) / 2
        return torch.exp(f * math.log(beta) + (1 - f) * math.log(small))
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


def ddpm_step_ref(x_t, o, abar_t, abar_p, *, noise=None, prediction_type="epsilon", variance_type="fixed_small",
                  v=None, clip_sample=False, clip_sample_range=1.0, thresholding=False,
                  dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """One DDPM ancestral step (Ho et al. eq. 6–7, 11) between timesteps with ᾱ_t and ᾱ_p (ᾱ_p = 1 after the last).

    x_t, o, noise, v: (B, ...). Returns (x_prev in x_t's dtype, x̂0 float32). No noise is added when `noise` is None.
    """
    x0, _ = predict_x0_eps_ref(x_t, o, abar_t, prediction_type)
    x0 = clip_or_threshold_ref(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                               thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                               sample_max_value=sample_max_value)
    mean, _, _ = posterior_mean_variance_ref(x0, x_t, abar_t, abar_p)
    if noise is not None:
        var = ddpm_variance(abar_t, abar_p, variance_type, v)
        std = var.sqrt() if torch.is_tensor(var) else math.sqrt(var)
        mean = mean + std * _f32(noise)
    return mean.to(x_t.dtype), x0


def ddim_sigma(abar_t: float, abar_p: float, eta: float) -> float:
    """σ_t = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_p) (Song et al. eq. 16)."""
    return eta * math.sqrt(max((1.0 - abar_p) / (1.0 - abar_t) * (1.0 - abar_t / abar_p), 0.0))


def ddim_step_ref(x_t, o, abar_t, abar_p, *, eta=0.0, noise=None, prediction_type="epsilon",
                  use_clipped_model_output=False, clip_sample=False, clip_sample_range=1.0, thresholding=False,
                  dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """One DDIM step (Song et al. eq. 12): x_prev = √ᾱ_p·x̂0 + √(1−ᾱ_p−σ²)·ε̂ + σ·z.

    By default ε̂ is the unclipped one (diffusers' use_clipped_model_output=False). Returns (x_prev, x̂0 float32).
    """
    x0, eps = predict_x0_eps_ref(x_t, o, abar_t, prediction_type)
    x0 = clip_or_threshold_ref(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                               thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                               sample_max_value=sample_max_value)
    sigma = ddim_sigma(abar_t, abar_p, eta)
    if use_clipped_model_output:
        eps = (_f32(x_t) - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)
    out = math.sqrt(abar_p) * x0 + math.sqrt(max(1.0 - abar_p - sigma**2, 0.0)) * eps
    if noise is not None and eta > 0:
        out = out + sigma * _f32(noise)
    return out.to(x_t.dtype), x0


# ---------------------------------------------------------------------------------------------------------------
# The fused step: one pass, x_t, o (o_c, z, v) → x_prev (and x̂0 if asked), on every backend.
#
# Per element, in float32 (the math of fastdiff::multistep_step_, csrc/include/multistep_math.h):
#   o   = o_u + w·(o_c − o_u)                              classifier-free guidance, when o_cond is given
#   x̂0  = p·x + q·o;  clamp(x̂0, ±clip) if clip;  clamp(x̂0, ±s_b)/s_b if thr (dynamic thresholding, s_b per sample)
#   ε̂   = r·x + s·o + u·x̂0
#   x'  = A·x̂0 + B·ε̂ + C·x + σ·z                           σ scalar, or per element from v (DDPM learned variances)
# which is the multistep row  yx = B·r + C,  yo = B·s,  yd = A + B·u,  yz = σ  (d = x̂0; the products and sums folded
# in float64 by `to_multistep_row`, then rounded once to float32 in the kernel).
# The scalars of one step sit in a float64 vector `coef` (layout below), computed once per step by `step_coefs`. A
# sampler keeps the table of all steps on the device and passes row i to step i, so a CUDA graph reads its
# coefficients from a static buffer. Memory traffic: read x, o (o_c, z, v), write x' (x̂0): a DDIM η = 0 step moves 3
# tensors (2 reads + 1 write) where the reference moves ~12 (see benchmarks/bench_sampler_step.py).

COEF = dict(p=0, q=1, r=2, s=3, u=4, A=5, B=6, C=7, sigma=8, clip=9, w=10, logmax=11, logmin=12)
NUM_COEF = 16
FLAG_CLIP = 1
VAR_MODES = {"scalar": 0, "learned": 1, "learned_range": 2}


def step_coefs(kind: str, abar_t: float, abar_p: float, *, prediction_type: str = "epsilon", sigma: float = 0.0,
               use_clipped_model_output: bool = False, clip_sample_range: float = 1.0, guidance_scale: float = 1.0,
               variance_type: str = "fixed_small") -> list[float]:
    """The NUM_COEF float64 scalars of one fused step (DDIM eq. 12 or the DDPM posterior mean, Ho et al. eq. 7).

    sigma: the step's noise scale (DDIM σ_t; DDPM √(fixed variance)); it multiplies z only where the step adds noise.
    DDIM: A = √ᾱ_p, B = √(1−ᾱ_p−σ²), C = 0.  DDPM: A = √ᾱ_p·β′/(1−ᾱ_t), B = 0, C = √α′·(1−ᾱ_p)/(1−ᾱ_t).
    """
    if kind not in ("ddim", "ddpm"):
        raise ValueError(f"kind must be 'ddim' or 'ddpm', got {kind!r}")
    a, b = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    inv_b = 1.0 / b if b > 0 else math.inf
    p, q = prediction.x0_coefs(prediction_type, a, b, types=PREDICTION_TYPES)
    r, s = prediction.eps_coefs(prediction_type, a, b, types=PREDICTION_TYPES)
    u = 0.0
    logmax = logmin = 0.0
    if kind == "ddim":
        A, B, C = math.sqrt(abar_p), math.sqrt(max(1.0 - abar_p - sigma**2, 0.0)), 0.0
        if use_clipped_model_output:
            r, s, u = inv_b, 0.0, -a * inv_b
    else:
        beta, alpha = 1.0 - abar_t / abar_p, abar_t / abar_p
        A = math.sqrt(abar_p) * beta / (1.0 - abar_t)
        B = 0.0
        C = math.sqrt(alpha) * (1.0 - abar_p) / (1.0 - abar_t)
        if variance_type.startswith("learned"):
            logmax = math.log(beta) if beta > 0 else -46.0  # log 1e-20
            logmin = math.log(max((1.0 - abar_p) / (1.0 - abar_t) * beta, 1e-20))
    if B == 0.0:
        r = s = u = 0.0
    c = [0.0] * NUM_COEF
    for k, val in dict(p=p, q=q, r=r, s=s, u=u, A=A, B=B, C=C, sigma=sigma, clip=clip_sample_range,
                       w=guidance_scale, logmax=logmax, logmin=logmin).items():
        c[COEF[k]] = float(val)
    return c


def sampler_step_ref(x, o, coef, *, o_cond=None, noise=None, v=None, thr=None, clip=False, var_mode="scalar",
                     write_x0=False):
    """The fused step's math in plain PyTorch (float32), term by term; the "torch" backend of `sampler_step`.

    coef: (NUM_COEF,) float64 tensor or sequence. thr: (B,) float32 per-sample threshold. Returns (x_prev, x̂0|None).
    """
    c = coef.tolist() if torch.is_tensor(coef) else list(coef)
    g = lambda k: c[COEF[k]]  # noqa: E731
    x32, o32 = x.float(), o.float()
    if o_cond is not None:
        o32 = o32 + g("w") * (o_cond.float() - o32)
    x0 = g("p") * x32 + g("q") * o32
    if clip:
        x0 = x0.clamp(-g("clip"), g("clip"))
    if thr is not None:
        s = thr.float().reshape(-1, *([1] * (x.dim() - 1)))
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    eps = g("r") * x32 + g("s") * o32 + g("u") * x0
    out = g("A") * x0 + g("B") * eps + g("C") * x32
    if noise is not None:
        if var_mode == "scalar":
            std = g("sigma")
        elif var_mode == "learned":
            std = v.float().sqrt()
        else:
            f = (v.float() + 1) / 2
            std = torch.exp(0.5 * (f * g("logmax") + (1 - f) * g("logmin")))
        out = out + std * noise.float()
    return out.to(x.dtype), (x0 if write_x0 else None)


# ---- the public op -----------------------------------------------------------------------------------------------

# (column in the 16-row, column in the multistep row): the scalars that carry over unchanged
_SAME = (("p", "p"), ("q", "q"), ("w", "w"), ("clip", "clip"), ("sigma", "yz"), ("logmax", "logmax"),
         ("logmin", "logmin"))  # (column in the 16-row, column in the multistep row): carried over unchanged


def to_multistep_row(coef):
    """A step_coefs row (NUM_COEF float64 scalars) as the coefficient row of fastdiff::multistep_step_ (its NUM_COEF
    = 24 layout, fastdiff.ops.multistep.COEF): p, q, w, clip, logmax, logmin carried over, yz = σ, and
    yx = B·r + C, yo = B·s, yd = B·u + A folded in float64.

    coef: a sequence of 16 floats → a list of 24 floats; or a float64 tensor (..., 16) → (..., 24) on its device (a
    whole (N, 16) table at once; a few device ops, no host read, so it may run inside a CUDA graph)."""
    if not torch.is_tensor(coef):  # plain floats: the same float64 arithmetic (one product, one sum) in Python
        c = [float(t) for t in coef]
        if len(c) != NUM_COEF:
            raise ValueError(f"to_multistep_row: a row has {NUM_COEF} coefficients, got {len(c)}")
        row = [0.0] * ms.NUM_COEF
        for src, dst in _SAME:
            row[ms.COEF[dst]] = c[COEF[src]]
        g = lambda k: c[COEF[k]]  # noqa: E731
        row[ms.COEF["yx"]], row[ms.COEF["yo"]] = g("B") * g("r") + g("C"), g("B") * g("s")
        row[ms.COEF["yd"]] = g("B") * g("u") + g("A")
        return row
    if coef.dtype != torch.float64 or coef.dim() < 1 or coef.shape[-1] != NUM_COEF:
        raise ValueError(f"to_multistep_row: coef must be a float64 tensor (..., {NUM_COEF}), got {coef.dtype} "
                         f"{tuple(coef.shape)}")
    row = coef.new_zeros(*coef.shape[:-1], ms.NUM_COEF)
    g = lambda k: coef[..., COEF[k]]  # noqa: E731
    for src, dst in _SAME:
        row[..., ms.COEF[dst]] = g(src)
    row[..., ms.COEF["yx"]] = g("B") * g("r") + g("C")
    row[..., ms.COEF["yo"]] = g("B") * g("s")
    row[..., ms.COEF["yd"]] = g("B") * g("u") + g("A")
    return row


def sampler_step(x: torch.Tensor, o: torch.Tensor, coef, *, o_cond=None, noise=None, rng=None, v=None, thr=None,
                 clip: bool = False, var_mode: str = "scalar", write_x0: bool = False, backend: str = "auto",
                 out=None, x0_out=None):
    """One fused sampler step (the formula at the top of this section) → (x_prev, x̂0 float32 or None).

    x, o, o_cond, noise, v: (B, ...) of one dtype (fp32/fp16/bf16; math in fp32). coef: (NUM_COEF,) float64 from
    `step_coefs` (a tensor on x's device; a list is moved there). noise: a tensor z, or rng: an int64 tensor
    [seed, offset] for in-kernel Philox (z_i = philox_randn_ref(seed, offset + i), i in memory order); neither: no
    noise. thr: (B,) float32 dynamic-thresholding scales (see `threshold_scale`). Layouts: contiguous, channels_last
    (3d) run in place; any other layout of x is copied to contiguous first, and inputs whose strides differ from x's
    are copied to x's layout (documented copies). x_prev has x's (dense) layout.
    out, x0_out: preallocated outputs, written in place: out of x's dtype, x0_out float32 (given, it implies
    write_x0), both of x's shape and (dense) strides, overlapping no input and each other. Returned as
    (out, x0_out); a missing out is allocated.
    Runs fastdiff.ops.multistep.multistep_step (the one fused op, any backend; "torch" its reference) on
    `to_multistep_row(coef)`, with d_out = x0_out in float32.
    """
    if not torch.is_tensor(x) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sampler_step: x must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("sampler_step: x must have shape (B, ...), got a 0-dim tensor")
    if var_mode not in VAR_MODES:
        raise ValueError(f"sampler_step: var_mode must be one of {tuple(VAR_MODES)}, got {var_mode!r}")
    if (var_mode != "scalar") != (v is not None):
        raise ValueError("sampler_step: v (the model's variance output) is needed exactly when var_mode is learned*")
    if torch.is_tensor(coef):
        if coef.dtype != torch.float64 or coef.shape != (NUM_COEF,) or coef.device != x.device:
            raise ValueError(f"sampler_step: coef must be a float64 tensor of shape ({NUM_COEF},) on {x.device}, "
                             f"got {coef.dtype} {tuple(coef.shape)} on {coef.device}")
        # a CPU row converted on the host (no device ops); a device row on its device (no host read: graph-safe)
        host = coef.device.type == "cpu" and not torch.compiler.is_compiling()
        row = torch.tensor(to_multistep_row(coef.tolist()), dtype=torch.float64) if host else to_multistep_row(coef)
    else:
        if len(coef) != NUM_COEF:
            raise ValueError(f"sampler_step: coef must have {NUM_COEF} values (step_coefs), got {len(coef)}")
        row = torch.tensor(to_multistep_row(coef), dtype=torch.float64, device=x.device)
    if x0_out is not None:  # named as the caller named it (multistep_step checks it again as d_out)
        _check_tensor_like(x0_out, x, "x0_out", "sampler_step", torch.float32)
        _check_no_alias("sampler_step", dict(x=x, o=o, o_cond=o_cond, noise=noise, v=v),
                        dict(out=out, x0_out=x0_out))
    elif write_x0:
        if _dense_format(x) is None:
            x = x.contiguous()
        x0_out = torch.empty_like(x, dtype=torch.float32)
    y, _, x0 = ms.multistep_step(x, o, row, o_cond=o_cond, noise=noise, rng=rng, v=v, var_mode=var_mode, thr=thr,
                                 clip=clip, out=out, d_out=x0_out, backend=backend)
    return y, x0


def threshold_scale(x, o, coef, *, o_cond=None, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding's per-sample scale s = clamp(quantile(|x̂0|, ratio), 1, max_value): (B,) float32.

    x̂0 is formed from the coefficient *tensor* (no host read), so this is safe inside a CUDA graph.
    """
    c = coef.to(torch.float32)
    return linear_threshold_scale(x, o, o_cond, c[COEF["p"]], c[COEF["q"]], c[COEF["w"]], ratio, max_value)
