"""Declines: recorded and printed by default, an error with file:line:column under required or strict."""
from __future__ import annotations

import json

import pytest

import planc.report.inspect as inspect
from planc.driver import compile
from planc.errors import CompileError
from tests.passes.blocks import plan

ATTN = 'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp%s}'


def test_required_rule_that_a_pass_declines_fails_with_its_location(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan(3, ATTN % ", required: true"))
    with pytest.raises(CompileError, match=rf"{path}:5:5: rules\[0\]: mla_tp declined on model.layers.0.self_attn "
                                           r"\(required: true\): 4 heads do not split over 3 devices"):
        compile("tiny-deepseek", path, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_the_same_rule_without_required_compiles_and_reports_the_decline(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan(3, ATTN % ""))
    lines: list[str] = []
    art = compile("tiny-deepseek", path, tmp_path / "art", log=lines.append)
    report = json.loads((art.path / "report.json").read_text())
    assert [d["target"] for d in report["declines"]] == [f"model.layers.{i}.self_attn" for i in range(4)]
    assert report["declines"][0]["rule"] == 0 and "valid degrees: 1, 2, 4" in report["declines"][0]["detail"]
    declined = [l for l in lines if l.startswith("declined ")]  # four blocks, one reason: one line
    assert len(declined) == 1 and declined[0].startswith("declined mla_tp on model.layers.0.self_attn (rules[0]): 4 heads")
    assert declined[0].endswith("(the same for 3 more: model.layers.1.self_attn, model.layers.2.self_attn, "
                                "model.layers.3.self_attn)")
    assert "collectives_per_decode_step" in report and report["collectives_per_decode_step"] == {}  # all replicated
    page = inspect.render(art.path)
    assert "4 declined rewrite(s)" in page and "4 heads do not split over 3 devices" in page
    with pytest.raises(CompileError, match=r"\(strict mode\)"):
        compile("tiny-deepseek", path, tmp_path / "art2", strict=True)


def test_report_keeps_every_intermediate_graph_as_json_nodes(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan(2, ATTN % ""))
    report = compile("tiny-deepseek", path, tmp_path / "art").report
    assert list(report["graph_nodes"]) == ["lift", "mla_tp"]  # one graph after each pass that ran
    final = {n["name"]: n for n in report["graph_nodes"]["mla_tp"]}
    o_proj = next(n for n in final.values() if n.get("fqn") == "model.layers.3.self_attn.o_proj" and n["kind"] == "linear")
    assert o_proj["strategy"] == "mla_tp" and o_proj["rule"] == 0 and o_proj["shard"]["layout"] == "row"
    assert set(o_proj) == {"name", "kind", "fqn", "block", "layer", "strategy", "rule", "why", "shard", "args"}


def test_declines_group_by_pass_rule_and_reason():
    from planc.report.report import decline_lines

    lines = decline_lines([("ep", f"model.layers.{i}.mlp", " (rules[1])", "no profile") for i in range(1, 7)]
                          + [("ep", "model.layers.7.mlp", " (rules[2])", "no profile"),
                             ("t3", "model.layers.1.mlp", " (rules[1])", "no profile")])
    assert lines == ["declined ep on model.layers.1.mlp (rules[1]): no profile (the same for 5 more: "
                     "model.layers.2.mlp, model.layers.3.mlp, model.layers.4.mlp and 2 more)",
                     "declined ep on model.layers.7.mlp (rules[2]): no profile",
                     "declined t3 on model.layers.1.mlp (rules[1]): no profile"]


def test_candidates_in_a_row_with_the_same_decision_print_as_one_line():
    from planc.report.report import candidate_lines

    def rule(i: int) -> dict:
        return {"target": f"l{i}.o_proj", "status": "no rule", "detail": f"no overlap rule matches l{i}.o_proj"}

    found = {"t3": [rule(0), rule(1), rule(2), {"target": "l3.o_proj", "status": "fused", "detail": "2 pieces"}, rule(4)]}
    assert candidate_lines(found) == [
        "t3       l0.o_proj: no rule: no overlap rule matches l0.o_proj (the same for 2 more: l1.o_proj, l2.o_proj)",
        "t3       l3.o_proj: fused: 2 pieces",
        "t3       l4.o_proj: no rule: no overlap rule matches l4.o_proj"]
