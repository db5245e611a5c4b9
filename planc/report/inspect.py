"""`planc inspect`: one self-contained HTML page showing what a compile decided.

Everything comes from the artifact directory: manifest.json (plan, model, versions),
report.json (pass records, every candidate a strategy could rewrite, memory, collectives, lift
checks, blocks run as captured, every intermediate graph as text and as JSON nodes) and program.py. A line `name = ...` of `forward` is
the node `name` of the final graph, whose JSON gives its rule, strategy, layer, block and shard:
nothing is read from comments. The
page has no dependencies: inline CSS, a few lines of vanilla JS to highlight a rule's program
lines, every text value passed through html.escape.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from planc import cost
from planc.errors import ArtifactError
from planc.codegen.artifact import program_file
from planc.runtime.artifact import read_manifest

ASSIGNMENT = re.compile(r"^\s+(\w+) = ")
LAYER_FQN = re.compile(r"layers\.(\d+)\.(.+)$")
COLUMNS = ("attention", "ffn")
FLOW_WIDTH = 64  # longer mappings of scalars are printed as blocks
CAPTURED = "run as captured"  # a grid cell's strategy when planc did not lift the block


# ---- reading the artifact -------------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    """One program.py line and the plan rule / grid cell ("layer:column") it belongs to."""
    text: str
    rule: int | None = None
    cell: str | None = None
    strategy: str = ""
    numbers: dict[str, str] = field(default_factory=dict)


@dataclass
class Cell:
    """One layer × block entry of the grid."""
    strategy: str = "replicated"
    declined: bool = False
    details: list[str] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)
    rules: set[int] = field(default_factory=set)


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
    """Lines of `forward` are nodes; module-level functions (run-as-captured code) are not. A call of
    a `captured` block (by FQN) belongs to its grid cell, though no rule produced it."""
    lines = []
    in_forward = False
    for text in source.splitlines():
        if text.startswith("def "):
            in_forward = text.startswith("def forward(")
        found = ASSIGNMENT.match(text) if in_forward else None
        node = nodes.get(found.group(1)) if found else None
        if node is not None and node.get("rule") is None and node.get("fqn") in captured:
            lines.append(Line(text, None, cell_of(node["fqn"]), CAPTURED))
            continue
        if node is None or node.get("rule") is None:
            lines.append(Line(text))
            continue
        where = node.get("block") or node.get("fqn", "")
        lines.append(Line(text, node["rule"], cell_of(where), node["strategy"],
                          {k: str(v) for k, v in node.get("shard", {}).items()}))
    return lines


def build_grid(report: dict, lines: list[Line]) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    for line in lines:
        if line.cell:
            cell = cells.setdefault(line.cell, Cell(strategy=line.strategy))
            cell.rules |= {line.rule} - {None}
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
    """A record about a block sets its cell's strategy; one about a projection in it (a `linear`
    node, as an overlap pass rewrites) only adds a line to the cell."""
    key = cell_of(record["target"])
    if key is None:
        return
    cell = cells.setdefault(key, Cell())
    if record["action"] == "applied" and record.get("kind") != "linear":
        cell.strategy = record["pass_name"]
    cell.declined = cell.declined or record["action"] == "declined"
    cell.details.append(f"{record['action']}: {record['detail']}")


# ---- formatting -----------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    """Binary units, as memory is allocated: 768 -> '768 B', 3300064 -> '3.15 MiB'."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


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
    return f"hsl({hue} 70% 88%)"


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """rows hold already-escaped HTML; classes (one per row) mark rows such as declines."""
    classes = classes or [""] * len(rows)
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(f'<tr class="{c}">' + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row, c in zip(rows, classes))
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


# ---- sections -------------------------------------------------------------------------------

def header(manifest: dict, report: dict) -> str:
    model = manifest.get("model", {})
    versions = {"planc": manifest.get("planc_version", "?"), **manifest.get("versions", {})}
    facts = [("model class", model.get("class", "?")), ("world size", manifest.get("world_size")),
             ("dtype", manifest.get("dtype")), ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
             ("compile", f"{report.get('compile_seconds', 0):.1f} s"), ("kernels", ", ".join(manifest.get("kernels", [])))]
    items = "".join(f"<div><b>{escape(k)}</b> {escape(str(v))}</div>" for k, v in facts)
    digest = str(manifest.get("plan_hash", ""))
    items += f'<div><b>plan sha256</b> <code title="{escape(digest)}">{escape(digest[:16])}…</code></div>'
    badge = '<span class="badge">weightless dry run (--meta)</span>' if manifest.get("meta") else ""
    title = f'<h1>{escape(str(model.get("source", "?")))} {badge}</h1>'
    return f'<header>{title}<div class="facts">{items}</div>{_alerts(report)}</header>'


def _alerts(report: dict) -> str:
    checks = report.get("lift_checks")
    failed = [c for c in checks if not c.get("ok")] if isinstance(checks, list) else []
    notes = [f"{len(report.get('declines', []))} declined rewrite(s)"] if report.get("declines") else []
    notes += [f"{len(failed)} lift check(s) failed"] if failed else []
    notes += report.get("advice") or []
    return "".join(f'<div class="alert">{escape(n)}</div>' for n in notes)


def plan_section(plan: dict) -> str:
    top = {k: v for k, v in plan.items() if k != "rules"}
    rules = "".join(_rule_block(i, rule) for i, rule in enumerate(plan.get("rules", [])))
    body = f'<pre class="plan">{escape(chr(10).join(yamlish(top)))}</pre>'
    hint = '<p class="note">Click a rule to highlight the program lines it produced.</p>'
    return _section("Plan", body + "<h3>rules</h3>" + hint + rules, "plan")


def _rule_block(index: int, rule: dict) -> str:
    text = "\n".join(yamlish(rule, 1))
    return (f'<pre class="rule pick" data-pick=\'.ln[data-rule="{index}"]\'>'
            f'<span class="tag">rules[{index}]</span>\n{escape(text)}</pre>')


def grid_section(cells: dict[str, Cell]) -> str:
    layers = sorted({int(key.split(":")[0]) for key in cells})
    head = "<tr><th>layer</th>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>"
    rows = "".join(f"<tr><th>{layer}</th>" + "".join(_cell_html(f"{layer}:{c}", cells.get(f"{layer}:{c}", Cell()))
                                                      for c in COLUMNS) + "</tr>" for layer in layers)
    legend = "".join(f'<span class="chip" style="background:{color(s)}">{escape(s)}</span>'
                     for s in sorted({cell.strategy for cell in cells.values()}))
    return _section("Layers × blocks", f'<div class="legend">{legend}</div><table class="grid">{head}{rows}</table>', "grid")


def _cell_html(key: str, cell: Cell) -> str:
    numbers = "".join(f'<span class="num">{escape(k)} <b>{escape(v)}</b></span>' for k, v in cell.numbers.items())
    declines = "".join(f'<div class="detail">{escape(d)}</div>' for d in cell.details if d.startswith("declined"))
    rules = " ".join(f"rules[{r}]" for r in sorted(cell.rules))
    cls = "cell pick declined" if cell.declined else "cell pick"
    return (f'<td class="{cls}" data-cell="{key}" data-pick=\'.ln[data-cell="{key}"]\' '
            f'style="background:{color(cell.strategy)}" title="{escape(chr(10).join(cell.details))}">'
            f'<div class="strategy">{escape(cell.strategy)} <small>{escape(rules)}</small></div>{numbers}{declines}</td>')


def memory_section(report: dict, meta: bool) -> str:
    ranks = report.get("per_rank", [])
    body = "<h3>weights per rank</h3>" + _bars(ranks, "weight_bytes")
    body += "<h3>KV cache per token per rank</h3>" + _bars(ranks, "kv_bytes_per_token")
    note = "Weight bytes are predicted from shapes (meta device, no weights written). " if meta else ""
    body += f'<p class="note">{note}KV bytes per token sum every layer\'s cache width on that rank × dtype size.</p>'
    return _section("Per-rank memory", body, "memory")


def _bars(ranks: list[dict], key: str) -> str:
    top = max((r[key] for r in ranks), default=0) or 1
    rows = "".join(f'<div class="bar"><span class="lbl">rank {r["rank"]}</span>'
                   f'<span class="track"><span class="fill" style="width:{100 * r[key] / top:.1f}%"></span></span>'
                   f'<span class="val">{human_bytes(r[key])} <small>({r[key]:,} B)</small></span></div>' for r in ranks)
    return f'<div class="bars">{rows}</div>'


def collectives_section(report: dict) -> str:
    decode, prefill = report.get("collectives_per_decode_step", {}), report.get("collectives_per_prefill", {})
    steps = [("decode step", decode)] + ([("prefill", prefill)] if prefill and prefill != decode else [])
    body = "".join((f"<h3>{escape(name)}</h3>" if len(steps) > 1 else "") + _table(
        ["op", "calls", "logical bytes / token"],
        [[f"<code>{escape(op)}</code>", str(e.get("calls", 0)), _logical_bytes(e)] for op, e in ops.items()])
        for name, ops in steps)
    note = ('<p class="note">Bytes are logical bytes per token from the ring formulas (all-reduce 2(n−1)/n·S, '
            'reduce-scatter / all-gather (n−1)/n·S, all-to-all: off-diagonal blocks), not bytes measured on the wire; '
            'all-to-all volume depends on routing, so its figure is an upper bound.</p>')
    title = "Collectives per decode step" + (" and per prefill" if len(steps) > 1 else "")
    return _section(title, body + note, "collectives")


PREDICT_CONTEXT = 32768  # cached tokens per sequence in the predicted decode step


def prediction_section(report: dict) -> str:
    """planc.cost on this artifact's per-rank bytes and collectives, for each hardware profile."""
    if not any(r["kv_bytes_per_token"] for r in report.get("per_rank", [])):
        return _section("Predicted decode step", '<p class="note">No KV cache: nothing to predict a decode step of.</p>',
                        "predicted")
    rows = []
    for name, hw in cost.PROFILES.items():
        most = cost.artifact_max_batch(report, hw, PREDICT_CONTEXT)
        one = cost.artifact_step(report, hw, 1, PREDICT_CONTEXT)
        if most < 1:
            rows.append([escape(name), "0", _ms(one["step_s"]), "does not fit", "", ""])
            continue
        full = cost.artifact_step(report, hw, most, PREDICT_CONTEXT)
        parts = full["slowest"]
        split = " / ".join(f"{100 * parts[k] / full['step_s']:.0f}%" for k in ("weights_s", "kv_s", "collectives_s"))
        rows.append([escape(name), f"{most:,}", _ms(one["step_s"]), _ms(full["step_s"]),
                     f"{full['tokens_per_s']:,.0f}", split])
    note = (f'<p class="note">planc.cost at {PREDICT_CONTEXT:,} cached tokens per sequence, from this report\'s '
            "per-rank weight and KV bytes and its collectives: each rank reads all its weights (every expert, as a "
            "large batch does) and its cache once per step at HBM bandwidth, collectives cost latency + ring bytes / "
            "link bandwidth; the slowest rank sets the step. Max batch: the most sequences whose cache fits "
            f"beside the weights in {cost.USABLE_MEMORY:.0%} of device memory on every rank.</p>")
    head = ["profile", "max batch", "step, batch 1", "step, max batch", "tokens/s", "weights / KV / collectives"]
    return _section("Predicted decode step", _table(head, rows) + note, "predicted")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _logical_bytes(entry: dict) -> str:
    if "bytes_per_token" in entry:
        n = entry["bytes_per_token"]
        return f"{human_bytes(n)} <small>({n:,} B)</small>"
    n = entry.get("bytes_per_token_max", 0)
    return f"≤ {human_bytes(n)} <small>({n:,} B, upper bound)</small>"


def candidates_section(report: dict) -> str:
    """Per strategy that surveys them: every candidate, fused / declined / without a rule, and why."""
    parts = []
    for name, entries in (report.get("candidates") or {}).items():
        if not entries:
            continue
        extra = [k for k in entries[0] if k not in ("target", "status", "rule", "detail")]
        rows = [[f"<code>{escape(e['target'])}</code>", escape(e["status"]),
                 "" if e.get("rule") is None else f"rules[{e['rule']}]", escape(e.get("detail", "")),
                 *(_value_html(e.get(k, "")) for k in extra)] for e in entries]
        classes = ["declined" if e["status"] == "declined" else "" for e in entries]
        counts = Counter(e["status"] for e in entries)
        parts.append(f"<h3>{escape(name)}: {escape(', '.join(f'{n} {status}' for status, n in counts.items()))}</h3>"
                     + _table(["target", "status", "rule", "detail", *extra], rows, classes))
    return _section("Candidates", "".join(parts), "candidates") if parts else ""


def _value_html(value: object) -> str:
    """A scalar as text; a mapping folded under its keys (the full value as YAML when opened)."""
    if isinstance(value, dict):
        body = escape("\n".join(yamlish({k: _rounded(v) for k, v in value.items()})))
        return f"<details><summary>{escape(', '.join(map(str, value)))}</summary><pre>{body}</pre></details>"
    return escape(_fmt(value, ".3g"))


def _rounded(value: object) -> object:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return float(format(value, ".3g")) if isinstance(value, float) else value


def passes_section(report: dict) -> str:
    records = report.get("passes", [])
    rows = [[escape(r["pass_name"]), f"<code>{escape(r['target'])}</code>", escape(r["action"]), escape(r["detail"])]
            for r in records]
    classes = ["declined" if r["action"] == "declined" else "" for r in records]
    declined = classes.count("declined")
    summary = f"{len(records) - declined} applied, {declined} declined"
    body = f"<details{' open' if declined or len(records) <= 40 else ''}><summary>{summary}</summary>"
    return _section("Pass records", body + _table(["pass", "target", "action", "detail"], rows, classes) + "</details>", "passes")


def lift_section(report: dict) -> str:
    checks = report.get("lift_checks", [])
    if not isinstance(checks, list):
        return _section("Lift checks", f'<p class="note">{escape(str(checks))}</p>', "lift")
    rows = [[f"<code>{escape(c['block'])}</code>", escape(_fmt(c["rel_err"], ".1e")), "ok" if c["ok"] else "MISMATCH"]
            for c in checks]
    classes = ["" if c["ok"] else "declined" for c in checks]
    failed = classes.count("declined")
    summary = f"<summary>{len(checks) - failed} of {len(checks)} blocks match the captured graph</summary>"
    table = _table(["block", "rel err", "ok"], rows, classes)
    return _section("Lift checks", f"<details{' open' if failed else ''}>{summary}{table}</details>", "lift")


def captured_section(report: dict) -> str:
    """Blocks planc did not lift: each runs whole on every rank as the function program.py defines."""
    entries = report.get("run_as_captured") or []
    if not entries:
        return ""
    rows = [[f"<code>{escape(e['block'])}</code>", escape(e["class"]), f"<code>{escape(e['function'])}</code>",
             escape(e["why"])] for e in entries]
    note = ('<p class="note">Not lifted, so no rule can split them: each runs whole on every rank, as the code '
            "torch.export captured of it (a function defined at the top of program.py).</p>")
    return _section(f"Run as captured ({len(entries)})", _table(["block", "class", "function", "why not lifted"], rows)
                    + note, "captured")


def notes_section(report: dict) -> str:
    """What each pass decided from data (a transform, slice energies, ...), one table per pass
    (a heatmap note is drawn by heatmap_section)."""
    parts = []
    for pass_name, notes in (report.get("notes") or {}).items():
        keys = sorted({k for entry in notes.values() for k in entry} - {"heatmap"})
        rows = [[f"<code>{escape(fqn)}</code>", *(escape(_fmt(entry.get(k, ""))) for k in keys)]
                for fqn, entry in notes.items()]
        parts.append(f"<h3>{escape(pass_name)}</h3>" + _table(["block", *keys], rows))
    return _section("Pass notes", "".join(parts), "notes") if parts else ""


def heatmap_section(report: dict) -> str:
    """Per block with a `heatmap` note (expert placement): the expected share of all activations by
    expert (rows) and the rank its tokens sit on (columns), on the calibration text; the expert's
    own rank is outlined, so the outlined cells add up to the expected local activation rate."""
    maps = [(fqn, entry) for notes in (report.get("notes") or {}).values() for fqn, entry in notes.items()
            if isinstance(entry.get("heatmap"), dict)]
    if not maps:
        return ""
    note = ('<p class="note">Expected share of the layer\'s expert activations on the calibration text, by expert '
            "and the rank its token sits on: spread evenly over the ranks without token shuffling, on its "
            "predicted rank with it (before the equal-group limit moves some tokens on, so held-out text "
            "runs somewhat less local). Outlined: the expert's own rank (a local activation).</p>")
    return _section("Expert placement", note + "".join(_heatmap(fqn, entry) for fqn, entry in maps), "heatmap")


def _heatmap(fqn: str, entry: dict) -> str:
    heat = entry["heatmap"]
    load, owner = heat["load"], heat["owner"]
    world = len(load[0])
    peak = max(max(row) for row in load) or 1.0
    rows = []
    for expert, row in enumerate(load):
        cells = "".join(
            f'<td class="heat{" own" if owner[expert] == d else ""}" style="background:rgba(37,99,235,{v / peak:.2f})" '
            f'title="{v:.2%}">{v:.1%}</td>' for d, v in enumerate(row))
        rows.append(f"<tr><th>expert {expert}</th>{cells}<td>rank {owner[expert]}</td></tr>")
    served = [sum(sum(row) for e, row in enumerate(load) if owner[e] == d) for d in range(world)]
    local = sum(row[owner[e]] for e, row in enumerate(load))
    foot = "".join(f"<td>{v:.1%}</td>" for v in served)
    head = "".join(f"<th>tokens on rank {d}</th>" for d in range(world))
    how = "tokens shuffled to their predicted rank" if heat.get("shuffled") else "tokens in slices, not shuffled"
    title = f"<h3>{escape(fqn)}: {local:.1%} local ({escape(how)})</h3>"
    table = (f'<table class="heatmap"><thead><tr><th></th>{head}<th>held by</th></tr></thead><tbody>{"".join(rows)}'
             f"</tbody><tfoot><tr><th>served by rank</th>{foot}<td></td></tr></tfoot></table>")
    return title + table


def _fmt(value: object, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, float) else str(value)


def program_section(lines: list[Line]) -> str:
    body = "".join(_program_line(n, line) for n, line in enumerate(lines, 1))
    status = ('<p class="note"><span id="status">Click a rule or a grid cell to highlight its lines.</span> '
              '<a href="#plan">↑ plan</a> <a href="#grid">↑ grid</a></p>')
    return _section("program.py", f'{status}<pre class="program" id="program">{body}</pre>', "program")


def _program_line(number: int, line: Line) -> str:
    attrs = f' data-rule="{line.rule}"' if line.rule is not None else ""
    attrs += f' data-cell="{line.cell}"' if line.cell else ""
    code = escape(line.text)
    if line.rule is not None:
        cut = line.text.rfind("#")
        code = f'{escape(line.text[:cut])}<span class="cm">{escape(line.text[cut:])}</span>'
    return f'<span class="ln"{attrs}><i>{number}</i>{code}\n</span>'


def graphs_section(report: dict) -> str:
    graphs = report.get("graphs", {})
    body = "".join(f"<details><summary>after <b>{escape(name)}</b> ({text.count(chr(10)) + 1} lines)</summary>"
                   f"<pre>{escape(text)}</pre></details>" for name, text in graphs.items())
    return _section("Intermediate graphs", body, "graphs")


# ---- page -----------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#fafafa;color:#1d1d1f}
header{background:#1f2937;color:#f9fafb;padding:14px 24px}
header h1{margin:0 0 6px;font-size:22px}
.facts{display:flex;flex-wrap:wrap;gap:4px 22px;font-size:13px}.facts b{color:#9ca3af;font-weight:500}
.badge{font-size:12px;background:#f59e0b;color:#111;border-radius:4px;padding:2px 6px;vertical-align:middle}
.alert{margin-top:8px;background:#b91c1c;padding:4px 10px;border-radius:4px;display:inline-block;margin-right:8px}
main{padding:8px 24px}.cols{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:0 28px}
h2{font-size:17px;border-bottom:2px solid #d1d5db;padding-bottom:3px;margin:18px 0 8px}
h3{font-size:13px;margin:10px 0 4px;color:#4b5563}
pre{background:#fff;border:1px solid #e5e7eb;border-radius:4px;padding:6px 10px;margin:4px 0;overflow:auto;font-size:12px}
.pick{cursor:pointer}.rule:hover,.cell:hover{outline:2px solid #2563eb}
.rule .tag{color:#6b7280}.picked{outline:2px solid #2563eb}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #e5e7eb;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#f3f4f6}tr.declined td{background:#fee2e2}
.grid td{min-width:220px}.grid{width:100%}.strategy{font-weight:600}.strategy small{font-weight:400;color:#6b7280}
.num{display:inline-block;font-size:11px;background:rgba(255,255,255,.65);border-radius:3px;padding:0 4px;margin:2px 3px 0 0}
.detail{font-size:11px;color:#374151}td.declined{outline:2px solid #dc2626}
.legend .chip{display:inline-block;padding:1px 8px;border-radius:3px;margin:0 6px 6px 0;font-size:12px}
.bar{display:flex;align-items:center;gap:8px;margin:2px 0}.lbl{width:52px;font-size:12px}
.track{flex:1;background:#e5e7eb;height:12px;border-radius:3px;overflow:hidden}
.fill{display:block;height:100%;background:#3b82f6}
.val{width:250px;font-size:12px}.note{color:#6b7280;font-size:12px;margin:4px 0}
.program{max-height:70vh;position:relative}.ln{display:block;white-space:pre}
.ln i{display:inline-block;width:3.5em;color:#9ca3af;font-style:normal;user-select:none}
.cm{color:#047857}.ln.hl{background:#fef08a}
details{margin:4px 0}summary{cursor:pointer;color:#1f2937}
.heatmap td.heat{text-align:right;font-size:11px;min-width:58px}.heatmap td.own{outline:2px solid #111;outline-offset:-2px}
"""

JS = """
document.addEventListener('click', function (e) {
  var pick = e.target.closest('.pick');
  if (!pick) return;
  document.querySelectorAll('.hl, .picked').forEach(function (x) { x.classList.remove('hl', 'picked'); });
  var hits = document.querySelectorAll(pick.dataset.pick);
  hits.forEach(function (x) { x.classList.add('hl'); });
  pick.classList.add('picked');
  document.getElementById('status').textContent = hits.length + ' program line(s) highlighted';
  if (hits.length) { var box = document.getElementById('program');
    box.scrollTop = hits[0].offsetTop - 40;  // .program is positioned: offsets are relative to it
    box.scrollIntoView({block: 'nearest'}); }
});
"""


def render(artifact: Path) -> str:
    """The inspection page of ARTIFACT as one HTML string."""
    artifact = Path(artifact)
    manifest, report, program = _read(artifact)
    captured = frozenset(e["block"] for e in report.get("run_as_captured", []))
    lines = parse_program(program, final_nodes(report), captured)
    left = [plan_section(manifest.get("plan", {})), memory_section(report, bool(manifest.get("meta"))),
            collectives_section(report), prediction_section(report),
            lift_section(report), captured_section(report), notes_section(report), heatmap_section(report)]
    right = [grid_section(build_grid(report, lines))]
    wide = [candidates_section(report), passes_section(report), program_section(lines), graphs_section(report)]
    title = f"planc inspect: {manifest.get('model', {}).get('source', artifact.name)}"
    main = f'<div class="cols"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>{"".join(wide)}'
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{header(manifest, report)}<main>{main}</main>"
            f"<script>{JS}</script></body></html>\n")


def write(artifact: Path, out: Path) -> Path:
    """Render ARTIFACT to OUT atomically: a temp file beside OUT, then os.replace."""
    page = render(artifact)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
