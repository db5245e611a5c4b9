"""What every GEMM kernel here shares: one [BLOCK_M, BLOCK_N] tile of x @ weight.T accumulated in
fp32 over K, and the launchers' block sizes.

The kernels (linear, grouped_gemm, t3_gemm) differ only in which tile a program makes and where
it stores it; they point at the tile's first rows and columns and call `matmul_tile`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def matmul_tile(x_ptrs, w_ptrs, mask_m, mask_n, K, stride_xk, stride_wk,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """x_ptrs [BLOCK_M, BLOCK_K] at k = 0 of the tile's rows; w_ptrs the weight tile read transposed
    as [BLOCK_K, BLOCK_N]; masks of the valid rows and columns. Returns the fp32 accumulator."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter's low-precision tl.dot is wrong; fp32 is exact there
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


def gemm_blocks(m: int, n: int, k: int, elem: int, compiled: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for an [m, k] @ [k, n] GEMM of `elem`-byte inputs. Compiled
    2-byte GEMMs take 128 x 128 x 64 tiles with Triton's default 4 warps and 3 stages: chosen on an
    H200 at one rank's DeepSeek-V3 o_proj (bf16, 512 and 4096 rows) after timing other tiles, warps
    and stages; `planc bench kernels` times the result. Under the interpreter, and for fp32 (no
    tensor cores with ieee dots, twice the shared memory a stage), 64-wide tiles."""
    cap = 128 if compiled and elem <= 2 else 64
    return block(m, cap), block(n, cap), block(k, 64)


def block(dim: int, cap: int) -> int:
    """Smallest power of two >= dim, clamped to [16, cap] (tl.dot needs every side >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(dim)))
