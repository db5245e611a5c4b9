"""The predicted decode step as a Chrome trace: valid, as long as cost.artifact_step's step,
collectives at one time on every rank; report.json's decode_ops add up to its per-rank figures."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from planc import cost
from planc.errors import ArtifactError
from planc.report import timeline
from tests.report.chrome import threads

CONTEXT = 32768


@pytest.fixture(scope="module")
def artifact(compiled):
    return compiled("deepseek_mla_tp_ep.yaml", 2)


@pytest.fixture(scope="module")
def report(artifact) -> dict:
    return json.loads((artifact / "report.json").read_text())


def test_decode_ops_add_up_to_the_per_rank_figures_in_program_order(report):
    ops = report["decode_ops"]
    for r in report["per_rank"]:
        assert sum(op["weight_bytes"][r["rank"]] for op in ops) == r["weight_bytes"]
        assert sum(op["kv_bytes_per_token"][r["rank"]] for op in ops) == r["kv_bytes_per_token"]
    calls, moved = Counter(), Counter()
    for op in ops:
        for c in op["collectives"]:
            calls[c["op"]] += c["calls"]
            moved[c["op"]] += cost.per_token(c)
    listed = report["collectives_per_decode_step"]
    assert calls == {op: e["calls"] for op, e in listed.items()}
    assert moved == {op: cost.per_token(e) for op, e in listed.items()}
    program = [n["name"] for n in list(report["graph_nodes"].values())[-1]]
    assert [op["node"] for op in ops] == [name for name in program if name in {op["node"] for op in ops}]
    assert {op["kind"] for op in ops if op["kv_bytes_per_token"][0]} == {"mla_attention"}


@pytest.mark.parametrize("profile, batch", [("H100", 1), ("H800", 64)])
def test_predicted_trace_is_valid_and_as_long_as_the_predicted_step(report, profile, batch):
    hw = cost.PROFILES[profile]
    trace = timeline.predicted(report, hw, batch=batch, context=CONTEXT)
    found = threads(trace)
    assert set(found) == {(r, tid) for r in range(2) for tid in (timeline.COMPUTE, timeline.COLLECTIVES)}
    step = cost.artifact_step(report, hw, batch, CONTEXT)["step_s"]
    end = max(e["ts"] + e["dur"] for events in found.values() for e in events)
    assert end / 1e6 == pytest.approx(step, rel=1e-12) and trace["metadata"]["step_s"] == step
    attention = next(e for e in found[(0, timeline.COMPUTE)] if e["args"]["kind"] == "mla_attention")
    assert attention["args"]["kv_bytes"] == batch * CONTEXT * 320  # one layer's latent + rope, fp32, on one rank


def test_collectives_start_and_end_together_on_every_rank(report):
    trace = timeline.predicted(report, cost.PROFILES["H100"], batch=8, context=CONTEXT)
    found = threads(trace)
    rank0, rank1 = ([(e["name"], e["ts"], e["dur"]) for e in found[(r, timeline.COLLECTIVES)]
                     if e["cat"] == "collective"] for r in range(2))
    assert rank0 == rank1
    names = [op["node"] for op in report["decode_ops"] for _ in op["collectives"]]
    assert [name for name, _, _ in rank0] == names


def _op(node: str, weights: list[int], collectives: tuple = ()) -> dict:
    return {"node": node, "kind": "linear", "fqn": f"model.{node}", "layer": 0, "strategy": "tp",
            "weight_bytes": weights, "kv_bytes_per_token": [0, 0], "collectives": list(collectives)}


def test_a_rank_waits_at_a_collective_for_the_slowest():
    """Rank 1 is slow before the all-reduce, rank 0 after it: each waits in turn, and the summary's
    busy + waiting + collectives is each rank's end."""
    hw = cost.Hardware("toy", flops=1.0, mem_bw=1e6, mem_bytes=1e9, link_bw=1e6, latency=1e-6)
    ar = {"op": "all_reduce", "calls": 1, "bytes_per_token": 10}
    report = {"per_rank": [{"rank": r, "weight_bytes": 300, "kv_bytes_per_token": 0} for r in range(2)],
              "decode_ops": [_op("a", [100, 200]), _op("ar", [0, 0], (ar,)), _op("b", [200, 100]),
                             _op("ar_1", [0, 0], (ar,))]}
    found = threads(timeline.predicted(report, hw, batch=1, context=0))
    waits = {r: [(e["args"]["for"], e["ts"], e["dur"]) for e in found[(r, timeline.COLLECTIVES)] if e["cat"] == "wait"]
             for r in range(2)}
    assert waits[0] == [("ar", 100.0, pytest.approx(100.0))]
    assert waits[1] == [("ar_1", pytest.approx(311.0), pytest.approx(100.0))]
    rows = timeline.summary(timeline.predicted(report, hw, batch=1, context=0))
    for row in rows:
        assert row["busy_s"] == pytest.approx(300e-6) and row["waiting_s"] == pytest.approx(100e-6)
        assert row["collectives_s"] == pytest.approx(2 * 11e-6)
        assert row["busy_s"] + row["waiting_s"] + row["collectives_s"] == pytest.approx(row["end_s"])
    assert rows[0]["end_s"] == pytest.approx(cost.artifact_step(report, hw, 1, 0)["step_s"])


def test_export_merges_the_measured_trace_from_its_default_place(report, artifact, tmp_path):
    measured = {"traceEvents": timeline.process(0, "rank 0") + timeline.process(1, "rank 1") + [
        timeline.complete("h", "compute", 0.0, 5.0, r, timeline.COMPUTE, {"step": 1}) for r in range(2)],
        "displayTimeUnit": "ms", "metadata": {"source": "measured"}}
    copy = tmp_path / "art"
    copy.mkdir()
    shutil.copy(artifact / "report.json", copy / "report.json")
    alone = json.loads(timeline.export(copy, tmp_path / "alone.json").read_text())
    assert {e["pid"] for e in alone["traceEvents"]} == {0, 1}
    (copy / timeline.MEASURED).write_text(timeline.to_json(measured))
    merged = json.loads(timeline.export(copy, tmp_path / "both.json", profile="H800", batch=4).read_text())
    found = threads(merged)
    assert {pid for pid, _ in found} == {0, 1, timeline.MEASURED_PID, timeline.MEASURED_PID + 1}
    names = {e["pid"]: e["args"]["name"] for e in merged["traceEvents"] if e["name"] == "process_name"}
    assert names[101] == "rank 1 (measured)" and names[0] == "rank 0 (predicted, H800, batch 4, 32,768 cached tokens)"
    assert merged["metadata"]["predicted"]["batch"] == 4 and merged["metadata"]["measured"] == {"source": "measured"}
    assert [row["pid"] for row in timeline.summary(merged)] == [0, 1, 100, 101]


def test_export_refuses_what_it_cannot_read(artifact, tmp_path):
    with pytest.raises(ValueError, match="profile 'B200': choose one of H100, H800, H200, A100"):
        timeline.export(artifact, tmp_path / "t.json", profile="B200")
    with pytest.raises(ArtifactError, match="no such trace; write one with `planc run"):
        timeline.export(artifact, tmp_path / "t.json", measured=tmp_path / "missing.json")
    with pytest.raises(ArtifactError, match="report.json: cannot read it"):
        timeline.export(tmp_path, tmp_path / "t.json")
