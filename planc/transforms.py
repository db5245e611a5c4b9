"""Orthogonal latent transforms U (C x C) for TPLA, computed once per MLA layer at compile time.

none: identity. hadamard: Sylvester Hadamard / sqrt(C) times a seeded random +-1 diagonal, which
spreads every direction's energy evenly over the slices. pca: eigenvectors of the covariance of
the RMS-normalized latent on the corpus's calibration split, sorted by eigenvalue (descending),
so slice 0 carries the most energy (the paper's default).

Folding (planc.passes.tpla): c' = U^T c, W_UK <- W_UK diag(gamma) U, W_UV likewise, gamma <- 1.
A unit-weight RMSNorm commutes with U, so the unsliced model is exactly MLA.
"""
from __future__ import annotations

import torch

def hadamard(n: int, seed: int) -> torch.Tensor:
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two kv_lora_rank, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n ** 0.5


def pca(latents_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U with eigenvectors as columns, eigenvalues), both sorted by eigenvalue, descending."""
    x = latents_NC.double()
    values, vectors = torch.linalg.eigh(x.T @ x / x.shape[0])
    order = values.argsort(descending=True)
    return vectors[:, order], values[order]


def slice_scales(latents_NC: torch.Tensor, U: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean over tokens of each rotated slice's RMS (the latents have unit RMS as a whole).

    Exact normalization divides a slice by the whole latent's RMS, the sliced one by the
    slice's own; on a unit-RMS latent their ratio is the slice's RMS, so multiplying the
    sliced result by its calibrated mean restores the exact scale on average."""
    rotated = latents_NC.double() @ U
    return torch.stack([s.pow(2).mean(-1).sqrt().mean() for s in rotated.chunk(groups, dim=-1)])
