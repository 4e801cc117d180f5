"""Self-attention over the H·W tokens of a feature map: softmax(q kᵀ · scale) v, per head.

    q, k, v: (B, heads, L, D)  L = H·W tokens, D = head width (C / heads; the DDPM U-Nets use one head, D = C)
    returns: (B, heads, L, D)

Backend: "torch" = torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels where torch has
them). On this project's CPU machine SDPA was measured 2-8x faster than the plain math reference (docs/benchmarks.md),
so "auto" picks it on every device. No custom (Triton / CUDA) attention kernel exists yet; GPU: not measured.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff import _backend

OP = "attention"
SUPPORTED = ("torch",)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch math: softmax(q kᵀ · scale) v with the softmax in float32 (diffusers' upcast_softmax)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(s.softmax(dim=-1), v.float()).to(q.dtype)


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (B, heads, L, D), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if k.shape != q.shape[:2] + k.shape[2:] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one dtype among float32/float16/bfloat16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ · scale) v, scale defaulting to 1/√D; shapes in the module docstring."""
    _check(q, k, v)
    name = _backend.resolve(OP, backend, q.device, SUPPORTED) if backend != "auto" else "torch"
    if name == "torch":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    raise AssertionError(name)
