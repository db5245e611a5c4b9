"""Grouped GEMM over token-sorted rows: `y[lo_g:hi_g] = x[lo_g:hi_g] @ weight[g].T` for every group.

An MoE layer sorts its (token, expert) pairs by expert, so expert g's rows are the contiguous block
offsets[g] .. offsets[g+1]-1 of x. One program computes one [BLOCK_M, BLOCK_N] tile of one group:
the launcher lists every group's row tiles on the host (tile_group, tile_start), so an expert with
a few rows costs one tile, an expert with none costs nothing, and no padding to a capacity is made.

Shape legend: M sorted rows, K input features, N output features, G groups (experts).
`weight` is [G, N, K] (each group in the nn.Linear layout, as transformers' fused experts hold
gate_up_proj and down_proj); it is read through strides. Under the Triton interpreter (CPU)
low-precision tl.dot is wrong, so there tiles are multiplied in fp32 and a bf16/fp16 result is
rounded in torch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from planc.kernels.gemm_tile import block, matmul_tile

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, tile_group_ptr, tile_start_ptr, ends_ptr,
    N, K,
    stride_xm, stride_xk,
    stride_wg, stride_wn, stride_wk,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.load(tile_group_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(ends_ptr + group)

    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < end
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # this group's weight tile, read transposed as [BLOCK_K, BLOCK_N]
    w_ptrs = w_ptr + group * stride_wg + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = matmul_tile(x_ptrs, w_ptrs, mask_m, mask_n, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, offsets: list[int]) -> None:
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_gemm: x must be [M, K] and weight [G, N, K]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if len(offsets) != weight.shape[0] + 1 or offsets[0] != 0 or offsets[-1] != x.shape[0] \
            or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"grouped_gemm: offsets must rise from 0 to M = {x.shape[0]} in G + 1 = "
                         f"{weight.shape[0] + 1} steps; got {offsets}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or x.device != weight.device:
        raise ValueError(f"grouped_gemm: x and weight must share a dtype among {SUPPORTED_DTYPES} and a device; "
                         f"got {x.dtype} on {x.device}, {weight.dtype} on {weight.device}")


def grouped_gemm(x_MK: torch.Tensor, weight_GNK: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """[M, N]: rows offsets[g] .. offsets[g+1]-1 of x times weight[g]ᵀ, in x's dtype."""
    _check(x_MK, weight_GNK, offsets)
    m, (_, n, k) = x_MK.shape[0], weight_GNK.shape
    if m == 0 or n == 0:
        return x_MK.new_zeros(m, n)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    buf_dtype = torch.float32 if interpret and x_MK.dtype != torch.float32 else x_MK.dtype
    y_MN = torch.empty((m, n), dtype=buf_dtype, device=x_MK.device)
    sizes = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    block_m, block_n, block_k = block(max(sizes), 64), block(n, 64), block(k, 64)
    tiles = [(g, lo) for g, (start, end) in enumerate(zip(offsets, offsets[1:])) for lo in range(start, end, block_m)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=x_MK.device)  # noqa: E731
    grid = (len(tiles), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        x_MK, weight_GNK, y_MN, as_tensor([g for g, _ in tiles]), as_tensor([lo for _, lo in tiles]),
        as_tensor(offsets[1:]),
        n, k,
        x_MK.stride(0), x_MK.stride(1),
        weight_GNK.stride(0), weight_GNK.stride(1), weight_GNK.stride(2),
        y_MN.stride(0), y_MN.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=interpret,
    )
    return y_MN.to(x_MK.dtype)


def grouped_gemm_reference(x_MK: torch.Tensor, weight_GNK: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Pure PyTorch: one fp32 GEMM per group, rounded once to x's dtype."""
    y = [torch.nn.functional.linear(x_MK[lo:hi].float(), weight_GNK[g].float())
         for g, (lo, hi) in enumerate(zip(offsets, offsets[1:]))]
    return torch.cat(y).to(x_MK.dtype) if y else x_MK.new_zeros(0, weight_GNK.shape[1])
