"""RMSNorm with Hugging Face (Llama / DeepSeek) semantics, one Triton program per row.

Shape legend: R rows (all leading dims flattened), D normalized features.
Semantics, step for step as `rmsnorm_reference`: the row is normalized in fp32, rounded to x's
dtype, then multiplied by `weight`; the result has dtype promote(weight.dtype, x.dtype), exactly
like `weight * h.to(x.dtype)` in torch. The product of two bf16/fp16 values is exact in fp32, so
computing it in fp32 and rounding once matches torch's low-precision elementwise multiply.

Under the Triton interpreter a float32 -> bfloat16 cast truncates instead of rounding to nearest
even (compiled Triton and torch round), so the kernel rounds bf16 values itself when interpreting.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round_to_bf16(h):
    """fp32 -> the fp32 value of the nearest-even bfloat16 (finite inputs)."""
    bits = h.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, w_ptr, y_ptr,
    D, eps,
    stride_xr, stride_xd, stride_w, stride_yr, stride_yd,
    BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_xr + offs * stride_xd, mask=mask, other=0.0)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / D
    h = h * tl.math.rsqrt(mean_sq + eps)
    # Round to x's dtype before the weight multiply, as the reference does.
    if INTERPRET and x_ptr.dtype.element_ty == tl.bfloat16:
        h = _round_to_bf16(h)
    else:
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs * stride_w, mask=mask, other=0.0).to(tl.float32)
    y = w * h
    if INTERPRET and y_ptr.dtype.element_ty == tl.bfloat16:
        y = _round_to_bf16(y)  # now exact in bf16, so the store's truncation is harmless
    tl.store(y_ptr + row * stride_yr + offs * stride_yd, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rmsnorm: expected x [..., D] and weight [D]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"rmsnorm: x and weight must be among {SUPPORTED_DTYPES}; got x {x.dtype}, weight {weight.dtype}"
        )
    if x.device != weight.device:
        raise ValueError(f"rmsnorm: x is on {x.device} but weight is on {weight.device}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face RMSNorm of x [..., D] with weight [D]; see the module docstring for dtypes."""
    _check(x, weight)
    d = x.shape[-1]
    x_RD = x.reshape(-1, d)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y_RD = torch.empty(x_RD.shape, dtype=out_dtype, device=x.device)
    if x_RD.numel() > 0:
        _rmsnorm_kernel[(x_RD.shape[0],)](
            x_RD, weight, y_RD,
            d, float(eps),
            x_RD.stride(0), x_RD.stride(1), weight.stride(0), y_RD.stride(0), y_RD.stride(1),
            BLOCK_D=triton.next_power_of_2(d), INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
        )
    return y_RD.reshape(x.shape)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm.forward, verbatim."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
