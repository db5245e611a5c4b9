"""planc.kernels.grouped_gemm against its reference (Triton interpreter on CPU, compiled on CUDA)."""
from __future__ import annotations

import planc  # noqa: F401  (selects TRITON_INTERPRET=1 without CUDA, before any kernel is decorated)

import pytest
import torch

from planc.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference


def _inputs(sizes: list[int], n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=gen).to(dtype)
    w = (torch.randn(len(sizes), n, k, generator=gen) / k**0.5).to(dtype)
    offsets = [sum(sizes[:g]) for g in range(len(sizes) + 1)]
    return x, w, offsets


@pytest.mark.parametrize("sizes,n,k", [([3], 5, 7), ([0, 17, 1, 0, 40], 33, 65), ([70, 2], 128, 64), ([1, 1, 1, 1], 16, 16)])
def test_grouped_gemm_fp32_matches_reference(sizes, n, k):
    x, w, offsets = _inputs(sizes, n, k, torch.float32)
    y = grouped_gemm(x, w, offsets)
    # fp32 sums of K <= 65 terms in tiles against torch's order: ~1e-7 on O(1) outputs.
    torch.testing.assert_close(y, grouped_gemm_reference(x, w, offsets), rtol=1e-5, atol=1e-6)


def test_grouped_gemm_reads_strided_expert_weights():
    x, w, offsets = _inputs([5, 9], 48, 32, torch.float32, seed=1)
    gate_up = torch.randn(2, 96, 32)
    half = gate_up[:, ::2]  # a non-contiguous [G, N, K] view
    torch.testing.assert_close(grouped_gemm(x, half, offsets), grouped_gemm_reference(x, half, offsets),
                               rtol=1e-5, atol=1e-6)


def test_grouped_gemm_bfloat16():
    x, w, offsets = _inputs([6, 0, 11], 24, 40, torch.bfloat16, seed=2)
    got = grouped_gemm(x, w, offsets)
    assert got.dtype == torch.bfloat16
    # both accumulate in fp32 and round once to bf16: at most one bf16 step apart.
    torch.testing.assert_close(got, grouped_gemm_reference(x, w, offsets), rtol=1e-2, atol=1e-2)


def test_grouped_gemm_rejects_offsets_that_do_not_cover_the_rows():
    x, w, _ = _inputs([2, 2], 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"offsets must rise from 0 to M = 4 in G \+ 1 = 3 steps"):
        grouped_gemm(x, w, [0, 3, 3])
