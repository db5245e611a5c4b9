"""What every Chrome trace planc writes must satisfy, predicted or measured."""
from __future__ import annotations

import json
from collections import defaultdict

EPS_US = 1e-6  # ts and dur are floats of microseconds: adjacent spans may meet a rounding error apart
KEYS = {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"}


def threads(trace: dict) -> dict[tuple[int, int], list[dict]]:
    """The complete events of each (pid, tid), in file order, after checking the trace is valid:
    JSON-serializable, every X event complete, every pid named "rank N" with threads compute and
    collectives, and on each thread ts non-decreasing and spans that do not overlap."""
    trace = json.loads(json.dumps(trace))
    assert trace["displayTimeUnit"] == "ms"
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    names = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    found: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "M":
            continue
        assert e["ph"] == "X" and KEYS <= set(e), e
        assert isinstance(e["name"], str) and e["ts"] >= 0 and e["dur"] >= 0, e
        found[(e["pid"], e["tid"])].append(e)
    for (pid, tid), events in found.items():
        assert names[pid].startswith(f"rank {pid % 100}")
        assert thread_names[(pid, tid)] == {0: "compute", 1: "collectives"}[tid]
        for before, after in zip(events, events[1:]):
            assert before["ts"] <= after["ts"], (before, after)
            assert before["ts"] + before["dur"] <= after["ts"] + EPS_US, (before, after)
    return dict(found)
