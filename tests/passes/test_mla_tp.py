"""mla_tp: heads split by GEMM-level linear nodes, one all-reduce after o_proj, shards sum to the block."""
from __future__ import annotations

import pytest
import torch

from planc.errors import CompileError
from planc.ir import format_graph, info, nodes_of
from tests.passes.blocks import compiled, lifted, model, plan, reference, run_block

ATTN = 'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}'


def test_rewrite_golden_and_pure():
    before = format_graph(lifted("tiny-deepseek"))
    graph, ctx, _ = compiled("tiny-deepseek", plan(2, ATTN))
    assert format_graph(lifted("tiny-deepseek")) == before  # the pass copied before rewriting
    lines = [l for l in format_graph(graph).splitlines() if "layers.2.self_attn" in l]
    assert [l.split(" = ")[1].split("(")[0] for l in lines] == [
        "linear", "rmsnorm", "linear", "linear", "mla_attention", "linear", "all_reduce"]
    assert "q_b_proj  mla_tp rules[0]  layout=column  width_per_rank=96" in lines[2]
    assert "o_proj  mla_tp rules[0]  layout=row  width_per_rank=64" in lines[5]
    assert [r.target for r in ctx.records] == [f"model.layers.{i}.self_attn" for i in range(4)]


@pytest.mark.parametrize("devices", [2, 4])
def test_shards_sum_to_the_block(devices):
    graph, _, ranks = compiled("tiny-deepseek", plan(devices, ATTN))
    fqn = "model.layers.1.self_attn"
    x = torch.randn(2, 5, model("tiny-deepseek").config.hidden_size)
    got, caches, _ = run_block(graph, ranks, fqn, x, decode_steps=2)
    torch.testing.assert_close(got, reference("tiny-deepseek", fqn, x), rtol=1e-5, atol=1e-5)
    assert all(c[fqn].ckv_BTC.shape[-1] == model("tiny-deepseek").config.kv_lora_rank for c in caches)  # latent replicated


def test_heads_that_do_not_split_are_declined():
    with pytest.raises(CompileError, match=r"plan.yaml:5:5: rules\[0\]: mla_tp declined on model.layers.0.self_attn "
                                           r"\(strict mode\): 4 heads do not split over 3 devices; valid degrees: 1, 2, 4"):
        compiled("tiny-deepseek", plan(3, ATTN))
    graph, ctx, _ = compiled("tiny-deepseek", plan(3, ATTN), strict=False)
    assert {info(n).strategy for n in nodes_of(graph, "mla_attention")} == {"replicated"}
    assert len([r for r in ctx.records if r.action == "declined"]) == 4 and not nodes_of(graph, "all_reduce")
