"""One decode step per rank as a Chrome trace (JSON object format; opens in Perfetto and chrome://tracing).

Layout, shared by the predicted trace (planc.cost on report.json) and the measured one
(`planc run --trace`, planc.runtime.trace):

    pid = rank, named "rank N"         (process_name metadata events)
    tid 0 "compute"                    a node reading weights and cached tokens
    tid 1 "collectives"                a node that communicates; "wait" before it while the rank
                                       waits for the last rank to reach it (a collective is a barrier)

Every span is a complete event ("ph": "X") with ts and dur in microseconds, name = the program
node's name (as in program.py and report.json's decode_ops), cat = compute | wait | collective.
The predicted trace leaves out nodes the cost model charges nothing (an add, an activation):
it reads only weights, cached tokens and collectives.

`export` writes the predicted step of an artifact and, when `planc run --trace` left one at its
default place (ARTIFACT/trace.json, MEASURED), the measured steps beside it in the same file: the
measured ranks as pids 100 + rank (MEASURED_PID), each process named for its source.
"""
from __future__ import annotations

import json
from pathlib import Path

from planc import cost
from planc.codegen.replace import replace_file
from planc.errors import ArtifactError, read_json

COMPUTE, COLLECTIVES = 0, 1  # tids
THREADS = {COMPUTE: "compute", COLLECTIVES: "collectives"}
MEASURED = "trace.json"  # `planc run --trace` writes ARTIFACT/MEASURED unless told another file
MEASURED_PID = 100  # in an exported file, measured rank r is pid MEASURED_PID + r
MAX_REPORT_BYTES = 256 << 20
MAX_TRACE_BYTES = 1 << 30
US = 1e6  # microseconds per second


# -- the format -------------------------------------------------------------------------------


def process(pid: int, name: str) -> list[dict]:
    """Metadata events naming a process and its two threads, sorted by pid in the viewer."""
    events = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
              {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
    return events + [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": thread}}
                     for tid, thread in THREADS.items()]


def complete(name: str, cat: str, ts_us: float, dur_us: float, pid: int, tid: int, args: dict) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "ts": ts_us, "dur": dur_us, "pid": pid, "tid": tid, "args": args}


def chrome_trace(events: list[dict], metadata: dict) -> dict:
    return {"traceEvents": events, "displayTimeUnit": "ms", "metadata": metadata}


def to_json(trace: dict) -> str:
    return json.dumps(trace, separators=(",", ":"))


def write(trace: dict, out: Path) -> Path:
    """Write `trace` to `out` atomically: a reader finds the old file or the whole new one."""
    return replace_file(out, to_json(trace))


# -- predicted ----------------------------------------------------------------------------------


def predicted(report: dict, hw: cost.Hardware, *, batch: int, context: int) -> dict:
    """planc.cost's decode step (cost.artifact_timeline) of the artifact whose report.json this is,
    at `batch` sequences of `context` cached tokens on `hw`; its length is cost.artifact_step's step_s."""
    events = []
    for rank, slots in enumerate(cost.artifact_timeline(report, hw, batch, context)):
        events += process(rank, f"rank {rank}")
        events += [_event(slot, batch, context) for slot in slots]
    step = cost.artifact_step(report, hw, batch, context)
    return chrome_trace(events, {"source": "predicted", "model": "planc.cost.artifact_timeline", "profile": hw.name,
                                 "batch": batch, "context": context, "world_size": len(report["per_rank"]),
                                 "step_s": step["step_s"]})


def _event(slot: cost.Slot, batch: int, context: int) -> dict:
    op, r, ts, dur = slot.op, slot.rank, slot.start * US, slot.seconds * US
    where = {"fqn": op["fqn"], "kind": op["kind"], "strategy": op["strategy"], "layer": op["layer"]}
    if slot.what == "compute":
        return complete(op["node"], "compute", ts, dur, r, COMPUTE,
                        {**where, "weight_bytes": op["weight_bytes"][r],
                         "kv_bytes": batch * context * op["kv_bytes_per_token"][r]})
    if slot.what == "wait":
        return complete("wait", "wait", ts, dur, r, COLLECTIVES, {"for": op["node"]})
    c = slot.collective
    return complete(op["node"], "collective", ts, dur, r, COLLECTIVES,
                    {**where, "op": c["op"], "calls": c["calls"], "logical_bytes": batch * cost.per_token(c),
                     "upper_bound": "bytes_per_token_max" in c})


# -- reading a trace ------------------------------------------------------------------------------


def summary(trace: dict) -> list[dict]:
    """Per process (rank) of a predicted or measured trace: seconds reading memory or computing
    (busy), waiting for other ranks at collectives, in collectives, and the end of its last span;
    `steps`: the decode steps it covers (a measured trace's args carry the step)."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    found: dict[int, dict] = {pid: {"pid": pid, "name": name, "busy_s": 0.0, "waiting_s": 0.0, "collectives_s": 0.0,
                                    "end_s": 0.0, "steps": set()} for pid, name in names.items()}
    key = {"compute": "busy_s", "wait": "waiting_s", "collective": "collectives_s"}
    for e in trace["traceEvents"]:
        if e["ph"] != "X":
            continue
        row = found[e["pid"]]
        row[key[e["cat"]]] += e["dur"] / US
        row["end_s"] = max(row["end_s"], (e["ts"] + e["dur"]) / US)
        row["steps"].add(e["args"].get("step", 0))
    return [{**row, "steps": len(row["steps"])} for _, row in sorted(found.items())]


def merge(predicted_trace: dict, measured_trace: dict) -> dict:
    """Both traces in one: the predicted ranks as they are, the measured ones as pids
    MEASURED_PID + rank; each process named for its source."""
    meta = predicted_trace["metadata"]
    label = f"predicted, {meta['profile']}, batch {meta['batch']}, {meta['context']:,} cached tokens"
    events = [_renamed(e, 0, label) for e in predicted_trace["traceEvents"]]
    events += [_renamed(e, MEASURED_PID, "measured") for e in measured_trace["traceEvents"]]
    return chrome_trace(events, {"predicted": meta, "measured": measured_trace.get("metadata", {}),
                                 "measured_pid_offset": MEASURED_PID})


def _renamed(event: dict, offset: int, label: str) -> dict:
    event = {**event, "pid": event["pid"] + offset}
    if event["name"] == "process_name":
        event["args"] = {"name": f"{event['args']['name']} ({label})"}
    elif event["name"] == "process_sort_index":
        event["args"] = {"sort_index": event["pid"]}
    return event


def export(artifact: Path, out: Path, profile: str = "H100", batch: int = 1, context: int = 32768,
           measured: Path | None = None) -> Path:
    """Write the artifact's predicted decode step on `profile` to `out`, merged with the measured
    steps of `measured` (default: ARTIFACT/trace.json, when `planc run --trace` wrote it there)."""
    artifact = Path(artifact)
    if profile not in cost.PROFILES:
        raise ValueError(f"profile {profile!r}: choose one of {', '.join(cost.PROFILES)}")
    if measured is not None and not Path(measured).is_file():
        raise ArtifactError(f"{measured}: no such trace; write one with `planc run {artifact} --trace {measured}`")
    measured = Path(measured) if measured is not None else artifact / MEASURED
    try:
        report = read_json(artifact / "report.json", MAX_REPORT_BYTES)
        trace = predicted(report, cost.PROFILES[profile], batch=batch, context=context)
        if measured.is_file():
            trace = merge(trace, read_json(measured, MAX_TRACE_BYTES))
    except ValueError as exc:
        raise ArtifactError(f"{exc}; recompile the artifact, or run it again with --trace") from None
    return write(trace, out)
