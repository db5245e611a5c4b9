"""`planc bench decode`: the bundled demo's decode throughput and collectives at 1, 2 and 4 ranks.

tiny-deepseek with plans/deepseek_mla_tp_ep.yaml retargeted to each world size, each compiled
to a temporary directory and launched with `planc.run.run` on the same prompts for the same
number of new tokens; rounds interleave the world sizes so drift hits each alike, and
tokens/s is the median over rounds (measured inside rank 0 around the decode loop, so launch
and load time are excluded). Collective calls and logical bytes per decode step come from the
Comm wrapper on rank 0; the compile-time report's calls are listed beside them.

Every rank runs with OMP_NUM_THREADS=1 (torchrun's default; inherited at spawn) unless the caller
set it: the tiny model's ops are too small to gain from intra-op threads, and torch's default of
one thread per core made decode 10-15x slower here (1 or 2 ranks on a busy 2-core machine).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from planc.driver import compile
from planc.plan import Plan, parse_plan_text
from planc.run import run as run_artifact
from planc.verify import DEFAULT_PROMPTS

PLAN = Path(__file__).resolve().parents[2] / "plans" / "deepseek_mla_tp_ep.yaml"
NOTE = ("CPU gloo ranks on a {cores}-core machine (more ranks than cores share them): ratios only, "
        "side by side in one run; absolute tokens/s mean nothing for a GPU. bytes are logical "
        "(ring formulas), not gloo's traffic; all_to_all bytes depend on the routing of these prompts")


def retarget(devices: int) -> Plan:
    """plans/deepseek_mla_tp_ep.yaml with mesh.devices replaced."""
    data = yaml.safe_load(PLAN.read_text())
    data["mesh"]["devices"] = devices
    return parse_plan_text(yaml.safe_dump(data, sort_keys=False), f"{PLAN.name} (mesh.devices = {devices})")


def cores() -> int:
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def rank_threads() -> Iterator[int]:
    """OMP_NUM_THREADS for the ranks launched inside the block: the caller's, else 1."""
    preset = os.environ.get("OMP_NUM_THREADS")
    threads = int(preset) if preset else 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield threads
    finally:
        if preset is None:
            del os.environ["OMP_NUM_THREADS"]


def measure(artifacts: dict[int, Path], *, max_new_tokens: int, repeats: int) -> dict[int, list[dict]]:
    """planc.run.run results per world size, `repeats` interleaved rounds over the world sizes."""
    runs: dict[int, list[dict]] = {n: [] for n in artifacts}
    for _ in range(repeats):
        for n, path in artifacts.items():
            with rank_threads() as threads:
                result = run_artifact(path, nproc=n, prompts=list(DEFAULT_PROMPTS), max_new_tokens=max_new_tokens)
            runs[n].append({**result, "threads_per_rank": threads})
    return runs


def summarize(runs: dict[int, list[dict]], artifacts: dict[int, Path], max_new_tokens: int) -> dict:
    reports = {n: json.loads((path / "report.json").read_text()) for n, path in artifacts.items()}
    first = {n: rs[0] for n, rs in runs.items()}
    tokens_per_s = {n: statistics.median(r["decode_tokens_per_s"] for r in rs) for n, rs in runs.items()}
    measured = {str(n): _rounded(r["collectives_per_decode_step"]) for n, r in first.items()}
    predicted = {str(n): {op: c["calls"] for op, c in rep["collectives_per_decode_step"].items()}
                 for n, rep in reports.items()}
    out = {
        "case": "decode",
        "model": "tiny-deepseek",
        "plan": PLAN.name,
        "prompts": list(DEFAULT_PROMPTS),
        "max_new_tokens": max_new_tokens,
        "decode_steps": {str(n): r["decode_steps"] for n, r in first.items()},
        "repeats": min(len(rs) for rs in runs.values()),
        "threads_per_rank": {str(n): r["threads_per_rank"] for n, r in first.items()},
        "tokens_per_s": {str(n): v for n, v in tokens_per_s.items()},
        "prefill_s": {str(n): statistics.median(r["prefill_s"] for r in rs) for n, rs in runs.items()},
        "collectives_per_decode_step": measured,
        "report_calls_per_decode_step": predicted,
        "calls_match_report": {n: {op: c["calls"] for op, c in measured[n].items()} == predicted[n] for n in measured},
        "same_tokens_as_fewest_ranks": {str(n): r["tokens"] == first[min(first)]["tokens"] for n, r in first.items()},
        "samples": {str(n): [r["decode_tokens_per_s"] for r in rs] for n, rs in runs.items()},
        "note": NOTE.format(cores=cores()),
    }
    if 1 in tokens_per_s:
        out["ratio_vs_1_rank"] = {str(n): v / tokens_per_s[1] for n, v in tokens_per_s.items()}
    return out


def _rounded(per_step: dict[str, dict]) -> dict[str, dict]:
    # Calls per step are whole numbers; all_to_all bytes are a per-step average over the routing.
    return {op: {"calls": round(c["calls"], 3), "bytes": round(c["bytes"], 1)} for op, c in sorted(per_step.items())}


def run(worlds: Sequence[int] = (1, 2, 4), max_new_tokens: int = 32, repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="planc-bench-decode-") as tmp:
        artifacts = {n: compile(None, retarget(n), Path(tmp, f"ranks{n}")).path for n in worlds}
        runs = measure(artifacts, max_new_tokens=max_new_tokens, repeats=repeats)
        return summarize(runs, artifacts, max_new_tokens)


def table(result: dict) -> str:
    worlds = list(result["tokens_per_s"])
    ratio = result.get("ratio_vs_1_rank", {})
    rows = [f"decode: {result['model']}, {result['plan']}, batch {len(result['prompts'])}, "
            f"{result['max_new_tokens']} new tokens, median of {result['repeats']} runs",
            f"{'ranks':>5} {'threads':>7} {'tokens/s':>9} {'vs 1 rank':>9} {'prefill ms':>10} {'same tokens':>11}"]
    for n in worlds:
        rows.append(f"{n:>5} {result['threads_per_rank'][n]:>7} {result['tokens_per_s'][n]:>9.1f} "
                    f"{f'{ratio[n]:.2f}x' if n in ratio else '-':>9} {result['prefill_s'][n] * 1e3:>10.1f} "
                    f"{str(result['same_tokens_as_fewest_ranks'][n]):>11}")
    rows += ["", f"{'ranks':>5} {'collective':<18} {'calls/step':>10} {'report':>6} {'logical bytes/step':>18}"]
    for n in worlds:
        for op, c in result["collectives_per_decode_step"][n].items():
            rows.append(f"{n:>5} {op:<18} {c['calls']:>10g} {result['report_calls_per_decode_step'][n].get(op, 0):>6} "
                        f"{c['bytes']:>18.1f}")
    return "\n".join(rows + [f"note: {result['note']}"])
