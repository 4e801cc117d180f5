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

Autograd: both custom ops (fastdiff::group_norm_silu, fastdiff::group_norm_silu_triton) have a registered backward,
`group_norm_silu_backward`: inputs saved; the backward recomputes GN with ATen's fused kernels and runs ATen's fused
GroupNorm backward (eager PyTorch's own), in float32 for fp16/bf16.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from fastdiff import _backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the Triton backend reports itself unavailable (fastdiff.backends())
    triton = None

OP = "group_norm_silu"
SUPPORTED = ("torch", "triton", "cpp", "cuda")


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
    if isinstance(num_groups, numbers.Integral) and not isinstance(num_groups, bool):
        num_groups = int(num_groups)  # NumPy integers are integers
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"num_groups must be a positive divisor of the channel count {C}, got {num_groups!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor of shape ({C},) or None, got {type(t).__name__}; "
                            f"wrap it: torch.tensor({name}, dtype=x.dtype, device=x.device)")
        if t is not None and (t.shape != (C,) or t.device != x.device):
            raise ValueError(f"{name} must have shape ({C},) on {x.device}, got {tuple(t.shape)} on {t.device}")
    if add is not None and (add.shape != (x.shape[0], C) or add.device != x.device):
        raise ValueError(f"add must have shape ({x.shape[0]}, {C}) on {x.device}, got {tuple(add.shape)} on "
                         f"{add.device}")
    return num_groups


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float = 1e-5, silu: bool = True, add: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """act(GroupNorm(x + add)) with fp32 statistics; see the module docstring for shapes. Dispatch:
    fastdiff._backend.resolve (backend "auto" | "torch" | "triton" | "cpp" | "cuda")."""
    num_groups = _check(x, weight, bias, num_groups, eps, add)
    name = _backend.resolve(OP, backend, x.device, SUPPORTED)
    if name == "torch":
        return group_norm_silu_ref(x, weight, bias, num_groups, eps, silu, add)
    if not _dense(x):
        x = x.contiguous()
    op = torch.ops.fastdiff.group_norm_silu_triton if name == "triton" else torch.ops.fastdiff.group_norm_silu
    args = (x, weight, bias, add, num_groups, float(eps), bool(silu))
    if name == "cpp" and not (torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            x.requires_grad or any(t is not None and t.requires_grad for t in (weight, bias, add))))):
        # When no input needs a gradient, the C++ op is called below the autograd key: the Python autograd kernel
        # of register_autograd costs ~4 µs more per call (0.15 ms calls at the 16² sizes).
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def _dense(x: torch.Tensor) -> bool:
    """NCHW-contiguous, or channels_last (4-d) / channels_last_3d (5-d): the layouts the kernels take."""
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


# ---- Triton ------------------------------------------------------------------------------------------------------
# Two launches over a grid (N·G, SPLIT): SPLIT programs share one (sample, group), so batch 1 × 32 groups still gives
# 32·SPLIT programs. Launch 1 reduces each program's slice of pixels to (count, mean, M2) (per tile: mean first, then
# Σ(x − mean)², tiles merged with Chan's formula). Launch 2 merges the SPLIT partials of its group the same way and
# writes y = act(x·A + B) for its slice. Traffic: 2 reads of x + 1 write of y.

if triton is not None:
    @triton.jit
    def _group_channels(G, Cg, BLOCK_C: tl.constexpr):
        """This program's (sample·group, split index, sample, its group's channel indices, their mask)."""
        ng = tl.program_id(0)
        sp = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        return ng, sp, ng // G, (ng % G) * Cg + cs, cs < Cg

    @triton.jit
    def _channel_vec(ptr, off, cmask, fill: tl.constexpr, HAS: tl.constexpr, BLOCK_C: tl.constexpr):
        """A per-channel parameter (weight, bias, add) in float32, or `fill` where it is absent."""
        if HAS:
            v = tl.load(ptr + off, mask=cmask, other=fill).to(tl.float32)
        else:
            v = tl.full([BLOCK_C], fill, dtype=tl.float32)
        return v

    @triton.jit
    def _gns_stats_kernel(x_ptr,  # (N, C, HW) with strides (sN, sC, sP): NCHW or NHWC
                          add_ptr,  # (N, C) float32, or a dummy if not HAS_ADD
                          part_ptr,  # (N·G, SPLIT, 3) float32: count, mean, M2
                          C, HW, G, Cg, sN, sC, sP, SPLIT, P_PER,
                          HAS_ADD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        ng, sp, n, ch, cmask = _group_channels(G, Cg, BLOCK_C)
        a = _channel_vec(add_ptr, n * C + ch, cmask, 0.0, HAS_ADD, BLOCK_C)
        p_start = sp * P_PER
        p_end = tl.minimum(p_start + P_PER, HW)
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for p0 in range(p_start, p_end, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            pmask = ps < p_end
            m = pmask[:, None] & cmask[None, :]
            off = n.to(tl.int64) * sN + ch[None, :].to(tl.int64) * sC + ps[:, None].to(tl.int64) * sP
            v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) + a[None, :]
            tc = tl.sum(tl.sum(m.to(tl.float32), axis=1), axis=0)
            tmean = tl.sum(tl.sum(tl.where(m, v, 0.0), axis=1), axis=0) / tc
            d = tl.where(m, v - tmean, 0.0)
            tm2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            tot = cnt + tc
            delta = tmean - mean
            mean = mean + delta * (tc / tot)
            m2 = m2 + tm2 + delta * delta * cnt * (tc / tot)
            cnt = tot
        base = part_ptr + (ng * SPLIT + sp) * 3
        tl.store(base, cnt)
        tl.store(base + 1, mean)
        tl.store(base + 2, m2)

    @triton.jit
    def _gns_apply_kernel(x_ptr, y_ptr,  # (N, C, HW), same strides (sN, sC, sP)
                          w_ptr, b_ptr,  # (C,) or dummies
                          add_ptr,  # (N, C) float32 or dummy
                          part_ptr,  # (N·G, SPLIT, 3) float32
                          C, HW, G, Cg, sN, sC, sP, SPLIT, P_PER, eps,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
                          SPLIT_P2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        ng, sp, n, ch, cmask = _group_channels(G, Cg, BLOCK_C)
        ks = tl.arange(0, SPLIT_P2)
        kmask = ks < SPLIT
        pb = part_ptr + (ng * SPLIT + ks) * 3
        cnt = tl.load(pb, mask=kmask, other=0.0)
        mu = tl.load(pb + 1, mask=kmask, other=0.0)
        m2 = tl.load(pb + 2, mask=kmask, other=0.0)
        tot = tl.sum(cnt, axis=0)
        mean = tl.sum(cnt * mu, axis=0) / tot
        dm = mu - mean
        var = (tl.sum(m2, axis=0) + tl.sum(cnt * dm * dm, axis=0)) / tot
        rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
        w = _channel_vec(w_ptr, ch, cmask, 1.0, HAS_W, BLOCK_C)
        b = _channel_vec(b_ptr, ch, cmask, 0.0, HAS_B, BLOCK_C)
        a = _channel_vec(add_ptr, n * C + ch, cmask, 0.0, HAS_ADD, BLOCK_C)
        A = rstd * w
        B = b + (a - mean) * A
        p_start = sp * P_PER
        p_end = tl.minimum(p_start + P_PER, HW)
        for p0 in range(p_start, p_end, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = (ps < p_end)[:, None] & cmask[None, :]
            off = n.to(tl.int64) * sN + ch[None, :].to(tl.int64) * sC + ps[:, None].to(tl.int64) * sP
            v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            yv = v * A[None, :] + B[None, :]
            if SILU:
                yv = yv / (1.0 + tl.exp(-yv))
            tl.store(y_ptr + off, yv.to(y_ptr.dtype.element_ty), mask=m)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the CPU interpreter: a few programs, enough to exercise the split


@torch.library.custom_op("fastdiff::group_norm_silu_triton", mutates_args=())
def _group_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            add: torch.Tensor | None, num_groups: int, eps: float, silu: bool) -> torch.Tensor:
    """Triton launcher (same contract as the C++ op fastdiff::group_norm_silu; the wrapper checks the arguments)."""
    y = torch.empty_like(x)
    N, C = x.shape[:2]
    HW = x.numel() // max(N * C, 1)
    if x.numel() == 0:
        return y
    G = num_groups
    Cg = C // G
    if x.is_contiguous():
        sN, sC, sP = C * HW, HW, 1
    else:  # channels_last: (N, *spatial, C)
        sN, sC, sP = HW * C, 1, C
    BLOCK_C = triton.next_power_of_2(Cg)
    BLOCK_P = max(1, min(triton.next_power_of_2(HW), 4096 // BLOCK_C))
    split = max(1, min(triton.cdiv(_target_programs(x.device), N * G), triton.cdiv(HW, BLOCK_P)))
    p_per = triton.cdiv(triton.cdiv(HW, split), BLOCK_P) * BLOCK_P
    split = triton.cdiv(HW, p_per)
    part = torch.empty((N * G, split, 3), device=x.device, dtype=torch.float32)
    a = add.float().contiguous() if add is not None else part
    w = weight.contiguous() if weight is not None else part
    b = bias.contiguous() if bias is not None else part
    grid = (N * G, split)
    _gns_stats_kernel[grid](x, a, part, C, HW, G, Cg, sN, sC, sP, split, p_per,
                            HAS_ADD=add is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    _gns_apply_kernel[grid](x, y, w, b, a, part, C, HW, G, Cg, sN, sC, sP, split, p_per, eps,
                            HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, SILU=silu,
                            SPLIT_P2=triton.next_power_of_2(split), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return y


@_group_norm_silu_triton.register_fake
def _(x, weight, bias, add, num_groups, eps, silu):
    return torch.empty_like(x)


# ---- autograd (both ops) -----------------------------------------------------------------------------------------
# Only the inputs are saved. The backward recomputes the statistics and z = GN(x + add)·w + b with ATen's fused
# native_group_norm, takes dz = silu_backward(dy, z) (dz = dy without SiLU), then ATen's fused
# native_group_norm_backward gives dx, dw, db, and dadd = Σ_spatial dx. That is eager PyTorch's own backward (plus a
# recomputed forward), run in float32 for fp16/bf16 I/O (float64 stays float64). Formula, for reference:
#   dw = Σ_{n,p} dz·x̂,  db = Σ_{n,p} dz,  g = dz·w,  dx = rstd·(g − mean_group(g) − x̂·mean_group(g·x̂)).

def group_norm_silu_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, add: torch.Tensor | None, num_groups: int, eps: float,
                             silu: bool, needs: tuple[bool, bool, bool, bool] = (True, True, True, True)):
    """(dx, dweight, dbias, dadd) of act(GN(x + add)·w + b) for the upstream gradient dy (x's shape); an entry is
    None where its input is None or `needs` says it is not wanted. dx keeps x's dtype and memory format."""
    N, C = x.shape[:2]
    HW = x.numel() // max(N * C, 1)
    ct = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    # ATen's CPU GroupNorm backward assumes dz and x share one memory format (eager autograd guarantees it): x's
    fmt = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    xf = x.to(ct).contiguous(memory_format=fmt)
    if add is not None:
        xf = (xf + add.to(ct).reshape(N, C, *([1] * (x.dim() - 2)))).contiguous(memory_format=fmt)
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    dz = dy.to(ct).contiguous(memory_format=fmt)
    if silu:
        z, mean, rstd = torch.native_group_norm(xf, w, b, N, C, HW, num_groups, eps)
        dz = torch.ops.aten.silu_backward(dz, z.contiguous(memory_format=fmt)).contiguous(memory_format=fmt)
    else:
        mean, rstd = torch.native_group_norm(xf, None, None, N, C, HW, num_groups, eps)[1:]
    want_dx = needs[0] or (add is not None and needs[3])
    mask = [want_dx, weight is not None and needs[1], bias is not None and needs[2]]
    dxf, dwf, dbf = torch.ops.aten.native_group_norm_backward(dz, xf, mean, rstd, w, N, C, HW, num_groups, mask)
    dw = dwf.to(weight.dtype) if mask[1] else None
    db = dbf.to(bias.dtype) if mask[2] else None
    dadd = dxf.reshape(N, C, -1).sum(-1).to(add.dtype) if add is not None and needs[3] else None
    dx = dxf.to(dtype=x.dtype, memory_format=fmt) if needs[0] else None
    return dx, dw, db, dadd


def _setup_context(ctx, inputs, output):
    x, weight, bias, add, num_groups, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias, add)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _backward(ctx, dy):
    x, weight, bias, add = ctx.saved_tensors
    dx, dw, db, dadd = group_norm_silu_backward(dy, x, weight, bias, add, ctx.num_groups, ctx.eps, ctx.silu,
                                                tuple(ctx.needs_input_grad[:4]))
    return dx, dw, db, dadd, None, None, None


torch.library.register_autograd("fastdiff::group_norm_silu_triton", _backward, setup_context=_setup_context)


if _backend.compiled_op_loaded("group_norm_silu"):  # the C++/CUDA op's fake kernel and autograd, when the extension is loaded
    @torch.library.register_fake("fastdiff::group_norm_silu")
    def _(x, weight, bias, add, num_groups, eps, silu):
        return torch.empty_like(x)

    torch.library.register_autograd("fastdiff::group_norm_silu", _backward, setup_context=_setup_context)
