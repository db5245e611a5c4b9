"""The bench cases on small settings: the compile case times a whole meta compile of each depth
asked for, and the decode case's collectives per step equal the compile-time report's (calls
exactly, ring bytes exactly)."""
from __future__ import annotations

import json

import pytest

from planc.bench import compile as compile_case
from planc.bench import decode as decode_case
from planc.plan import load_plan


def test_compile_case_times_a_meta_compile_of_the_depth_asked_for(tmp_path):
    sample = compile_case.time_compile(5, load_plan(compile_case.PLAN), tmp_path / "art")
    assert set(compile_case.STAGES) <= set(sample)  # every stage closed by a driver log line, none missing
    assert sum(sample[s] for s in compile_case.STAGES) == pytest.approx(sample["total"])  # no second left out
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert manifest["meta"] and manifest["world_size"] == 8 and not (tmp_path / "art" / "weights").exists()
    assert {r["kv_bytes_per_token"] for r in report["per_rank"]} == {5 * 576 * 2}  # 5 layers of bf16 MLA latent
    assert report["compile_seconds"] < sample["total"]


def test_compile_case_reports_each_depth():
    result = compile_case.run(layers=(4, 5), repeats=1)
    assert (result["case"], result["layers"], result["repeats"], result["devices"]) == ("compile", [4, 5], [1, 1], 8)
    assert [len(s) for s in result["samples"]] == [1, 1] and result["seconds"] == [s[0] for s in result["samples"]]
    assert [set(stages) for stages in result["stages"]] == [set(compile_case.STAGES)] * 2
    assert result["growth"] == [None, pytest.approx(result["seconds"][1] / result["seconds"][0] - 1)]
    json.dumps(result)
    assert [line.split()[0] for line in compile_case.table(result).splitlines()[2:4]] == ["4", "5"]


def test_compile_case_rejects_a_depth_with_no_moe_layer():
    with pytest.raises(ValueError, match="first 3 layers are dense"):
        compile_case.run(layers=(3, 4), repeats=1)


def test_decode_collectives_per_step_match_report(compiled):
    artifacts = {n: compiled("deepseek_mla_tp_ep.yaml", n) for n in (1, 2)}
    result = decode_case.summarize(decode_case.measure(artifacts, max_new_tokens=4, repeats=1), artifacts, 4)
    batch = len(result["prompts"])
    for n, path in artifacts.items():
        predicted = json.loads((path / "report.json").read_text())["collectives_per_decode_step"]
        measured = result["collectives_per_decode_step"][str(n)]
        assert {op: c["calls"] for op, c in measured.items()} == {op: c["calls"] for op, c in predicted.items()}
        for op in ("all_reduce", "all_gather_varlen"):  # routing-independent: exact
            assert measured[op]["bytes"] == predicted[op]["bytes_per_token"] * batch
        assert measured["all_to_all"]["bytes"] <= predicted["all_to_all"]["bytes_per_token_max"] * batch
    assert result["collectives_per_decode_step"]["2"]["all_reduce"]["bytes"] > 0
    assert all(v > 0 for v in result["tokens_per_s"].values()) and result["ratio_vs_1_rank"]["1"] == 1.0
    assert result["same_tokens_as_fewest_ranks"] == {"1": True, "2": True}
    assert result["calls_match_report"] == {"1": True, "2": True}
    json.dumps(result)
    assert "all_to_all" in decode_case.table(result)


def test_decode_retarget_changes_only_the_device_count():
    from planc.plan import load_plan

    plan = load_plan(decode_case.PLAN)
    assert plan.mesh.devices != 4
    retargeted = decode_case.retarget(4)
    assert retargeted.mesh.devices == 4 and retargeted.rules == plan.rules and retargeted.model == plan.model
