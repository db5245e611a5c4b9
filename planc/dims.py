"""The static shape facts a semantic op needs, read from the model at lift time.

They are printed verbatim into the generated program (`repr` is valid Python), so a reader sees
every number a rank uses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MlaDims:
    num_heads: int  # heads on this rank (all heads before partitioning)
    q_lora_rank: int  # 0 when q is a single projection
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    eps: float
    scale: float
    rope_scaling: float
    rope_interleave: bool

    def local(self, num_heads: int) -> "MlaDims":
        return replace(self, num_heads=num_heads)


@dataclass(frozen=True)
class GqaDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    rope_scaling: float

    def local(self, num_heads: int, num_kv_heads: int) -> "GqaDims":
        return replace(self, num_heads=num_heads, num_kv_heads=num_kv_heads)


@dataclass(frozen=True)
class RouterDims:
    num_experts: int
    num_groups: int
    topk_groups: int
    top_k: int
    normalize: bool
    scaling: float


@dataclass(frozen=True)
class TplaDims:
    """One rank's share of a TPLA layer (every rank has the same numbers; slices live in weights).

    mla.num_heads: decode heads on this rank (heads split over the group_size ranks of a group);
    latent: this rank's slice width C/g; prefill_heads: heads per rank in exact-MLA prefill
    (0 when prefill uses the sliced formula too); group_size: ranks sharing one slice;
    recompute_rms: the RMS is over the whole latent, recomputed on this rank (rmsnorm: recompute).
    With rmsnorm: exact the program passes an all-reduced sum of squares instead.
    """

    mla: MlaDims
    latent: int
    group_size: int
    prefill_heads: int
    recompute_rms: bool = False
