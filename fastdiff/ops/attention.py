"""Self-attention over the H·W tokens of a feature map: softmax(q kᵀ · scale) v, per head.

    q: (B, heads, Lq, D), k: (B, heads, Lk, D), v: (B, heads, Lk, Dv)  any strides (the U-Net passes views of one
       fused QKV projection); L = H·W tokens, D = head width (C / heads; the DDPM U-Nets use one head, D = C)
    returns: (B, heads, Lq, Dv) in q's dtype

Backends:
  "torch"  torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels where torch has them).
  "triton" fastdiff::attention_triton, a flash-attention-style kernel: one program per (BLOCK_M query rows, head),
           streaming BLOCK_N keys at a time with an online softmax (running max m, running sum l, rescaled fp32
           accumulator), so the L×L score matrix never reaches memory; scores, softmax and accumulation in float32
           whatever the I/O dtype (fp32 inputs use IEEE fp32 dots, not TF32). Backward: recomputed through the
           float32 reference (O(L²) memory), for completeness; sampling needs only the forward.
backend="auto": SDPA on CPU, where it is the measured winner (2-8x faster than the plain math reference,
docs/benchmarks.md; the Triton kernel runs on CPU only under the slow TRITON_INTERPRET=1 interpreter). On CUDA the
choice is made by measurement, once per (device, dtype, batch·heads, Lq, Lk, D, Dv) key: the first eager call times
both backends on its own inputs (CUDA events, median of 5 after a warm-up) and checks the Triton output against SDPA's
(it must agree within the dtype's tolerance, else SDPA is kept and a warning says so); later calls reuse the winner
(`autotune_choices()` lists them). Under torch.compile tracing, and during CUDA-graph capture of a shape never
measured, "auto" is SDPA (the CUDA-graph sampler's eager warm-up pass measures before it captures).
FASTDIFF_ATTENTION_AUTOTUNE=0 turns the measurement off (SDPA). Dispatch goes through `fastdiff._backend.resolve`
like every op: an explicit backend= or FASTDIFF_BACKEND=torch|triton is used as is (never measured); the measurement
only refines backend="auto".
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from fastdiff import _backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the Triton backend reports itself unavailable (fastdiff.backends())
    triton = None

OP = "attention"
SUPPORTED = ("torch", "triton")


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
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError(f"k, v have no tokens (L_k = 0, k {tuple(k.shape)}): a softmax over zero keys is undefined; "
                         "pass at least one key (attention over an empty sequence has no result)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ · scale) v, scale defaulting to 1/√D; shapes in the module docstring. backend: "auto" (SDPA on CPU,
    measured choice on CUDA: see the module docstring) | "torch" | "triton". Dispatch: fastdiff._backend.resolve,
    so FASTDIFF_BACKEND=torch|triton replaces "auto" here as for every op."""
    _check(q, k, v)
    name = _backend.resolve(OP, backend, q.device, SUPPORTED)
    if _backend.requested(backend) == "auto":  # the rule's automatic choice, refined by measurement where it runs
        name = _auto_backend(q, k, v, scale)
    if name == "torch":
        if _backend.cpu_half(q):
            # PyTorch's CPU fp16 SDPA is a slow path (2.6x slower than fp32 at 64x256 tokens x 256 on this
            # project's CPU); fp32 math rounded once is also the more accurate result
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale).half()
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if name == "triton":
        if q.shape[-1] > 512 or v.shape[-1] > 512:
            raise ValueError(f"backend 'triton': head width must be <= 512, got q/k {q.shape[-1]}, v {v.shape[-1]}")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return torch.ops.fastdiff.attention_triton(q, k, v, scale)
    raise AssertionError(name)


# ---- backend="auto": measured once per shape -------------------------------------------------------------------
AUTOTUNE_DEVICE_TYPES = ("cuda",)  # where "auto" measures; elsewhere it is SDPA
_AUTO_CHOICE: dict[tuple, str] = {}
# agreement required of the Triton output before it may win: |triton - sdpa| <= tol · max(1, |sdpa|max)
_AGREE_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def autotune_choices() -> dict[tuple, str]:
    """The backends "auto" chose so far: {(device, dtype, batch·heads, Lq, Lk, D, Dv): "torch" | "triton"}."""
    return dict(_AUTO_CHOICE)


def _key(q, k, v):
    return (str(q.device), q.dtype, q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])


def _auto_backend(q, k, v, scale) -> str:
    if q.device.type not in AUTOTUNE_DEVICE_TYPES or torch.compiler.is_compiling():
        return "torch"
    key = _key(q, k, v)
    hit = _AUTO_CHOICE.get(key)
    if hit is not None:
        return hit
    if (os.environ.get("FASTDIFF_ATTENTION_AUTOTUNE", "1") == "0" or q.shape[-1] > 512 or v.shape[-1] > 512
            or not _backend.backends()["triton"]["available"] or q.requires_grad or k.requires_grad
            or v.requires_grad or (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        return "torch"
    _AUTO_CHOICE[key] = choice = _measure(q, k, v, scale)
    return choice


def _time_ms(fn, device: torch.device, reps: int = 5) -> float:
    """Median time of fn() in ms after one warm-up call (CUDA events on CUDA, the wall clock elsewhere)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _measure(q, k, v, scale) -> str:
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q, k, v, scale=scale)
        try:
            got = attention(q, k, v, scale, backend="triton")
        except Exception as e:  # a kernel that cannot compile or launch here loses, loudly
            _backend._warn_once(OP, f"auto: the Triton kernel failed for {tuple(q.shape)} {q.dtype} "
                                    f"({type(e).__name__}: {e}); using SDPA")
            return "torch"
        err = (got.float() - want.float()).abs().max().item()
        bound = _AGREE_TOL[q.dtype] * max(1.0, want.float().abs().max().item())
        if not err <= bound:
            _backend._warn_once(OP, f"auto: the Triton kernel disagrees with SDPA for {tuple(q.shape)} {q.dtype} "
                                    f"(max error {err:.3g} > {bound:.3g}); using SDPA")
            return "torch"
        t_sdpa = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), q.device)
        t_triton = _time_ms(lambda: attention(q, k, v, scale, backend="triton"), q.device)
    return "triton" if t_triton < t_sdpa else "torch"


# ---- Triton ------------------------------------------------------------------------------------------------------
# Memory traffic: the reference writes and reads the B·heads·Lq·Lk fp32 score matrix (twice: scores, then
# probabilities); the fused kernel reads q once, k and v once per BLOCK_M query rows (from L2 on GPU), writes o once.

if triton is not None:
    @triton.jit
    def _attn_fwd_kernel(q_ptr,  # (B, H, Lq, D) strides sqb, sqh, sql, sqd
                         k_ptr,  # (B, H, Lk, D) strides skb, skh, skl, skd
                         v_ptr,  # (B, H, Lk, Dv) strides svb, svh, svl, svd
                         o_ptr,  # (B, H, Lq, Dv) contiguous
                         H, Lq, Lk, D, Dv, qk_scale,  # qk_scale = scale · log2(e): the softmax runs in base 2
                         sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                         IEEE: tl.constexpr,  # fp32 operands, IEEE fp32 dots (else fp16/bf16 tensor-core dots)
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ds = tl.arange(0, BLOCK_D)
        dvs = tl.arange(0, BLOCK_DV)
        rmask = rows < Lq
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sql + ds[None, :] * sqd,
                    mask=rmask[:, None] & (ds < D)[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for n0 in range(0, Lk, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < Lk
            kt = tl.load(k_base + cols[None, :].to(tl.int64) * skl + ds[:, None] * skd,
                         mask=cmask[None, :] & (ds < D)[:, None], other=0.0)  # (BLOCK_D, BLOCK_N): kᵀ
            if IEEE:
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(cmask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vv = tl.load(v_base + cols[:, None].to(tl.int64) * svl + dvs[None, :] * svd,
                         mask=cmask[:, None] & (dvs < Dv)[None, :], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, vv.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
        acc = acc / l_i[:, None]
        o_off = (bh.to(tl.int64) * Lq + rows[:, None].to(tl.int64)) * Dv + dvs[None, :]
        tl.store(o_ptr + o_off, acc.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & (dvs < Dv)[None, :])


def _blocks(d: int, dv: int, lq: int, lk: int, gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_warps): the fp32 accumulator BLOCK_M × BLOCK_DV and the k/v tiles
    BLOCK_N × BLOCK_D shrink as the head widens (D = 512: 16 × 512 accumulator, 32-key tiles). tl.dot needs every
    dimension >= 16. Chosen by register/shared-memory budget, not tuned on a GPU (none was available). Under the CPU
    interpreter the tiles are the smallest (16 × 16), so small test shapes still span several query and key tiles."""
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    if not gpu:
        return 16, 16, bd, bdv, 4
    w = max(bd, bdv)
    bm = 64 if w <= 128 else 32 if w <= 256 else 16
    bn = 64 if w <= 64 else 32
    bm = max(16, min(bm, triton.next_power_of_2(lq)))
    bn = max(16, min(bn, triton.next_power_of_2(lk)))
    return bm, bn, bd, bdv, 4 if w <= 128 else 8


def _num_stages(bd: int, bdv: int, ieee: bool) -> int:
    """Pipelining depth of the key loop. Triton's default, 3, keeps three k/v tiles in shared memory: with fp32 (IEEE)
    dots that is 297 KB at D = 512 and 168 KB at D = 256 (triton.compile for sm_90, triton 3.6 and 3.9), over the
    H100's 227 KB and the A100's 163 KB per block, so the launch fails (OutOfResources). 2 stages: 103 KB at D = 256;
    1 stage: 100 KB at D = 512. fp16/bf16 tiles need <= 50 KB at any depth. scripts/triton_aot_check.py checks this."""
    w = max(bd, bdv)
    if not ieee or w <= 128:
        return 3
    return 2 if w <= 256 else 1


def _ieee(q: torch.Tensor) -> bool:
    """fp32 inputs dot in IEEE fp32. So do bf16 inputs under TRITON_INTERPRET=1: the interpreter's bf16 tl.dot
    returns garbage (triton 3.9), so on CPU the bf16 operands are upcast (exactly) before the dot; on GPU bf16 and fp16
    use tensor-core dots with fp32 accumulation."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")


@torch.library.custom_op("fastdiff::attention_triton", mutates_args=())
def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton launcher; q, k, v (B, H, L, D) with any strides (the wrapper `attention` checks them)."""
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    o = torch.empty((B, H, Lq, Dv), device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    if Lk == 0:
        raise ValueError("attention: k and v must have at least one token")
    bm, bn, bd, bdv, warps = _blocks(D, Dv, Lq, Lk, q.device.type == "cuda")
    grid = (triton.cdiv(Lq, bm), B * H)
    ieee = _ieee(q)
    _attn_fwd_kernel[grid](q, k, v, o, H, Lq, Lk, D, Dv, scale * math.log2(math.e),
                           *q.stride(), *k.stride(), *v.stride(), IEEE=ieee,
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=warps,
                           num_stages=_num_stages(bd, bdv, ieee))
    return o


@_attention_triton.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:3], v.shape[3]))


def _attn_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _attn_backward(ctx, do):
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
        o = attention_ref(*ins, scale=ctx.scale)
        grads = torch.autograd.grad(o, ins, do.float())
    return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None)


torch.library.register_autograd("fastdiff::attention_triton", _attn_backward, setup_context=_attn_setup_context)
