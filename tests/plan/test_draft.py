"""The plan's draft section: its schema, the sub-plan the pipeline compiles, located errors."""
from __future__ import annotations

import pytest

from planc.driver import compile, validate
from planc.errors import PlanError
from planc.plan import locate, parse_plan_text

PLAN = """version: 1
mesh: {devices: 2}
model: {source: tiny-deepseek}
draft:
  model: {source: tiny-draft}
  rules:
    - match: "model.layers.*.mlp"
      mlp: {strategy: tp}
  easyspec: {layer_parallel: 2}
"""


def test_the_draft_is_a_plan_of_its_own_that_keeps_its_positions():
    plan = parse_plan_text(PLAN, "p.yaml")
    draft = plan.draft_plan()
    assert (draft.mesh, draft.model.source, draft.rules) == (plan.mesh, "tiny-draft", plan.draft.rules)
    assert locate(draft, ("rules", 0, "match")) == "p.yaml:7:7" and locate(draft, ("model", "source")) == "p.yaml:5:11"
    assert plan.draft.speculate.tokens == 4 and plan.draft.easyspec.combine == "seq_mlp"
    assert plan.draft.easyspec.calibrate and plan.draft.easyspec.keep_first_last


@pytest.mark.parametrize("edit, message", [
    ("easyspec: {layer_parallel: 0}", "p.yaml:9:14: draft.easyspec.layer_parallel: Input should be greater than or equal to 1"),
    ("easyspec: {layer_parallel: 2, combine: mean}", "draft.easyspec.combine"),
    ("easyspec: {layer_parallel: 2}\n  speculate: {tokens: 17}", "draft.speculate.tokens: Input should be less than or equal to 16"),
    ("easyspec: {layer_parallel: 2, calibrat: true}", "unknown key 'calibrat'; did you mean 'calibrate'?"),
])
def test_draft_fields_are_checked_where_they_are_written(edit, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_plan_text(PLAN.replace("easyspec: {layer_parallel: 2}", edit), "p.yaml")


def test_a_draft_with_another_vocabulary_is_refused_at_its_source(tmp_path):
    plan = parse_plan_text(PLAN.replace("source: tiny-draft", "source: deepseek-v3"), "p.yaml")
    with pytest.raises(PlanError, match="p.yaml:5:11: draft.model.source: the draft's vocabulary has 129280 tokens "
                                        "and the target's 260"):
        compile(None, plan, tmp_path / "out", meta=True)


def test_validate_runs_the_draft_through_its_pipeline(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PLAN.replace("devices: 2", "devices: 4").replace(
        '    - match: "model.layers.*.mlp"\n      mlp: {strategy: tp}', '    - match: "model.layers.1.self_attn"\n'
        '      attention: {strategy: tp}'))
    text = validate(path)
    assert "declined easyspec on draft model.layers.1.self_attn: stays on every rank" in text
    # layer 2's group stays sequential with layer 1: every rank, like layers 0 and 1 (one line for the three)
    assert ("easyspec model.layers.0.self_attn: every rank: kept sequential: runs on every rank (the same for 2 more: "
            "model.layers.1.self_attn, model.layers.2.self_attn)") in text
    assert "easyspec model.layers.3.self_attn: rank 2" in text and "easyspec model.layers.5.self_attn: every rank" in text
