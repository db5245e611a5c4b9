"""Orthogonal latent transforms U (C x C) for slicing an MLA latent, computed once per layer at compile time.

none: identity. hadamard: Sylvester Hadamard / sqrt(C) times a seeded random +-1 diagonal, which
spreads every direction's energy evenly over the slices. pca: eigenvectors of the covariance of
the RMS-normalized latent on the corpus's calibration split, sorted by eigenvalue (descending),
so slice 0 carries the most energy (the paper's default).

Folding (planc.passes.tpla): c' = U^T c, W_UK <- W_UK diag(gamma) U, W_UV likewise, gamma <- 1.
A unit-weight RMSNorm commutes with U, so the unsliced model is exactly MLA.
"""
from __future__ import annotations

import math

from planc.lazy import lazy

torch = lazy("torch")


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


def slice_scales(latents_NC: torch.Tensor, U: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean over tokens of each rotated slice's RMS (the latents have unit RMS as a whole).

    Exact normalization divides a slice by the whole latent's RMS, the sliced one by the
    slice's own; on a unit-RMS latent their ratio is the slice's RMS, so multiplying the
    sliced result by its calibrated mean restores the exact scale on average."""
    rotated = latents_NC.double() @ U
    return torch.stack([s.pow(2).mean(-1).sqrt().mean() for s in rotated.chunk(groups, dim=-1)])
