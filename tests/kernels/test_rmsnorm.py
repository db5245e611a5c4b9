"""planc.kernels.rmsnorm against its (Hugging Face) reference."""
from __future__ import annotations

import planc  # noqa: F401  (selects TRITON_INTERPRET=1 without CUDA, before any kernel is decorated)

import pytest
import torch

from planc.kernels.rmsnorm import rmsnorm, rmsnorm_reference

EPS = 1e-6


def _inputs(shape, x_dtype, w_dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=gen)).to(device=device, dtype=x_dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(device=device, dtype=w_dtype)
    return x, w


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 64), (7, 48), (1, 33)])
def test_rmsnorm_fp32_matches_reference(shape):
    x, w = _inputs(shape, torch.float32, torch.float32)
    y = rmsnorm(x, w, EPS)
    assert y.shape == x.shape and y.dtype == torch.float32
    # Same formula; only the order of the D-term sum of squares and rsqrt's last bit differ.
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
     (torch.float32, torch.bfloat16)],
)
def test_rmsnorm_low_precision_rounds_like_reference(x_dtype, w_dtype):
    x, w = _inputs((6, 40), x_dtype, w_dtype, seed=1)
    y = rmsnorm(x, w, EPS)
    ref = rmsnorm_reference(x, w, EPS)
    assert y.dtype == ref.dtype == torch.promote_types(x_dtype, w_dtype)
    # Both round the normalized row to x's dtype and the product to the output dtype; an fp32
    # last-bit difference can flip a rounding, so allow one ulp of the coarsest dtype involved...
    rtol = 2**-7 if torch.bfloat16 in (x_dtype, w_dtype) else 2**-10
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=1e-6)
    # ...but almost all must be bit-equal (truncating instead of rounding would miss about half).
    exact = (y == ref).float().mean().item()
    assert exact > 0.97, f"only {exact:.1%} of outputs are bit-equal to the reference"


def test_rmsnorm_strided_rows():
    x_full, w = _inputs((5, 2, 24), torch.float32, torch.float32, seed=2)
    x = x_full[:, 1, :]  # row stride 48
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rmsnorm_reference_matches_naive_fp64():
    x, w = _inputs((4, 9), torch.float32, torch.float32, seed=3)
    naive = torch.empty(4, 9, dtype=torch.float64)
    for i in range(4):
        row = [float(v) for v in x[i]]
        inv = (sum(v * v for v in row) / len(row) + EPS) ** -0.5
        for j in range(9):
            naive[i, j] = float(w[j]) * row[j] * inv
    torch.testing.assert_close(rmsnorm_reference(x, w, EPS).double(), naive, rtol=1e-6, atol=1e-7)


def test_rmsnorm_rejects_bad_inputs():
    x, w = _inputs((2, 8), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, w[:4], EPS)
    with pytest.raises(ValueError, match="among"):
        rmsnorm(x.double(), w, EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_cuda_large(dtype):
    x, w = _inputs((4, 129, 7168), dtype, dtype, device="cuda", seed=4)
    y, ref = rmsnorm(x, w, EPS), rmsnorm_reference(x, w, EPS)
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=1e-5)
