"""fastdiff.nn.layers: Conv2d / Linear are PyTorch's, except float16 on the CPU, which computes in float32 and rounds
once (exact products, fp32 accumulation: what a GPU's fp16 convolution returns)."""
import pytest
import torch
from torch.nn import functional as F

from fastdiff.nn.layers import Conv2d, Linear, linear


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_conv_fp16_cpu_is_fp32_rounded_once(channels_last):
    torch.manual_seed(0)
    conv = Conv2d(6, 5, 3, padding=1).half()
    x = torch.randn(2, 6, 7, 9).half()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = conv(x)
    want = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1).half()
    assert y.dtype == torch.float16 and torch.equal(y, want)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    # and it is at least as close to the float64 result as PyTorch's own fp16 convolution
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    native = torch.nn.Conv2d.forward(conv, x)
    assert (y.double() - exact).abs().max() <= (native.double() - exact).abs().max() + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_other_dtypes_are_pytorch(dtype):
    torch.manual_seed(0)
    conv, lin = Conv2d(4, 3, 3, stride=2).to(dtype), Linear(5, 7).to(dtype)
    x, z = torch.randn(1, 4, 8, 8).to(dtype), torch.randn(3, 5).to(dtype)
    assert torch.equal(conv(x), torch.nn.Conv2d.forward(conv, x))
    assert torch.equal(lin(z), F.linear(z, lin.weight, lin.bias))


def test_linear_fp16_cpu():
    torch.manual_seed(0)
    lin = Linear(5, 7).half()
    z = torch.randn(2, 3, 5).half()
    assert torch.equal(lin(z), F.linear(z.float(), lin.weight.float(), lin.bias.float()).half())
    assert torch.equal(linear(z, lin.weight), F.linear(z.float(), lin.weight.float()).half())


def test_state_dict_keys_unchanged():
    assert set(Conv2d(2, 3, 1).state_dict()) == set(torch.nn.Conv2d(2, 3, 1).state_dict()) == {"weight", "bias"}
    assert set(Linear(2, 3, bias=False).state_dict()) == {"weight"}
