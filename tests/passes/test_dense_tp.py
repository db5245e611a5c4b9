"""dense tp: gate/up column-parallel, down row-parallel, one all-reduce; also for shared experts."""
from __future__ import annotations

import pytest
import torch

from planc.errors import CompileError
from planc.ir import format_graph
from planc.ops import Ops
from planc.weights import scoped
from tests.passes.blocks import compiled, model, plan, run_block

MLP = 'match: "model.layers.0.mlp"\n    mlp: {strategy: tp}'


@pytest.mark.parametrize("devices", [2, 4])
def test_shards_sum_to_the_mlp(devices):
    graph, _, ranks = compiled("tiny-deepseek", plan(devices, MLP))
    x = torch.randn(2, 5, model("tiny-deepseek").config.hidden_size)
    got, _, _ = run_block(graph, ranks, "model.layers.0.mlp", x)
    W = scoped(dict(model("tiny-deepseek").named_parameters()), "model.layers.0.mlp")
    torch.testing.assert_close(got, Ops().mlp(x, W, "silu"), rtol=1e-5, atol=1e-5)


def test_shared_experts_split_by_a_rule_of_their_own():
    rule = 'match: "model.layers.*.mlp.shared_experts"\n    mlp: {strategy: tp}'
    graph, ctx, _ = compiled("tiny-deepseek", plan(2, rule))
    assert sum(r.action == "applied" for r in ctx.records) == 3
    assert "shared_experts.down_proj  tp rules[0]  layout=row" in format_graph(graph)


def test_width_that_does_not_split_is_declined():
    width = model("tiny-deepseek").config.intermediate_size
    with pytest.raises(CompileError, match=f"intermediate size {width} does not split over 3 devices"):
        compiled("tiny-deepseek", plan(3, MLP))
