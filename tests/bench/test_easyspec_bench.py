"""bench easyspec without launching ranks: the configurations' plans, the summary of measured runs,
and the cost model's prediction for DeepSeek-V3 with a 1B-class draft."""
from __future__ import annotations

import json

import pytest

from planc.bench import easyspec
from planc.plan import parse_plan_text


def test_each_configuration_changes_only_the_draft():
    base = parse_plan_text(easyspec.PLAN.read_text(), "base")
    plans = {name: parse_plan_text(easyspec.plan_text(changes), name)
             for name, (changes, _) in easyspec.CONFIGS.items() if changes is not None}
    assert all((p.mesh, p.model, p.rules) == (base.mesh, base.model, base.rules) for p in plans.values())
    assert plans["speculative"].draft.easyspec is None and plans["speculative"].draft.rules == ()
    assert [r.section.choice for r in plans["speculative_draft_tp"].draft.rules] == ["tp", "tp"]
    assert [plans[f"easyspec_{n}"].draft.easyspec.layer_parallel for n in (2, 4)] == [2, 4]
    assert plans["easyspec_4"].draft.easyspec.calibrate


def _run(tps: float, tokens, spec: dict | None = None) -> dict:
    return {"decode_tokens_per_s": tps, "tokens": tokens, "speculation": spec}


def _spec(accepted: int, draft_s: float, depth: float) -> dict:
    return {"acceptance_rate": accepted / 40, "mean_accepted_length": 1 + accepted / 10, "draft_sequential_depth": depth,
            "sequential_depth": 6, "rounds": 10, "drafted": 40, "accepted": accepted, "draft_s": draft_s,
            "verify_s": 0.5, "draft_work_per_rank": [], "collectives_per_round": {}}


def test_summary_takes_medians_and_ratios():
    runs = {"vanilla": [_run(t, [[1]]) for t in (10.0, 12.0, 11.0)],
            "speculative": [_run(22.0, [[1]], _spec(30, 0.2, 6.0))],
            "speculative_draft_tp": [_run(5.0, [[1]], _spec(30, 2.0, 6.0))],
            "easyspec_2": [_run(20.0, [[1]], _spec(28, 0.4, 4.5))],
            "easyspec_4": [_run(18.0, [[2]], _spec(27, 0.5, 3.75))]}
    out = easyspec.summarize(runs, ["a prompt"], 8)
    c = out["configs"]
    assert c["vanilla"]["tokens_per_s"] == 11.0 and c["speculative"]["speedup_vs_vanilla"] == 2.0
    assert c["easyspec_2"]["acceptance_vs_speculative"] == pytest.approx(28 / 30)
    assert c["easyspec_4"]["depth_vs_sequential"] == 0.625 and not c["easyspec_4"]["same_tokens_as_vanilla"]
    assert c["easyspec_2"]["draft_ms_per_round"] == 40.0
    assert c["easyspec_2"]["drafting_speedup_vs_speculative"] == 0.5
    assert c["easyspec_2"]["drafting_speedup_vs_draft_tp"] == 5.0
    json.dumps(out)
    assert "easyspec_4" in easyspec.table(out)


def test_prediction_for_deepseek_v3_with_a_1b_draft():
    p = easyspec.predict({"speculative": 0.8, "speculative_draft_tp": 0.8, "easyspec_2": 0.78, "easyspec_4": 0.76})
    c = p["configs"]
    assert c["easyspec_4"]["draft_sequential_depth"] == (16 + 3 * (2 + 4)) / 4  # 14 middle layers: groups 4+4+4+2
    assert c["easyspec_2"]["draft_sequential_depth"] == (16 + 3 * (2 + 7)) / 4
    assert c["speculative"]["mean_accepted_length"] == pytest.approx((1 - 0.8 ** 5) / 0.2)
    # fewer sequential collectives: EasySpec drafts faster than the draft split over 8 GPUs layer by layer
    assert c["easyspec_4"]["draft_ms_per_round"] < c["easyspec_2"]["draft_ms_per_round"] \
        < c["speculative_draft_tp"]["draft_ms_per_round"] < c["speculative"]["draft_ms_per_round"]
    assert c["vanilla"]["speedup_vs_vanilla"] == 1.0 and c["speculative_draft_tp"]["verify_ms"] > c["vanilla"]["step_ms"]
