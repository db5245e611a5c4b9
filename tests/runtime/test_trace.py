"""`planc run --trace`: the program's forward stamps its nodes only when traced; a real 2-rank run
writes one Chrome trace with every rank's node spans and collectives, beside an artifact that
still opens."""
from __future__ import annotations

import ast
import json
import shutil
from collections import defaultdict

import pytest

from planc.cli import main
from planc.errors import RunError
from planc.report import timeline
from planc.runtime.artifact import ArtifactDir, open_artifact
from planc.runtime.comm import Comm
from planc.runtime.trace import CALL, COMM_OPS, HOOK, NODE, Tracer, measured_trace
from tests.report.chrome import threads

PROGRAM = '''
def forward(rt, ids, step):
    """doc"""
    ops, comm = rt
    x = ids + 1
    y = comm(x)
    return y
'''


def test_forward_stamps_each_node_and_its_return_only_in_traced_phases():
    comm = Comm.single()
    tracer = Tracer(comm)
    module = {HOOK: tracer.mark}
    exec(compile(tracer.instrument(ast.parse(PROGRAM)), "program.py", "exec"), module)
    assert tracer.nodes == ["x", "y"]
    module["forward"]((None, lambda v: v * 2), 1, None)  # phase "default": not a decode step
    assert tracer.rows().shape == (0, 6)
    for _ in range(2):
        with comm.phase("decode"):
            assert module["forward"]((None, lambda v: v * 2), 1, None) == 4
    rows = tracer.rows().tolist()
    assert [(kind, step, k) for kind, step, k, *_ in rows] == [(NODE, 1, 0), (NODE, 1, 1), (NODE, 2, 0), (NODE, 2, 1)]
    assert all(0 <= start <= end for *_, start, end, _ in rows)


def test_an_untraced_program_is_the_compiled_one(compiled):
    forward = ArtifactDir(compiled("deepseek_mla_tp_ep.yaml", 2)).load_module("programs/target/program.py", "p").forward
    assert HOOK not in forward.__code__.co_names


def test_a_node_holding_a_collective_waits_for_the_last_rank_to_reach_it():
    """Rank 1 reaches the all-reduce node 3 us after rank 0: rank 0 waits 3 us, then both are in it."""
    ar = COMM_OPS.index("all_reduce")
    rows = [[[NODE, 1, 0, 0, 5_000, 0], [NODE, 1, 1, 5_000, 12_000, 0], [CALL, 0, ar, 5_500, 11_000, 64]],
            [[NODE, 1, 0, 0, 8_000, 0], [NODE, 1, 1, 8_000, 12_500, 0], [CALL, 0, ar, 8_200, 12_000, 64]]]
    trace = measured_trace(rows, ["a", "ar"], {})
    found = threads(trace)
    assert [(e["name"], e["ts"], e["dur"]) for e in found[(0, timeline.COLLECTIVES)]] == [("wait", 5.0, 3.0),
                                                                                         ("ar", 8.0, 4.0)]
    assert [(e["name"], e["ts"], e["dur"]) for e in found[(1, timeline.COLLECTIVES)]] == [("ar", 8.0, 4.5)]
    assert found[(1, timeline.COLLECTIVES)][0]["args"] == {"step": 1, "op": "all_reduce", "calls": 1,
                                                          "logical_bytes": 64, "in_comm_us": 3.8}
    assert [e["name"] for e in found[(0, timeline.COMPUTE)]] == ["a"]


def test_a_trace_file_in_a_missing_directory_is_refused_before_any_rank_starts(compiled, tmp_path):
    from planc.run import run

    with pytest.raises(RunError, match="--trace .*missing/t.json: .*missing is not a directory this process can"):
        run(compiled("deepseek_mla_tp_ep.yaml", 2), trace=tmp_path / "missing" / "t.json")


def test_planc_run_trace_writes_every_ranks_decode_steps_beside_the_artifact(compiled, tmp_path, capsys):
    copy = shutil.copytree(compiled("deepseek_mla_tp_ep.yaml", 2), tmp_path / "art")
    assert main(["run", str(copy), "--max-new-tokens", "4", "--trace", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    path = copy / timeline.MEASURED
    assert result["trace"] == {"file": str(path), "decode_steps": 3, "events": result["trace"]["events"]}
    open_artifact(copy)  # a trace beside the artifact's files breaks none of its checks
    report = json.loads((copy / "report.json").read_text())
    assert {op: c["calls"] for op, c in result["collectives_per_decode_step"].items()} == {
        op: e["calls"] for op, e in report["collectives_per_decode_step"].items()}  # tracing adds none to decode

    found = threads(json.loads(path.read_text()))
    assert {pid for pid, _ in found} == {0, 1}
    final = list(report["graph_nodes"].values())[-1]
    program = [n["name"] for n in final if n["kind"] not in ("placeholder", "output")]
    moving = {op["node"]: op["collectives"][0] for op in report["decode_ops"] if op["collectives"]}
    batch = len(result["tokens"])
    for rank in range(2):
        spans = defaultdict(list)
        for tid in (timeline.COMPUTE, timeline.COLLECTIVES):
            for e in found[(rank, tid)]:
                if e["cat"] != "wait":
                    spans[e["args"]["step"]].append(e)
        assert sorted(spans) == [1, 2, 3]
        for events in spans.values():
            assert sorted(e["name"] for e in events) == sorted(program)  # every node once per step
            collectives = {e["name"]: e["args"] for e in events if e["cat"] == "collective"}
            assert set(collectives) == set(moving)
            for name, args in collectives.items():
                assert args["op"] == moving[name]["op"]
                if "bytes_per_token" in moving[name]:  # all-to-all volume follows the routing
                    assert args["logical_bytes"] == batch * moving[name]["bytes_per_token"]
