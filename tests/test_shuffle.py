"""Token shuffling: equal groups, confident tokens first, overflow to the next-best rank; the
permutation round-trips bitwise; the predictor falls back to the 2-gram for unseen ids."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from planc import shuffle
from planc.ops import Ops


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.sampled_from([2, 3, 4, 8]), st.integers(0, 2**31 - 1))
def test_assign_gives_every_rank_an_equal_share(tokens, world, seed):
    score = torch.rand(tokens, world, generator=torch.Generator().manual_seed(seed))
    sizes = torch.bincount(shuffle.assign(score), minlength=world)
    assert int(sizes.sum()) == tokens and int(sizes.max() - sizes.min()) <= 1


def test_confident_tokens_keep_their_rank_and_the_rest_overflow_to_their_next_best():
    score = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.8, 0.0, 0.2], [0.1, 0.9, 0.0], [0.5, 0.5, 0.0],
                          [0.0, 0.0, 1.0]])
    # rank 0 has room for 2: tokens 0 and 2 (0.9, 0.8) beat 1 (0.6) and 4 (0.5); 1 goes to its
    # second choice, rank 1, which 3 (0.9) fills with it; 4 (tied: rank 0 first) ends on rank 2.
    assert shuffle.assign(score).tolist() == [0, 1, 0, 1, 2, 2]


def test_a_single_token_goes_to_its_predicted_rank():
    assert shuffle.assign(torch.tensor([[0.0, 0.2, 0.7, 0.1]])).tolist() == [2]


def _tables(world: int = 4) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {"token_score": torch.rand(20, world, generator=gen), "bigram": torch.rand(world, world, generator=gen)}


def test_the_permutation_round_trips_bitwise():
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    plan = shuffle.plan_tokens(ids, _tables(), 0.5, torch.randint(0, 4, (21,)), 4, 1)
    assert sorted(plan.perm.tolist()) == list(range(21)) and sorted(plan.sizes) == [5, 5, 5, 6]
    rows = plan.permute(Ops(), x)
    assert torch.equal(plan.unpermute(Ops(), rows, x), x)
    assert torch.equal(rows[plan.mine[0]:plan.mine[1]], plan.take(x))
    assert torch.equal(plan.home[plan.perm], torch.repeat_interleave(torch.arange(4), torch.tensor(plan.sizes)))


def test_unseen_or_unsure_tokens_are_predicted_by_the_previous_layers_rank():
    token_score = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.0, 0.0]])  # sure, unsure, never seen
    p = shuffle.Predictor(token_score, torch.tensor([[0.2, 0.8], [0.7, 0.3]]), threshold=0.6)
    got = p.scores(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 0, 1]))
    assert torch.equal(got, torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8], [0.7, 0.3]]))
    first_layer = shuffle.Predictor(token_score, None, 0.6)  # no previous MoE layer: the table alone
    assert torch.equal(first_layer.scores(torch.tensor([1]), None), token_score[1:2])


def test_predictor_tables_and_precision_on_a_profile():
    owner = (0, 0, 1, 1)
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    experts = torch.tensor([[0, 1], [2, 3]] * 4)  # id 0 always on rank 0, id 1 always on rank 1
    p, precision = shuffle.predictor(ids, experts, owner, 3, prev_best_T=None)
    assert p.token_score.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]] and precision == 1.0
    assert shuffle.best_rank(torch.tensor([[0, 2], [2, 3]]), owner).tolist() == [0, 1]  # a tie goes to rank 0
    # a prediction is right when its rank holds as many of the token's experts as any rank
    assert shuffle.precision(torch.tensor([1, 0]), torch.tensor([[0, 1], [1, 1]]), 2) == 0.5
