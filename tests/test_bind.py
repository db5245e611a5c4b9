"""bind: rules to nodes by module-FQN glob, first fitting rule wins, unmatched rules are errors."""
from __future__ import annotations

import pytest

from planc.bind import bind, matching
from planc.errors import PlanError
from planc.ir import info, nodes_of
from planc.plan import parse_plan_text
from tests.passes.blocks import compiled, lifted, plan


def test_a_glob_over_projection_fqns_finds_the_linear_nodes():
    found = matching(lifted("tiny-deepseek"), "model.layers.*.self_attn.o_proj", ("linear",))
    assert [info(n).fqn for n in found] == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    assert all(info(n).block == f"model.layers.{i}.self_attn" for i, n in enumerate(found))


def test_compiled_graph_shows_each_o_proj_as_a_linear_followed_by_its_all_reduce():
    graph, _, _ = compiled("tiny-deepseek", plan(2, 'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}'))
    for o_proj in matching(graph, "model.layers.*.self_attn.o_proj", ("linear",)):
        (user,) = o_proj.users
        assert info(user).kind == "all_reduce" and info(user).fqn == info(o_proj).fqn


def test_first_fitting_rule_wins_and_records_where_it_is():
    text = plan(2, 'match: "model.layers.1.self_attn"\n    attention: {strategy: replicated}',
                'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}')
    graph = bind(lifted("tiny-deepseek"), parse_plan_text(text, "plan.yaml"))
    rules = {info(n).fqn: info(n).rule for n in nodes_of(graph, "mla_attention")}
    assert rules["model.layers.1.self_attn"].index == 0 and rules["model.layers.2.self_attn"].index == 1
    assert rules["model.layers.2.self_attn"].where == "plan.yaml:7:5"


def test_a_rule_that_binds_nothing_is_an_error_listing_the_candidates():
    text = plan(2, 'match: "model.layers.*.attn"\n    attention: {strategy: mla_tp}')
    with pytest.raises(PlanError, match=r"plan.yaml:5:5: rules\[0\].match 'model.layers.\*.attn' bound no attention "
                                        r"block \(no module matches\). attention blocks in this model: model.layers.0.self_attn"):
        bind(lifted("tiny-deepseek"), parse_plan_text(text, "plan.yaml"))


def test_rules_bind_per_section_so_an_overlap_rule_takes_a_projection_an_attention_rule_splits():
    text = plan(2, 'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}',
                'match: "model.layers.*.self_attn.o_proj"\n    overlap: {kind: t3}')
    graph = bind(lifted("tiny-deepseek"), parse_plan_text(text, "plan.yaml"))
    o_proj = next(n for n in nodes_of(graph, "linear") if info(n).fqn == "model.layers.1.self_attn.o_proj")
    core = next(n for n in nodes_of(graph, "mla_attention") if info(n).fqn == "model.layers.1.self_attn")
    assert [(r.index, r.section) for r in info(o_proj).bindings] == [(1, "overlap")]
    assert [(r.index, r.section) for r in info(core).bindings] == [(0, "attention")]
    again = text + '  - match: "model.layers.1.self_attn.o_proj"\n    overlap: {kind: t3}\n'
    with pytest.raises(PlanError, match=r"rules\[2\].match 'model.layers.1.self_attn.o_proj' bound no overlap block "
                                        r"\(an earlier rule already took every match\)"):
        bind(lifted("tiny-deepseek"), parse_plan_text(again, "plan.yaml"))
