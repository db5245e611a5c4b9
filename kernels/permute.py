"""Row permute / un-permute: the gather and scatter around token shuffling and expert sorting.

    gather_rows(x, idx)       out[i] = x[idx[i]]     tokens into group order (or pairs into expert order)
    scatter_rows(y, idx, n)   out[idx[i]] = y[i]     back to token order; rows nobody writes are 0

Pure copies: the results equal the references bitwise in every dtype. One program moves a
[BLOCK_M, BLOCK_D] tile: it loads BLOCK_M row indices once and copies those rows' columns.

Shape legend: N rows of the source / destination, M rows moved, D row width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _move_rows_kernel(src_ptr, idx_ptr, out_ptr, M, D, stride_src, stride_out,
                      GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row i of the tile moves from src[idx[i]] to out[i] (GATHER) or from src[i] to out[idx[i]]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = rows < M
    mask = mask_m[:, None] & (cols < D)[None, :]
    idx = tl.load(idx_ptr + rows, mask=mask_m, other=0)
    src_rows, out_rows = (idx, rows) if GATHER else (rows, idx)
    values = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=mask)
    tl.store(out_ptr + out_rows[:, None] * stride_out + cols[None, :], values, mask=mask)


def _check(name: str, t: torch.Tensor, idx: torch.Tensor, num_rows: int) -> None:
    if t.dim() != 2 or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64) or t.device != idx.device:
        raise ValueError(f"{name}: rows must be [rows, D] and idx a 1-D integer tensor on the same device; got "
                         f"{tuple(t.shape)} on {t.device} and idx {tuple(idx.shape)} {idx.dtype} on {idx.device}")
    if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < num_rows):
        raise ValueError(f"{name}: idx must lie in [0, {num_rows}); got {int(idx.min())} .. {int(idx.max())}")


def _launch(gather: bool, src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    m, d = idx.numel(), src.shape[1]
    if m and d:
        block_m, block_d = 16, max(16, min(128, triton.next_power_of_2(d)))
        src = src.contiguous() if src.stride(1) != 1 else src
        _move_rows_kernel[(triton.cdiv(m, block_m), triton.cdiv(d, block_d))](
            src, idx.contiguous(), out, m, d, src.stride(0), out.stride(0),
            GATHER=gather, BLOCK_M=block_m, BLOCK_D=block_d)
    return out


def gather_rows(x_ND: torch.Tensor, idx_M: torch.Tensor) -> torch.Tensor:
    """[M, D]: out[i] = x[idx[i]]."""
    _check("gather_rows", x_ND, idx_M, x_ND.shape[0])
    return _launch(True, x_ND, idx_M, x_ND.new_empty(idx_M.numel(), x_ND.shape[1]))


def scatter_rows(y_MD: torch.Tensor, idx_M: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows, D]: out[idx[i]] = y[i] (idx without repeats), zeros elsewhere."""
    _check("scatter_rows", y_MD, idx_M, num_rows)
    if y_MD.shape[0] != idx_M.numel():
        raise ValueError(f"scatter_rows: {y_MD.shape[0]} rows but {idx_M.numel()} indices")
    return _launch(False, y_MD, idx_M, y_MD.new_zeros(num_rows, y_MD.shape[1]))


def gather_rows_reference(x_ND: torch.Tensor, idx_M: torch.Tensor) -> torch.Tensor:
    return x_ND[idx_M]


def scatter_rows_reference(y_MD: torch.Tensor, idx_M: torch.Tensor, num_rows: int) -> torch.Tensor:
    return y_MD.new_zeros(num_rows, y_MD.shape[1]).index_copy_(0, idx_M, y_MD)
