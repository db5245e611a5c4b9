"""Host-side input checks shared by the MLA decode kernels (Triton and CPU)."""
from __future__ import annotations

import torch


def check_shapes(op: str, q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
                 key_mask: torch.Tensor) -> None:
    """q_lat [B,H,C], q_pe [B,H,R], ckv [B,T,C], kpe [B,T,R], key_mask [B,T] bool, one device."""
    shapes = (f"q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, ckv {tuple(ckv.shape)}, "
              f"kpe {tuple(kpe.shape)}, key_mask {tuple(key_mask.shape)}")
    if not (q_lat.dim() == q_pe.dim() == ckv.dim() == kpe.dim() == 3 and key_mask.dim() == 2):
        raise ValueError(f"{op}: expected q_lat [B,H,C], q_pe [B,H,R], ckv [B,T,C], kpe [B,T,R], "
                         f"key_mask [B,T]; got {shapes}")
    b, h, c = q_lat.shape
    t, r = ckv.shape[1], kpe.shape[2]
    if (tuple(q_pe.shape) != (b, h, r) or tuple(ckv.shape) != (b, t, c) or tuple(kpe.shape) != (b, t, r)
            or tuple(key_mask.shape) != (b, t)):
        raise ValueError(f"{op}: inconsistent shapes (B={b}, H={h}, C={c}, T={t}, R={r}): {shapes}")
    if key_mask.dtype != torch.bool:
        raise ValueError(f"{op}: key_mask must be torch.bool (True = attend), got {key_mask.dtype}")
    if len({x.device for x in (q_lat, q_pe, ckv, kpe, key_mask)}) != 1:
        raise ValueError(f"{op}: all inputs must be on one device")
