"""Conv2d and Linear for the U-Net: PyTorch's modules (same parameters and state_dict keys) with one change on the CPU.

float16 on the CPU computes in float32 and rounds the result to float16 once. PyTorch's CPU float16 convolution and
matmul are slow paths on CPUs without native fp16 arithmetic (this project's AMD EPYC, torch 2.13: a 3×3 conv of
8×128×32² is 48 ms in fp32, 3.8 s in fp16 NCHW, 0.21 s in fp16 channels_last; a 16384×256 by 256×768 matmul 0.12 s
against 0.58 s), and every fp16 product is exact in fp32, so this is the fp32-accumulated result that a GPU's fp16
convolution or GEMM also returns, not an approximation of it. Every other device and dtype: PyTorch's own kernels.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fastdiff._backend import cpu_half


def _up(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, float16 on the CPU through float32 (module docstring)."""
    if cpu_half(x):
        return F.linear(x.float(), weight.float(), _up(bias)).half()
    return F.linear(x, weight, bias)


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_half(x):
            # keep the input's memory format: channels_last stays channels_last through the fp32 copy
            return self._conv_forward(x.float(), self.weight.float(), _up(self.bias)).half()
        return self._conv_forward(x, self.weight, self.bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
