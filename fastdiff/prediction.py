"""Prediction types: a model output o as x̂0 or ε̂, and the output a model of each type is trained to give
(docs/math.md, "Prediction types").

With α = √ᾱ_t, σ = √(1 − ᾱ_t) on the VP path x = α·x0 + σ·ε (or α = 1 − σ on the flow path of `flow_prediction`):

    prediction_type    o (target)              x̂0               ε̂
    epsilon            ε  (Ho et al. 2020)      (x − σ·o)/α      o
    sample             x0                       o                (x − α·o)/σ
    v_prediction       α·ε − σ·x0 (Salimans     α·x − σ·o        σ·x + α·o
                       & Ho 2022)
    flow_prediction    ε − x0 (Lipman et al.    x − σ·o          x + α·o
                       2023; Liu et al. 2023)

Every conversion is linear in (x, o). `x0_coefs` / `eps_coefs` give the float64 coefficients (p, q) / (r, s) with
x̂0 = p·x + q·o and ε̂ = r·x + s·o, the form the solver plans (fastdiff.samplers.plan, symbolic `Lin` values) and the
fused ops' coefficient rows take; `to_x0` / `to_eps` apply the same conversion to tensors (references, the bound);
`target` is the inverse: what a model of each type outputs given x0 and ε (training, the exact oracle).

Edge cases, as the call sites had them: at σ = 0 `sample`'s ε̂ coefficients are infinite (1/σ = inf, not a
ZeroDivisionError); at α = 0 `epsilon`'s x̂0 coefficients are infinite (zero terminal SNR: callers refuse it first);
`flow_prediction` is finite on the whole path, α = 0 included.
"""
from __future__ import annotations

import math

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
VP_PREDICTION_TYPES = PREDICTION_TYPES[:3]  # the types of the VP path; flow_prediction needs α = 1 − σ


def check(prediction_type, types=PREDICTION_TYPES, name: str = "prediction_type") -> str:
    """`prediction_type` if it is one of `types`, else a ValueError naming the argument (`name`)."""
    if not isinstance(prediction_type, str) or prediction_type not in types:
        raise ValueError(f"{name} must be one of {tuple(types)}, got {prediction_type!r}")
    return prediction_type


def _inv(v: float) -> float:
    return 1.0 / v if v != 0.0 else math.inf


def x0_coefs(prediction_type: str, alpha: float, sigma: float, *, types=PREDICTION_TYPES) -> tuple[float, float]:
    """(p, q), float64, with x̂0 = p·x + q·o for a model output o of `prediction_type` at (α, σ)."""
    pt = check(prediction_type, types)
    alpha, sigma = float(alpha), float(sigma)
    if pt == "epsilon":
        return _inv(alpha), (-sigma / alpha if alpha != 0.0 else -sigma * math.inf)
    if pt == "sample":
        return 0.0, 1.0
    if pt == "v_prediction":
        return alpha, -sigma
    return 1.0, -sigma  # flow_prediction: x̂0 = x − σ·v


def eps_coefs(prediction_type: str, alpha: float, sigma: float, *, types=PREDICTION_TYPES) -> tuple[float, float]:
    """(r, s), float64, with ε̂ = r·x + s·o for a model output o of `prediction_type` at (α, σ).

    `eps_coefs("sample", α, σ)` is also ε̂ from any x̂0 (o = x̂0): ε̂ = (x − α·x̂0)/σ."""
    pt = check(prediction_type, types)
    alpha, sigma = float(alpha), float(sigma)
    if pt == "epsilon":
        return 0.0, 1.0
    if pt == "sample":
        r = _inv(sigma)
        return r, -alpha * r
    if pt == "v_prediction":
        return sigma, alpha
    return 1.0, alpha  # flow_prediction: ε̂ = x + (1 − σ)·v


def to_x0(x, o, alpha, sigma, prediction_type: str = "epsilon", *, types=PREDICTION_TYPES):
    """x̂0 from the model output `o` at sample `x` (tensors; α, σ floats or tensors broadcasting against them)."""
    pt = check(prediction_type, types)
    if pt == "epsilon":
        return (x - sigma * o) / alpha
    if pt == "sample":
        return o
    if pt == "v_prediction":
        return alpha * x - sigma * o
    return x - sigma * o


def to_eps(x, o, alpha, sigma, prediction_type: str = "epsilon", *, types=PREDICTION_TYPES):
    """ε̂ from the model output `o` at sample `x` (tensors; α, σ floats or tensors). With "sample", ε̂ from any x̂0."""
    pt = check(prediction_type, types)
    if pt == "epsilon":
        return o
    if pt == "sample":
        return (x - alpha * o) / sigma
    if pt == "v_prediction":
        return alpha * o + sigma * x
    return x + alpha * o


def target(prediction_type: str, x0, eps, alpha, sigma, *, types=PREDICTION_TYPES):
    """What a model of `prediction_type` should output for the sample α·x0 + σ·ε: ε, x0, v = α·ε − σ·x0 or the
    flow velocity ε − x0 (tensors or floats; α, σ broadcasting against them)."""
    pt = check(prediction_type, types)
    if pt == "epsilon":
        return eps
    if pt == "sample":
        return x0
    if pt == "v_prediction":
        return alpha * eps - sigma * x0
    return eps - x0
