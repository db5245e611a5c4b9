"""Absorbed-form MLA decode attention over a latent cache, flash-decoding style.

Shape legend: B batch, H query heads, T cache capacity (slots), S sequence splits,
C = d_c latent width (ckv is both key part and value), R = d_r rope width.

    logits[b, h, t] = scale * (q_lat[b, h] . ckv[b, t] + q_pe[b, h] . kpe[b, t])   where key_mask[b, t]
    out[b, h]       = sum_t softmax_t(logits[b, h]) * ckv[b, t]

All heads of a batch row read the same cache rows (MQA), so one program takes a block of heads
and one split of the sequence, runs an online softmax over that split and writes a partial
(max, sum, unnormalized accumulator) in fp32; the launcher merges the splits with an exact
log-sum-exp in torch. Logits are kept in base 2 (exp2) with scale * log2(e) folded in.

Masked slots are never loaded (their bytes may be anything, NaN included) and contribute
nothing; a row whose keys are all masked returns zeros. C and R may be any size: tiles are
padded to a power of two >= 16 (tl.dot's minimum) and masked.

Under the Triton interpreter (CPU) low-precision tl.dot is wrong, so tiles are upcast to fp32.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from planc.kernels.mla_inputs import check_shapes
from planc.kernels.split_merge import default_num_splits, merge_splits

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _mla_decode_split_kernel(
    q_lat_ptr, q_pe_ptr, ckv_ptr, kpe_ptr, mask_ptr,
    acc_ptr, m_ptr, l_ptr,
    H, T, C, R, tokens_per_split, qk_scale,
    stride_qlb, stride_qlh, stride_qlc,
    stride_qpb, stride_qph, stride_qpr,
    stride_cb, stride_ct, stride_cc,
    stride_kb, stride_kt, stride_kr,
    stride_mb, stride_mt,
    stride_ab, stride_as, stride_ah, stride_ac,
    stride_lb, stride_ls, stride_lh,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    s = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < H
    mask_c = offs_c < C
    mask_r = offs_r < R

    q_lat_HC = tl.load(
        q_lat_ptr + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_c[None, :] * stride_qlc,
        mask=mask_h[:, None] & mask_c[None, :], other=0.0)
    q_pe_HR = tl.load(
        q_pe_ptr + b * stride_qpb + offs_h[:, None] * stride_qph + offs_r[None, :] * stride_qpr,
        mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    if UPCAST:
        q_lat_HC = q_lat_HC.to(tl.float32)
        q_pe_HR = q_pe_HR.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc_HC = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)

    t_start = s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid_T = tl.load(mask_ptr + b * stride_mb + offs_t * stride_mt, mask=offs_t < t_end, other=0) != 0
        ckv_TC = tl.load(
            ckv_ptr + b * stride_cb + offs_t[:, None] * stride_ct + offs_c[None, :] * stride_cc,
            mask=valid_T[:, None] & mask_c[None, :], other=0.0)
        kpe_TR = tl.load(
            kpe_ptr + b * stride_kb + offs_t[:, None] * stride_kt + offs_r[None, :] * stride_kr,
            mask=valid_T[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:
            ckv_TC = ckv_TC.to(tl.float32)
            kpe_TR = kpe_TR.to(tl.float32)
        qk_HT = tl.dot(q_lat_HC, tl.trans(ckv_TC), input_precision="ieee")
        qk_HT = tl.dot(q_pe_HR, tl.trans(kpe_TR), qk_HT, input_precision="ieee")
        qk_HT = tl.where(valid_T[None, :], qk_HT * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk_HT, axis=1))
        # While every key seen is masked the max is -inf; subtracting 0 instead keeps exp2 at 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_HT = tl.math.exp2(qk_HT - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p_HT, axis=1)
        acc_HC = tl.dot(p_HT.to(ckv_TC.dtype), ckv_TC, acc_HC * alpha[:, None], input_precision="ieee")
        m_i = m_new

    tl.store(acc_ptr + b * stride_ab + s * stride_as + offs_h[:, None] * stride_ah + offs_c[None, :] * stride_ac,
             acc_HC, mask=mask_h[:, None] & mask_c[None, :])
    tl.store(m_ptr + b * stride_lb + s * stride_ls + offs_h * stride_lh, m_i, mask=mask_h)
    tl.store(l_ptr + b * stride_lb + s * stride_ls + offs_h * stride_lh, l_i, mask=mask_h)


def _pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _check(q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
           key_mask: torch.Tensor) -> None:
    check_shapes("mla_decode", q_lat, q_pe, ckv, kpe, key_mask)
    dtypes = {q_lat.dtype, q_pe.dtype, ckv.dtype, kpe.dtype}
    if len(dtypes) != 1 or q_lat.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"mla_decode: q_lat, q_pe, ckv, kpe must share one dtype among {SUPPORTED_DTYPES}; "
                         f"got {q_lat.dtype}, {q_pe.dtype}, {ckv.dtype}, {kpe.dtype}")


def _tiles(h: int, t: int, block_c: int, elem: int, interpret: bool) -> tuple[int, int, dict]:
    """(BLOCK_H, BLOCK_T, launch options). The fp32 accumulator [BLOCK_H, BLOCK_C] stays within
    8192 values (registers). Under the interpreter the cache tile does too. Compiled, the cache tile
    [BLOCK_T, BLOCK_C] is 64 rows where two stages of it fit in 128 KiB of shared memory, with 8 warps
    for a 512-wide latent: chosen on an H200 at one rank's DeepSeek-V3 shapes after timing other
    block sizes, warps and stages; `planc bench kernels` times the result."""
    block_h = max(16, min(triton.next_power_of_2(h), 64, 8192 // block_c))
    rows = triton.next_power_of_2(max(t, 1))
    if interpret:
        return block_h, max(16, min(rows, 64, 8192 // block_c)), {}
    block_t = max(16, min(rows, 64, (64 << 10) // (block_c * elem)))
    return block_h, block_t, {"num_warps": 8 if block_c >= 512 else 4, "num_stages": 2}


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
               key_mask: torch.Tensor, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """MLA decode attention; returns out [B, H, C] in q_lat's dtype.

    q_lat [B, H, C], q_pe [B, H, R], ckv [B, T, C], kpe [B, T, R], key_mask [B, T] bool.
    `num_splits` (default: sized to the device) sets how many sequence splits run in parallel.
    """
    _check(q_lat, q_pe, ckv, kpe, key_mask)
    b, h, c = q_lat.shape
    t, r = ckv.shape[1], kpe.shape[2]
    if b * h * c == 0:
        return q_lat.new_zeros((b, h, c))
    block_c, block_r = _pad(c), _pad(r)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block_h, block_t, launch = _tiles(h, t, block_c, q_lat.element_size(), interpret)
    num_head_blocks = triton.cdiv(h, block_h)
    num_blocks = max(1, triton.cdiv(t, block_t))
    if num_splits is None:
        num_splits = default_num_splits(num_blocks, b * num_head_blocks, q_lat.device)
    if num_splits < 1:
        raise ValueError(f"mla_decode: num_splits must be >= 1, got {num_splits}")
    tokens_per_split = triton.cdiv(num_blocks, min(num_splits, num_blocks)) * block_t
    num_splits = max(1, triton.cdiv(t, tokens_per_split))

    acc_BSHC = torch.empty((b, num_splits, h, c), dtype=torch.float32, device=q_lat.device)
    m_BSH = torch.empty((b, num_splits, h), dtype=torch.float32, device=q_lat.device)
    l_BSH = torch.empty_like(m_BSH)
    mask_BT = key_mask.view(torch.uint8)
    _mla_decode_split_kernel[(b, num_head_blocks, num_splits)](
        q_lat, q_pe, ckv, kpe, mask_BT,
        acc_BSHC, m_BSH, l_BSH,
        h, t, c, r, tokens_per_split, float(scale) * math.log2(math.e),
        *q_lat.stride(), *q_pe.stride(), *ckv.stride(), *kpe.stride(), *mask_BT.stride(),
        *acc_BSHC.stride(), *m_BSH.stride(),
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_R=block_r,
        UPCAST=interpret, **launch,
    )
    return merge_splits(acc_BSHC, m_BSH, l_BSH).to(q_lat.dtype)


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
                         key_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Pure-PyTorch `mla_decode` in fp32 (masked slots zeroed, all-masked rows give zeros)."""
    valid_BT = key_mask.bool()
    ckv_f = ckv.float().masked_fill(~valid_BT[..., None], 0.0)
    kpe_f = kpe.float().masked_fill(~valid_BT[..., None], 0.0)
    logits = scale * (torch.einsum("bhc,btc->bht", q_lat.float(), ckv_f)
                      + torch.einsum("bhr,btr->bht", q_pe.float(), kpe_f))
    logits = logits.masked_fill(~valid_BT[:, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).masked_fill(~valid_BT.any(-1)[:, None, None], 0.0)
    return torch.einsum("bht,btc->bhc", p, ckv_f).to(q_lat.dtype)
