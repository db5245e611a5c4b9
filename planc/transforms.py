"""Orthogonal latent transforms U (C x C) for TPLA, computed once per MLA layer at compile time.

none: identity. hadamard: Sylvester Hadamard / sqrt(C) times a seeded random +-1 diagonal, which
spreads every direction's energy evenly over the slices. pca: eigenvectors of the covariance of
the RMS-normalized latent on the corpus's calibration split, sorted by eigenvalue (descending),
so slice 0 carries the most energy (the paper's default).

Folding (planc.codegen.partition): c' = U^T c, W_UK <- W_UK diag(gamma) U, W_UV likewise, gamma <- 1.
A unit-weight RMSNorm commutes with U, so the unsliced model is exactly MLA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from planc.ir import block_nodes, info

def hadamard(n: int, seed: int) -> torch.Tensor:
    """diag(s) H / sqrt(n): H a Hadamard matrix of order n, s a seeded random +-1 vector (fp64)."""
    h = hadamard_matrix(n)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n ** 0.5


def hadamard_matrix(n: int) -> torch.Tensor:
    """A +-1 matrix H of order n with H H^T = n I (fp64): Sylvester's for a power of two, else a
    Paley matrix of order m (q+1 for a prime q = 3 mod 4, 2(q+1) for a prime q = 1 mod 4)
    Kronecker a Sylvester one of order n/m. ValueError when planc has no construction for n."""
    split = _hadamard_split(n)
    if split is None:
        raise ValueError(_no_hadamard_message(n))
    paley, power = split
    if paley == 1:
        return _sylvester(power)
    return torch.kron(_paley(paley), _sylvester(power))


def hadamard_order_ok(n: int) -> bool:
    """Whether hadamard(n, seed) has a construction here."""
    return _hadamard_split(n) is not None


def nearest_hadamard_orders(n: int) -> list[int]:
    """The closest constructible orders below and above n (n itself if it is one)."""
    if hadamard_order_ok(n):
        return [n]
    below = next((m for m in range(n - 1, 0, -1) if hadamard_order_ok(m)), None)
    above = next(m for m in range(max(n + 1, 1), 2 * max(n, 1) + 1) if hadamard_order_ok(m))
    return [m for m in (below, above) if m is not None]


def _no_hadamard_message(n: int) -> str:
    return (f"width {n} has no Hadamard construction in planc; nearest valid widths: "
            f"{', '.join(map(str, nearest_hadamard_orders(n)))} (orders above 2 are multiples of 4; planc builds "
            f"Sylvester 2^k, Paley q+1 (prime q = 3 mod 4) and 2(q+1) (prime q = 1 mod 4), and their "
            f"Kronecker products with 2^k)")


def _hadamard_split(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m 2^k and m = 1 or a Paley order, the smallest such m; None if none."""
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        if n // power == 1 or _paley_prime(n // power) is not None:
            return n // power, power
        power //= 2
    return None


def _paley_prime(m: int) -> int | None:
    """The prime q whose Paley construction has order m (I: q + 1, II: 2(q + 1)), if any."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return m // 2 - 1
    return None


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(m: int) -> torch.Tensor:
    """Paley I (m = q + 1, q = 3 mod 4): I + [[0, 1^T], [-1, Q]]. Paley II (m = 2(q + 1), q = 1 mod 4):
    the symmetric conference matrix C = [[0, 1^T], [1, Q]] with each 0 -> [[1, -1], [-1, -1]] and
    each +-1 -> +-[[1, 1], [1, -1]]."""
    q = _paley_prime(m)
    ones = torch.ones(1, q, dtype=torch.float64)
    lower = -ones.T if m == q + 1 else ones.T
    core = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1),
                      torch.cat([lower, _jacobsthal(q)], 1)], 0)
    if m == q + 1:
        return core + torch.eye(m, dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = chi(j - i), chi the quadratic character mod the prime q (chi(0) = 0)."""
    residues = {x * x % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


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


@dataclass(frozen=True)
class LatentFold:
    """What partition folds into one TPLA layer's weights."""

    U: torch.Tensor  # C x C orthogonal, fp64
    scales: torch.Tensor | None  # [g]: calibrated slice-RMS / latent-RMS; None = plain per-slice RMSNorm


def _needs_data(shard: dict) -> bool:
    return shard["transform"] == "pca" or shard["scales"] == "calibrated"


def slice_scales(latents_NC: torch.Tensor, U: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean over tokens of each rotated slice's RMS (the latents have unit RMS as a whole).

    Exact normalization divides a slice by the whole latent's RMS, the sliced one by the
    slice's own; on a unit-RMS latent their ratio is the slice's RMS, so multiplying the
    sliced result by its calibrated mean restores the exact scale on average."""
    rotated = latents_NC.double() @ U
    return torch.stack([s.pow(2).mean(-1).sqrt().mean() for s in rotated.chunk(groups, dim=-1)])


def _rotation(meta, latents: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    C, kind = meta.dims.kv_lora_rank, meta.shard["transform"]
    if kind == "hadamard":
        return hadamard(C, meta.shard["seed"]), {"transform": kind}
    if kind == "pca" and latents is not None:
        U, values = pca(latents)
        shares = values.view(meta.shard["latent_groups"], -1).sum(-1) / values.sum()
        return U, {"transform": kind, "slice_energy": [round(float(v), 6) for v in shares]}
    return torch.eye(C, dtype=torch.float64), {"transform": kind if kind != "pca" else "pca (identity on meta)"}


def latent_transforms(graph: fx.Graph, model: nn.Module, meta: bool) -> tuple[dict[str, LatentFold], dict]:
    """The fold of every TPLA layer, plus what to report (transform, energy share, scales)."""
    nodes = block_nodes(graph, "tpla_latent")
    data = [info(n).fqn for n in nodes if _needs_data(info(n).shard)]
    latents = calibration_latents(model, data, info(nodes[0]).shard["calibration_tokens"]) if data and not meta else {}
    folds: dict[str, LatentFold] = {}
    notes: dict = {}
    for node in nodes:
        m = info(node)
        U, notes[m.fqn] = _rotation(m, latents.get(m.fqn))
        scales = None
        if m.shard["scales"] == "calibrated" and m.fqn in latents:
            scales = slice_scales(latents[m.fqn], U, m.shard["latent_groups"])
            notes[m.fqn]["slice_scales"] = [round(float(v), 6) for v in scales]
        folds[m.fqn] = LatentFold(U, scales)
    return folds, notes


SLICED_NORM_WARN = 2.0  # a slice the sliced RMSNorm scales by more than this (or less than 1/this)


def sliced_norm_advice(graph: fx.Graph, notes: dict) -> list[str]:
    """Where a layer normalizes each slice alone (rmsnorm: sliced, scales: none) and the calibrated
    slice energies are far from even, what that norm does to a decode token's slices against the
    exact norm: slice j is scaled by rms(c) / rms(c_j) ~ 1 / sqrt(g * energy_j)."""
    gains = {}
    for node in block_nodes(graph, "tpla_latent"):
        m = info(node)
        energy = notes.get(m.fqn, {}).get("slice_energy")
        if energy and m.shard["rmsnorm"] == "sliced" and m.shard["scales"] == "none":
            gains[m.fqn] = [1 / math.sqrt(len(energy) * max(e, 1e-12)) for e in energy]
    off = {fqn: g for fqn, g in gains.items() if max(g) > SLICED_NORM_WARN or min(g) < 1 / SLICED_NORM_WARN}
    if not off:
        return []
    worst = max(off, key=lambda fqn: max(off[fqn]))
    energy = ", ".join(f"{e:.1%}" for e in notes[worst]["slice_energy"])
    return [f"{len(off)} of {len(gains)} TPLA layers have uneven slice energies with rmsnorm: sliced; worst "
            f"{worst}: slices hold {energy} of the latent energy on the calibration split, so the sliced "
            f"RMSNorm scales a decode token's slices by {', '.join(f'{g:.2f}x' for g in off[worst])} against the "
            f"exact norm. rmsnorm: recompute normalizes exactly with no extra communication "
            f"(or scales: calibrated corrects the mean)"]
