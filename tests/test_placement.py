"""Expert placement: E/n experts per rank always; eplb balances load; semantic finds planted co-activation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from planc import placement


def _planted(pairs: list[tuple[int, int]], tokens_per_pair: int = 5) -> torch.Tensor:
    """counts[v, e]: token id v always routed to one pair of experts."""
    counts = torch.zeros(len(pairs) * tokens_per_pair, 8, dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        counts[i * tokens_per_pair:(i + 1) * tokens_per_pair, [a, b]] = 10
    return counts


def test_counts_and_coactivation_on_a_known_routing():
    ids, experts = torch.tensor([0, 1, 0]), torch.tensor([[0, 1], [1, 2], [0, 2]])
    assert placement.counts(ids, experts, 2, 3).tolist() == [[2, 1, 1], [0, 1, 1]]
    assert placement.coactivation(experts, 3).tolist() == [[2, 1, 1], [1, 2, 1], [1, 1, 2]]
    assert placement.co_located(experts, (0, 0, 1)) == pytest.approx(1 / 3)  # of pairs 0-1, 1-2, 0-2 only 0-1


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(4, 2), (8, 2), (8, 4), (8, 8)]), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_every_placement_puts_exactly_e_over_n_experts_on_each_rank(shape, vocab, seed):
    num_experts, world = shape
    counts = torch.randint(0, 5, (vocab, num_experts), generator=torch.Generator().manual_seed(seed))
    for owner in (placement.contiguous(num_experts, world), placement.eplb(counts.sum(0), world),
                  placement.semantic(counts, world)[0]):
        assert sorted(owner) == sorted(list(range(world)) * (num_experts // world))


def test_eplb_packs_heaviest_first_onto_the_lightest_rank():
    load = torch.tensor([9.0, 8, 1, 1])
    assert placement.eplb(load, 2) == (0, 1, 1, 0)  # 9+1 against 8+1
    assert placement.score(torch.diag(load).long(), (0, 1, 1, 0)).expert_imbalance == pytest.approx(10 / 9.5)


def test_semantic_finds_planted_pairs_that_contiguous_splits():
    pairs = [(0, 5), (1, 6), (2, 7), (3, 4)]
    counts = _planted(pairs)
    owner, found = placement.semantic(counts, 4)
    assert all(owner[a] == owner[b] for a, b in pairs)
    assert placement.score(counts, owner).remote == pytest.approx(0.0)
    assert placement.score(counts, placement.contiguous(8, 4)).remote == pytest.approx(0.5)
    assert set(found["objectives"]) == {"greedy", "kernighan_lin", "contiguous"}


def test_balanced_remote_moves_the_least_confident_tokens_off_a_full_rank():
    # Three ids all served by rank 0 (one of them only half); ranks take equal shares of activations.
    S_Vn = torch.tensor([[[4.0, 0.0], [4.0, 0.0], [2.0, 2.0]]], dtype=torch.double)
    # 12 activations, 6 per rank: id 0 puts its 4 on rank 0, id 1 the 2 left there and 2 on rank 1
    # (remote), id 2 (least confident) all on rank 1, where half of its activations are served.
    assert float(placement.balanced_remote(S_Vn)[0]) == pytest.approx((2 + 2) / 12)


def test_expected_load_is_a_share_of_all_activations_spread_or_by_prediction():
    counts = torch.tensor([[3, 1], [0, 4]])
    spread = placement.expected_load(counts, 2)
    assert torch.allclose(spread, torch.tensor([[3, 3], [5, 5]], dtype=torch.double) / 16)
    by_token = placement.expected_load(counts, 2, torch.tensor([[1.0, 0.0], [0.2, 0.8]]))
    assert torch.allclose(by_token, torch.tensor([[3, 0], [1, 4]], dtype=torch.double) / 8)
