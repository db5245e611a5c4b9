"""Grouped-query decode attention over a KV cache, flash-decoding style.

Shape legend: B batch, Q query heads (Hq), K kv heads (Hkv), G = Q // K query heads per kv head,
T cache capacity (slots), S sequence splits, D head dim.

    logits[b, h, t] = scale * q[b, h] . k[b, t, h // G]   where key_mask[b, t]
                      (then softcap * tanh(logits / softcap) where softcap is given: Gemma 2)
    out[b, h]       = sum_t softmax_t(logits[b, h]) * v[b, t, h // G]
                      (with sinks: sinks[h] joins each row's normalizer, its probability dropped: gpt-oss)

The G query heads of one kv head read the same cache rows, so one program takes a block of them
and one split of the sequence, runs an online softmax over that split and writes a partial
(max, sum, unnormalized accumulator) in fp32; the launcher merges the splits with an exact
log-sum-exp in torch. Logits are kept in base 2 (exp2) with scale * log2(e) folded in (with a
softcap, log2(e) is applied after the cap; tanh is written with exp2, which the interpreter has).

Masked slots are never loaded (their bytes may be anything, NaN included) and contribute
nothing; a row whose keys are all masked returns zeros. D may be any size: tiles are padded to
a power of two >= 16 (tl.dot's minimum) and masked, as is the head block when G < 16.

Under the Triton interpreter (CPU) low-precision tl.dot is wrong, so tiles are upcast to fp32.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from planc.kernels.split_merge import default_num_splits, merge_splits

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))  # logits are kept in base 2


@triton.jit
def _gqa_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr,
    acc_ptr, m_ptr, l_ptr,
    G, T, D, tokens_per_split, qk_scale, softcap, num_g_blocks,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_mb, stride_mt,
    stride_ab, stride_as, stride_ah, stride_ad,
    stride_lb, stride_ls, stride_lh,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1) // num_g_blocks
    gb = tl.program_id(1) % num_g_blocks
    s = tl.program_id(2)
    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_h = kvh * G + offs_g  # query heads served by this kv head
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D

    q_GD = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                   mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q_GD = q_GD.to(tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc_GD = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)

    t_start = s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid_T = tl.load(mask_ptr + b * stride_mb + offs_t * stride_mt, mask=offs_t < t_end, other=0) != 0
        load_mask = valid_T[:, None] & mask_d[None, :]
        k_TD = tl.load(k_base + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
        v_TD = tl.load(v_base + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
        if UPCAST:
            k_TD = k_TD.to(tl.float32)
            v_TD = v_TD.to(tl.float32)
        qk_GT = tl.dot(q_GD, tl.trans(k_TD), input_precision="ieee") * qk_scale
        if SOFTCAP:  # qk_scale is the plain scale here: cap, then to base 2
            x_GT = qk_GT / softcap
            e_GT = tl.math.exp2(tl.abs(x_GT) * (-2.0 * LOG2E))  # tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) <= 1
            tanh_GT = tl.where(x_GT < 0, -1.0, 1.0) * (1.0 - e_GT) / (1.0 + e_GT)
            qk_GT = tanh_GT * (softcap * LOG2E)
        qk_GT = tl.where(valid_T[None, :], qk_GT, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk_GT, axis=1))
        # While every key seen is masked the max is -inf; subtracting 0 instead keeps exp2 at 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_GT = tl.math.exp2(qk_GT - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p_GT, axis=1)
        acc_GD = tl.dot(p_GT.to(v_TD.dtype), v_TD, acc_GD * alpha[:, None], input_precision="ieee")
        m_i = m_new

    tl.store(acc_ptr + b * stride_ab + s * stride_as + offs_h[:, None] * stride_ah + offs_d[None, :] * stride_ad,
             acc_GD, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(m_ptr + b * stride_lb + s * stride_ls + offs_h * stride_lh, m_i, mask=mask_g)
    tl.store(l_ptr + b * stride_lb + s * stride_ls + offs_h * stride_lh, l_i, mask=mask_g)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, key_mask {tuple(key_mask.shape)}"
    if not (q.dim() == 3 and k.dim() == v.dim() == 4 and key_mask.dim() == 2):
        raise ValueError(f"gqa_decode: expected q [B,Hq,D], k and v [B,T,Hkv,D], key_mask [B,T]; got {shapes}")
    b, hq, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    if tuple(k.shape) != (b, t, hkv, d) or tuple(v.shape) != tuple(k.shape) or tuple(key_mask.shape) != (b, t):
        raise ValueError(f"gqa_decode: inconsistent shapes (B={b}, Hq={hq}, D={d}, T={t}, Hkv={hkv}): {shapes}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"gqa_decode: Hq={hq} query heads must be a multiple of Hkv={hkv} kv heads ({shapes})")
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"gqa_decode: q, k, v must share one dtype among {SUPPORTED_DTYPES}; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask.dtype != torch.bool:
        raise ValueError(f"gqa_decode: key_mask must be torch.bool (True = attend), got {key_mask.dtype}")
    if len({x.device for x in (q, k, v, key_mask)}) != 1:
        raise ValueError("gqa_decode: all inputs must be on one device")


def gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
               num_splits: int | None = None, *, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
    """GQA decode attention; returns out [B, Hq, D] in q's dtype.

    q [B, Hq, D], k and v [B, T, Hkv, D], key_mask [B, T] bool; query head h uses kv head
    h // (Hq // Hkv). `num_splits` (default: sized to the device) sets the sequence splits;
    `softcap` caps the scaled logits (softcap · tanh(logits / softcap)); `sinks` [Hq] adds one
    logit per head to every row's normalizer (merged with the splits, in torch).
    """
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"gqa_decode: sinks must be [Hq] = ({q.shape[1]},), got {tuple(sinks.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"gqa_decode: softcap must be > 0 (or None), got {softcap}")
    _check(q, k, v, key_mask)
    b, hq, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    if b * hq * d == 0:
        return q.new_zeros((b, hq, d))
    group = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    block_g = max(16, min(triton.next_power_of_2(group), 64))
    block_t = max(16, min(triton.next_power_of_2(max(t, 1)), 64, 8192 // block_d))
    num_g_blocks = triton.cdiv(group, block_g)
    num_blocks = max(1, triton.cdiv(t, block_t))
    if num_splits is None:
        num_splits = default_num_splits(num_blocks, b * hkv * num_g_blocks, q.device)
    if num_splits < 1:
        raise ValueError(f"gqa_decode: num_splits must be >= 1, got {num_splits}")
    tokens_per_split = triton.cdiv(num_blocks, min(num_splits, num_blocks)) * block_t
    num_splits = max(1, triton.cdiv(t, tokens_per_split))

    acc_BSHD = torch.empty((b, num_splits, hq, d), dtype=torch.float32, device=q.device)
    m_BSH = torch.empty((b, num_splits, hq), dtype=torch.float32, device=q.device)
    l_BSH = torch.empty_like(m_BSH)
    mask_BT = key_mask.view(torch.uint8)
    _gqa_decode_split_kernel[(b, hkv * num_g_blocks, num_splits)](
        q, k, v, mask_BT,
        acc_BSHD, m_BSH, l_BSH,
        group, t, d, tokens_per_split, float(scale) * (1.0 if softcap is not None else LOG2E.value), float(softcap or 1.0),
        num_g_blocks,
        *q.stride(), *k.stride(), *v.stride(), *mask_BT.stride(),
        *acc_BSHD.stride(), *m_BSH.stride(),
        BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_D=block_d,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", SOFTCAP=softcap is not None,
    )
    sink_BH = None if sinks is None else (sinks.float() * LOG2E.value).expand(b, hq)
    return merge_splits(acc_BSHD, m_BSH, l_BSH, sink_BH).to(q.dtype)


def gqa_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                         scale: float, *, softcap: float | None = None,
                         sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch `gqa_decode` in fp32 (masked slots zeroed, all-masked rows give zeros)."""
    group = q.shape[1] // k.shape[2]
    valid_BT = key_mask.bool()
    k_f = k.float().masked_fill(~valid_BT[..., None, None], 0.0).repeat_interleave(group, dim=2)
    v_f = v.float().masked_fill(~valid_BT[..., None, None], 0.0).repeat_interleave(group, dim=2)
    logits = scale * torch.einsum("bhd,bthd->bht", q.float(), k_f)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~valid_BT[:, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float()[None, :, None].expand(logits.shape[0], -1, 1)
        p = torch.softmax(torch.cat([logits, sink], -1), dim=-1)[..., :-1]
        return torch.einsum("bht,bthd->bhd", p, v_f).to(q.dtype)
    p = torch.softmax(logits, dim=-1).masked_fill(~valid_BT.any(-1)[:, None, None], 0.0)
    return torch.einsum("bht,bthd->bhd", p, v_f).to(q.dtype)
