"""planc.kernels.permute: row gather / scatter equal their references bitwise, and round-trip."""
from __future__ import annotations

import planc  # noqa: F401  (selects TRITON_INTERPRET=1 without CUDA, before any kernel is decorated)

import pytest
import torch

from planc.kernels.permute import gather_rows, gather_rows_reference, scatter_rows, scatter_rows_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,width", [(1, 1), (21, 128), (40, 130)])
def test_permutation_round_trips_bitwise(dtype, rows, width):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=gen).to(dtype)
    perm = torch.randperm(rows, generator=gen)
    moved = gather_rows(x, perm)
    assert torch.equal(moved, gather_rows_reference(x, perm))
    back = scatter_rows(moved, perm, rows)
    assert torch.equal(back, scatter_rows_reference(moved, perm, rows)) and torch.equal(back, x)


def test_gather_repeats_rows_and_scatter_leaves_unwritten_rows_zero():
    x = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(gather_rows(x, torch.tensor([3, 3, 0])), x[[3, 3, 0]])
    out = scatter_rows(x[:2], torch.tensor([4, 1]), 5)
    assert torch.equal(out, torch.tensor([[0.0] * 3, [3.0, 4, 5], [0.0] * 3, [0.0] * 3, [0, 1, 2]]))


def test_indices_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 2\)"):
        gather_rows(torch.zeros(2, 3), torch.tensor([0, 2]))
