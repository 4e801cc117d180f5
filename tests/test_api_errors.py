"""API errors that point the right way (issue 22, item 11): each test is named after the behaviour it holds.

Every refused call must raise before any sampling work, with a message that names the argument and the fix; every
accepted spelling (a schedule name, a NumPy integer) must give the same result as the canonical one.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.theory.langevin import langevin_sample
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref

SHAPE = (2, 1, 4, 4)


def eps_model(x, t):
    return 0.1 * x  # deterministic, so two calls with the same generator agree exactly


def gen():
    return torch.Generator().manual_seed(0)


# ---- schedule= by name -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, builder", [("linear", NoiseSchedule.linear), ("cosine", NoiseSchedule.cosine),
                                           ("squaredcos_cap_v2", NoiseSchedule.cosine),
                                           ("scaled_linear", NoiseSchedule.scaled_linear)])
@pytest.mark.parametrize("sampler", [None, "ddim", "ddpm", "euler"])
def test_schedule_name_is_the_named_noise_schedule(name, builder, sampler):
    kw = dict(shape=SHAPE, sampler=sampler) if sampler else dict(shape=SHAPE)
    got = fastdiff.sample(eps_model, 4, schedule=name, generator=gen(), **kw)
    want = fastdiff.sample(eps_model, 4, schedule=builder(), generator=gen(), **kw)
    assert torch.equal(got, want)


def test_schedule_name_works_in_ddim_and_ddpm_sample():
    want = fastdiff.ddim_sample(eps_model, 4, shape=SHAPE, schedule=NoiseSchedule.cosine(), generator=gen())
    assert torch.equal(fastdiff.ddim_sample(eps_model, 4, shape=SHAPE, schedule="cosine", generator=gen()), want)
    want = fastdiff.ddpm_sample(eps_model, steps=4, shape=SHAPE, schedule=NoiseSchedule.linear(), generator=gen())
    assert torch.equal(fastdiff.ddpm_sample(eps_model, steps=4, shape=SHAPE, schedule="linear", generator=gen()), want)


def test_unknown_schedule_name_lists_the_names_first():
    with pytest.raises(ValueError, match=r"schedule: unknown schedule name 'lin'; names: \('linear'"):
        fastdiff.sample(eps_model, 4, shape=SHAPE, schedule="lin")
    with pytest.raises(ValueError, match="unknown schedule name 'lin'"):
        fastdiff.ddim_sample(eps_model, 4, shape=SHAPE, schedule="lin")


def test_schedule_of_a_wrong_type_says_what_is_expected_before_asking_for_sampler():
    with pytest.raises(TypeError, match=r"schedule: expected a NoiseSchedule, a schedule name .* got int"):
        fastdiff.sample(eps_model, 4, shape=SHAPE, schedule=5)


# ---- device= -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("entry", ["sample", "ddim_sample", "ddpm_sample"])
def test_cuda_device_without_cuda_names_the_argument_and_the_fix(entry):
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available: .*use device='cpu'"):
        getattr(fastdiff, entry)(eps_model, steps=4, shape=SHAPE, device="cuda")


@pytest.mark.parametrize("entry", ["sample", "ddim_sample", "ddpm_sample"])
def test_gpu_is_not_a_device_and_the_error_names_cuda(entry):
    with pytest.raises(ValueError, match=r"device='gpu' is not a device \(a GPU is 'cuda' or 'cuda:N'\)"):
        getattr(fastdiff, entry)(eps_model, steps=4, shape=SHAPE, device="gpu")


def test_device_of_a_wrong_type_is_a_type_error_naming_device():
    with pytest.raises(TypeError, match="device must be a device such as 'cpu'"):
        fastdiff.sample(eps_model, 4, shape=SHAPE, device=1.5)


def test_cpu_device_is_accepted_as_string_and_torch_device():
    a = fastdiff.sample(eps_model, 4, shape=SHAPE, device="cpu", generator=gen())
    b = fastdiff.sample(eps_model, 4, shape=SHAPE, device=torch.device("cpu"), generator=gen())
    assert torch.equal(a, b)


# ---- steps: one rule for every entry point ----------------------------------------------------------------------

ENTRIES = [("sample", {}), ("sample", {"sampler": "ddim"}), ("sample", {"sampler": "ddpm"}),
           ("sample", {"sampler": "euler"}), ("ddim_sample", {}), ("ddpm_sample", {})]


@pytest.mark.parametrize("entry, kw", ENTRIES)
@pytest.mark.parametrize("steps, err", [(5.0, TypeError), ("5", TypeError), (True, TypeError), (0, ValueError),
                                        (-3, ValueError)])
def test_steps_is_refused_by_the_same_rule_in_every_entry_point(entry, kw, steps, err):
    with pytest.raises(err, match="^steps must be"):
        getattr(fastdiff, entry)(eps_model, steps=steps, shape=SHAPE, **kw)


@pytest.mark.parametrize("entry, kw", ENTRIES)
def test_numpy_integer_steps_are_integers_in_every_entry_point(entry, kw):
    f = getattr(fastdiff, entry)
    assert torch.equal(f(eps_model, steps=np.int64(4), shape=SHAPE, generator=gen(), **kw),
                       f(eps_model, steps=4, shape=SHAPE, generator=gen(), **kw))


# ---- the model's dtype -------------------------------------------------------------------------------------------

class Half(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        return self.conv(x)


@pytest.mark.parametrize("entry", ["sample", "ddim_sample", "ddpm_sample"])
def test_dtype_other_than_the_models_is_an_error_naming_both(entry):
    m = Half().half()
    with pytest.raises(TypeError, match=r"dtype / x_T: the sample is torch.float32 but the model's parameters are "
                                        r"torch.float16, .* pass dtype=torch.float16 .* or cast the model"):
        getattr(fastdiff, entry)(m, steps=3, shape=SHAPE, dtype=torch.float32)


def test_x_T_of_another_dtype_than_the_model_names_x_T():
    m = Half().half()
    with pytest.raises(TypeError, match=r"dtype / x_T: the sample is torch.float32 but the model's parameters are "):
        fastdiff.ddim_sample(m, 3, x_T=torch.randn(SHAPE))


def test_model_dtype_is_followed_when_dtype_is_unset():
    m = Half().to(torch.float64)
    assert fastdiff.ddim_sample(m, 3, shape=SHAPE).dtype == torch.float64


# ---- ᾱ below the sample dtype's range ---------------------------------------------------------------------------

def _steep(min_abar: float, T: int = 1000) -> NoiseSchedule:
    """Constant β with ᾱ_{T−1} = min_abar."""
    beta = 1 - math.exp(math.log(min_abar) / T)
    return NoiseSchedule(torch.full((T,), beta, dtype=torch.float64))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++", "euler", "heun", "unipc", "euler_ancestral"])
def test_alpha_bar_underflowing_float32_is_an_error_not_a_nan_sample(sampler):
    sch = _steep(1e-97)
    with pytest.raises(ValueError, match=r"schedule: ᾱ .* = 1(\.23)?e-97 underflows torch.float32 .* sample in float64 "
                                         r"\(dtype=torch.float64\)"):
        fastdiff.sample(eps_model, 10, sampler=sampler, shape=SHAPE, schedule=sch, timestep_spacing="trailing")
    x = fastdiff.sample(eps_model, 10, sampler=sampler, shape=SHAPE, schedule=sch, dtype=torch.float64,
                        timestep_spacing="trailing")
    assert torch.isfinite(x).all()  # the fix the message gives works


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_samples_are_checked_in_the_float32_they_compute_in(dtype):
    with pytest.raises(ValueError, match=r"underflows torch.float32 .* sample in float64"):
        fastdiff.sample(eps_model, 10, sampler="ddim", shape=SHAPE, schedule=_steep(1e-97), dtype=dtype,
                        timestep_spacing="trailing")


def test_schedules_inside_float32_are_not_refused_in_half_precision():
    # cosine's ᾱ_999 = 2.4e-9 is below float16's smallest subnormal, but the steps compute in float32 (and the fuzz
    # against diffusers holds such float16 loops to its tolerance): not refused
    for dt in (torch.float16, torch.bfloat16):
        for sampler in ("ddim", "ddpm"):
            x = fastdiff.sample(eps_model, 10, sampler=sampler, shape=SHAPE, schedule="cosine", dtype=dt,
                                timestep_spacing="trailing")
            assert torch.isfinite(x).all()


def test_zero_terminal_snr_is_not_underflow():
    sch = NoiseSchedule.linear(rescale_zero_snr=True)
    x = fastdiff.sample(eps_model, 10, sampler="ddim", shape=SHAPE, schedule=sch, prediction_type="v_prediction",
                        timestep_spacing="trailing")
    assert torch.isfinite(x).all()


# ---- option types ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(clip_sample=True, clip_sample_range="1"), dict(clip_sample_range="1"),
                                dict(thresholding=True, sample_max_value="2"), dict(steps_offset=1.5)])
def test_option_of_the_wrong_type_is_named(kw):
    name = [k for k in kw if k not in ("clip_sample", "thresholding")][0]
    with pytest.raises(TypeError, match=f"^{name} must be"):
        fastdiff.ddim_sample(eps_model, 4, shape=SHAPE, **kw)


def test_numpy_numbers_are_accepted_as_options():
    a = fastdiff.ddim_sample(eps_model, 4, shape=SHAPE, clip_sample=True, clip_sample_range=np.float32(0.5),
                             generator=gen())
    b = fastdiff.ddim_sample(eps_model, 4, shape=SHAPE, clip_sample=True, clip_sample_range=0.5, generator=gen())
    assert torch.equal(a, b)


# ---- GroupNorm+SiLU ------------------------------------------------------------------------------------------------

def test_numpy_integer_num_groups_is_an_integer():
    x = torch.randn(2, 8, 4, 4)
    w, b = torch.randn(8), torch.randn(8)
    assert torch.equal(group_norm_silu(x, w, b, np.int64(4)), group_norm_silu(x, w, b, 4))
    assert torch.allclose(group_norm_silu(x, w, b, np.int32(4), backend="torch"), group_norm_silu_ref(x, w, b, 4))


def test_numpy_integer_norm_num_groups_in_a_unet_config():
    from fastdiff.nn.config import UNet2DConfig

    c = UNet2DConfig(norm_num_groups=np.int64(8), block_out_channels=(np.int64(16), 32), sample_size=np.int64(8),
                     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    assert type(c.norm_num_groups) is int and c.norm_num_groups == 8 and type(c.sample_size) is int


def test_bool_num_groups_is_still_refused():
    with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
        group_norm_silu(torch.randn(2, 8, 4, 4), None, None, True)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_list_as_group_norm_weight_is_a_type_error_naming_it(which):
    x = torch.randn(2, 8, 4, 4)
    kw = dict(weight=torch.ones(8), bias=torch.zeros(8))
    kw[which] = [1.0] * 8
    with pytest.raises(TypeError, match=fr"{which} must be a tensor of shape \(8,\) or None, got list"):
        group_norm_silu(x, kw["weight"], kw["bias"], 4)


# ---- attention -----------------------------------------------------------------------------------------------------

def test_attention_over_zero_keys_is_an_error():
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 0, 8)
    with pytest.raises(ValueError, match=r"k, v have no tokens \(L_k = 0"):
        attention(q, k, k)


def test_attention_of_zero_queries_is_an_empty_result():
    q = torch.randn(1, 1, 0, 8)
    k = torch.randn(1, 1, 3, 8)
    assert attention(q, k, k).shape == (1, 1, 0, 8)


# ---- Langevin ------------------------------------------------------------------------------------------------------

def test_langevin_score_of_the_wrong_shape_is_an_error_not_a_broadcast():
    with pytest.raises(ValueError, match=r"returned shape \(3,\), expected x's shape \(2, 3\)"):
        langevin_sample(lambda x, s: torch.zeros(x.shape[1:]), [1.0, 0.1], 2, 0.01, shape=(2, 3))


def test_langevin_score_returning_none_is_a_type_error():
    with pytest.raises(TypeError, match=r"returned NoneType, expected a tensor of x's shape \(2, 3\)"):
        langevin_sample(lambda x, s: None, [1.0, 0.1], 2, 0.01, shape=(2, 3))


def test_langevin_device_is_checked_like_the_samplers():
    with pytest.raises(ValueError, match=r"device='gpu' is not a device \(a GPU is 'cuda' or 'cuda:N'\)"):
        langevin_sample(lambda x, s: -x, [1.0], 1, 0.01, shape=(2, 3), device="gpu")


def test_langevin_score_in_the_final_denoise_is_checked_too():
    calls = []

    def score(x, s):
        calls.append(s)
        return -x if len(calls) <= 2 else None

    with pytest.raises(TypeError, match="returned NoneType"):
        langevin_sample(score, [1.0], 2, 0.01, shape=(2, 3), final_denoise=True)
    assert len(calls) == 3
