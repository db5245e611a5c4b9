"""Plan loading: every error names FILE:LINE:COL and the field path."""
from __future__ import annotations

from pathlib import Path

import pytest

from planc.errors import PlanError
from planc.plan import Plan, load_plan, locate, parse_plan_text

EXAMPLE = """\
version: 1
mesh: {devices: 2}
model: {source: tiny-deepseek, dtype: float32}
rules:
  - match: "model.layers.*.self_attn"
    attention: {strategy: mla_tp}
  - match: "model.layers.0.mlp"
    mlp: {strategy: tp}
  - match: "model.layers.*.mlp"
    moe: {strategy: ep, placement: contiguous}
"""


def _error(text: str) -> str:
    with pytest.raises(PlanError) as info:
        parse_plan_text(text, "plan.yaml")
    return str(info.value)


def test_example_plan_loads_from_file(tmp_path: Path) -> None:
    path = tmp_path / "tp.yaml"
    path.write_text(EXAMPLE)
    plan = load_plan(path)
    assert plan.mesh.devices == 2 and plan.model is not None
    assert plan.model.source == "tiny-deepseek"
    assert [rule.match for rule in plan.rules][1] == "model.layers.0.mlp"
    assert load_plan(str(path)) == plan


def test_text_with_newline_is_parsed_as_yaml() -> None:
    plan = load_plan(EXAMPLE, source_name="inline.yaml")
    assert locate(plan, ("mesh",)) == "inline.yaml:2:1"
    assert locate(load_plan(EXAMPLE), ()) == "<string>:1:1"


def test_locate_points_at_keys_and_falls_back_to_parent() -> None:
    plan = parse_plan_text(EXAMPLE, "p.yaml")
    assert locate(plan, ("rules", 0, "match")) == "p.yaml:5:5"
    assert locate(plan, ("rules", 2, "moe", "placement")) == "p.yaml:10:25"
    assert locate(plan, ("rules", 1, "mlp", "required")) == "p.yaml:8:5"


def test_locate_survives_copies_and_is_none_without_source() -> None:
    plan = parse_plan_text(EXAMPLE, "p.yaml").model_copy(update={})
    assert locate(plan, ("mesh",)) == "p.yaml:2:1"  # private state survives copies
    assert locate(Plan(version=1, mesh={"devices": 1}), ("mesh",)) is None


def test_unknown_key_suggests_a_fix() -> None:
    message = _error(EXAMPLE.replace("attention: {strategy", "atention: {strategy"))
    assert ("plan.yaml:6:5: rules[0].atention: unknown key 'atention'; "
            "did you mean 'attention'?") in message
    assert "Allowed keys: attention, match, mlp, moe, overlap." in message


def test_unknown_key_without_a_close_match() -> None:
    message = _error(EXAMPLE + "zzz: 1\n")
    assert message == ("plan.yaml:11:1: zzz: unknown key 'zzz'. "
                       "Allowed keys: draft, mesh, model, rules, version.")


def test_duplicate_key_names_both_places() -> None:
    message = _error(EXAMPLE.replace("mesh: {devices: 2}", "mesh: {devices: 2, devices: 4}"))
    assert message.startswith("plan.yaml:2:20: invalid YAML: duplicate key 'devices'")
    assert "first defined at line 2, column 8" in message


def test_merge_keys_are_not_duplicates() -> None:
    merged = "base: &b {devices: 1}\nmesh: {<<: *b, devices: 2}"
    text = EXAMPLE.replace("mesh: {devices: 2}", merged)
    assert "unknown key 'base'" in _error(text)  # parsed fine; only the extra key is wrong


def test_malformed_yaml_has_line_and_column() -> None:
    message = _error("version: 1\nmesh: {devices: 2\n")
    assert message.startswith("plan.yaml:3:1: invalid YAML:")


def test_wrong_literal_lists_allowed_values() -> None:
    message = _error(EXAMPLE.replace("strategy: tp", "strategy: sharded"))
    assert "rules[1].mlp.strategy: unknown strategy 'sharded'; allowed values: 'replicated', 'tp'" in message
    assert message.startswith("plan.yaml:8:")


def test_all_errors_reported_one_per_line() -> None:
    text = EXAMPLE.replace("devices: 2", "devices: 0").replace("dtype: float32", "dtype: int8")
    lines = _error(text).splitlines()
    assert len(lines) == 2
    assert lines[0] == ("plan.yaml:2:8: mesh.devices: "
                        "Input should be greater than or equal to 1 (got 0)")
    assert lines[1].startswith("plan.yaml:3:32: model.dtype:")


def test_rule_with_two_sections_is_located_at_the_rule() -> None:
    two = "    mlp: {strategy: tp}\n    moe: {strategy: ep}\n"
    message = _error(EXAMPLE.replace("    mlp: {strategy: tp}\n", two))
    assert ("plan.yaml:7:5: rules[1]: a rule needs exactly one section key out of "
            "attention, mlp, moe, overlap; found mlp, moe") in message


def test_rule_with_no_section() -> None:
    message = _error(EXAMPLE.replace("    mlp: {strategy: tp}\n", ""))
    assert "plan.yaml:7:5: rules[1]: a rule needs exactly one section key" in message
    assert message.endswith("found none")


def test_missing_required_key_points_at_parent() -> None:
    message = _error("version: 1\nmesh:\n  backend: gloo\n")
    assert message == "plan.yaml:2:1: mesh.devices: required key is missing"


def test_version_2_rejected() -> None:
    message = _error(EXAMPLE.replace("version: 1", "version: 2"))
    assert message == "plan.yaml:1:1: version: Input should be 1 (got 2)"


@pytest.mark.parametrize("text, got", [("- 1\n", "got a list"), ("", "got an empty document")])
def test_top_level_must_be_a_mapping(text: str, got: str) -> None:
    message = _error(text)
    assert "a plan must be a YAML mapping" in message and got in message


def test_unsafe_tags_are_refused() -> None:
    assert "invalid YAML" in _error("version: !!python/object/apply:os.system [echo hi]\n")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PlanError, match="nope.yaml: plan file not found"):
        load_plan(path)
