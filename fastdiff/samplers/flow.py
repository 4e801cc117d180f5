"""Flow-matching (rectified-flow) samplers: Euler and Heun on the velocity ODE (docs/math.md, "Flow matching").

A flow-matching model (Lipman et al. 2023, arXiv 2210.02747; Liu et al. 2023, rectified flow, arXiv 2209.03003) is
trained on the straight path x_σ = (1 − σ)·x0 + σ·ε, σ ∈ [0, 1], and predicts the velocity v = dx_σ/dσ = ε − x0, so
sampling integrates dx/dσ = v(x, σ) from σ = 1 (pure noise) to σ = 0. The sample is the model's input as it is
(no VP scaling: every call has scale_in = scale_out = 1, x_T = randn, init_noise_sigma 1), and

    flow_euler:      x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i
    stochastic:      x_{i+1} = (1 − σ_{i+1})·x̂0 + σ_{i+1}·z,   x̂0 = x_i − σ_i·v_i   (re-noise to σ_{i+1})
    flow_heun:       x̃ = x_i + (σ_{i+1} − σ_i)·v_i,  x_{i+1} = x_i + (σ_{i+1} − σ_i)·(v_i + v(x̃, σ_{i+1}))/2
                     (2N − 1 model calls: the last step, to σ = 0, is an Euler step)

each one row of the fused op. The σ grid is diffusers' FlowMatchEulerDiscreteScheduler's (0.42): N points from
σ_max·T to σ_min·T (T = num_train_timesteps; σ_min and σ_max as its constructor holds them, i.e. already shifted),
divided by T, then the resolution shift σ' = s·σ/(1 + (s − 1)·σ) (SD3, Esser et al. 2024, arXiv 2403.03206, §5.3.2)
or, with use_dynamic_shifting, the time shift e^μ/(e^μ + (1/σ − 1)) ("exponential", Flux) or μ/(μ + (1/σ − 1))
("linear"); then shift_terminal's stretch (1 − σ' scaled so that the last σ is shift_terminal), then Karras,
exponential or beta σ's between the ends; invert_sigmas flips σ → 1 − σ. The model sees t = σ·T in float32 as the
scheduler holds it. The coefficients are the formulas above in float64 on those σ's (diffusers: float32).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import prediction
from fastdiff.schedule import grids
from fastdiff.samplers.plan import PlanBuilder

FLOW_PREDICTION = "flow_prediction"

_SHIFT_DEFAULTS = dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
# FlowMatchEulerDiscreteScheduler's config (diffusers 0.42) + the set_timesteps arguments (mu, sigmas, timesteps)
# + image_seq_len (mu computed as the pipelines do) + prediction_type (only "flow_prediction")
EULER_DEFAULTS = dict(_SHIFT_DEFAULTS, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                      use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False,
                      mu=None, image_seq_len=None, sigmas=None, timesteps=None, prediction_type=FLOW_PREDICTION)
# FlowMatchHeunDiscreteScheduler has shift only
HEUN_DEFAULTS = dict(shift=1.0, prediction_type=FLOW_PREDICTION)


# ---- σ maps (shared with the flow σ's of DPM-Solver++ and UniPC) ---------------------------------------------------

def shift_sigmas(s, shift: float):
    """σ' = s·σ/(1 + (s − 1)·σ): the resolution shift of SD3 (Esser et al. 2024, §5.3.2), in s's dtype."""
    return shift * s / (1 + (shift - 1) * s)


def time_shift(s, mu: float, kind: str):
    """The dynamic (resolution-dependent) shift: e^μ/(e^μ + (1/σ − 1)) ("exponential") or μ/(μ + (1/σ − 1))."""
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / s - 1))


def stretch_to_terminal(s, terminal: float):
    """1 − σ scaled so that the last σ is `terminal` (LTX-Video's shift_terminal)."""
    one_minus = 1 - s
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def mu_for(image_seq_len: float, o: dict) -> float:
    """μ as the pipelines compute it (Flux's calculate_shift): linear in the image sequence length from
    (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift)."""
    m = (o["max_shift"] - o["base_shift"]) / (o["max_image_seq_len"] - o["base_image_seq_len"])
    return image_seq_len * m + o["base_shift"] - m * o["base_image_seq_len"]


def _number(name, v, *, positive=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return float(v)


def resolve_mu(o: dict):
    """μ of use_dynamic_shifting: `mu`, else computed from `image_seq_len`; an error naming mu when neither."""
    if o.get("mu") is not None:
        return _number("mu", o["mu"])
    if o.get("image_seq_len") is not None:
        return mu_for(_number("image_seq_len", o["image_seq_len"], positive=True), o)
    raise ValueError("mu: use_dynamic_shifting=True needs mu= (the pipelines compute it from the image sequence "
                     "length; pass mu= or image_seq_len=)")


def _values(name, v, T: int | None = None) -> np.ndarray:
    """A user's sigmas= (in (0, 1]) or timesteps= (in (0, T]) as a float64 array; errors name the argument."""
    a = grids.vector(name, v)
    hi = 1.0 if T is None else float(T)
    if not np.isfinite(a).all() or (a <= 0).any() or (a > hi).any():
        raise ValueError(f"{name} must lie in (0, {hi:g}] for a flow model (σ = t/num_train_timesteps in (0, 1]), "
                         f"got {a.tolist()}")
    if a.size > 1 and not (np.diff(a) < 0).all():
        raise ValueError(f"{name} must be strictly decreasing, got {a.tolist()}")
    return a


def as_tuple(v):
    """sigmas=/timesteps= as a hashable tuple of floats (the plan cache keys on the options' repr)."""
    if v is None:
        return None
    if torch.is_tensor(v):
        v = v.detach().to("cpu", torch.float64).tolist()
    try:
        return tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise TypeError(f"expected a 1-D sequence of numbers, got {type(v).__name__}") from None


def validate(o: dict, sampler: str):
    if o.get("prediction_type", FLOW_PREDICTION) != FLOW_PREDICTION:
        raise ValueError(f"prediction_type: sampler={sampler!r} integrates a velocity (flow-matching) model, "
                         f"prediction_type='flow_prediction'; got {o['prediction_type']!r} (an ε/x0/v model samples "
                         "with the VP samplers)")
    _number("shift", o["shift"], positive=True)
    if o.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {o['time_shift_type']!r}")
    if o.get("shift_terminal") is not None:
        t = _number("shift_terminal", o["shift_terminal"])
        if not 0 <= t < 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {t}")
    grids.check_spread(o)


def euler_grid(T: int, steps: int, o: dict):
    """(model timesteps: float32 values, σ's float64 with the final one appended) as FlowMatchEulerDiscreteScheduler
    (and FlowMatchHeunDiscreteScheduler, which has shift only) builds them in set_timesteps."""
    dynamic = bool(o.get("use_dynamic_shifting"))
    mu = resolve_mu(o) if dynamic else None
    shift = float(o["shift"])
    # σ_max, σ_min as the constructor holds them: float32, shifted unless dynamic
    ends = torch.tensor([float(T), 1.0], dtype=torch.float32) / T
    if not dynamic:
        ends = shift_sigmas(ends, shift)
    s_max, s_min = float(ends[0]), float(ends[1])
    given_t = None
    if o.get("timesteps") is not None:  # the model's times as given (with sigmas= too: diffusers' pair)
        given_t = _values("timesteps", o["timesteps"], T).astype(np.float32)
        if len(given_t) != steps:
            raise ValueError(f"timesteps: {len(given_t)} values but steps={steps}")
    if o.get("sigmas") is not None:
        sig = _values("sigmas", o["sigmas"])
        if len(sig) != steps:
            raise ValueError(f"sigmas: {len(sig)} values but steps={steps}")
    elif given_t is not None:
        sig = given_t.astype(np.float64) / T
    else:
        sig = np.linspace(s_max * T, s_min * T, steps) / T

    def post(sig):  # shift, stretch, spread: in sig's dtype, as diffusers computes it
        sig = time_shift(sig, mu, o.get("time_shift_type", "exponential")) if dynamic else shift_sigmas(sig, shift)
        if o.get("shift_terminal"):
            sig = stretch_to_terminal(sig, float(o["shift_terminal"]))
        k = grids.spread(float(sig[-1]), float(sig[0]), steps, o)
        return sig if k is None else k

    # the model's times from diffusers' own arithmetic (custom σ's are float32 there), the coefficients in float64
    s32 = torch.from_numpy(np.asarray(post(sig if o.get("sigmas") is None else sig.astype(np.float32)))).to(
        torch.float32)
    sig = np.asarray(post(sig), dtype=np.float64)
    if o.get("invert_sigmas"):
        s32 = 1.0 - s32
        sig = 1.0 - sig
        ts = (s32 * T).tolist()
        last = 1.0
    else:
        ts = (s32 * T).tolist() if given_t is None else [float(t) for t in given_t]
        last = 0.0
    return ts, [float(s) for s in sig] + [last]


def _no_vp_grid(o, sampler, grid_):
    validate(o, sampler)
    if grid_ is not None:
        raise ValueError(f"timesteps: sampler={sampler!r} takes its grid as sigmas= or timesteps= (flow σ's, "
                         "t = σ·num_train_timesteps), not a VP grid")


def _x0(c, sigma: float):
    """d = x̂0 = x − σ·v from the velocity output (fastdiff.prediction, flow_prediction)."""
    p, q = prediction.x0_coefs(FLOW_PREDICTION, 1.0 - sigma, sigma)
    return c.convert(p * c.x + q * c.o)


def euler_plan(schedule, steps: int, o: dict, grid_=None):
    """flow_euler: x + (σ_next − σ)·v, or with stochastic_sampling (1 − σ_next)·x̂0 + σ_next·z."""
    _no_vp_grid(o, "flow_euler", grid_)
    ts, sig = euler_grid(len(schedule), steps, o)
    b = PlanBuilder("flow_euler")
    for i in range(len(ts)):
        s, sn = sig[i], sig[i + 1]
        c = b.call(ts[i])
        x0 = _x0(c, s)  # d = x̂0 (callbacks' "x0")
        if o["stochastic_sampling"]:
            c.force_noise = True  # diffusers draws every step, the last (σ_next = 0) too
            c.next((1.0 - sn) * x0 + sn * c.z)
        else:
            c.next(c.x + (sn - s) * c.o)
    return b.build(t_dtype=torch.float32, init_noise_sigma=1.0, sigmas=sig, timesteps=ts, options=dict(o),
                   noise_dtype=torch.float32)


def heun_plan(schedule, steps: int, o: dict, grid_=None):
    """flow_heun: Heun's method on dx/dσ = v with diffusers' call layout (σ's [σ0, σ1, σ1, …, σ_{N−1}, σ_{N−1}, 0])."""
    _no_vp_grid(o, "flow_heun", grid_)
    ts0, sig0 = euler_grid(len(schedule), steps, dict(EULER_DEFAULTS, shift=o["shift"]))
    S = sig0[:1] + [s for s in sig0[1:-1] for _ in (0, 1)] + sig0[-1:]
    Ts = ts0[:1] + [t for t in ts0[1:] for _ in (0, 1)]
    b = PlanBuilder("flow_heun")
    first, dt = True, None
    for k in range(len(Ts)):
        c = b.call(Ts[k])
        if first:
            s, sn = S[k], S[k + 1]
            _x0(c, s)
            dt = sn - s
            nxt = c.x + dt * c.o
            if k < len(Ts) - 1:
                c.put("half", c.x + (0.5 * dt) * c.o)  # x_i + dt·v_i/2, one slot (y2)
        else:
            _x0(c, S[k])
            nxt = c.get("half") + (0.5 * dt) * c.o
            c.drop("half")
        c.next(nxt)
        first = not first
    return b.build(t_dtype=torch.float32, init_noise_sigma=1.0, sigmas=S, timesteps=Ts, options=dict(o))


def grid_options(sampler: str, steps, options: dict, timesteps=None, sigmas=None, time_grid=None):
    """(options, steps) with fastdiff.sample's timesteps=/sigmas= moved into the options of a sampler on flow σ's
    (flow_euler, flow_heun, or DPM-Solver++/UniPC with use_flow_sigmas), as diffusers' set_timesteps takes them:
    σ's before the shift, in (0, 1]; timesteps in (0, T], the model called with them."""
    if time_grid is not None:
        raise ValueError(f"time_grid: sampler={sampler!r} builds a flow σ grid; pass sigmas= or timesteps= instead")
    allowed = {"flow_euler": ("sigmas", "timesteps"), "unipc": ("sigmas",)}.get(sampler, ())
    if sigmas is not None and timesteps is not None:
        raise ValueError("pass only one of sigmas= and timesteps= (fastdiff calls the model at t = σ·T; diffusers' "
                         "pair of both is for the drop-in FlowMatchEulerDiscreteScheduler)")
    options = dict(options)
    for name, v in (("sigmas", sigmas), ("timesteps", timesteps)):
        if v is None:
            continue
        if name not in allowed:
            raise ValueError(f"{name}: sampler={sampler!r} on flow σ's takes no custom {name} (neither does diffusers' "
                             f"scheduler); custom flow grids: sampler='flow_euler' (sigmas=, timesteps=), 'unipc' "
                             "(sigmas=)")
        if options.get(name) is not None:
            raise ValueError(f"{name} given twice")
        try:
            options[name] = as_tuple(v)
        except TypeError as e:
            raise TypeError(f"{name}: {e}") from None
        n = len(options[name])
        if steps is not None and steps != n:
            raise ValueError(f"{name}: {n} values but steps={steps}; pass steps={n} or leave steps out")
        steps = n
    return options, steps


def on_flow_sigmas(sampler: str, config: dict | None, options: dict) -> bool:
    """Whether `sampler` runs on flow σ's: a flow sampler, or a VP solver with use_flow_sigmas (option or config)."""
    if sampler in ("flow_euler", "flow_heun"):
        return True
    if sampler not in ("dpmsolver++", "sde-dpmsolver++", "unipc"):
        return False
    return bool(options.get("use_flow_sigmas", (config or {}).get("use_flow_sigmas", False)))
