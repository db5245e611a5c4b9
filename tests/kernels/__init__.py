"""Helpers shared by the kernel tests: cache masks of every shape a decode kernel meets."""
from __future__ import annotations

import torch

JUNK = 1e4  # what invalid cache slots hold; a kernel that reads them is far off


def _mask(b: int, t: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "full":
        return torch.ones(b, t, dtype=torch.bool)
    if kind == "holes":
        mask = torch.rand(b, t, generator=gen) < 0.6
        mask[:, -1] = True
        return mask
    if kind == "left_pad":  # row i starts with i * t // (b + 1) + 1 padding slots (at least one valid)
        pad = torch.tensor([min(t - 1, i * t // (b + 1) + 1) for i in range(b)])
        return torch.arange(t)[None, :] >= pad[:, None]
    if kind == "empty_row":  # row 0 attends to nothing and must come back as zeros
        mask = torch.rand(b, t, generator=gen) < 0.6
        mask[0] = False
        return mask
    raise AssertionError(kind)
