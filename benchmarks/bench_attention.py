"""Attention over H·W tokens, one head of width C (the DDPM attention blocks): torch SDPA (backend="torch"), "auto"
(fastdiff's dispatch: SDPA on CPU, the measured winner of SDPA and Triton on CUDA), the Triton flash-attention kernel
(backend="triton"; CUDA only: under the CPU interpreter it is not a performance number) and the plain-PyTorch math
reference (softmax(qkᵀ/√C)v with an L×L score matrix in
float32). On CUDA the SDPA-vs-Triton pair is what decides the "auto" choice on GPU (fastdiff/ops/attention.py).

    pytest benchmarks/bench_attention.py --benchmark-only

extra_info (benchmarks/_harness.py: also gbs, copy_gbs, of_copy, versions, device, commit):
  bytes = 4 · B·L·C · itemsize (read q, k, v, write o): the floor for a fused kernel; the reference also writes and
          reads the B·L² score matrix.
  flops = 4 · B·L²·C (q kᵀ and p v, 2 flops per multiply-add; softmax not counted); tflops = flops / median.
"""
import pytest
import torch

from benchmarks._harness import measure
from fastdiff.ops.attention import attention, attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
# (B, L = H·W, C): CIFAR-10 16×16 level (C 256), CelebA-HQ 16×16 level (C 512), CelebA-HQ-like 32×32 tokens (C 256)
SIZES = {"cifar16": (64 if GPU else 8, 256, 256), "celebahq16": (8 if GPU else 1, 256, 512)}
if GPU:
    SIZES["tokens1024"] = (8, 1024, 256)
DTYPES = [torch.float32, torch.float16 if GPU else torch.bfloat16]
FORMS = {"sdpa": lambda q, k, v: attention(q, k, v, backend="torch"),
         "auto": lambda q, k, v: attention(q, k, v),  # SDPA or Triton, as measured on the first call (CUDA)
         "triton": lambda q, k, v: attention(q, k, v, backend="triton"),
         "reference": attention_ref}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("form", list(FORMS))
def test_attention(benchmark, form, size, dtype):
    if form == "triton" and not GPU:
        pytest.skip("the Triton kernel is benchmarked on CUDA only (the CPU interpreter is not a performance path)")
    B, L, C = SIZES[size]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 1, L, C, device=DEV, dtype=dtype) for _ in range(3))
    f = FORMS[form]
    if form != "sdpa":  # the benchmarked form must compute the same thing
        ref = attention(q, k, v)
        torch.testing.assert_close(f(q, k, v).float(), ref.float(), rtol=2e-2, atol=2e-2)

    f(q, k, v)  # "auto" measures here, outside the timing
    measure(benchmark, lambda: f(q, k, v), nbytes=4 * B * L * C * q.element_size(), like=q, flops=4 * B * L * L * C,
            form=form, shape=f"{B}x{L}x{C}", dtype=str(dtype))
