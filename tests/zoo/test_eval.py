"""Evaluation functions on small inputs whose answers are known."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from planc.models.registry import BOS_ID, BYTE_VOCAB, EOS_ID, WEIGHTS_DIR
from planc.zoo import corpus
from planc.zoo import eval as zoo_eval
from planc.zoo.train import build_model
from tests.zoo import mini_deepseek


class Constant(nn.Module):
    """Logits that ignore the input: uniform, or peaked on one token."""

    def __init__(self, peak: int | None = None):
        super().__init__()
        self.peak = peak

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, BYTE_VOCAB)
        if self.peak is not None:
            logits[..., self.peak] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def mini():
    return build_model(mini_deepseek(), 0).eval()


def test_uniform_model_scores_log2_vocab():
    assert zoo_eval.bits_per_byte(Constant(), max_bytes=1000) == pytest.approx(math.log2(BYTE_VOCAB), abs=1e-9)


def test_only_byte_targets_are_scored():
    ids = torch.tensor([[BOS_ID, 65, 66, EOS_ID]])
    logits = torch.zeros(1, 4, BYTE_VOCAB)
    logits[0, 0, 65] = 100.0  # certain of the first byte, uniform on the second, EOS not scored
    bits, count = zoo_eval.scored_bits(logits, ids)
    assert count == 2 and bits == pytest.approx(math.log2(BYTE_VOCAB), abs=1e-6)


def test_default_eval_set_is_the_one_the_shipped_figures_were_measured_on():
    recorded = json.loads((WEIGHTS_DIR / "manifest.json").read_text())["bench_zoo"]["eval_set"]
    ids = zoo_eval.eval_ids()
    assert ids.shape == (recorded["windows"], recorded["seq_len"])
    assert torch.equal(ids, corpus.windows(recorded["split"], recorded["windows"], recorded["seq_len"]))


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=20_000))
def test_eval_set_has_the_fewest_windows_that_score_max_bytes_predictions(max_bytes):
    ids = zoo_eval.eval_ids(max_bytes=max_bytes)
    num, seq = ids.shape
    predictions = seq - 1  # per window: every token but the first is predicted
    assert num * predictions >= max_bytes > (num - 1) * predictions
    assert torch.equal(ids, corpus.windows("heldout", num, seq))


def test_draft_agreement(mini):
    assert zoo_eval.draft_agreement(mini, mini, max_bytes=500) == 1.0
    assert zoo_eval.draft_agreement(Constant(peak=5), Constant(peak=7), max_bytes=500) == 0.0


def test_hotness_of_hand_counted_routings():
    counts = torch.tensor([[10, 0, 0, 0],   # always experts 0 (k=2: 5 occurrences) -> 1.0
                           [5, 5, 5, 5],    # spread evenly -> 0.5
                           [1, 1, 0, 0]])   # one occurrence: below min_occurrences, ignored
    assert zoo_eval.hotness(counts, k=2, min_occurrences=5) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="occurs"):
        zoo_eval.hotness(counts, k=2, min_occurrences=100)


def test_topk_hotness_reports_every_moe_layer(mini):
    result = zoo_eval.topk_hotness(mini, max_bytes=2000, min_occurrences=5)
    assert list(result) == ["model.layers.1.mlp"]  # layer 0 is dense
    assert 2 / 4 <= result["model.layers.1.mlp"] <= 1.0  # k=2 of 4 experts: at least k/E


def test_top_half_energy_of_known_spectra():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    assert zoo_eval.top_half_energy(x * torch.tensor([3.0, 2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert zoo_eval.top_half_energy(x) == pytest.approx(0.5, abs=0.02)
    # Centered: a constant offset carries no energy.
    assert zoo_eval.top_half_energy(x * torch.tensor([1.0, 1.0, 0.0, 0.0]) + 5) == pytest.approx(1.0)


def test_latent_energy_reports_every_mla_layer(mini):
    result = zoo_eval.latent_top_half_energy(mini, max_bytes=500)
    assert list(result) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(0.5 <= v <= 1.0 for v in result.values())


@pytest.mark.slow
def test_artifact_on_two_ranks_scores_like_the_model(compiled):
    from planc.models.registry import load_model

    # fp32 end to end; the ranks' partial sums reorder additions: ~1e-6 relative on the logits.
    artifact = compiled("deepseek_mla_tp_ep.yaml", 2)
    got = zoo_eval.artifact_bits_per_byte(artifact, max_bytes=500, timeout_s=240)
    assert got == pytest.approx(zoo_eval.bits_per_byte(load_model("tiny-deepseek"), max_bytes=500), abs=1e-4)


def test_artifact_on_one_rank_runs_in_process_and_scores_like_the_model(compiled):
    from planc.models.registry import load_model

    artifact = compiled("deepseek_mla_tp_ep.yaml", 1)
    got = zoo_eval.artifact_bits_per_byte(artifact, max_bytes=500)
    assert got == pytest.approx(zoo_eval.bits_per_byte(load_model("tiny-deepseek"), max_bytes=500), abs=1e-4)
