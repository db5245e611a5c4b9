"""The TP / EP passes: graph rewrites (golden text), purity, divisibility errors."""
from __future__ import annotations

import pytest

from planc.bind import bind
from planc.driver import PASSES
from planc.errors import PlanError
from planc.lift import lift
from planc.models.registry import load_model
from planc.passmanager import PassContext, run_passes
from planc.plan import parse_plan_text
from tests.conftest import PLANS


@pytest.fixture(scope="module")
def lifted_deepseek():
    model = load_model("tiny-deepseek")
    return lift(model, check=False).graph


def _plan(devices: int, name: str = "deepseek_mla_tp_ep.yaml"):
    text = (PLANS / name).read_text().replace("devices: 2", f"devices: {devices}")
    return parse_plan_text(text, "plan.yaml")


def _layer(graph_text: str, layer: int) -> list[str]:
    """The op names of one layer, in order (golden text without node numbering)."""
    ops = []
    for line in graph_text.splitlines():
        if "call_function" in line:
            ops.append(line.split("target=planc.ir.")[1].split("]")[0])
    return ops


def test_golden_ep_layer(lifted_deepseek):
    plan = _plan(2)
    ctx = PassContext(plan, 2)
    out = run_passes(bind(lifted_deepseek, plan), PASSES, ctx)
    ops = _layer(str(out), 1)
    moe_layer = ops[ops.index("moe_route") - 5: ops.index("moe_route") + 7]
    assert moe_layer == ["rmsnorm", "mla_attention", "all_reduce", "add", "rmsnorm", "moe_route", "all_to_all",
                         "moe_experts", "all_to_all", "moe_combine", "all_gather_varlen", "add"]
    assert [g for g, _ in ctx.graphs] == ["lift", "mla_tp", "tpla", "attention_tp", "dense_tp", "ep"]


def test_passes_do_not_mutate_their_input(lifted_deepseek):
    before = str(lifted_deepseek)
    plan = _plan(2)
    run_passes(bind(lifted_deepseek, plan), PASSES, PassContext(plan, 2))
    assert str(lifted_deepseek) == before


def test_every_rewrite_is_recorded(lifted_deepseek):
    plan = _plan(4)
    ctx = PassContext(plan, 4)
    run_passes(bind(lifted_deepseek, plan), PASSES, ctx)
    applied = {(r.pass_name, r.target) for r in ctx.records if r.action == "applied"}
    assert ("mla_tp", "model.layers.3.self_attn") in applied
    assert ("dense_tp", "model.layers.0.mlp") in applied
    assert ("ep", "model.layers.2.mlp") in applied
    assert len(applied) == 4 + 1 + 3


def test_experts_not_divisible(lifted_deepseek):
    text = (PLANS / "deepseek_mla_tp_ep.yaml").read_text().replace("devices: 2", "devices: 4").replace(
        "attention: {strategy: mla_tp}", "attention: {strategy: replicated}").replace(
        'match: "model.layers.0.mlp"\n    mlp: {strategy: tp}', 'match: "model.layers.0.mlp"\n    mlp: {strategy: replicated}')
    plan = parse_plan_text(text.replace("devices: 4", "devices: 3"), "plan.yaml")
    with pytest.raises(PlanError, match=r"8 experts evenly on 3 devices; valid degrees: 1, 2, 4, 8"):
        run_passes(bind(lifted_deepseek, plan), PASSES, PassContext(plan, 3))


def test_gqa_valid_degrees():
    from planc.passes.attention_tp import valid_degrees

    assert valid_degrees(4, 2) == [1, 2, 4]
    assert valid_degrees(8, 4) == [1, 2, 4, 8]
    assert valid_degrees(6, 3) == [1, 3, 6]
