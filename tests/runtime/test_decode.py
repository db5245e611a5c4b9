"""Decode strategies apart from the loop, and the loop's stopping rule, on the bundled model."""
from __future__ import annotations

import pytest
import torch

from planc.errors import RunError
from planc.models.tokenizer import encode
from planc.runtime.decode import Greedy, Sampling, choose_strategy, generate
from planc.runtime.model import Model

PROMPTS = [encode("def fibonacci(n):\n    return"), encode("import os\nimport"), encode("class Tree:\n    def")]
NEW = 12


@pytest.fixture(scope="module")
def model(compiled) -> Model:
    return Model(compiled("deepseek_mla_tp_ep.yaml", 1))


@pytest.fixture(scope="module")
def greedy(model):
    return generate(model, PROMPTS, NEW, Greedy(), keep_logits=True)


def test_options_choose_the_strategy():
    assert choose_strategy() == Greedy() and choose_strategy(0.0, top_k=5) == Greedy()
    assert choose_strategy(0.7, 5, 1) == Sampling(0.7, 5, 1)
    for bad in ({"temperature": -1.0}, {"temperature": 1.0, "top_k": -2}):
        with pytest.raises(RunError, match="temperature must be > 0"):
            choose_strategy(**bad)


def test_top_k_sampling_keeps_to_the_k_best_logits():
    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0], [3.0, -1.0, 2.9, 2.95]]).repeat(100, 1)
    picked = Sampling(temperature=10.0, top_k=2, seed=0).pick(logits).view(100, 2)
    assert set(picked[:, 0].tolist()) == {1, 2} and set(picked[:, 1].tolist()) == {0, 3}
    assert set(Sampling(temperature=10.0, seed=0).pick(logits).tolist()) == {0, 1, 2, 3}  # no cut: all drawn


def test_the_same_seed_draws_the_same_tokens(model):
    runs = [generate(model, PROMPTS, 6, Sampling(temperature=1.5, seed=s)).tokens for s in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2]


def test_top_1_sampling_is_greedy(model, greedy):
    sampled = generate(model, PROMPTS, NEW, Sampling(temperature=1.0, top_k=1, seed=3))
    assert sampled.tokens == greedy.tokens


def _outside_top_k(gen, k: int) -> int:
    """How many sampled tokens are not among the k largest logits of their step."""
    outside = 0
    for step, logits_BV in enumerate(gen.step_logits):
        kth_B = logits_BV.topk(k, dim=-1).values[:, -1]
        outside += sum(int(logits_BV[row, tokens[step]] < kth_B[row]) for row, tokens in enumerate(gen.tokens))
    return outside


def test_top_k_sampling_on_the_model(model, greedy):
    k, hot = 3, 3.0  # a high temperature flattens the model's confident steps
    cut = generate(model, PROMPTS, NEW, Sampling(temperature=hot, top_k=k, seed=1), keep_logits=True)
    assert _outside_top_k(cut, k) == 0
    assert cut.tokens != greedy.tokens  # it did sample
    uncut = generate(model, PROMPTS, NEW, Sampling(temperature=hot, seed=1), keep_logits=True)
    assert _outside_top_k(uncut, k) > 0  # the check above can see a token outside the k best


def _eos_for(tokens: list[list[int]]) -> tuple[int, int]:
    """A token row `cut` emits that some other row never does: (token, cut)."""
    for cut, row in enumerate(tokens):
        for token in row[1:-1]:
            if any(token not in other for other in tokens):
                return token, cut
    pytest.fail(f"every generated token appears in every row: {tokens}")


def test_a_row_that_emits_eos_stops_and_the_others_go_on(model, greedy):
    eos, cut = _eos_for(greedy.tokens)
    got = generate(model, PROMPTS, NEW, Greedy(), eos_id=eos)
    want = [row[:row.index(eos) + 1] if eos in row else row for row in greedy.tokens]
    assert got.tokens == want
    assert got.tokens[cut][-1] == eos and len(got.tokens[cut]) < NEW
    assert any(len(row) == NEW and eos not in row for row in got.tokens)
    assert got.decode_steps == NEW - 1  # a row still running keeps the loop going


def test_decoding_ends_once_every_row_has_stopped(model, greedy):
    first = greedy.tokens[0][0]
    got = generate(model, PROMPTS[:1], NEW, Greedy(), eos_id=first)
    assert got.tokens == [[first]] and got.decode_steps == 0


def test_any_of_several_eos_ids_stops_a_row(model, greedy):
    """Llama-3-style configs list several EOS ids; a row stops at whichever it emits first."""
    eos, cut = _eos_for(greedy.tokens)
    never = max(max(row) for row in greedy.tokens) + 1  # an id no row emits
    got = generate(model, PROMPTS, NEW, Greedy(), eos_id=[never, eos])
    assert got.tokens == [row[:row.index(eos) + 1] if eos in row else row for row in greedy.tokens]
    assert got.tokens[cut][-1] == eos


def test_greedy_verify_accepts_the_target_argmax_prefix():
    """Target argmax per position: row 0 [1, 2, 3, 0] (drafts 1, 2, 3 all accepted, bonus 0);
    row 1 [1, 0, ...] (draft 1 accepted, draft 2 rejected: the correction is 0)."""
    best = torch.tensor([[1, 2, 3, 0], [1, 0, 3, 2]])
    target_BGV = torch.nn.functional.one_hot(best, 4).float()
    accepted, next_B = Greedy().verify(target_BGV, torch.zeros(2, 3, 4), torch.tensor([[1, 2, 3], [1, 2, 3]]))
    assert accepted.tolist() == [3, 1] and next_B.tolist() == [0, 0]


def test_sampling_verify_accepts_what_the_target_would_draw_with_certainty():
    """p = q: every draft is accepted (u * q < p for u < 1), and the bonus comes from p_G."""
    logits = torch.tensor([[[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 30.0]]])
    accepted, next_B = Sampling(seed=0).verify(logits, logits[:, :2], torch.tensor([[1, 0]]))
    assert accepted.tolist() == [2] and next_B.tolist() == [2]
