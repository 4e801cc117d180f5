"""fastdiff.prediction: model output ↔ x̂0 / ε̂ for every prediction type (docs/math.md, "Prediction types")."""
import math

import diffusers
import pytest
import torch

from fastdiff import prediction as P, samplers as S
from fastdiff.schedule import NoiseSchedule, grids
from fastdiff.samplers.plan import COEF

ABARS = [0.9999, 0.95, 0.5, 0.05, 1e-3]  # ᾱ on the VP path (α = √ᾱ, σ = √(1 − ᾱ))
FLOW_SIGMAS = [0.0, 1e-3, 0.3, 0.7, 1.0]  # σ on the flow path (α = 1 − σ), both ends included


def _cases():
    for pt in P.VP_PREDICTION_TYPES:
        for ab in ABARS:
            yield pt, math.sqrt(ab), math.sqrt(1.0 - ab)
    for s in FLOW_SIGMAS:
        yield "flow_prediction", 1.0 - s, s


def _data(seed=0, shape=(4, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


def _close(got, want, scale=1.0):
    """float64 to a few ulps of the largest term (`scale`: the conversion's amplification, e.g. 1/α)."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14 * scale)


@pytest.mark.parametrize("pt,a,s", list(_cases()))
def test_round_trip_every_type(pt, a, s):
    """(x0, ε) → model output → (x̂0, ε̂) = (x0, ε), by the tensor helpers and by the coefficient form."""
    x0, eps = _data()
    x = a * x0 + s * eps
    o = P.target(pt, x0, eps, a, s)
    p, q = P.x0_coefs(pt, a, s)
    r, u = P.eps_coefs(pt, a, s)
    amp = 1.0 / a if pt == "epsilon" else (1.0 / s if pt == "sample" and s > 0 else 1.0)
    _close(P.to_x0(x, o, a, s, pt), x0, 10 * amp)
    _close(p * x + q * o, x0, 10 * amp)
    if pt == "sample" and s == 0.0:
        return
    _close(P.to_eps(x, o, a, s, pt), eps, 10 * amp)
    _close(r * x + u * o, eps, 10 * amp)


@pytest.mark.parametrize("pt", P.PREDICTION_TYPES)
def test_round_trip_per_row_alpha_sigma(pt):
    """The tensor helpers broadcast per-sample α, σ (B, 1, 1), as the bound and training pass them."""
    x0, eps = _data(1)
    sig = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64).reshape(-1, 1, 1)
    a = 1.0 - sig if pt == "flow_prediction" else (1.0 - sig**2).sqrt()
    x = a * x0 + sig * eps
    o = P.target(pt, x0, eps, a, sig)
    _close(P.to_x0(x, o, a, sig, pt), x0, 100)
    _close(P.to_eps(x, o, a, sig, pt), eps, 100)


def test_coefficients_are_the_table():
    a, s = 0.6, 0.8
    assert P.x0_coefs("epsilon", a, s) == (1.0 / a, -s / a)
    assert P.eps_coefs("epsilon", a, s) == (0.0, 1.0)
    assert P.x0_coefs("sample", a, s) == (0.0, 1.0)
    assert P.eps_coefs("sample", a, s) == (1.0 / s, -a * (1.0 / s))
    assert P.x0_coefs("v_prediction", a, s) == (a, -s)
    assert P.eps_coefs("v_prediction", a, s) == (s, a)
    assert P.x0_coefs("flow_prediction", 0.3, 0.7) == (1.0, -0.7)
    assert P.eps_coefs("flow_prediction", 0.3, 0.7) == (1.0, 0.3)
    assert P.target("v_prediction", 2.0, 3.0, a, s) == a * 3.0 - s * 2.0
    assert P.target("flow_prediction", 2.0, 3.0, 0.3, 0.7) == 1.0


def test_edge_cases():
    # σ = 0 (the last step): ε̂ from x̂0 divides by σ, infinite coefficients rather than ZeroDivisionError
    r, u = P.eps_coefs("sample", 1.0, 0.0)
    assert r == math.inf and u == -math.inf
    assert P.x0_coefs("epsilon", 1.0, 0.0) == (1.0, 0.0) and P.x0_coefs("v_prediction", 1.0, 0.0) == (1.0, 0.0)
    # α = 0 (zero terminal SNR): ε's x̂0 is infinite; v and flow stay finite
    p, q = P.x0_coefs("epsilon", 0.0, 1.0)
    assert p == math.inf and q == -math.inf
    assert P.x0_coefs("v_prediction", 0.0, 1.0) == (0.0, -1.0)
    assert P.eps_coefs("v_prediction", 0.0, 1.0) == (1.0, 0.0)
    assert P.x0_coefs("flow_prediction", 0.0, 1.0) == (1.0, -1.0)
    assert P.eps_coefs("flow_prediction", 0.0, 1.0) == (1.0, 0.0)


@pytest.mark.parametrize("fn", [P.x0_coefs, P.eps_coefs])
def test_unknown_type_names_the_argument(fn):
    with pytest.raises(ValueError, match=r"prediction_type must be one of \('epsilon', 'sample', 'v_prediction', "
                                         r"'flow_prediction'\), got 'eps'"):
        fn("eps", 0.6, 0.8)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        fn(None, 0.6, 0.8)
    with pytest.raises(ValueError, match=r"prediction_type must be one of \('epsilon', 'sample', 'v_prediction'\), "
                                         r"got 'flow_prediction'"):
        fn("flow_prediction", 0.6, 0.8, types=P.VP_PREDICTION_TYPES)


def test_unknown_type_tensor_helpers_and_check():
    x = torch.zeros(2)
    for call in (lambda: P.to_x0(x, x, 0.6, 0.8, "x0"), lambda: P.to_eps(x, x, 0.6, 0.8, "x0"),
                 lambda: P.target("x0", x, x, 0.6, 0.8)):
        with pytest.raises(ValueError, match="prediction_type must be one of .* got 'x0'"):
            call()
    with pytest.raises(ValueError, match="^mode must be one of"):
        P.check("x0", name="mode")
    assert P.check("v_prediction") == "v_prediction"


# ---- diffusers' formulas, one case each ----

@pytest.mark.parametrize("pt", P.VP_PREDICTION_TYPES)
def test_ddim_step_matches_diffusers(pt):
    """diffusers' DDIMScheduler.step (η = 0): x̂0 and x_prev = √ᾱ_p·x̂0 + √(1 − ᾱ_p)·ε̂ from our x̂0, ε̂."""
    sch = diffusers.DDIMScheduler(prediction_type=pt, clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(10)
    t, tp = int(sch.timesteps[3]), int(sch.timesteps[4])
    x, o = _data(2)
    ref = sch.step(o, t, x, eta=0.0)
    ab = sch.alphas_cumprod.double()  # diffusers' float32 ᾱ, exactly
    a, s = math.sqrt(ab[t]), math.sqrt(1.0 - ab[t])
    p, q = P.x0_coefs(pt, a, s)
    r, u = P.eps_coefs(pt, a, s)
    x0, eps = P.to_x0(x, o, a, s, pt), P.to_eps(x, o, a, s, pt)
    # diffusers takes ᾱ**0.5 in float32: agreement to float32's rounding of the coefficients
    torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p * x + q * o, x0, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(r * x + u * o, eps, rtol=1e-14, atol=1e-14)
    prev = math.sqrt(ab[tp]) * x0 + math.sqrt(1.0 - ab[tp]) * eps
    torch.testing.assert_close(prev, ref.prev_sample, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pt", P.VP_PREDICTION_TYPES)
def test_ddpm_x0_and_velocity_match_diffusers(pt):
    """diffusers' DDPMScheduler: step's pred_original_sample, and get_velocity (the v target of training)."""
    sch = diffusers.DDPMScheduler(prediction_type=pt, clip_sample=False)
    t = 417
    x, o = _data(3)
    ref = sch.step(o, t, x, generator=torch.Generator().manual_seed(0))
    ab = float(sch.alphas_cumprod.double()[t])
    a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
    torch.testing.assert_close(P.to_x0(x, o, a, s, pt), ref.pred_original_sample, rtol=1e-6, atol=1e-6)
    x0, eps = _data(4)
    v = sch.get_velocity(x0, eps, torch.full((x0.shape[0],), t))
    torch.testing.assert_close(P.target("v_prediction", x0, eps, a, s), v, rtol=1e-6, atol=1e-6)


def test_flow_matches_diffusers_flow_path():
    """FlowMatchEulerDiscreteScheduler.scale_noise is x = (1 − σ)·x0 + σ·ε; the model's target ε − x0 gives back x0."""
    sch = diffusers.FlowMatchEulerDiscreteScheduler()
    sch.set_timesteps(10)
    x0, eps = _data(5)
    k = 4
    sig = float(sch.sigmas[k])
    x = sch.scale_noise(x0, sch.timesteps[k:k + 1], eps)
    o = P.target("flow_prediction", x0, eps, 1.0 - sig, sig)
    torch.testing.assert_close(P.to_x0(x, o, 1.0 - sig, sig, "flow_prediction"), x0, rtol=1e-6, atol=1e-6)


# ---- a call site: the plans' d = p·x + q·o is the module's (p, q) ----

@pytest.mark.parametrize("pt", P.VP_PREDICTION_TYPES)
def test_dpm_solver_plan_rows_use_the_coefficients(pt):
    o = S.solver_options("dpmsolver++", {"prediction_type": pt}, {})
    plan = S.build_plan("dpmsolver++", NoiseSchedule.linear(), 5, o, None)
    table = plan.coef_table()
    for i, sig in enumerate(plan.sigmas[:-1]):
        a, s, _ = grids.vp(sig)
        assert (float(table[i, COEF["p"]]), float(table[i, COEF["q"]])) == P.x0_coefs(pt, a, s)
