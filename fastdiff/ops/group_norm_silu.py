"""GroupNorm, affine and optional SiLU in one pass: y = act(GN(x + add)·w + b).

    x: (N, C, *spatial)  NCHW-contiguous or channels_last; fp32, fp16 or bf16
    weight, bias: (C,) or None (no affine)
    add: (N, C) or None — a per-sample, per-channel vector added to x *before* the statistics. This is where the
         ResBlock's time embedding really sits: h = conv1(...) + temb[:, :, None, None]; norm2(h). Fusing it saves
         one read and one write of h.
    returns: same shape, dtype and memory format as x.

Statistics are kept in float32 whatever the I/O dtype. The reduction over one (sample, group) is split across
programs / threads; partial results are merged with Chan's parallel formula (count, mean, M2), which is as stable as
Welford's; inside a block the mean is taken first and M2 = Σ(x − mean)² second (two-pass over data already in
registers or cache), so there is no E[x²] − E[x]² cancellation.

Backends: "torch" (the reference), "triton", "cpp" (csrc/cpu/group_norm_silu.cpp), "cuda"
(csrc/cuda/group_norm_silu.cu). Memory traffic of the eager pair GroupNorm + SiLU is 2 reads + 1 write (GroupNorm
statistics, then normalise) plus 1 read + 1 write (SiLU); the fused op moves 1 read + 1 write of x when the group fits
in cache (CPU) and 2 reads + 1 write otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff import _backend

OP = "group_norm_silu"
SUPPORTED = ("torch",)


def group_norm_silu_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                        eps: float = 1e-5, silu: bool = True, add: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: act(F.group_norm(x + add[..., None, None], ...)). Runs in x's dtype, as eager PyTorch does."""
    if add is not None:
        x = x + add.reshape(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _check(x, weight, bias, num_groups, eps, add):
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, ...), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"num_groups must be a positive divisor of the channel count {C}, got {num_groups!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (C,) or t.device != x.device):
            raise ValueError(f"{name} must have shape ({C},) on {x.device}, got {tuple(t.shape)} on {t.device}")
    if add is not None and (add.shape != (x.shape[0], C) or add.device != x.device):
        raise ValueError(f"add must have shape ({x.shape[0]}, {C}) on {x.device}, got {tuple(add.shape)} on "
                         f"{add.device}")


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float = 1e-5, silu: bool = True, add: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """act(GroupNorm(x + add)) with fp32 statistics; see the module docstring for shapes. Dispatch:
    fastdiff._backend.resolve (backend "auto" | "torch" | "triton" | "cpp" | "cuda")."""
    _check(x, weight, bias, num_groups, eps, add)
    name = _backend.resolve(OP, backend, x.device, SUPPORTED)
    if name == "torch":
        return group_norm_silu_ref(x, weight, bias, num_groups, eps, silu, add)
    raise AssertionError(name)
