"""Attention over H·W tokens, one head of width C (the DDPM attention blocks): torch SDPA (what fastdiff dispatches
to) against the plain-PyTorch math reference (softmax(qkᵀ/√C)v with an L×L score matrix in float32).

    pytest benchmarks/bench_attention.py --benchmark-only

bytes = 4 · B·L·C · itemsize (read q, k, v, write o): the floor for a fused kernel; the reference also writes and reads
the B·L² score matrix.
"""
import pytest
import torch

from fastdiff.ops.attention import attention, attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
# (B, L = H·W, C): CIFAR-10 16×16 level (C 256), CelebA-HQ 16×16 level (C 512)
SIZES = {"cifar16": (64 if GPU else 8, 256, 256), "celebahq16": (8 if GPU else 1, 256, 512)}
DTYPES = [torch.float32, torch.float16 if GPU else torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("form", ["sdpa", "reference"])
def test_attention(benchmark, form, size, dtype):
    B, L, C = SIZES[size]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 1, L, C, device=DEV, dtype=dtype) for _ in range(3))
    f = attention if form == "sdpa" else attention_ref

    def run():
        o = f(q, k, v)
        if GPU:
            torch.cuda.synchronize()
        return o

    run()
    benchmark.extra_info["bytes"] = 4 * B * L * C * q.element_size()
    benchmark.pedantic(run, rounds=10 if not GPU else 50, warmup_rounds=1)
