"""Runs of identical layers folded into one body (planc.ir.Run): a meta compile builds, binds,
rewrites and partitions a run's first layer alone, writes a loop over the run's layers into the
program, and reports every layer as the unfolded compile does. The folded program runs: on real
weights it gives the unfolded program's logits exactly. A rule whose glob tells a run's layers
apart unfolds the graph."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T

import planc.cost as cost
import planc.driver as driver
from planc.cost import decode_ops
from planc.codegen.artifact import Program, write_artifact
from planc.codegen.emit_program import emit_program
from planc.codegen.partition import model_tensors, partition
from planc.ir import NodeInfo, add_node, info, loop_misfit, runs
from planc.lift.glue import Scale
from planc.lift import lift
from planc.models.registry import load_model
from planc.plan import parse_plan_text
from planc.report.inspect import view
from planc.report.report import build_report, cache_specs
from planc.runtime.decode import generate
from planc.runtime.model import Model
from planc.runtime.threads import run_threads
from tests.lift.test_layouts import COMMON, build
from tests.lift.test_layouts import PLAN as LAYOUT_PLAN

# the bundled example plan, and T3 on the shared experts' down projections (which ep leaves replicated: declined)
PLAN = (Path(__file__).resolve().parents[2] / "plans" / "deepseek_mla_tp_ep.yaml").read_text() + """\
  - match: "model.layers.*.mlp.shared_experts.down_proj"
    overlap: {kind: t3}
"""


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """tiny-deepseek (a dense layer, then three MoE layers) compiled on meta, folded as compile
    folds it and unfolded (the lift told not to fold)."""
    out = tmp_path_factory.mktemp("fold")
    plan = parse_plan_text(PLAN, "plan.yaml")
    folded = driver.compile("tiny-deepseek", plan, out / "folded", meta=True)
    real = driver.lift
    driver.lift = lambda model, **kw: real(model, **{**kw, "fold": False})
    try:
        unfolded = driver.compile("tiny-deepseek", plan, out / "unfolded", meta=True)
    finally:
        driver.lift = real
    return folded, unfolded


def test_a_meta_compile_folds_the_moe_layers_into_one_loop(both):
    folded, unfolded = both
    program = folded.program
    assert "LAYERS_1_3 = ('model.layers.1', 'model.layers.2', 'model.layers.3')" in program
    assert re.search(r"\n    for layer in LAYERS_1_3:\n        x_\d+ = ops.rmsnorm\(h_\d+, W\[layer \+ '.input_layernorm.weight'\]", program)
    assert "caches[layer + '.self_attn']" in program and "'model.layers.2." not in program
    assert "'model.layers.2.self_attn.o_proj.weight'" in unfolded.program
    last = list(folded.report["graph_nodes"].values())[-1]
    assert {tuple(n["run"]) for n in last if "run" in n} == {(1, 3)}
    assert len(last) < len(list(unfolded.report["graph_nodes"].values())[-1])


@pytest.mark.parametrize("key", ["per_rank", "kv_width_per_rank", "collectives_per_decode_step", "collectives_per_prefill",
                                 "candidates", "approximate", "passes", "declines", "notes", "run_as_captured"])
def test_the_folded_report_reads_as_the_unfolded_one(both, key):
    folded, unfolded = both
    assert folded.report[key] == unfolded.report[key]


def test_decode_ops_are_every_layers_in_program_order(both):
    """A folded run's body is listed once (`run`) and read out layer by layer; node names aside
    (the folded body's variables serve every layer of the run), as the unfolded report lists them."""
    folded, unfolded = both
    assert {tuple(op["run"]) for op in folded.report["decode_ops"] if "run" in op} == {(1, 3)}
    strip = [[{k: v for k, v in op.items() if k not in ("node", "run")} for op in decode_ops(a.report)] for a in both]
    assert strip[0] == strip[1] and len(strip[0]) == len(unfolded.report["decode_ops"])
    assert decode_ops(unfolded.report) == unfolded.report["decode_ops"]


def test_the_cost_model_reads_the_folded_report_as_the_unfolded_one(both):
    folded, unfolded = both
    hw = cost.PROFILES["H100"]
    assert cost.artifact_step(folded.report, hw, 8, 4096) == cost.artifact_step(unfolded.report, hw, 8, 4096)


def test_inspect_shows_every_layer_of_a_folded_run(both):
    folded, unfolded = both
    a, b = view(folded.path), view(unfolded.path)
    assert a["grid"] == b["grid"] and a["picture"].runs == b["picture"].runs == [(0, 1), (1, 3)]


OTHERS = {  # GQA with a MoE (experts split over ranks), and OLMo's weightless LayerNorms run as captured
    "qwen3_moe": (lambda: T.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32), LAYOUT_PLAN + "  - match: \"model.layers.*.mlp\"\n"
                                                                                   "    moe: {strategy: ep}\n"),
    "olmo": (lambda: T.OlmoConfig(**COMMON), LAYOUT_PLAN),
}


@pytest.mark.parametrize("name", ["tiny-deepseek", *OTHERS])
def test_the_folded_program_on_real_weights_gives_the_unfolded_logits(tmp_path, name):
    """The meta compile's loop, run on the weights of the compile with weights (the same graph
    folded, so the same shards): every step's logits equal to the unfolded program's."""
    if name == "tiny-deepseek":
        plan, model = parse_plan_text(PLAN, "plan.yaml"), load_model("tiny-deepseek")
    else:
        config, text = OTHERS[name]
        plan, model = parse_plan_text(text, "plan.yaml"), build("", config=config())
    unfolded = driver.compile(model, plan, tmp_path / "unfolded").path
    graph, ctx = driver.parallelize(lift(model, check=False, fold=True), plan, model)
    assert runs(graph) and len({info(n).layer for n in graph.nodes if "planc" in n.meta}) < model.config.num_hidden_layers + 1
    ranks = partition(graph_unfolded := driver.parallelize(lift(model, check=False), plan, model)[0],
                      model_tensors(model, graph_unfolded), 2)
    manifest = json.loads((unfolded / "manifest.json").read_text())
    keep = {k: v for k, v in manifest.items() if k not in ("format_version", "programs", "files", "manifest_sha256")}
    program = emit_program(graph, model=name, world_size=2, plan_hash=plan.hash())
    assert "for layer in LAYERS_" in program
    assert cache_specs(graph) == cache_specs(graph_unfolded)
    folded = write_artifact(tmp_path / "folded", manifest=keep, programs={"target": Program(program, cache_specs(graph), ranks)},
                            report=build_report(graph, ctx, ranks, elem=4, checks=[], meta=False))
    prompts = [list(range(30, 45)), list(range(50, 58))]  # batched, one row left-padded
    got = [run_threads(lambda comm: generate(Model(str(a), comm=comm), prompts, 5, keep_logits=True), 2)[0]
           for a in (folded, unfolded)]
    assert got[0].tokens == got[1].tokens
    assert all(torch.equal(x, y) for x, y in zip(got[0].step_logits, got[1].step_logits))


def test_a_rule_telling_a_runs_layers_apart_unfolds_the_graph(tmp_path):
    plan = parse_plan_text(PLAN.replace('"model.layers.0.mlp"', '"model.layers.2.mlp"').replace(
        "mlp: {strategy: tp}", "moe: {strategy: replicated}"), "plan.yaml")
    artifact = driver.compile("tiny-deepseek", plan, tmp_path / "out", meta=True)
    assert "for layer in" not in artifact.program
    assert "'model.layers.2.mlp.gate'" not in artifact.program and "'model.layers.3.mlp.gate'" in artifact.program


def _misfit_after(graph):
    """A folded graph whose layer-1 body is split by a node of no layer (what a pass inserting one
    outside the layer would leave)."""
    body = [n for n in graph.nodes if "planc" in n.meta and info(n).layer == 1]
    with graph.inserting_after(body[2]):
        stray = add_node(graph, "scale", (body[2],), NodeInfo(kind="scale", dims=Scale("mul", 1.0)))
    body[2].replace_all_uses_with(stray, delete_user_cb=lambda user: user is not stray)
    return graph


def test_a_body_no_loop_can_run_is_named_and_the_compile_unfolds_it(tmp_path, monkeypatch):
    model = load_model("tiny-deepseek", meta=True)
    plan = parse_plan_text(PLAN, "plan.yaml")
    graph, _ = driver.parallelize(lift(model, check=False, fold=True), plan, model, meta=True)
    assert loop_misfit(graph) is None
    assert loop_misfit(_misfit_after(graph)) == "layer 1's nodes are not one stretch of the graph"
    real = driver.run_passes

    def passes_leaving_a_misfit(*args):
        done = real(*args)
        return _misfit_after(done) if runs(done) else done

    monkeypatch.setattr(driver, "run_passes", passes_leaving_a_misfit)
    artifact = driver.compile("tiny-deepseek", plan, tmp_path / "out", meta=True)
    assert "for layer in" not in artifact.program and "'model.layers.3.self_attn.o_proj.weight'" in artifact.program
