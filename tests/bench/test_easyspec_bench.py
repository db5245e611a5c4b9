"""bench easyspec without launching ranks: the configurations' plans, the summary of measured runs
per batch setting (tokens/s the median of the rounds', rates from summed counts), and the cost
model's prediction for DeepSeek-V3 with a 1B-class draft."""
from __future__ import annotations

import json

import pytest

from planc.bench import easyspec
from planc.plan import parse_plan_text
from planc.runtime.speculative import Figures, Speculation


def test_each_configuration_changes_only_the_draft():
    base = parse_plan_text(easyspec.PLAN.read_text(), "base")
    plans = {name: parse_plan_text(easyspec.plan_text(changes), name)
             for name, (changes, _) in easyspec.CONFIGS.items() if changes is not None}
    assert all((p.mesh, p.model, p.rules) == (base.mesh, base.model, base.rules) for p in plans.values())
    assert plans["speculative"].draft.easyspec is None and plans["speculative"].draft.rules == ()
    assert [r.section.choice for r in plans["speculative_draft_tp"].draft.rules] == ["tp", "tp"]
    assert [plans[f"easyspec_{n}"].draft.easyspec.layer_parallel for n in (2, 4)] == [2, 4]
    assert plans["easyspec_4"].draft.easyspec.calibrate


def _run(decoded: int, seconds: float, tokens, spec: dict | None = None) -> dict:
    return {"decode_tokens": decoded, "decode_s": seconds, "decode_tokens_per_s": decoded / seconds,
            "tokens": tokens, "speculation": spec}


def _spec(rounds: int, accepted: int, draft_s: float, depth: int) -> dict:
    """One row's summary as the runtime writes it: G = 4, `depth` attention steps per round."""
    figures = Figures(rounds=rounds, drafted=4 * rounds, accepted=accepted, verified=rounds, draft_depth=depth * rounds,
                      draft_s=draft_s, verify_s=0.5)
    return {**figures.summary(Speculation(tokens=4, sequential_depth=6)), "draft_work_per_rank": [],
            "collectives_per_round": {}}


def test_a_setting_pools_its_rounds_and_compares_within_itself():
    """Two rounds of unequal size: tokens/s is the median of the rounds' (pooled beside it), every
    speculation rate comes from the summed counts, not an average of the rounds' rates."""
    runs = {"vanilla": [_run(100, 10.0, [[1]]), _run(20, 1.0, [[2]])],
            "speculative": [_run(100, 5.0, [[1]], _spec(10, 30, 0.2, 24)), _run(20, 0.5, [[2]], _spec(5, 5, 0.4, 24))],
            "speculative_draft_tp": [_run(100, 20.0, [[1]], _spec(10, 30, 2.0, 24)),
                                     _run(20, 2.0, [[2]], _spec(5, 5, 1.0, 24))],
            "easyspec_2": [_run(100, 6.0, [[1]], _spec(10, 28, 0.3, 18)), _run(20, 0.6, [[2]], _spec(5, 5, 0.3, 18))],
            "easyspec_4": [_run(100, 6.0, [[1]], _spec(10, 27, 0.3, 15)), _run(20, 0.6, [[3]], _spec(5, 4, 0.3, 15))]}
    out = easyspec.summarize(runs, 1, "each prompt alone")
    c = out["configs"]
    assert (out["batch_size"], out["rounds"]) == (1, 2)
    assert c["vanilla"]["tokens_per_s"] == 15.0 and c["vanilla"]["samples_tokens_per_s"] == [10.0, 20.0]
    assert c["vanilla"]["tokens_per_s_pooled"] == 120 / 11
    assert c["speculative"]["speedup_vs_vanilla"] == pytest.approx(30.0 / 15.0)
    assert c["speculative"]["acceptance_rate"] == 35 / 60  # the rounds' own rates average 0.5
    assert c["speculative"]["mean_accepted_length"] == (35 + 15) / 15
    assert c["speculative"]["draft_ms_per_round"] == pytest.approx(0.6 / 15 * 1e3)
    assert c["easyspec_2"]["acceptance_vs_speculative"] == pytest.approx(33 / 35)
    assert c["easyspec_4"]["depth_vs_sequential"] == 0.625 and not c["easyspec_4"]["same_tokens_as_vanilla"]
    assert c["easyspec_2"]["drafting_speedup_vs_speculative"] == pytest.approx(1.0)
    assert c["easyspec_2"]["drafting_speedup_vs_draft_tp"] == pytest.approx(5.0)
    result = {"target": "t", "draft": "d", "ranks": 4, "prompts": 2, "prompt_bytes": 8, "max_new_tokens": 8,
              "configs": c, "configs_batch_all": c, "note": "n",
              "batches": {"configs": {"batch_size": 1, "how": "alone"}, "configs_batch_all": {"batch_size": 2, "how": "all"}},
              "prediction": easyspec.predict({n: v.get("acceptance_rate") for n, v in c.items()})}
    json.dumps(result)
    text = easyspec.table(result)
    assert "batch 1 (alone):" in text and "batch 2 (all):" in text and text.count("easyspec_4") == 3


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
