"""Host-side halves of split-sequence (flash-decoding) attention, shared by the decode kernels.

A decode kernel splits the keys into `num_splits` slices and writes, per slice, an unnormalized
accumulator with its base-2 running max and sum; `merge_splits` combines them exactly.
"""
from __future__ import annotations

import torch
import triton


def default_num_splits(num_blocks: int, num_programs: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs; a few on CPU to exercise the merge."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(num_blocks, triton.cdiv(target, num_programs)))


def merge_splits(acc_BSHX: torch.Tensor, m_BSH: torch.Tensor, l_BSH: torch.Tensor,
                 sink_BH: torch.Tensor | None = None) -> torch.Tensor:
    """Exact log-sum-exp merge of per-split partials (base-2 maxima); all-masked rows give 0.
    `sink_BH`: one more base-2 logit per row in the normalizer, with no value (attention sinks)."""
    m_max = m_BSH.amax(dim=1, keepdim=True)
    if sink_BH is not None:
        m_max = torch.maximum(m_max, sink_BH.unsqueeze(1))
    m_max = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    w_BSH = torch.exp2(m_BSH - m_max)
    num_BHX = (w_BSH.unsqueeze(-1) * acc_BSHX).sum(dim=1)
    den_BH = (w_BSH * l_BSH).sum(dim=1)
    if sink_BH is not None:
        den_BH = den_BH + torch.exp2(sink_BH - m_max.squeeze(1))
    return torch.where(den_BH.unsqueeze(-1) > 0, num_BHX / den_BH.clamp_min(1e-30).unsqueeze(-1), 0.0)
