"""`planc inspect`: one self-contained HTML page showing what a compile decided.

Everything comes from the artifact directory: manifest.json (the plan as written and as resolved,
model, versions), report.json (pass records, every candidate a strategy could rewrite, memory,
collectives, lift checks, blocks run as captured, every intermediate graph as text and as JSON
nodes), program.py, and the measured decode-step trace when `planc run --trace` left one. A line
`name = ...` of `forward` is the node `name` of the final graph, whose JSON gives its rule,
strategy, layer, block and shard: nothing is read from comments.

This module turns those files into plain data (a view); templates/inspect.html.j2 lays it out
with Jinja2, which escapes every value. The page has no dependencies: inline CSS, inline
JavaScript that reads the page's own JSON (`<script type="application/json">`), no requests.
"""
from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jinja2
import yaml

from planc import cost
from planc.codegen.artifact import program_file
from planc.codegen.replace import replace_file
from planc.diff import PREDICT_CONTEXT, human_bytes
from planc.errors import ArtifactError, read_json
from planc.report import graphview, timeline
from planc.runtime.artifact import read_manifest

ASSIGNMENT = re.compile(r"^\s+(\w+) = ")
LAYER_FQN = re.compile(r"layers\.(\d+)\.(.+)$")
COLUMNS = ("attention", "ffn")
FLOW_WIDTH = 64  # longer mappings of scalars are printed as blocks
CAPTURED = "run as captured"  # a grid cell's strategy when planc did not lift the block
TEMPLATES = Path(__file__).parent / "templates"

# ---- reading the artifact -------------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    """One program.py line and the plan rule / grid cell ("layer:column") / graph node it belongs to."""
    text: str
    rule: int | None = None
    cell: str | None = None
    strategy: str = ""
    numbers: dict[str, str] = field(default_factory=dict)
    node: str | None = None
    also: tuple[str, ...] = ()  # the cells of the other layers of a folded run the line's loop body runs


@dataclass
class Cell:
    """One layer × block entry of the grid."""
    strategy: str = "replicated"
    declined: bool = False
    details: list[str] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)
    rules: set[int] = field(default_factory=set)
    from_program: bool = False  # the strategy was read off the program's nodes, in the plan's words


def _read(artifact: Path) -> tuple[dict, dict, str]:
    manifest = read_manifest(artifact)
    missing = [name for name in ("report.json", program_file("target")) if not (artifact / name).is_file()]
    if missing:
        raise ArtifactError(f"{artifact}: incomplete artifact, {' and '.join(missing)} missing; "
                            "recompile it with `planc compile`")
    report = json.loads((artifact / "report.json").read_text())
    return manifest, report, (artifact / program_file("target")).read_text()


def column(path: str) -> str | None:
    """Grid column of a module path or match glob: attention, ffn, or None (outside a layer block)."""
    last = path.lower()
    if "attn" in last or "attention" in last:
        return "attention"
    if any(word in last for word in ("mlp", "moe", "ffn", "expert")):
        return "ffn"
    return None


def cell_of(fqn: str) -> str | None:
    """'model.layers.3.self_attn' -> '3:attention'."""
    found = LAYER_FQN.search(fqn)
    col = column(found.group(2)) if found else None
    return f"{found.group(1)}:{col}" if col else None


def final_nodes(report: dict) -> dict[str, dict]:
    """The last graph's nodes by name (the program's variables)."""
    graphs = report.get("graph_nodes") or {}
    return {n["name"]: n for n in (list(graphs.values())[-1] if graphs else [])}


def parse_program(source: str, nodes: dict[str, dict], captured: frozenset[str] = frozenset()) -> list[Line]:
    """Lines of `forward` are nodes (its `def` line the inputs); module-level functions (run-as-captured
    code) are not. A line of a block belongs to its grid cell, with a rule or without (replicated;
    a `captured` block, by FQN, runs as captured)."""
    lines = []
    in_forward = False
    inputs = [name for name, n in nodes.items() if n.get("kind") == "placeholder"]
    for text in source.splitlines():
        if text.startswith("def "):
            in_forward = text.startswith("def forward(")
            if in_forward and inputs:
                lines.append(Line(text, node=inputs[0]))
                continue
        found = ASSIGNMENT.match(text) if in_forward else None
        node = nodes.get(found.group(1)) if found else None
        if node is None:
            lines.append(Line(text))
        elif node.get("rule") is None and node.get("fqn") in captured:
            lines.append(Line(text, None, cell_of(node["fqn"]), CAPTURED, node=node["name"], also=_also(node, node["fqn"])))
        elif node.get("rule") is None:
            block = node.get("block") or ""
            lines.append(Line(text, None, cell_of(block) if block else None, node.get("strategy") or "replicated",
                              node=node["name"], also=_also(node, block)))
        else:
            where = node.get("block") or node.get("fqn", "")
            lines.append(Line(text, node["rule"], cell_of(where), node["strategy"],
                              {k: str(v) for k, v in node.get("shard", {}).items()}, node["name"], _also(node, where)))
    return lines


def _also(node: dict, where: str) -> tuple[str, ...]:
    """For a node of a folded run's first layer: the cells of `where` in the run's other layers."""
    first, count = node.get("run") or (None, 1)
    key = cell_of(where) if count > 1 else None
    if key is None or not key.startswith(f"{first}:"):
        return ()
    return tuple(f"{layer}:{key.split(':', 1)[1]}" for layer in range(first + 1, first + count))


def build_grid(report: dict, lines: list[Line]) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    for line in lines:
        for key in (line.cell, *line.also) if line.cell else ():
            cell = cells.setdefault(key, Cell(strategy=line.strategy, from_program=True))
            if line.rule is not None:
                if not cell.rules:
                    cell.strategy = line.strategy  # the block's first line from a rule names its strategy
                cell.rules.add(line.rule)
                cell.numbers.update(line.numbers)
    for record in report.get("passes", []):
        _add_record(cells, record)
    for entry in report.get("run_as_captured", []):
        if key := cell_of(entry["block"]):
            cell = cells.setdefault(key, Cell())
            cell.strategy = CAPTURED
            cell.details.append(f"{CAPTURED} ({entry['class']}): {entry['why']}")
    for fqn, width in report.get("kv_width_per_rank", {}).items():
        if key := cell_of(fqn):
            cells.setdefault(key, Cell()).numbers["kv_width_per_rank"] = str(width)
    return cells


def _add_record(cells: dict[str, Cell], record: dict) -> None:
    """A record about a block names its cell's strategy unless the program's nodes already did (in
    the plan's words: `tp`, not the pass `dense_tp`); one about a projection in it (a `linear` node,
    as an overlap pass rewrites) only adds a line to the cell."""
    key = cell_of(record["target"])
    if key is None:
        return
    cell = cells.setdefault(key, Cell())
    if record["action"] == "applied" and record.get("kind") != "linear" and not cell.from_program:
        cell.strategy = record["pass_name"]
    cell.declined = cell.declined or record["action"] == "declined"
    cell.details.append(f"{record['action']}: {record['detail']}")


def rule_spans(text: str) -> dict[int, tuple[int, int]]:
    """1-based first and last line of each `rules` entry in a plan's YAML text (composed, never
    constructed: nothing in the text runs)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(root, yaml.MappingNode):
        return {}
    for key, value in root.value:
        if key.value == "rules" and isinstance(value, yaml.SequenceNode):
            lines = text.splitlines()
            spans = {}
            for i, item in enumerate(value.value):
                end = item.end_mark
                # a block node ends where the next token starts: on the next item's "- " line, or
                # at column 0 of the line after it
                before = lines[end.line][:end.column] if end.line < len(lines) else ""
                last = end.line if before.strip() in ("", "-") else end.line + 1
                while last > item.start_mark.line + 1 and lines[last - 1].strip()[:1] in ("", "#"):
                    last -= 1  # blank and comment lines before the next rule belong to neither
                spans[i] = (item.start_mark.line + 1, max(item.start_mark.line + 1, last))
            return spans
    return {}


# ---- formatting -----------------------------------------------------------------------------

def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not re.fullmatch(r"[\w.\-/]+", value):
        return json.dumps(value)
    return str(value)


def yamlish(value: object, indent: int = 0) -> list[str]:
    """Block YAML for nested values; a mapping of scalars stays on one line in flow style."""
    pad = "  " * indent
    if isinstance(value, dict):
        return [line for key, item in value.items() for line in _yaml_entry(f"{pad}{key}:", item, indent)]
    if isinstance(value, list):
        return [line for item in value for line in _yaml_entry(f"{pad}-", item, indent)]
    return [pad + _scalar(value)]


def _yaml_entry(head: str, item: object, indent: int) -> list[str]:
    if isinstance(item, dict) and all(not isinstance(v, (dict, list)) for v in item.values()):
        flow = f"{head} {{{', '.join(f'{k}: {_scalar(v)}' for k, v in item.items())}}}"
        if len(flow) <= FLOW_WIDTH:
            return [flow]
    if isinstance(item, (dict, list)) and item:
        return [head, *yamlish(item, indent + 1)]
    return [f"{head} {_scalar(item)}"]


def color(strategy: str) -> str:
    if strategy == "replicated":
        return "hsl(0 0% 93%)"
    hue = zlib.crc32(strategy.encode()) % 360
    return f"hsl({hue} 70% 86%)"


def fmt(value: object, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, float) else str(value)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def rounded(value: object) -> object:
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return float(format(value, ".3g")) if isinstance(value, float) else value


def logical_bytes(entry: dict) -> tuple[str, int, bool]:
    """(human figure, exact bytes, is an upper bound) of a collective's bytes per token."""
    if "bytes_per_token" in entry:
        return human_bytes(entry["bytes_per_token"]), entry["bytes_per_token"], False
    n = entry.get("bytes_per_token_max", 0)
    return human_bytes(n), n, True


# ---- the view -------------------------------------------------------------------------------

def kernels_used(nodes: dict[str, dict], shipped: list[str]) -> list[str]:
    """The shipped kernel files this program's calls can run (under some --kernels choice), as
    each op's declaration names them."""
    return sorted({f for n in nodes.values() for f in graphview.declared(n).kernels if f in shipped})


def plan_view(manifest: dict) -> dict:
    """The plan as written (numbered lines, each rule's span) and as resolved (defaults filled in)."""
    written = manifest.get("plan_file") or {}
    plan = written.get("resolved") or manifest.get("plan", {})
    text = written.get("text")
    spans = rule_spans(text) if text else {}
    rule_of_line = {line: i for i, (first, last) in spans.items() for line in range(first, last + 1)}
    lines = [{"n": n, "text": t, "rule": rule_of_line.get(n)} for n, t in enumerate((text or "").splitlines(), 1)]
    rules = []
    for i, rule in enumerate(plan.get("rules", [])):
        sections = {k: v for k, v in rule.items() if k not in ("match", "required")}
        said = ", ".join(f"{k}: {v.get('strategy') or v.get('kind') or next(iter(v.values()), '')}"
                         if isinstance(v, dict) else f"{k}: {v}" for k, v in sections.items())
        rules.append({"index": i, "match": rule.get("match", ""), "summary": said,
                      "text": "\n".join(yamlish(rule, 1)), "span": spans.get(i)})
    top = {k: v for k, v in plan.items() if k != "rules"}
    return {"name": written.get("name"), "lines": lines, "top": "\n".join(yamlish(top)), "rules": rules}


def grid_rows(cells: dict[str, Cell]) -> list[dict]:
    """Grid rows, consecutive layers that agree in every column folded into one row with a count."""
    layers = sorted({int(key.split(":")[0]) for key in cells})

    def signature(layer: int) -> tuple:
        return tuple((c.strategy, c.declined, tuple(sorted(c.numbers.items())), tuple(sorted(c.rules)))
                     for c in (cells.get(f"{layer}:{col}", Cell()) for col in COLUMNS))

    rows: list[list[int]] = []
    for layer in layers:
        if rows and rows[-1][-1] == layer - 1 and signature(rows[-1][0]) == signature(layer):
            rows[-1].append(layer)
        else:
            rows.append([layer])
    out = []
    for run in rows:
        label = str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}"
        entries = []
        for col in COLUMNS:
            first = cells.get(f"{run[0]}:{col}", Cell())
            details = list(dict.fromkeys(first.details))
            entries.append({"key": f"cell:{run[0]}-{run[-1]}:{col}", "column": col, "cells": [f"{l}:{col}" for l in run],
                            "strategy": first.strategy, "color": color(first.strategy), "declined": first.declined,
                            "numbers": first.numbers, "rules": " ".join(f"rules[{r}]" for r in sorted(first.rules)),
                            "details": details})
        out.append({"label": label, "count": len(run), "layers": run, "entries": entries})
    return out


def memory_view(report: dict, manifest: dict) -> dict:
    """Per rank: weights, KV cache per token, and a decode step's activations per sequence, with
    the device profiles' capacities for the page to set against a chosen context and batch."""
    hidden = manifest.get("model", {}).get("hidden_size") or 0
    vocab = manifest.get("model", {}).get("vocab_size") or 0
    element = 2 if manifest.get("dtype") in ("bfloat16", "float16") else 4
    # Live at once in a decode step, per sequence: the residual stream, a block's input and output
    # (3 × hidden in the model's dtype) and the float32 logits (the widest tensor of the step).
    activations = 3 * hidden * element + 4 * vocab
    ranks = [{"rank": r["rank"], "weights": r["weight_bytes"], "kv_per_token": r["kv_bytes_per_token"],
              "activations_per_seq": activations} for r in report.get("per_rank", [])]
    devices = {name: hw.mem_bytes for name, hw in cost.PROFILES.items()}
    return {"ranks": ranks, "devices": devices, "usable": cost.USABLE_MEMORY, "context": PREDICT_CONTEXT,
            "batch": 1, "activation_formula": f"3 × hidden ({hidden}) × {element} B + float32 logits (4 × {vocab} B)"}


def predicted_rows(report: dict) -> list[dict]:
    rows = []
    for name, hw in cost.PROFILES.items():
        most = cost.artifact_max_batch(report, hw, PREDICT_CONTEXT)
        one = cost.artifact_step(report, hw, 1, PREDICT_CONTEXT)
        row = {"profile": name, "max_batch": most, "one": ms(one["step_s"]), "full": None}
        if most >= 1:
            full = cost.artifact_step(report, hw, most, PREDICT_CONTEXT)
            parts = full["slowest"]
            row.update(full=ms(full["step_s"]), tokens_per_s=f"{full['tokens_per_s']:,.0f}",
                       split=" / ".join(f"{100 * parts[k] / full['step_s']:.0f}%"
                                        for k in ("weights_s", "kv_s", "waiting_s", "collectives_s")))
        rows.append(row)
    return rows


def candidate_tables(report: dict) -> list[dict]:
    tables = []
    for name, entries in (report.get("candidates") or {}).items():
        if not entries:
            continue
        extra = [k for k in entries[0] if k not in ("target", "status", "rule", "detail")]
        counts = Counter(e["status"] for e in entries)
        rows = [{"target": e["target"], "status": e["status"], "rule": e.get("rule"), "detail": e.get("detail", ""),
                 "extra": [_extra_value(e.get(k, "")) for k in extra]} for e in entries]
        tables.append({"name": name, "counts": ", ".join(f"{n} {status}" for status, n in counts.items()),
                       "extra": extra, "rows": rows})
    return tables


def _extra_value(value: object) -> dict:
    if isinstance(value, dict):
        return {"summary": ", ".join(map(str, value)), "yaml": "\n".join(yamlish(rounded(value)))}
    return {"text": fmt(value, ".3g")}


def heatmaps(report: dict) -> list[dict]:
    """Per block with a `heatmap` note (expert placement): the expected share of all activations by
    expert (rows) and the rank its tokens sit on (columns); the expert's own rank is outlined."""
    out = []
    for notes in (report.get("notes") or {}).values():
        for fqn, entry in notes.items():
            heat = entry.get("heatmap")
            if not isinstance(heat, dict):
                continue
            load, owner = heat["load"], heat["owner"]
            peak = max(max(row) for row in load) or 1.0
            world = len(load[0])
            out.append({"fqn": fqn, "world": world, "shuffled": heat.get("shuffled", False),
                        "local": sum(row[owner[e]] for e, row in enumerate(load)),
                        "served": [sum(sum(row) for e, row in enumerate(load) if owner[e] == d) for d in range(world)],
                        "rows": [{"expert": e, "owner": owner[e],
                                  "cells": [{"v": v, "alpha": f"{v / peak:.2f}", "own": owner[e] == d}
                                            for d, v in enumerate(row)]} for e, row in enumerate(load)]})
    return out


def pass_notes(report: dict) -> list[dict]:
    """What each pass decided from data, one table per pass (heatmaps are drawn, not listed)."""
    out = []
    for pass_name, notes in (report.get("notes") or {}).items():
        keys = sorted({k for entry in notes.values() for k in entry} - {"heatmap"})
        out.append({"name": pass_name, "columns": keys,
                    "rows": [[fqn, *(fmt(entry.get(k, "")) for k in keys)] for fqn, entry in notes.items()]})
    return out


def _details(lines: list[Line], cells: dict[str, Cell], grid: list[dict], picture: graphview.Picture,
             plan: dict, report: dict, nodes: dict[str, dict]) -> dict[str, dict]:
    """What the page shows for each thing a user can pick: a title, facts, and program line numbers."""
    line_of = {line.node: n for n, line in enumerate(lines, 1) if line.node}
    checks = {c["block"]: c for c in report.get("lift_checks", [])} if isinstance(report.get("lift_checks"), list) else {}
    per_call = {op: logical_bytes(e)[1] // max(1, e.get("calls", 1))
                for op, e in report.get("collectives_per_decode_step", {}).items()}
    out: dict[str, dict] = {}
    for rule in plan["rules"]:
        hits = [n for n, line in enumerate(lines, 1) if line.rule == rule["index"]]
        blocks = sorted({r["target"] for r in report.get("passes", []) if r.get("rule") == rule["index"]})
        declined = [r["detail"] for r in report.get("passes", [])
                    if r.get("rule") == rule["index"] and r["action"] == "declined"]
        out[f"rule:{rule['index']}"] = {
            "title": f"rules[{rule['index']}]  match: {rule['match']}",
            "facts": [["says", rule["summary"]], ["rewrote", f"{len(blocks)} module(s)"],
                      *[["declined", d] for d in declined[:5]], ["program lines", str(len(hits))]],
            "lines": hits}
    for row in grid:
        for entry in row["entries"]:
            keys = set(entry["cells"])
            hits = [n for n, line in enumerate(lines, 1) if line.cell in keys]
            blocks = sorted({nodes[line.node].get("block") for line in lines
                             if line.cell in keys and line.node and nodes[line.node].get("block")})
            collectives = Counter(graphview.collective_of(nodes[line.node]) for line in lines
                                  if line.cell in keys and line.node) - Counter({None: 10**9})
            facts = [["strategy", entry["strategy"]], ["layers", row["label"] + (f" (×{row['count']})" if row["count"] > 1 else "")],
                     *[[k, v] for k, v in entry["numbers"].items()], *[["", d] for d in entry["details"][:6]],
                     *[[f"collective", f"{op} ×{n}"] for op, n in collectives.items() if op],
                     *[["lift check", _check_text(checks[b])] for b in blocks[:1] if b in checks]]
            out[entry["key"]] = {"title": f"layer {row['label']} · {entry['column']}", "facts": facts, "lines": hits}
    for box in picture.nodes:
        members = [nodes[m] for m in box.members if m in nodes]
        first = members[0] if members else {}
        facts = [["strategy", box.strategy]]
        if box.layers:
            start, count = box.layers
            facts.append(["layers", f"{start}" if count == 1 else f"{start}–{start + count - 1} (×{count})"])
        if first.get("block") or first.get("fqn"):
            facts.append(["module", first.get("block") or first.get("fqn")])
        if box.collective:
            bytes_per_call = per_call.get(box.collective) or per_call.get(first.get("kind", ""))
            facts.append(["collective", box.collective + (f", {human_bytes(bytes_per_call)}/token per call"
                                                           if bytes_per_call else "")])
            if first.get("why"):
                facts.append(["why", first["why"]])
        shards = {k: v for m in members for k, v in (m.get("shard") or {}).items()}
        facts += [[k, str(v)] for k, v in shards.items()]
        kinds = Counter(m["kind"] for m in members if m.get("layer") == first.get("layer"))
        facts.append(["nodes", ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in kinds.items())])
        block = first.get("block") or first.get("fqn")
        if block in checks:
            facts.append(["lift check", _check_text(checks[block])])
        out[f"node:{box.key}"] = {"title": f"{box.label}" + (f" · {box.sub}" if box.sub else ""), "facts": facts,
                                  "lines": sorted(line_of[m] for m in box.members if m in line_of)}
    return out


def _check_text(check: dict) -> str:
    err = "not run" if check.get("rel_err") is None else f"rel err {check['rel_err']:.1e}"
    return f"{'ok' if check.get('ok') else 'MISMATCH'} ({check.get('method', '?')}, {err})"


def compact_trace(trace: dict, names: dict[str, int]) -> dict:
    """A Chrome trace as the page draws and downloads it: spans as [pid, tid, cat, start, end, name]
    rows (name an index into the page's shared `names`; start and end in microseconds rounded to
    the nanosecond, so spans that meet still meet) and the
    processes' and threads' names; the spans' args are left out (`planc inspect --trace-out`
    writes them)."""
    rows, labels = [], {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            rows.append([e["pid"], e["tid"], e.get("cat", ""), round(e["ts"], 3), round(e["ts"] + e["dur"], 3),
                         names.setdefault(e["name"], len(names))])
        elif e["ph"] == "M" and e["name"] in ("process_name", "thread_name"):
            labels[f"{e['pid']}" if e["name"] == "process_name" else f"{e['pid']}/{e['tid']}"] = e["args"]["name"]
    return {"spans": rows, "labels": labels, "metadata": trace.get("metadata", {})}


def timeline_view(report: dict, artifact: Path) -> dict:
    """The predicted decode step per hardware profile (batch 1, PREDICT_CONTEXT cached tokens) as
    Chrome traces, and the steps `planc run --trace` measured when it left ARTIFACT/trace.json;
    with each trace's per-rank summary (busy, waiting, in collectives)."""
    predicted = {name: timeline.predicted(report, hw, batch=1, context=PREDICT_CONTEXT)
                 for name, hw in cost.PROFILES.items()}
    measured, measured_summary, unreadable = None, None, None
    if (path := artifact / timeline.MEASURED).is_file():
        try:
            measured = read_json(path, timeline.MAX_TRACE_BYTES)
            measured_summary = timeline.summary(measured)
        except (ValueError, KeyError, TypeError) as exc:
            measured, unreadable = None, f"{path.name} is not a trace planc wrote ({exc}); run `planc run --trace` again"
    names: dict[str, int] = {}
    return {"predicted": {name: compact_trace(trace, names) for name, trace in predicted.items()},
            "measured": compact_trace(measured, names) if measured else None, "names": list(names),
            "unreadable": unreadable, "context": PREDICT_CONTEXT,
            "summaries": {name: timeline.summary(trace) for name, trace in predicted.items()},
            "measured_summary": measured_summary}


def view(artifact: Path) -> dict:
    """Everything the inspect template shows, as plain data."""
    manifest, report, program = _read(artifact)
    captured = frozenset(e["block"] for e in report.get("run_as_captured", []))
    nodes = final_nodes(report)
    lines = parse_program(program, nodes, captured)
    cells = build_grid(report, lines)
    grid = grid_rows(cells)
    picture = graphview.build(list(nodes.values()))
    plan = plan_view(manifest)
    model = manifest.get("model", {})
    checks = report.get("lift_checks")
    failed = [c for c in checks if not c.get("ok")] if isinstance(checks, list) else []
    alerts = [f"{len(report.get('declines', []))} declined rewrite(s)"] if report.get("declines") else []
    alerts += [f"{len(failed)} lift check(s) failed"] if failed else []
    alerts += report.get("advice") or []
    strategies = sorted({e["strategy"] for row in grid for e in row["entries"]} | {b.strategy for b in picture.nodes})
    return {
        "title": f"{plan['name'] or 'plan'} on {model.get('source', artifact.name)} · planc inspect",
        "manifest": manifest, "report": report, "model": model, "plan": plan, "alerts": alerts,
        "kernels": kernels_used(nodes, manifest.get("kernels", [])),
        "legend": [(s, color(s)) for s in strategies],
        "grid": grid, "picture": picture, "bands": graphview.bands(picture),
        "memory": memory_view(report, manifest), "predicted": predicted_rows(report),
        "collectives": _collective_steps(report), "candidates": candidate_tables(report),
        "notes": pass_notes(report), "heatmaps": heatmaps(report), "lines": lines,
        "timeline": timeline_view(report, artifact),
        "details": _details(lines, cells, grid, picture, plan, report, nodes),
    }


def _collective_steps(report: dict) -> list[dict]:
    decode, prefill = report.get("collectives_per_decode_step", {}), report.get("collectives_per_prefill", {})
    steps = [("decode step", decode)] + ([("prefill", prefill)] if prefill and prefill != decode else [])
    return [{"name": name, "ops": [{"op": op, "calls": e.get("calls", 0), "bytes": logical_bytes(e)}
                                   for op, e in ops.items()]} for name, ops in steps]


# ---- page -----------------------------------------------------------------------------------

@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(human_bytes=human_bytes, fmt=fmt, color=color, ms=ms)
    return env


def render(artifact: Path) -> str:
    """The inspection page of ARTIFACT as one HTML string."""
    return environment().get_template("inspect.html.j2").render(**view(Path(artifact)))


def write(artifact: Path, out: Path) -> Path:
    """Render ARTIFACT's page to OUT atomically."""
    return replace_file(out, render(artifact))


def render_diff(d: dict) -> str:
    """`planc diff`'s figures (planc.diff.diff) as a page: the terminal's rows, changes marked."""
    from planc.diff import diff_rows

    rows = diff_rows(d)[1:]  # the first row names the sides, as the header does
    return environment().get_template("diff.html.j2").render(
        title=f"planc diff: {d['a']['given']} vs {d['b']['given']}", a=d["a"]["given"], b=d["b"]["given"],
        rows=rows, context=PREDICT_CONTEXT)
