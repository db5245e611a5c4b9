"""Editors check plans against plans/plan.schema.json (the yaml-language-server modeline on every plan)."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from planc.plan import plan_json_schema
from tests.conftest import PLANS

MODELINE = "# yaml-language-server: $schema=plan.schema.json\n"


def test_the_checked_in_schema_is_planc_schema():
    assert json.loads((PLANS / "plan.schema.json").read_text()) == plan_json_schema()  # else: planc schema > plans/plan.schema.json


@pytest.mark.parametrize("plan", sorted(PLANS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_plan_carries_the_modeline_and_fits_the_schema(plan):
    text = plan.read_text()
    assert text.startswith(MODELINE)
    jsonschema.validate(yaml.safe_load(text), plan_json_schema())


@pytest.mark.parametrize("sections", [{}, {"attention": {"strategy": "mla_tp"}, "mlp": {"strategy": "tp"}}],
                         ids=["none", "two"])
def test_a_rule_needs_exactly_one_section_key(sections):
    plan = {"version": 1, "mesh": {"devices": 2}, "rules": [{"match": "model.layers.*", **sections}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(plan, plan_json_schema())
