"""Read a plan: safe YAML that remembers where every field is, then located schema errors.

Every error names `FILE:LINE:COL` (1-based) and the field path, e.g.
`plan.yaml:7:18: rules[1].attention.latent_groups: Input should be greater than or equal to 1 (got 0)`.

Input is bounded before it is parsed: a plan is at most MAX_PLAN_BYTES of UTF-8, nests at most
MAX_DEPTH collections deep and writes integers of at most MAX_INT_CHARS characters (the schema
bounds the rule count and mesh.devices).
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from planc.errors import PlanError
from planc.plan.schema import Plan

FieldPath = tuple[str | int, ...]
Positions = dict[FieldPath, tuple[int, int]]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"

MAX_PLAN_BYTES = 256 * 2**10  # ~4,000 one-line rules; a real plan is a few dozen globs
MAX_DEPTH = 32  # collections within collections; a plan needs 4
MAX_INT_CHARS = 32  # 10^31: beyond any count a plan holds


class _PlanLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML would silently keep the last one),
    nesting deeper than MAX_DEPTH (PyYAML composes recursively) and integers longer than
    MAX_INT_CHARS (int() refuses 4,300 digits; 1:2:3... sexagesimal ones grow without bound)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_DEPTH} collections deep (the limit); a plan nests 4",
                self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters; plan integers have at most "
                f"{MAX_INT_CHARS}", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base` may legitimately be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # the base class reports unhashable keys
                continue
            if key in first_seen:
                first = _line_col(first_seen[key])
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first defined at line {first[0]}, "
                    f"column {first[1]}); remove one of them", key_node.start_mark)
            first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_PlanLoader.add_constructor(_INT_TAG, _PlanLoader.construct_yaml_int)


def load_plan(path_or_text: str | os.PathLike[str], *, source_name: str | None = None) -> Plan:
    """Load a plan from a file path, or from YAML text if given a `str` containing a newline."""
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return parse_plan_text(path_or_text, source_name or "<string>")
    path = Path(path_or_text)
    return parse_plan_text(_read(path), source_name or str(path))


def parse_plan_text(text: str, source_name: str) -> Plan:
    """Parse and validate plan YAML; `source_name` is the FILE part of error locations."""
    if len(text) > MAX_PLAN_BYTES:
        raise PlanError(_too_large(source_name))
    data, positions = _parse_yaml(text, source_name)
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise PlanError(f"{_where(source_name, positions, ())}: a plan must be a YAML mapping "
                        f"with keys {', '.join(Plan.model_fields)}; got {got}")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        messages = [_describe(error, source_name, positions) for error in exc.errors()]
        raise PlanError("\n".join(messages)) from None
    plan._source = source_name
    plan._text = text
    plan._positions = positions
    return plan


def locate(plan: Plan, path: FieldPath) -> str | None:
    """`FILE:LINE:COL` of a field such as ("rules", 0, "match"), or of its nearest located
    parent; None for a plan that was not loaded from text."""
    if plan._source is None or not plan._positions:
        return None
    return _where(plan._source, plan._positions, tuple(path))


def field_path(path: FieldPath) -> str:
    """Dotted form of a field path: ("rules", 1, "moe") -> "rules[1].moe"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<plan>"


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)  # a plan larger than the limit is never read whole
    except FileNotFoundError:
        raise PlanError(f"{path}: plan file not found; check the path") from None
    except OSError as exc:
        raise PlanError(f"{path}: cannot read plan file: {exc.strerror or exc}") from None
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(_too_large(str(path)))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PlanError(f"{path}:{line}:{col}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the plan as UTF-8") from None


def _too_large(source: str) -> str:
    return (f"{source}: larger than {MAX_PLAN_BYTES} bytes, the limit of a plan; a rule's match is a glob, "
            f"so one rule covers every layer alike")


def _parse_yaml(text: str, source: str) -> tuple[Any, Positions]:
    try:
        loader = _PlanLoader(text)  # the reader refuses control characters here, before parsing
    except yaml.reader.ReaderError as exc:
        raise PlanError(_reader_message(exc, text, source)) from None
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise PlanError(_yaml_message(exc, source)) from None
    finally:
        loader.dispose()
    positions: Positions = {}
    if node is not None:
        positions[()] = _line_col(node.start_mark)
        _collect_positions(node, (), positions, set())
    return data, positions


def _reader_message(exc: yaml.reader.ReaderError, text: str, source: str) -> str:
    line = text.count("\n", 0, exc.position) + 1
    col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
    return (f"{source}:{line}:{col}: invalid YAML: character U+{exc.character:04X} is not allowed "
            f"(YAML forbids control characters other than tab and newline); remove it")


def _yaml_message(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{_line_col(mark)[0]}:{_line_col(mark)[1]}" if mark else source
    if isinstance(exc, yaml.MarkedYAMLError):
        detail = ", ".join(part for part in (exc.context, exc.problem) if part)
    else:
        detail = str(exc)
    return f"{where}: invalid YAML: {detail}"


def _collect_positions(node: yaml.Node, path: FieldPath, out: Positions, seen: set[int]) -> None:
    # An alias is the same node object as its anchor: locate it, but do not walk it again
    # (that also keeps recursive aliases from looping).
    if id(node) in seen:
        return
    seen.add(id(node))
    for sub, mark_node, child in _children(node, path):
        out[sub] = _line_col(mark_node.start_mark)
        _collect_positions(child, sub, out, seen)


def _children(node: yaml.Node, path: FieldPath) -> list[tuple[FieldPath, yaml.Node, yaml.Node]]:
    """(path, node that marks the field, value node); a mapping field is located at its key."""
    if isinstance(node, yaml.MappingNode):
        return [(path + (key.value,), key, value) for key, value in node.value
                if isinstance(key, yaml.ScalarNode)]
    if isinstance(node, yaml.SequenceNode):
        return [(path + (i,), item, item) for i, item in enumerate(node.value)]
    return []


def _line_col(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _where(source: str, positions: Positions, path: FieldPath) -> str:
    # A missing or unknown field has no position of its own; point at its closest parent.
    for end in range(len(path), -1, -1):
        if path[:end] in positions:
            line, col = positions[path[:end]]
            return f"{source}:{line}:{col}"
    return source


def _describe(error: ErrorDetails, source: str, positions: Positions) -> str:
    path, chosen = _without_tags(tuple(error["loc"]))
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a section's strategy value
        path += (_discriminator(path),)
    if error["type"] == "extra_forbidden":
        return f"{_where(source, positions, path)}: {field_path(path)}: {_unknown_key(path, chosen.get(path[:-1]))}"
    return f"{_where(source, positions, path)}: {field_path(path)}: {_explain(error, path)}"


def _without_tags(loc: FieldPath) -> tuple[FieldPath, dict[FieldPath, type[BaseModel]]]:
    """pydantic puts the tag of a section union in the error location ("...attention.<tag>.seed");
    the YAML has no such level. Returns the path without it, and the member each tag chose."""
    path: list[str | int] = []
    chosen: dict[FieldPath, type[BaseModel]] = {}
    for part in loc:
        members = _union_members(tuple(path)) if isinstance(part, str) else {}
        if part in members:
            chosen[tuple(path)] = members[part]
            continue
        path.append(part)
    return tuple(path), chosen


def _explain(error: ErrorDetails, path: FieldPath) -> str:
    if error["type"] == "union_tag_invalid":
        return f"unknown strategy {error['ctx']['tag']!r}; allowed values: {_literal_values(path)}"
    if error["type"] == "union_tag_not_found":
        return f"required key is missing; allowed values: {_literal_values(path)}"
    if error["type"] == "extra_forbidden":
        return _unknown_key(path)
    if error["type"] == "missing":
        allowed = _literal_values(path)
        return "required key is missing" + (f"; allowed values: {allowed}" if allowed else "")
    message = error["msg"].removeprefix("Value error, ")
    value = error["input"]
    if value is None or isinstance(value, (str, int, float, bool)):
        shown = repr(value)
        message += f" (got {shown if len(shown) <= 80 else shown[:60] + ' ... ' + shown[-15:]})"
    return message


def _unknown_key(path: FieldPath, model: type[BaseModel] | None = None) -> str:
    model = model or _model_at(path[:-1])
    allowed = sorted(model.model_fields) if model else []
    close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return f"unknown key {path[-1]!r}{hint} Allowed keys: {', '.join(allowed)}."


def _literal_values(path: FieldPath) -> str:
    """The allowed values of a Literal-typed field, quoted and comma-separated, or ""; for a
    section's `strategy`, the values of every strategy the section offers."""
    values = [v for model in _models_at(path[:-1]) for v in _literal_args(model, str(path[-1]))]
    return ", ".join(repr(v) for v in dict.fromkeys(values))


def _literal_args(model: type[BaseModel], name: str) -> tuple:
    field = model.model_fields.get(name)
    return get_args(field.annotation) if field is not None and get_origin(field.annotation) is Literal else ()


def _model_at(path: FieldPath) -> type[BaseModel] | None:
    """The model class that validates the mapping at `path` (sequence indices are skipped); for a
    section, the member its written `strategy` selects is unknown here: the union's first."""
    models = _models_at(path)
    return models[0] if models else None


def _models_at(path: FieldPath) -> list[type[BaseModel]]:
    models: list[type[BaseModel]] = [Plan]
    for part in path:
        if isinstance(part, int):
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [m for f in fields for m in _models_in(f.annotation)]
    return models


def _union_members(path: FieldPath) -> dict[str, type[BaseModel]]:
    """strategy value -> section model, when `path` is a section with several strategies."""
    models = _models_at(path)
    if len(models) < 2:
        return {}
    return {v: m for m in models for v in _literal_args(m, _discriminator(path))}


def _discriminator(path: FieldPath) -> str:
    """The field whose value picks a section's strategy (`strategy`; `kind` for overlap)."""
    return next((m.discriminator for m in _models_at(path) if hasattr(m, "discriminator")), "strategy")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    # Unwraps `X | None`, unions, Annotated and `tuple[X, ...]` to the model classes inside.
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]
