"""Token shuffling: equal groups, the tokens with most to lose keep their rank; the permutation
round-trips bitwise; the n-gram tables predict from a token's context, backing off to shorter
contexts and to the previous layer's rank."""
from __future__ import annotations

import pytest
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


def test_the_token_with_most_to_lose_keeps_its_rank():
    # rank 0 has room for one: token 1 loses 0.85 away from it, token 0 only 0.1 (though more
    # confident); most confident first would put 0 on rank 0 and 1 on rank 1 (0.9 in all, not 1.65)
    assert shuffle.assign(torch.tensor([[0.9, 0.8], [0.85, 0.0]])).tolist() == [1, 0]


def _best_total(score: torch.Tensor) -> float:
    """The highest summed score of any assignment with groups differing by at most one (dynamic
    programming over how many tokens each rank holds so far)."""
    N, world = score.shape
    cap = -(-N // world)
    best = {(0,) * world: 0.0}
    for t in range(N):
        after: dict[tuple, float] = {}
        for counts, total in best.items():
            for r in range(world):
                if counts[r] < cap:
                    key = counts[:r] + (counts[r] + 1,) + counts[r + 1:]
                    after[key] = max(after.get(key, float("-inf")), total + float(score[t, r]))
        best = after
    return max(total for counts, total in best.items() if max(counts) - min(counts) <= 1)


@pytest.mark.parametrize("tokens,world,exact", [(8, 2, True), (9, 3, True), (7, 3, False), (10, 4, False)])
def test_assign_against_the_best_equal_grouping(tokens, world, exact):
    """100 random score tables each, against brute force: the optimum every time when the tokens
    divide evenly; otherwise 98% of it on average (the placeholders' ranks are a guess)."""
    gen, ratios = torch.Generator().manual_seed(3), []
    for _ in range(100):
        score = torch.rand(tokens, world, generator=gen, dtype=torch.float64)
        home = shuffle.assign(score)
        ratios.append(float(score.gather(1, home[:, None]).sum()) / _best_total(score))
    assert max(ratios) < 1 + 1e-9
    if exact:
        assert min(ratios) > 1 - 1e-9
    else:
        assert sum(ratios) / len(ratios) > 0.98


def test_a_single_token_goes_to_its_predicted_rank():
    assert shuffle.assign(torch.tensor([[0.0, 0.2, 0.7, 0.1]])).tolist() == [2]


def _profile(world_of_context: dict, repeats: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of 4 ids repeated: [1, 2, 0, 2], with the experts each (previous id, id) is routed
    to given by world_of_context (experts 0-1 on rank 0, 2-3 on rank 1 under owner (0, 0, 1, 1))."""
    ids = torch.tensor([1, 2, 0, 2] * repeats)
    experts = torch.tensor([world_of_context[(int(ids[i - 1]) if i % 4 else None, int(ids[i]))] for i in range(len(ids))])
    return ids, experts


def test_a_longer_context_decides_where_the_token_alone_is_ambiguous():
    on0, on1 = [0, 1], [2, 3]
    ids, experts = _profile({(None, 1): on0, (1, 2): on1, (2, 0): on0, (0, 2): on0})
    p, precision = shuffle.predictor(ids, experts, (0, 0, 1, 1), None, window=4)
    assert precision == 1.0  # the tables of the first half predict every token of the second
    # id 2 alone: rank 1 half the time; after 1 always rank 1, after 0 always rank 0
    alone = p.token_scores(3)[2]
    assert alone[0] == pytest.approx(alone[1], abs=0.05)
    got = p.scores(torch.tensor([[1, 2, 0, 2]]), None).argmax(1)
    assert got.tolist() == [0, 1, 0, 0]
    # a context never seen (2 after 2) backs off to the token alone: its two ranks near even
    unseen = p.scores(torch.tensor([[2, 2]]), None)[1]
    assert torch.allclose(unseen, p.scores(torch.tensor([[2]]), None)[0])


def test_unseen_ids_lean_on_the_previous_layers_rank():
    ids, experts = _profile({(None, 1): [0, 1], (1, 2): [2, 3], (2, 0): [0, 1], (0, 2): [0, 1]})
    prev_best = torch.tensor([0, 1, 0, 1] * 8)  # the 2-gram: after rank 0, rank 0; after rank 1, rank 1
    p, _ = shuffle.predictor(ids, torch.tensor([[0, 1], [2, 3]] * 16), (0, 0, 1, 1), prev_best, window=4)
    never = p.scores(torch.tensor([[7], [7]]), torch.tensor([0, 1]))  # id 7 is not in the profile
    assert never.argmax(1).tolist() == [0, 1] and torch.equal(never, p.prior)
    first_layer, _ = shuffle.predictor(ids, experts, (0, 0, 1, 1), None, window=4)
    assert first_layer.prior.shape == (1, 2)  # no previous MoE layer: one row, every token's coverage


def test_context_keys_only_reach_back_inside_the_row():
    key, valid = shuffle.context_keys(torch.tensor([[5, 6, 7], [8, 9, 10]]), 2)
    assert valid.tolist() == [False, True, True] * 2
    assert key[1] == 6 * shuffle.BASE + 5 and key[4] == 9 * shuffle.BASE + 8


def test_tables_round_trip_through_the_weights():
    ids, experts = _profile({(None, 1): [0, 2], (1, 2): [2, 3], (2, 0): [0, 1], (0, 2): [1, 3]})
    p, _ = shuffle.predictor(ids, experts, (0, 1, 1, 0), torch.tensor([1, 0] * 16), window=4)
    again = shuffle.Predictor.from_tables(p.tables())
    x = torch.tensor([[1, 2, 0, 2, 7]])
    assert torch.allclose(again.scores(x, torch.tensor([0, 1, 1, 0, 1])), p.scores(x, torch.tensor([0, 1, 1, 0, 1])))
    assert len(again.ngrams) == shuffle.ORDER


def _tables(world: int = 4) -> dict:
    ids = torch.randint(0, 20, (64,), generator=torch.Generator().manual_seed(1))
    experts = torch.randint(0, 8, (64, 2), generator=torch.Generator().manual_seed(2))
    owner = tuple(e // 2 for e in range(8))
    return shuffle.predictor(ids, experts, owner, torch.randint(0, world, (64,)), window=8)[0].tables()


def test_the_permutation_round_trips_bitwise():
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    plan = shuffle.plan_tokens(ids, _tables(), torch.randint(0, 4, (21,)), 4, 1)
    assert sorted(plan.perm.tolist()) == list(range(21)) and sorted(plan.sizes) == [5, 5, 5, 6]
    rows = plan.permute(Ops(), x)
    assert torch.equal(plan.unpermute(Ops(), rows, x), x)
    assert torch.equal(rows[plan.mine[0]:plan.mine[1]], plan.take(x))
    assert torch.equal(plan.home[plan.perm], torch.repeat_interleave(torch.arange(4), torch.tensor(plan.sizes)))


def test_precision_and_best_rank():
    owner = (0, 0, 1, 1)
    assert shuffle.best_rank(torch.tensor([[0, 2], [2, 3]]), owner).tolist() == [0, 1]  # a tie goes to rank 0
    # a prediction is right when its rank holds as many of the token's experts as any rank
    assert shuffle.precision(torch.tensor([1, 0]), torch.tensor([[0, 1], [1, 1]]), 2) == 0.5


def test_held_back_rows_count_what_a_placement_costs_with_its_predictor():
    """Each (previous id, id) context always routes to one expert pair: a placement holding every
    pair on one rank needs no rows once the tables know the contexts; one splitting every pair
    needs at least one row per token, and under two (two: a token on a rank holding neither)."""
    pairs = {(None, 1): [0, 1], (1, 2): [2, 3], (2, 0): [4, 5], (0, 2): [6, 7]}
    ids, experts = _profile(pairs, repeats=16)
    together, apart = (0, 0, 1, 1, 2, 2, 3, 3), (0, 1, 1, 2, 2, 3, 3, 0)
    assert shuffle.held_back_rows(ids, experts, together, None, window=4, step_windows=2) == 0.0
    assert 1.0 <= shuffle.held_back_rows(ids, experts, apart, None, window=4, step_windows=2) < 2.0


def test_a_profile_of_one_window_is_read_as_two_halves():
    """profile.tokens may be a single calibration window: its halves are read as windows of half."""
    ids, experts = _profile({(None, 1): [0, 1], (1, 2): [2, 3], (2, 0): [0, 1], (0, 2): [2, 3]}, repeats=2)
    p, precision = shuffle.predictor(ids, experts, (0, 0, 1, 1), None, window=8)
    assert len(p.ngrams) == shuffle.ORDER and 0.0 <= precision <= 1.0
    assert 0.0 <= shuffle.held_back_rows(ids, experts, (0, 0, 1, 1), None, window=8, step_windows=1) <= 1.0


def test_a_longer_context_seen_once_is_left_out():
    ids = torch.tensor([1, 2, 0, 2, 1, 2, 5, 3])  # windows of 4: (1, 2) twice; (2, 5) and (5, 3) once
    experts = torch.tensor([[0, 1]] * 8)
    p = shuffle.predictor_from(ids, experts, (0, 0, 1, 1), None, window=4)
    order1, order2 = p.ngrams[0], p.ngrams[1]
    assert order1.keys.tolist() == [0, 1, 2, 3, 5] and order1.count.tolist() == [1, 2, 3, 1, 1]
    assert order2.keys.tolist() == [2 * shuffle.BASE + 1] and order2.count.tolist() == [2]  # id 2 after id 1
