"""moe tp: every expert's intermediate dim split, the router whole, one all-reduce after the block."""
from __future__ import annotations

import pytest
import torch

from planc.dims import CLAMPED_GLU, ExpertsLayout, MoeDims, RouterDims
from planc.errors import CompileError
from planc.ir import NodeInfo, format_graph, info
from planc.ops import Ops
from planc.passes.moe_tp import ExpertSlices
from tests.passes.blocks import compiled, leaves_lifted_graph_alone, model, plan, ranks_reproduce

MOE = 'match: "model.layers.*.mlp"\n    moe: {strategy: tp}'
DENSE = 'match: "model.layers.0.mlp"\n    mlp: {strategy: replicated}'
SHARED = 'match: "model.layers.*.mlp.shared_experts"\n    mlp: {strategy: tp}'


def test_rewrite_golden():
    graph, ctx, _ = compiled("tiny-deepseek", plan(2, DENSE, MOE))
    layer = [line for line in format_graph(graph).splitlines() if "layers.1.mlp" in line]
    assert [line.split(" = ")[1].split("(")[0] for line in layer] == [
        "moe", "all_reduce", "linear", "linear", "mlp", "linear"]
    assert "tp rules[1]  intermediate_per_rank=32" in layer[0]
    assert sum(r.action == "applied" for r in ctx.records if r.pass_name == "moe_tp") == 3


def test_pass_does_not_mutate_its_input():
    leaves_lifted_graph_alone("tiny-deepseek", lambda: compiled("tiny-deepseek", plan(2, DENSE, MOE)))


@pytest.mark.parametrize("devices", [2, 4])
def test_ranks_reproduce_the_moe_block(devices):
    graph, _, ranks = compiled("tiny-deepseek", plan(devices, DENSE, MOE))
    ranks_reproduce(graph, ranks, "tiny-deepseek", "model.layers.2.mlp")


def test_routed_and_shared_experts_both_split_sum_their_partials_before_one_all_reduce():
    graph, _, ranks = compiled("tiny-deepseek", plan(2, DENSE, SHARED, MOE))
    reduces = [n for n in graph.nodes if "planc" in n.meta and info(n).kind == "all_reduce"]
    assert [info(n).block for n in reduces] == [f"model.layers.{i}.mlp" for i in (1, 2, 3)]  # one per MoE layer
    assert {info(n.args[0]).kind for n in reduces} == {"add"}  # of routed + shared
    ranks_reproduce(graph, ranks, "tiny-deepseek", "model.layers.3.mlp")


def test_every_rank_holds_a_slice_of_every_expert_and_the_whole_router():
    _, _, ranks = compiled("tiny-deepseek", plan(4, DENSE, MOE))
    params = dict(model("tiny-deepseek").named_parameters())
    gate_up, down = (params[f"model.layers.1.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj"))
    for r, W in enumerate(ranks):
        assert torch.equal(W["model.layers.1.mlp.experts.gate_up_proj"],
                           torch.cat([gate_up[:, 16 * r:16 * (r + 1)], gate_up[:, 64 + 16 * r:64 + 16 * (r + 1)]], 1))
        assert torch.equal(W["model.layers.1.mlp.experts.down_proj"], down[:, :, 16 * r:16 * (r + 1)])
        assert torch.equal(W["model.layers.1.mlp.gate.weight"], params["model.layers.1.mlp.gate.weight"])


GPT_OSS = ExpertsLayout(transposed=True, interleaved=True, bias=True, limit=0.5, alpha=1.702)


@pytest.mark.parametrize("layout", [ExpertsLayout(), GPT_OSS], ids=["common", "gpt_oss"])
@pytest.mark.parametrize("devices", [2, 4])
def test_slices_of_each_layout_sum_to_the_block(layout, devices):
    """The ranks' partial outputs, each from its slices of the weights, sum to the whole block's:
    gate and up taken at their own offsets (stacked) or as one run of pairs (interleaved), a
    transposed layout's intermediate dim on its own axis, the down bias added once."""
    E, D, I = 4, 16, 8
    g = torch.Generator().manual_seed(0)
    experts = {"gate_up_proj": (E, D, 2 * I) if layout.transposed else (E, 2 * I, D),
               "down_proj": (E, I, D) if layout.transposed else (E, D, I)}
    if layout.bias:
        experts |= {"gate_up_proj_bias": (E, 2 * I), "down_proj_bias": (E, D)}
    W = {f"experts.{k}": torch.randn(*shape, generator=g) for k, shape in experts.items()}
    W |= {"gate.weight": torch.randn(E, D, generator=g)}
    dims = MoeDims(RouterDims(E, 2, normalize=True), D, I, CLAMPED_GLU if layout.limit else "silu", layout)
    x = torch.randn(2, 3, D, generator=g)
    whole = Ops().moe_routed(x, W, dims)
    shard = ExpertSlices(I // devices)
    node = NodeInfo(kind="moe", dims=dims, shard=shard)
    parts = [Ops().moe_routed(x, shard.slice(W, node, r), node.local_dims()) for r in range(devices)]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-5)


def test_an_intermediate_that_does_not_split_is_declined():
    with pytest.raises(CompileError, match="expert intermediate size 64 does not split over 3 devices; valid "
                                           "degrees: 1, 2, 4, 8, 16, 32, 64"):
        compiled("tiny-deepseek", plan(3, MOE))
    graph, ctx, _ = compiled("tiny-deepseek", plan(3, MOE), strict=False)
    assert [r.action for r in ctx.records if r.pass_name == "moe_tp"] == ["declined"] * 3
    assert not any(info(n).kind == "all_reduce" for n in graph.nodes if "planc" in n.meta)
