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
