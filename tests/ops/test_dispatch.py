"""fastdiff._backend.resolve: one cached rule for every op, FASTDIFF_BACKEND honoured by every op (attention too)."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastdiff import _backend
from fastdiff.ops import attention as attn_mod
from fastdiff.ops import group_norm_silu as gns
from fastdiff.ops import sampler_step as ss

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
CPU = torch.device("cpu")


def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 1, 20, 16, generator=g) for _ in range(3)]


def test_resolve_follows_the_environment_each_call(monkeypatch):
    """The cache key holds FASTDIFF_BACKEND: setting or clearing it changes the answer at once."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    auto = _backend.resolve("sampler_step", "auto", CPU)
    assert auto == ("cpp" if _backend.has_cpp() else "torch")
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert _backend.resolve("sampler_step", "auto", CPU) == "torch"
    assert _backend.resolve("sampler_step", "auto", CPU) == "torch"  # a cache hit
    monkeypatch.delenv("FASTDIFF_BACKEND")
    assert _backend.resolve("sampler_step", "auto", CPU) == auto
    # an explicit request is not overridden by the environment
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    if _backend.has_cpp():
        assert _backend.resolve("sampler_step", "cpp", CPU) == "cpp"


def test_resolve_errors_name_the_setting(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("sampler_step", "tpu", CPU)
    with pytest.raises(RuntimeError, match="'cuda' needs CUDA tensors"):
        _backend.resolve("sampler_step", "cuda", CPU)
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        _backend.resolve("attention", "cpp", CPU, attn_mod.SUPPORTED)
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    for _ in range(2):  # errors are not cached: they raise every time
        with pytest.raises(ValueError, match="FASTDIFF_BACKEND must be one of"):
            _backend.resolve("sampler_step", "auto", CPU)


def test_environment_backend_an_op_lacks_keeps_its_automatic_choice(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpp")
    with pytest.warns(RuntimeWarning, match="FASTDIFF_BACKEND='cpp' is not implemented for this op"):
        name = _backend.resolve("attention_env_test", "auto", CPU, attn_mod.SUPPORTED)
    assert name == "torch"
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="fastdiff.attention: FASTDIFF_BACKEND='cpp'"):
        out = attn_mod.attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_environment_torch_reaches_every_op(monkeypatch):
    """FASTDIFF_BACKEND=torch: each op runs its plain-PyTorch reference (bit-identical to calling it)."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    g = torch.Generator().manual_seed(1)
    x, o = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    coef = torch.tensor(ss.step_coefs("ddim", 0.5, 0.7), dtype=torch.float64)
    assert torch.equal(ss.sampler_step(x, o, coef)[0], ss.sampler_step_ref(x, o, coef)[0])
    h = torch.randn(2, 8, 4, 4, generator=g)
    assert torch.equal(gns.group_norm_silu(h, None, None, 4), gns.group_norm_silu_ref(h, None, None, 4))
    # attention: "torch" is SDPA, and the measurement of backend="auto" is skipped even where it would run
    monkeypatch.setattr(attn_mod, "AUTOTUNE_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(attn_mod, "_AUTO_CHOICE", {})
    monkeypatch.setattr(attn_mod, "_measure", lambda *a: pytest.fail("FASTDIFF_BACKEND=torch must not measure"))
    q, k, v = qkv()
    assert torch.equal(attn_mod.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert attn_mod.autotune_choices() == {}


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_environment_triton_reaches_attention(monkeypatch):
    """FASTDIFF_BACKEND=triton: attention(backend="auto") runs the Triton kernel, unmeasured."""
    calls = []
    real = torch.ops.fastdiff.attention_triton

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch.ops.fastdiff, "attention_triton", spy)
    monkeypatch.setattr(attn_mod, "_measure", lambda *a: pytest.fail("FASTDIFF_BACKEND=triton must not measure"))
    q, k, v = qkv()
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    attn_mod.attention(q, k, v)
    assert calls == []  # auto on CPU: SDPA
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    out = attn_mod.attention(q, k, v)
    assert len(calls) == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
