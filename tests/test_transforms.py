"""Hadamard transforms: every order planc claims to construct is orthogonal, seeded and signed; the
rest are refused with the nearest widths that work."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from planc.transforms import hadamard, hadamard_matrix, hadamard_order_ok, nearest_hadamard_orders

CONSTRUCTIBLE = [n for n in range(1, 257) if hadamard_order_ok(n)]
# The orders <= 256 that exist (multiples of 4) but need a prime-power field or another family.
NOT_BUILT = {52, 92, 100, 116, 156, 172, 184, 188, 232, 236, 244}


def test_constructible_orders_are_every_power_of_two_and_the_paley_products():
    assert {1, 2, 4, 8, 16, 32, 64, 128, 256} <= set(CONSTRUCTIBLE)
    assert {12, 20, 24, 28, 36, 44, 96, 192} <= set(CONSTRUCTIBLE)  # 12 = 11 + 1, 28 = 2(13 + 1), 96 = 12 x 8
    assert set(range(4, 257, 4)) - set(CONSTRUCTIBLE) == NOT_BUILT


@pytest.mark.parametrize("n", CONSTRUCTIBLE)
def test_every_constructible_order_is_a_hadamard_matrix_and_orthogonal(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    # Integer-valued fp64 products: exact.
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    U = hadamard(n, seed=3)
    torch.testing.assert_close(U @ U.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [12, 28, 96, 128])
def test_transform_is_the_matrix_over_sqrt_n_with_a_seeded_sign_per_row(n):
    U, h = hadamard(n, seed=5), hadamard_matrix(n)
    signs = U * n ** 0.5 / h  # every entry of row i is s_i
    assert torch.equal(signs, signs[:, :1].expand(n, n)) and set(signs[:, 0].tolist()) == {-1.0, 1.0}
    assert torch.equal(U.abs(), torch.full((n, n), 1 / n ** 0.5, dtype=torch.float64))  # +-1/sqrt(n), rounded once


def test_transform_is_deterministic_per_seed():
    assert torch.equal(hadamard(96, 0), hadamard(96, 0))
    assert not torch.equal(hadamard(96, 0), hadamard(96, 1))
    assert torch.equal(hadamard(96, 0).abs(), hadamard(96, 1).abs())


@pytest.mark.parametrize("n", [1, 2, 4, 64, 512])
def test_powers_of_two_are_bitwise_the_sylvester_transform_tpla_figures_were_recorded_with(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    for seed in (0, 7):
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        assert torch.equal(hadamard(n, seed), signs[:, None] * h / n ** 0.5)


@pytest.mark.parametrize("n,nearest", [(6, "4, 8"), (92, "88, 96"), (100, "96, 104"), (3, "2, 4"), (0, "1")])
def test_an_order_without_a_construction_is_refused_with_the_nearest_widths(n, nearest):
    with pytest.raises(ValueError) as err:
        hadamard(n, seed=0)
    message = str(err.value)
    assert f"width {n} has no Hadamard construction in planc" in message
    assert f"nearest valid widths: {nearest} " in message, message


@given(st.integers(min_value=-4, max_value=2000))
def test_nearest_orders_bracket_the_width_with_nothing_closer(n):
    nearest = nearest_hadamard_orders(n)
    assert all(hadamard_order_ok(m) for m in nearest)
    if hadamard_order_ok(n):
        assert nearest == [n]
        return
    assert nearest[-1] > n and not any(hadamard_order_ok(m) for m in range(n + 1, nearest[-1]))
    if n > 1:
        assert len(nearest) == 2 and nearest[0] < n
        assert not any(hadamard_order_ok(m) for m in range(nearest[0] + 1, n))


@given(st.integers(min_value=3, max_value=5000))
def test_only_multiples_of_four_are_claimed_above_two(n):
    # A Hadamard matrix of order n > 2 exists only if 4 divides n: claiming another is a bug.
    assert not hadamard_order_ok(n) or n % 4 == 0
