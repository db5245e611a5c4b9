"""Orthogonal latent transforms U (C x C) for TPLA, computed once per MLA layer at compile time.

none: identity. hadamard: Sylvester Hadamard / sqrt(C) times a seeded random +-1 diagonal, which
spreads every direction's energy evenly over the slices. pca: eigenvectors of the covariance of
the RMS-normalized latent on the corpus's calibration split, sorted by eigenvalue (descending),
so slice 0 carries the most energy (the paper's default).

Folding (planc.codegen.partition): c' = U^T c, W_UK <- W_UK diag(gamma) U, W_UV likewise, gamma <- 1.
A unit-weight RMSNorm commutes with U, so the unsliced model is exactly MLA.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from planc.ir import block_nodes, info

Transforms = dict[str, torch.Tensor]


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


def calibration_latents(model: nn.Module, fqns: list[str], num_tokens: int) -> dict[str, torch.Tensor]:
    """RMS-normalized (unit-weight) latents c/rms(c) of each MLA layer on the calibration split."""
    from planc.zoo.corpus import windows

    seq = min(256, num_tokens)
    ids = windows("calibration", max(1, num_tokens // seq), seq)
    seen: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}
    modules = dict(model.named_modules())
    hooks = [modules[f"{f}.kv_a_layernorm"].register_forward_hook(_keep(seen[f], modules[f"{f}.kv_a_layernorm"]))
             for f in fqns]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {f: torch.cat(v) for f, v in seen.items()}


def _keep(store: list, norm: nn.Module):
    def hook(module, inputs, output):
        c = inputs[0].double().reshape(-1, inputs[0].shape[-1])
        store.append(c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    return hook


def latent_transforms(graph: fx.Graph, model: nn.Module, meta: bool) -> tuple[Transforms, dict]:
    """U per TPLA layer, plus what to report (transform, and for pca the top-slice energy share)."""
    nodes = [n for n in block_nodes(graph, "tpla_latent")]
    out: Transforms = {}
    notes: dict = {}
    pca_fqns = [info(n).fqn for n in nodes if info(n).shard["transform"] == "pca"]
    latents = calibration_latents(model, pca_fqns, info(nodes[0]).shard["calibration_tokens"]) if pca_fqns and not meta else {}
    for node in nodes:
        m = info(node)
        C, kind = m.dims.kv_lora_rank, m.shard["transform"]
        if kind == "hadamard":
            out[m.fqn] = hadamard(C, m.shard["seed"])
        elif kind == "pca" and not meta:
            out[m.fqn], values = pca(latents[m.fqn])
            notes[m.fqn] = {"top_slice_energy": float(values[: m.shard["latent_per_rank"]].sum() / values.sum())}
        else:
            out[m.fqn] = torch.eye(C, dtype=torch.float64)
        notes.setdefault(m.fqn, {})["transform"] = kind if not (kind == "pca" and meta) else "pca (identity on meta)"
    return out, notes
