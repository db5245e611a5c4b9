"""`planc diff A B`: two compiles side by side, read from what each artifact says about itself.

A and B are artifacts, or plans compiled here (weightless, `--meta`: every figure below comes
from shapes, not weights) on one model. For each: where every block went (its pass records,
identical layers folded into one row), per-rank weight and KV bytes, collectives per decode step
and their logical bytes (report.json, ring formulas), the decode step planc.cost predicts per
device profile, and the ops the program calls.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path

from planc.errors import ArtifactError

MANIFEST, REPORT, PROGRAM = "manifest.json", "report.json", "programs/target/program.py"
PREDICT_CONTEXT = 32768  # cached tokens per sequence in a predicted decode step (here and on the inspect page)
LAYER = re.compile(r"(?<=\.layers\.)(\d+)(?=\.)")
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; 169264.86 MiB -> '165.30 GiB'."""
    unit = 0
    while abs(n) >= 1024 and unit < len(UNITS) - 1:
        n, unit = n / 1024, unit + 1
    return f"{n:.0f} B" if unit == 0 else f"{n:.2f} {UNITS[unit]}"


def rank_groups(per_rank: list[dict]) -> list[tuple[str, dict]]:
    """Ranks with equal figures as one entry: [('ranks 0-7', figures)], first rank's order."""
    groups: dict[tuple, list[int]] = {}
    for r in per_rank:
        groups.setdefault(tuple(sorted((k, v) for k, v in r.items() if k != "rank")), []).append(r["rank"])
    return [(_ranks_label(ranks), dict(key)) for key, ranks in groups.items()]


def _ranks_label(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
    return f"ranks {ranks[0]}-{ranks[-1]}" if contiguous else f"ranks {', '.join(map(str, ranks))}"


def summarize(artifact: Path) -> dict:
    """The figures diff compares, from one artifact's manifest, report and program."""
    artifact = Path(artifact)
    if not (artifact / MANIFEST).is_file():
        raise ArtifactError(f"{artifact}: not a planc artifact (no {MANIFEST}); create one with `planc compile`")
    manifest = json.loads((artifact / MANIFEST).read_text())
    report = json.loads((artifact / REPORT).read_text())
    program = artifact / PROGRAM
    ops = Counter(re.findall(r"\bops\.(\w+)\(", program.read_text())) if program.is_file() else Counter()
    return {
        "artifact": str(artifact),
        "model": manifest["model"]["source"],
        "plan_hash": manifest["plan_hash"],
        "world_size": manifest["world_size"],
        "dtype": manifest["dtype"],
        "placements": _placements(report["passes"]),
        "per_rank": report["per_rank"],
        "collectives_per_decode_step": report["collectives_per_decode_step"],
        "predicted_decode_step": _predicted(report),
        "program_ops": dict(sorted(ops.items())),
    }


def _placements(records: list[dict]) -> dict[str, str]:
    """Block FQN -> what the passes made of it ("tpla: 2 latent slices ...")."""
    placed = {}
    for r in records:
        prefix = "" if r["action"] == "applied" else f"{r['action']} "
        placed[r["target"]] = f"{prefix}{r['pass_name']}: {r['detail']}"
    return placed


def _predicted(report: dict) -> dict[str, dict]:
    """planc.cost's decode step per device profile: batch 1, and the largest batch that fits."""
    from planc import cost

    if not any(r["kv_bytes_per_token"] for r in report["per_rank"]):
        return {}
    found = {}
    for name, hw in cost.PROFILES.items():
        one = cost.artifact_step(report, hw, 1, PREDICT_CONTEXT)
        most = cost.artifact_max_batch(report, hw, PREDICT_CONTEXT)
        full = cost.artifact_step(report, hw, most, PREDICT_CONTEXT) if most else None
        found[name] = {"context": PREDICT_CONTEXT, "step_s_batch_1": one["step_s"], "max_batch": most,
                       "step_s_max_batch": full and full["step_s"], "tokens_per_s": full and full["tokens_per_s"]}
    return found


def diff(a: str, b: str, *, model: str | None = None) -> dict:
    """Both sides' summaries and the rows that differ or not, as `planc diff --json` prints them."""
    with tempfile.TemporaryDirectory(prefix="planc-diff-") as tmp:
        sides = [summarize(_artifact(x, model, Path(tmp, name))) for x, name in ((a, "a"), (b, "b"))]
    for side, given in zip(sides, (a, b)):
        side["given"] = given
    return {"a": sides[0], "b": sides[1], "placements": _placement_rows(sides[0]["placements"], sides[1]["placements"]),
            "kv_bytes_per_token": _per_rank(sides, "kv_bytes_per_token"),
            "weight_bytes": _per_rank(sides, "weight_bytes"),
            "collectives_per_decode_step": _collectives(sides),
            "predicted_decode_step_s": {hw: [s["predicted_decode_step"].get(hw, {}).get("step_s_batch_1") for s in sides]
                                        for hw in _union(s["predicted_decode_step"] for s in sides)},
            "program_ops": {op: [s["program_ops"].get(op, 0) for s in sides]
                            for op in _union(s["program_ops"] for s in sides)}}


def _artifact(given: str, model: str | None, out: Path) -> Path:
    """An artifact as given, or a plan compiled weightless into `out`."""
    path = Path(given)
    if path.is_dir():
        return path
    from planc.driver import compile

    return compile(model, path, out, meta=True).path


def _union(dicts) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def _per_rank(sides: list[dict], key: str) -> dict[str, list[int]]:
    """'rank r' -> [A's figure, B's figure] (None where a side has no such rank)."""
    ranks = max(len(s["per_rank"]) for s in sides)
    return {f"rank {r}": [s["per_rank"][r][key] if r < len(s["per_rank"]) else None for s in sides]
            for r in range(ranks)}


def _collectives(sides: list[dict]) -> dict[str, list[dict | None]]:
    return {op: [s["collectives_per_decode_step"].get(op) for s in sides]
            for op in _union(s["collectives_per_decode_step"] for s in sides)}


def _placement_rows(a: dict[str, str], b: dict[str, str]) -> list[dict]:
    """One row per block, layers with the same pair of placements folded: model.layers.{1-3}.mlp."""
    rows: dict[tuple, list[int | None]] = {}
    for target in _union((a, b)):
        layer = LAYER.search(target)
        pattern = LAYER.sub("{}", target, count=1)
        rows.setdefault((pattern, a.get(target), b.get(target)), []).append(int(layer.group(1)) if layer else None)
    return [{"blocks": _fold(pattern, layers), "a": pa, "b": pb} for (pattern, pa, pb), layers in rows.items()]


def _fold(pattern: str, layers: list[int | None]) -> str:
    if layers == [None]:
        return pattern
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    inner = ",".join(runs)
    return pattern.replace("{}", inner if len(layers) == 1 else f"{{{inner}}}")


def _collective_text(entry: dict | None) -> str:
    if not entry:
        return "-"
    per_token = entry.get("bytes_per_token", entry.get("bytes_per_token_max", 0))
    bound = " (max)" if "bytes_per_token_max" in entry else ""
    return f"{entry['calls']} calls, {per_token} B/token{bound}"


def _change(a: float | None, b: float | None) -> str:
    if not a or b is None or a == b:
        return ""
    return f"  ({(b - a) / a:+.0%})"


def format_diff(d: dict) -> str:
    """Side by side for a terminal: a label column, then A, then B."""
    rows = diff_rows(d)
    widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}".rstrip() for r in rows)


def diff_rows(d: dict) -> list[tuple[str, str, str]]:
    """(label, A, B) rows, headings with empty figures and their entries indented by two spaces:
    what the terminal and the page both show."""
    a, b = d["a"], d["b"]
    rows: list[tuple[str, str, str]] = [("", f"A: {a['given']}", f"B: {b['given']}"),
                                        ("model", f"{a['model']} ({a['dtype']})", f"{b['model']} ({b['dtype']})"),
                                        ("ranks", str(a["world_size"]), str(b["world_size"])), ("placements", "", "")]
    rows += [(f"  {r['blocks']}", r["a"] or "-", r["b"] or "-") for r in d["placements"]]
    rows.append(("per rank", "", ""))
    for label, key, fmt in (("KV cache", "kv_bytes_per_token", lambda v: f"{v} B/token"),
                            ("weights", "weight_bytes", human_bytes)):
        for rank, (va, vb) in _fold_ranks(d[key]):
            rows.append((f"  {label}, {rank}", "-" if va is None else fmt(va),
                         ("-" if vb is None else fmt(vb)) + _change(va, vb)))
    rows.append(("collectives per decode step", "", ""))
    rows += [(f"  {op}", _collective_text(ea), _collective_text(eb)) for op, (ea, eb) in d["collectives_per_decode_step"].items()]
    rows.append((f"predicted decode step (batch 1, {PREDICT_CONTEXT} cached tokens)", "", ""))
    rows += [(f"  {hw}", _ms(sa), _ms(sb) + _change(sa, sb)) for hw, (sa, sb) in d["predicted_decode_step_s"].items()]
    rows.append(("program ops (calls per forward)", "", ""))
    rows += [(f"  {op}", str(na), str(nb)) for op, (na, nb) in d["program_ops"].items()]
    return rows


def _fold_ranks(per_rank: dict[str, list]) -> list[tuple[str, list]]:
    """Ranks whose pair of figures is equal share a row."""
    groups = rank_groups([{"rank": int(rank.split()[1]), "pair": tuple(v)} for rank, v in per_rank.items()])
    return [(label, list(entry["pair"])) for label, entry in groups]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"
