"""Plan models: validation, hashing, YAML round trip and the exported JSON Schema."""
from __future__ import annotations

import json
import random
import re

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from planc.plan import Plan, parse_plan_text, plan_json_schema
from planc.passes.ep import EpSection
from planc.plan.schema import MAX_DEVICES, Rule

EXAMPLE = {
    "version": 1,
    "mesh": {"devices": 2},
    "model": {"source": "tiny-deepseek", "dtype": "float32"},
    "rules": [
        {"match": "model.layers.*.self_attn", "attention": {"strategy": "mla_tp"}},
        {"match": "model.layers.0.mlp", "mlp": {"strategy": "tp"}},
        {"match": "model.layers.*.mlp", "moe": {"strategy": "ep", "placement": "contiguous"}},
    ],
}


def test_yaml_round_trip_keeps_plan_and_hash() -> None:
    plan = Plan.model_validate(EXAMPLE)
    again = parse_plan_text(yaml.safe_dump(plan.to_yaml_dict()), "roundtrip.yaml")
    assert again == plan
    assert again.hash() == plan.hash()
    assert again.to_yaml_dict() == plan.to_yaml_dict()


def test_defaults_and_sections() -> None:
    plan = Plan.model_validate(EXAMPLE)
    assert plan.mesh.backend == "auto"
    assert [rule.section_name for rule in plan.rules] == ["attention", "mlp", "moe"]
    assert plan.rules[2].section == EpSection(strategy="ep")
    assert plan.rules[0].section.required is False


def test_hash_is_hex_sha256_and_changes_with_content() -> None:
    plan = Plan.model_validate(EXAMPLE)
    assert re.fullmatch("[0-9a-f]{64}", plan.hash())
    assert Plan.model_validate(EXAMPLE).hash() == plan.hash()
    changed = {**EXAMPLE, "mesh": {"devices": 4}}
    assert Plan.model_validate(changed).hash() != plan.hash()


def test_source_location_does_not_change_equality_or_hash() -> None:
    text = yaml.safe_dump(EXAMPLE)
    a, b = parse_plan_text(text, "a.yaml"), parse_plan_text(text, "b.yaml")
    assert a == b and hash(a) == hash(b) and a.hash() == b.hash()


def test_models_are_frozen() -> None:
    plan = Plan.model_validate(EXAMPLE)
    with pytest.raises(ValidationError):
        plan.mesh.devices = 8  # type: ignore[misc]


@pytest.mark.parametrize("sections", [{}, {"mlp": {"strategy": "tp"}, "moe": {"strategy": "ep"}}])
def test_rule_needs_exactly_one_section(sections: dict) -> None:
    with pytest.raises(ValidationError, match="exactly one section key out of attention, mlp, moe"):
        Rule.model_validate({"match": "x", **sections})


def test_version_2_rejected() -> None:
    with pytest.raises(ValidationError, match="version"):
        Plan.model_validate({**EXAMPLE, "version": 2})


def test_devices_must_be_an_int_not_a_bool() -> None:
    with pytest.raises(ValidationError):
        Plan.model_validate({**EXAMPLE, "mesh": {"devices": True}})


def test_json_schema_is_json_and_lists_strategies() -> None:
    schema = plan_json_schema()
    text = json.dumps(schema)
    assert json.loads(text) == schema
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] == "planc plan"
    assert schema["additionalProperties"] is False
    for strategy in ("replicated", "tp", "mla_tp", "ep", "contiguous"):
        assert f'"{strategy}"' in text
    assert "_positions" not in text and "_source" not in text


def _shuffled(value: object, rng: random.Random) -> object:
    """The same data with every mapping's key order permuted."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {key: _shuffled(value[key], rng) for key in keys}
    if isinstance(value, list):
        return [_shuffled(item, rng) for item in value]
    return value


@settings(max_examples=50, deadline=None)
@given(devices=st.integers(min_value=1, max_value=MAX_DEVICES), seed=st.integers(0, 2**32 - 1))
def test_hash_ignores_key_order(devices: int, seed: int) -> None:
    data = {**EXAMPLE, "mesh": {"devices": devices, "backend": "gloo"}}
    shuffled = _shuffled(data, random.Random(seed))
    assert Plan.model_validate(shuffled).hash() == Plan.model_validate(data).hash()


@settings(max_examples=50, deadline=None)
@given(devices=st.integers(max_value=0))
def test_devices_below_one_rejected(devices: int) -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Plan.model_validate({**EXAMPLE, "mesh": {"devices": devices}})


def test_example_plans_round_trip_through_their_dump():
    from pathlib import Path

    from planc.plan import Plan, load_plan

    for path in sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.yaml")):
        plan = load_plan(path)
        assert Plan.model_validate(plan.to_yaml_dict()) == plan
