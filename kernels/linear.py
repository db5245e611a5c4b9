"""Linear without bias, `y = x @ weight.T`, as a tiled Triton GEMM with fp32 accumulation.

Shape legend: M rows of x (all leading dims flattened), K input features, N output features.
`weight` has the nn.Linear layout [N, K]; the kernel reads it through strides, so no transpose
is materialized. Tiles are visited in grouped order (GROUP_M row-tiles share a column sweep) so
neighbouring programs reuse the same weight tiles from L2, as in the Triton matmul tutorial.

Under the Triton interpreter (CPU) low-precision tl.dot is wrong and an fp32 -> bf16 cast
truncates, so there the kernel multiplies in fp32 and the launcher rounds a bf16 result in torch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from planc.kernels.gemm_tile import gemm_blocks, matmul_tile

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_M = 8


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # x tile [BLOCK_M, BLOCK_K]; weight tile read transposed as [BLOCK_K, BLOCK_N].
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = matmul_tile(x_ptrs, w_ptrs, mask_m, mask_n, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be 2-D [N, K] (nn.Linear layout), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x's last dim must equal weight's K; got x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)} (weight is [N, K]; pass weight, not weight.T)"
        )
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(
            f"linear: x and weight must share one dtype among {SUPPORTED_DTYPES}; got x {x.dtype}, "
            f"weight {weight.dtype} (cast one of them first)"
        )
    if x.device != weight.device:
        raise ValueError(f"linear: x is on {x.device} but weight is on {weight.device}")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for x [..., K] and weight [N, K]; returns [..., N] in x's dtype."""
    _check(x, weight)
    n, k = weight.shape
    x_MK = x.reshape(-1, k)
    m = x_MK.shape[0]
    if m == 0 or n == 0 or k == 0:
        return x.new_zeros((*x.shape[:-1], n))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    buf_dtype = torch.float32 if interpret and x.dtype == torch.bfloat16 else x.dtype
    y_MN = torch.empty((m, n), dtype=buf_dtype, device=x.device)
    block_m, block_n, block_k = gemm_blocks(m, n, k, x.element_size(), compiled=not interpret)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _linear_kernel[grid](
        x_MK, weight, y_MN,
        m, n, k,
        x_MK.stride(0), x_MK.stride(1),
        weight.stride(0), weight.stride(1),
        y_MN.stride(0), y_MN.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=GROUP_M, UPCAST=interpret,
    )
    return y_MN.to(x.dtype).reshape(*x.shape[:-1], n)


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch `linear`: fp32 accumulation, one rounding to x's dtype at the end."""
    return torch.nn.functional.linear(x.float(), weight.float()).to(x.dtype)
