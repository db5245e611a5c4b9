"""`planc verify`'s per-dtype pass/fail bars on hand-made comparison reports."""
from __future__ import annotations

import pytest
import torch

from planc.verify import compare, judge


def _report(agreement=1.0, max_diff=0.0, median=0.0, largest=20.0) -> dict:
    return {"token_agreement": agreement, "max_logit_diff": max_diff, "median_logit_diff": median,
            "max_abs_logit": largest, "tokens_compared": 48}


@pytest.mark.parametrize("report, passed", [
    (_report(median=0.25, max_diff=3.0), True),  # |logit| 20: one bf16 ulp is 0.125; a routing flip's max is free
    (_report(median=0.26), False),
    (_report(median=0.26, largest=40.0), True),  # at |logit| 40 the ulp doubles
    (_report(agreement=0.95), True),
    (_report(agreement=0.94), False),
])
def test_bfloat16_bar(report, passed):
    judged = judge(report, "bfloat16")
    assert judged["passed"] is passed, judged
    assert "2 bf16 ulps" in judged["tolerance"]


@pytest.mark.parametrize("report, passed", [
    (_report(max_diff=1e-4), True), (_report(max_diff=2e-4), False), (_report(agreement=47 / 48), False),
])
def test_float32_bar(report, passed):
    assert judge(report, "float32")["passed"] is passed


@pytest.mark.parametrize("report, passed", [
    (_report(max_diff=0.5), True), (_report(agreement=0.95, max_diff=0.5), True), (_report(agreement=0.94), False),
])
def test_a_plan_that_approximates_the_model_is_judged_by_its_tokens(report, passed):
    approximate = {"model.layers.0.self_attn": {"strategy": "tpla", "what": "attention over 2 latent slices"}}
    judged = judge(report, "float32", approximate)
    assert judged["passed"] is passed and judged["tolerance"] == "token_agreement >= 0.95"
    assert judged["approximate"] == approximate
    assert judge(report, "float32", {})["passed"] is False  # nothing approximated: the exact bar


def test_compare_scores_until_a_row_diverges():
    ref_logits = [torch.tensor([[1.0, 2.0], [4.0, 3.0]])] * 3  # 3 steps, 2 rows, 2-token vocabulary
    got_logits = [[[1.0, 2.5], [4.0, 3.0]]] * 3
    report = compare([[1, 1, 1], [0, 0, 0]], ref_logits, [[1, 1, 1], [0, 1, 0]], got_logits)
    assert report["token_agreement"] == 4 / 6 and report["tokens_compared"] == 6
    assert report["max_logit_diff"] == 0.5 and report["median_logit_diff"] == 0.5 and report["max_abs_logit"] == 4.0


def test_logits_are_also_compared_over_every_step_past_a_divergence():
    """An artifact that agrees on nothing shows its logit difference (over all steps) instead of
    a vacuous 0 over the no steps that agree, and fails."""
    ref_logits = [torch.tensor([[1.0, 2.0]])] * 3  # 3 steps, 1 row
    got_logits = [[[1.0, 2.0]], [[1.0, 2.0]], [[9.0, 2.0]]]  # first token already differs
    report = compare([[1, 1, 1]], ref_logits, [[0, 1, 0]], got_logits)
    assert report["token_agreement"] == 0 and report["logit_steps_agreeing"] == 0 and report["max_logit_diff"] == 0
    assert report["max_logit_diff_all_steps"] == 8.0 and report["logit_steps_all"] == 3
    assert judge(report, "float32")["passed"] is False and judge(report, "bfloat16")["passed"] is False


def test_planc_verify_exits_1_below_the_agreement_bar_and_prints_both_logit_figures(monkeypatch, capsys):
    from planc import verify as verify_module
    from planc.cli import main

    failing = judge({**_report(agreement=0.5), "logit_steps_agreeing": 24, "max_logit_diff_all_steps": 7.5,
                     "logit_steps_all": 48}, "bfloat16")
    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: {**failing, "ranks_agree": True, "world_size": 2})
    assert main(["verify", "ARTIFACT"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("token_agreement 0.5000 over 48 tokens, max_logit_diff 0.000e+00, median 0.000e+00 over the "
                      "24 row steps before any divergence, max_logit_diff 7.500e+00 over all 48 row steps "
                      "(2 ranks, bfloat16)")
    assert out[1].startswith("FAILED: bfloat16 tolerance token_agreement >= 0.95")
