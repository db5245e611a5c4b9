"""The plan file: schema, loader with YAML line:column errors, and the exported JSON Schema."""
from __future__ import annotations

from typing import Any

from planc.plan.load import load_plan, locate, parse_plan_text
from planc.plan.schema import Plan

__all__ = ["Plan", "load_plan", "locate", "parse_plan_text", "plan_json_schema"]

_JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def plan_json_schema() -> dict[str, Any]:
    """JSON Schema of a plan file, for `# yaml-language-server: $schema=...` and `planc schema`."""
    return {"$schema": _JSON_SCHEMA_DIALECT, **Plan.model_json_schema(), "title": "planc plan"}
