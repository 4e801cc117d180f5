"""Argument checks with errors that name the argument, shared by the API, the command line and the trainer.

Every check returns the value in a normal form (a Python int/float, a tuple of ints, ...) or raises TypeError (wrong
kind of value) / ValueError (right kind, bad value) whose message starts with the argument's name. Numbers: Python
and NumPy ints and floats, and 0-dim real tensors, are welcome; bool, str, None and containers are refused.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch

# the β schedules a diffusers config may name (fastdiff.schedule.NoiseSchedule builds each)
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _kind(v: Any) -> str:
    return f"{type(v).__name__} {v!r}" if not torch.is_tensor(v) else f"tensor of shape {tuple(v.shape)}"


def check_number(name: str, v: Any, *, min: float | None = None, max: float | None = None, finite: bool = True,
                 integer: bool = False, min_exclusive: bool = False) -> int | float:
    """`v` as a Python int (`integer=True`) or float, checked: a number type, finite (unless `finite=False`; NaN is
    always refused), `min <= v` (`min < v` with `min_exclusive`), `v <= max`."""
    if torch.is_tensor(v):
        if v.numel() != 1 or v.dim() != 0 or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name} must be a number, got {_kind(v)}")
        v = v.item()
    elif hasattr(v, "shape") and getattr(v, "shape", None) == () and hasattr(v, "item") and \
            not isinstance(v, numbers.Number):  # a 0-dim NumPy array
        v = v.item()
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, numbers.Real) or isinstance(v, np.bool_):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {_kind(v)}")
    if integer:
        if not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {_kind(v)}")
        out: int | float = int(v)
    else:
        out = float(v)
        if math.isnan(out):
            raise ValueError(f"{name} must be a number, got NaN")
        if finite and math.isinf(out):
            raise ValueError(f"{name} must be finite, got {out}")
    if min is not None and (out < min or (min_exclusive and out == min)):
        raise ValueError(f"{name} must be {'>' if min_exclusive else '>='} {min}, got {out}")
    if max is not None and out > max:
        raise ValueError(f"{name} must be <= {max}, got {out}")
    return out


def check_bool(name: str, v: Any) -> bool:
    """A bool (Python or NumPy); 0/1 ints are refused (a config value of 1.0 for a flag is almost always a typo)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise TypeError(f"{name} must be True or False, got {_kind(v)}")


def check_choice(name: str, v: Any, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")
    return v


def check_generator(name: str, g: Any):
    """None, a torch.Generator, or a noise source with `draw(shape, device, dtype)` (fastdiff.app.jobs.IndexedNoise)."""
    if g is None or isinstance(g, torch.Generator) or callable(getattr(g, "draw", None)):
        return g
    hint = f" (a seed? use torch.Generator().manual_seed({g!r}))" if isinstance(g, numbers.Integral) else ""
    raise TypeError(f"{name} must be a torch.Generator or None, got {_kind(g)}{hint}")


def check_shape(name: str, shape: Any, *, min_dims: int = 1) -> tuple[int, ...]:
    """A tuple/list/torch.Size of positive ints with at least `min_dims` entries (the first is the batch)."""
    if torch.is_tensor(shape) or isinstance(shape, (str, bytes, Mapping)) or not isinstance(shape, Sequence):
        raise TypeError(f"{name} must be a tuple of ints such as (B, C, H, W), got {_kind(shape)}")
    out = tuple(check_number(f"{name}[{i}]", s, integer=True, min=1) for i, s in enumerate(shape))
    if len(out) < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} entries (B, ...), got {out}")
    return out


def check_dtype(name: str, dtype: Any, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.dtype | None:
    """None or one of `allowed` (default: the floating dtypes a sample can have)."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype such as torch.float32, got {_kind(dtype)}")
    if dtype not in allowed:
        raise ValueError(f"{name} must be one of {[str(d) for d in allowed]}, got {dtype}")
    return dtype


def check_model_output(out: Any, x: torch.Tensor, *, channels_factor: int = 1, step: int | None = None,
                       check_finite: bool = False) -> torch.Tensor:
    """The model's prediction for sample `x`: a tensor, an object with `.sample` (diffusers), a mapping with
    "sample", or a non-empty tuple/list whose first item is one of those; shaped like `x` (channel dim times
    `channels_factor`, e.g. 2 for learned variances), floating, on x's device and in x's dtype."""
    at = f" at step {step}" if step is not None else ""
    o = out
    if isinstance(o, Mapping) and "sample" in o:
        o = o["sample"]
    o = getattr(o, "sample", o)
    if isinstance(o, (tuple, list)):
        if not o:
            raise TypeError(f"model output{at} is an empty {type(o).__name__}: the model must return the "
                            f"prediction, a tensor of shape {tuple(x.shape)}")
        o = getattr(o[0], "sample", o[0])
    if not torch.is_tensor(o):
        raise TypeError(f"model output{at} must be a tensor (or have .sample), got {type(o).__name__}")
    want = list(x.shape)
    if channels_factor != 1 and len(want) > 1:
        want[1] *= channels_factor
    if list(o.shape) != want:
        raise ValueError(f"model output{at} has shape {tuple(o.shape)}, expected {tuple(want)}")
    if not o.is_floating_point():
        raise TypeError(f"model output{at} has dtype {o.dtype}; a prediction must be floating point")
    if o.device != x.device:
        raise ValueError(f"model output{at} is on {o.device}, the sample on {x.device}")
    if o.dtype != x.dtype:
        raise TypeError(f"model output{at} has dtype {o.dtype}, the sample {x.dtype}: cast the model or pass dtype=")
    if check_finite and not torch.isfinite(o).all():
        raise FloatingPointError(f"model output{at} contains NaN/inf")
    return o


def check_finite_tensors(what: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """FloatingPointError naming the first tensors of `tensors` (name → tensor) holding NaN/inf."""
    bad = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"{what}: non-finite values (NaN/inf) in {len(bad)} tensor(s): {bad[:5]}"
                                 f"{' ...' if len(bad) > 5 else ''}")


# ---------------------------------------------------------------------------------------------------------------
# schedules

_NUMERIC_OPTIONS = {"beta_start": dict(min=0, min_exclusive=True, max=1), "beta_end": dict(min=0, min_exclusive=True,
                                                                                              max=1)}
# numbers whose range matters only when their switch is on (as in diffusers, a switched-off setting may hold anything
# numeric); their type is always checked
_SWITCHED_OPTIONS = {"clip_sample_range": ("clip_sample", dict(min=0, min_exclusive=True)),
                     "dynamic_thresholding_ratio": ("thresholding", dict(min=0, min_exclusive=True, max=1)),
                     "sample_max_value": ("thresholding", dict(min=0, min_exclusive=True))}
_INT_OPTIONS = {"num_train_timesteps": dict(min=1), "steps_offset": dict(min=0)}
_BOOL_OPTIONS = ("clip_sample", "thresholding", "set_alpha_to_one", "rescale_betas_zero_snr",
                 "use_clipped_model_output")


def check_scheduler_config(cfg: Mapping[str, Any], name: str | None = "scheduler config") -> dict[str, Any]:
    """A diffusers-style scheduler config checked for types and consistency; returns a plain dict (numbers as
    Python numbers). Unknown keys pass through (diffusers configs carry many). name None: errors name the key
    alone (keyword options such as clip_sample_range="1")."""

    pre = f"{name}: " if name else ""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{name} must be a dict, got {_kind(cfg)}")
    out = dict(cfg)
    for k, kw in _INT_OPTIONS.items():
        if out.get(k) is not None:
            out[k] = check_number(f"{pre}{k}", out[k], integer=True, **kw)
    for k, kw in _NUMERIC_OPTIONS.items():
        if out.get(k) is not None:
            out[k] = check_number(f"{pre}{k}", out[k], **kw)
    for k in _BOOL_OPTIONS:
        if out.get(k) is not None:
            out[k] = check_bool(f"{pre}{k}", out[k])
    for k, (switch, kw) in _SWITCHED_OPTIONS.items():
        if out.get(k) is not None:
            out[k] = check_number(f"{pre}{k}", out[k], **(kw if out.get(switch) else {}))
    if out.get("beta_schedule") is not None and out.get("trained_betas") is None:
        check_choice(f"{pre}beta_schedule", out["beta_schedule"], BETA_SCHEDULES)
    tb = out.get("trained_betas")
    if tb is not None:
        if isinstance(tb, (str, bytes, Mapping)):
            raise TypeError(f"{pre}trained_betas must be a list of numbers, got {_kind(tb)}")
        vals = [check_number(f"{pre}trained_betas[{i}]", b, min=0, min_exclusive=True, max=1)
                for i, b in enumerate(list(tb.flatten().tolist() if hasattr(tb, "flatten") else tb))]
        if not vals:
            raise ValueError(f"{pre}trained_betas is empty")
        T = out.get("num_train_timesteps")
        if T is not None and T != len(vals):
            raise ValueError(f"{pre}trained_betas has {len(vals)} entries but num_train_timesteps is {T}")
        out["trained_betas"] = vals
    return out


def check_betas(name: str, betas: Any) -> torch.Tensor:
    """β_1 … β_T as a float64 tensor: a sequence or tensor of finite numbers in (0, 1]. A string is refused with the
    named builders as the hint (NoiseSchedule("linear") means NoiseSchedule.from_name("linear"))."""
    if isinstance(betas, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of β values, got the string {betas!r}; for a named schedule use "
                        f"NoiseSchedule.from_name({betas!r}) or NoiseSchedule.linear() / .cosine() / ...")
    if isinstance(betas, Mapping) or betas is None or isinstance(betas, numbers.Number):
        raise TypeError(f"{name} must be a sequence of β values, got {_kind(betas)}")
    if torch.is_tensor(betas):
        if betas.is_complex() or betas.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers, got a {betas.dtype} tensor")
        b = betas.detach().to("cpu", torch.float64).flatten()
    else:
        b = torch.tensor([check_number(f"{name}[{i}]", v, finite=False) for i, v in enumerate(betas)],
                         dtype=torch.float64)
    if b.numel() < 1:
        raise ValueError(f"{name}: need at least one timestep")
    bad = (~torch.isfinite(b)) | (b <= 0) | (b > 1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: every β_t must be finite and in (0, 1]; β[{i}] = {float(b[i])}")
    return b


def check_rescale_zero_snr(betas: torch.Tensor, name: str = "rescale_zero_snr") -> None:
    """The zero-terminal-SNR rescale (Lin et al. 2023, Alg. 1) divides by √ᾱ_0 − √ᾱ_{T−1}: a schedule with one
    step, or whose ᾱ does not decrease, cannot be rescaled."""
    b = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if b.numel() < 2:
        raise ValueError(f"{name}: needs at least 2 timesteps, got {b.numel()}")
    s = torch.cumprod(1.0 - b, 0).sqrt()
    if not float(s[0] - s[-1]) > 0:
        raise ValueError(f"{name}: √ᾱ_0 = √ᾱ_T-1 = {float(s[0]):.6g}: the schedule adds no noise to rescale")


def check_alpha_bar(abar: Sequence[float] | torch.Tensor, dtype: torch.dtype, name: str = "schedule",
                    labels: Sequence[str] | None = None) -> None:
    """Every ᾱ_t that a sampler will divide by √ᾱ_t must stay representable in `dtype`: ᾱ_t > 0 that rounds to 0, or
    whose 1/√ᾱ_t overflows, is refused naming it (`labels[i]`, else the index) and the fix (ᾱ_t = 0 exactly, a
    zero-terminal-SNR schedule, is the caller's business: only v-/x0-prediction can start there)."""
    a = torch.as_tensor(abar, dtype=torch.float64).flatten()
    info = torch.finfo(dtype)
    pos = a > 0
    under = pos & ((a.to(dtype) == 0) | (1 / a.sqrt() > info.max))
    if under.any():
        i = int(under.nonzero()[0])
        at = labels[i] if labels is not None else f"ᾱ[{i}]"
        fix = "sample in float64 (dtype=torch.float64)" if dtype != torch.float64 else "use a larger ᾱ"
        raise ValueError(f"{name}: {at} = {float(a[i]):.3g} underflows {dtype} (1/√ᾱ = {float(1 / a[i].sqrt()):.3g}, "
                         f"smallest normal {info.tiny:.3g}): {fix}, or a timestep spacing / schedule that does not "
                         "visit it (the sample would not be finite)")


def check_plan_alpha_bar(plan: Any, dtype: torch.dtype, name: str = "schedule") -> None:
    """check_alpha_bar over the ᾱ a sampling plan visits (a DDIM/DDPM plan: ᾱ at its timesteps; a solver plan: ᾱ =
    1/(1 + σ²) of its σ grid) in the dtype the steps compute in: float64 for float64 samples, else float32 (the
    fused kernels' arithmetic, and diffusers' tables). Once per plan and dtype (the result is kept on the plan)."""
    done = plan.__dict__.setdefault("_alpha_bar_ok", set())
    if dtype in done:
        return
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if hasattr(plan, "abar_t"):
        ts = plan.timesteps.tolist()
        check_alpha_bar(plan.abar_t, compute, name, [f"ᾱ at timestep {t}" for t in ts])
    elif getattr(plan, "sigmas", None) is not None:
        sig = [float(x) for x in plan.sigmas]
        abar = [0.0 if math.isinf(x) else 1.0 / (1.0 + x * x) for x in sig]
        check_alpha_bar(abar, compute, name, [f"ᾱ = 1/(1+σ²) at σ = {x:.3g}" for x in sig])
    done.add(dtype)


def check_sampler_args(*, steps: Any = None, eta: Any = None, shape: Any = None, generator: Any = None,
                       dtype: Any = None, guidance_scale: Any = None, steps_required: bool = False,
                       device: Any = None) -> dict[str, Any]:
    """The public samplers' common arguments in one call (each checked only when given; None passes):
    steps a positive int (one rule for every entry point: 5.0, "5" and True are refused), eta a finite number >= 0,
    shape (B, ...) of positive ints, generator a torch.Generator (or noise source), dtype a floating torch.dtype,
    guidance_scale a finite number, device one this process can use. Returns them normalised."""
    out: dict[str, Any] = {}
    if device is not None:
        out["device"] = check_device("device", device)
    if steps is not None or steps_required:
        out["steps"] = check_number("steps", steps, integer=True, min=1)
    if eta is not None:
        out["eta"] = check_number("eta", eta, min=0)
    if shape is not None:
        out["shape"] = check_shape("shape", shape)
    out["generator"] = check_generator("generator", generator)
    out["dtype"] = check_dtype("dtype", dtype)
    if guidance_scale is not None:
        out["guidance_scale"] = check_number("guidance_scale", guidance_scale)
    return out


def check_device(name: str, device: Any) -> torch.device | None:
    """None, or a device this process can use: 'gpu' and other non-devices are refused naming 'cuda', and 'cuda'
    without a visible CUDA device names why (a CPU-only torch build, or no device visible) and the fix."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {_kind(device)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        hint = " (a GPU is 'cuda' or 'cuda:N')" if str(device).lower().split(":")[0] in ("gpu", "nvidia") else ""
        raise ValueError(f"{name}={device!r} is not a device{hint}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None else
                   "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"{name}={device!r}: CUDA is not available: {why}; use {name}='cpu' or leave {name} "
                             "unset (the model's device, else the CPU)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{name}={device!r}: only {n} CUDA device(s) are visible (cuda:0 … cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={device!r}: MPS is not available here; use {name}='cpu'")
    return dev


def model_dtype_error(model: Any, x: torch.Tensor) -> TypeError | None:
    """The error to raise when `model(x, t)` failed and an nn.Module `model` whose floating parameters share one dtype
    was handed a sample of another dtype (None otherwise: the failure has another cause). Checked after a failure,
    not before: a module that casts inside, or runs under autocast, takes other dtypes fine. fastdiff does not cast
    the model or the sample behind the caller's back."""
    if not isinstance(model, torch.nn.Module):
        return None
    dts = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dts) != 1:
        return None
    (mdt,) = dts
    if x.dtype == mdt:
        return None
    return TypeError(f"dtype / x_T: the sample is {x.dtype} but the model's parameters are {mdt}, and the model "
                     f"failed on it; pass dtype={mdt} (or leave dtype unset and x_T out to follow the model), or cast "
                     f"the model: model.to({x.dtype})")
