"""replicated: a rule can pin blocks whole that a later, broader rule would split."""
from __future__ import annotations

from planc.ir import info, nodes_of
from tests.passes.blocks import compiled, plan


def test_pinned_block_stays_whole_and_the_rest_is_split():
    graph, ctx, ranks = compiled("tiny-deepseek", plan(
        2, 'match: "model.layers.0.self_attn"\n    attention: {strategy: replicated}',
        'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}'))
    strategies = {info(n).fqn: info(n).strategy for n in nodes_of(graph, "mla_attention")}
    assert strategies == {"model.layers.0.self_attn": "replicated", **{f"model.layers.{i}.self_attn": "mla_tp" for i in (1, 2, 3)}}
    assert [(r.pass_name, r.target) for r in ctx.records][0] == ("replicated", "model.layers.0.self_attn")
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert ranks[0][name].shape == ranks[1][name].shape and ranks[0][name].equal(ranks[1][name])
