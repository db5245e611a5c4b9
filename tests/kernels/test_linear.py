"""planc.kernels.linear against its reference (Triton interpreter on CPU, compiled on CUDA)."""
from __future__ import annotations

import planc  # noqa: F401  (selects TRITON_INTERPRET=1 without CUDA, before any kernel is decorated)

import pytest
import torch

from planc.kernels.linear import linear, linear_reference


def _inputs(lead: tuple[int, ...], n: int, k: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device=device, dtype=dtype)
    return x, w


@pytest.mark.parametrize(
    "lead, n, k",
    [((1,), 1, 1), ((3,), 5, 7), ((17,), 33, 65), ((64,), 48, 40), ((2, 3), 70, 19), ((1,), 128, 64)],
)
def test_linear_fp32_matches_reference(lead, n, k):
    x, w = _inputs(lead, n, k, torch.float32)
    y = linear(x, w)
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    # fp32 sums of K <= 65 terms in a different order: errors ~1e-7 on O(1) outputs.
    torch.testing.assert_close(y, linear_reference(x, w), rtol=1e-5, atol=1e-6)


def test_linear_strided_inputs():
    x_full, w_full = _inputs((9,), 40, 48, torch.float32, seed=1)
    x = x_full[:, ::2]  # non-unit column stride, K = 24
    w = w_full[::2, 8:32]  # row stride 96, N = 20
    torch.testing.assert_close(linear(x, w), linear_reference(x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_low_precision(dtype):
    x, w = _inputs((2, 13), 37, 50, dtype, seed=2)
    y = linear(x, w)
    assert y.dtype == dtype
    # Both sides accumulate in fp32 and round once; different summation order can move the
    # result across a rounding boundary, so allow one ulp (2^-7 relative for bf16, 2^-10 fp16).
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(y.float(), linear_reference(x, w).float(), rtol=rtol, atol=1e-3)
    # The interpreter's fp32->bf16 cast truncates; the launcher must round to nearest instead.
    exact = (y == linear_reference(x, w)).float().mean().item()
    assert exact > 0.95, f"only {exact:.1%} of outputs equal the correctly rounded reference"


def test_linear_reference_matches_naive_fp64():
    x, w = _inputs((5,), 6, 11, torch.float32, seed=3)
    naive = torch.zeros(5, 6, dtype=torch.float64)
    for i in range(5):
        for j in range(6):
            naive[i, j] = sum(float(x[i, kk]) * float(w[j, kk]) for kk in range(11))
    torch.testing.assert_close(linear_reference(x, w).double(), naive, rtol=1e-6, atol=1e-6)


def test_linear_rejects_bad_inputs():
    x, w = _inputs((4,), 8, 16, torch.float32)
    with pytest.raises(ValueError, match="weight's K"):
        linear(x, w.T)
    with pytest.raises(ValueError, match="dtype"):
        linear(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        linear(x, w[None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cuda_large(dtype):
    x, w = _inputs((3, 171), 1000, 768, dtype, device="cuda", seed=4)
    y = linear(x, w)
    # fp32 uses ieee dot (no tf32); bf16 rounds once from an fp32 accumulator.
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (2**-7, 1e-2)
    torch.testing.assert_close(y.float(), linear_reference(x, w).float(), rtol=rtol, atol=atol)
