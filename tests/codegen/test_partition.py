"""Partition: every tensor goes to the deepest node that holds weights; shards slice it per rank."""
from __future__ import annotations

import torch

from planc.codegen.partition import assign, model_tensors
from planc.dims import LinearDims
from planc.ir import LinearShard, NodeInfo, even_ranges
from tests.passes.blocks import compiled, model, plan

ATTN = 'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}'


def test_each_tensor_goes_to_its_deepest_owner():
    graph, _, _ = compiled("tiny-deepseek", plan(2, ATTN))
    owned = assign(graph, model_tensors(model("tiny-deepseek")))
    assert set(owned["model.layers.0.self_attn"]) == {"kv_a_layernorm.weight", "kv_b_proj.weight"}
    assert set(owned["model.layers.0.self_attn.q_b_proj"]) == {"weight"}
    assert set(owned["model.layers.1.mlp"]) == {"gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj",
                                                 "experts.down_proj"}
    held = {f"{fqn}.{name}" for fqn, tensors in owned.items() for name in tensors}
    assert held == {n for n in model_tensors(model("tiny-deepseek")) if not n.startswith("model.rotary_emb.")}


def test_rank_bytes_add_up_to_the_model_where_split():
    graph, _, ranks = compiled("tiny-deepseek", plan(2, ATTN))
    full = model_tensors(model("tiny-deepseek"))
    for name in ("model.layers.2.self_attn.q_b_proj.weight", "model.layers.2.self_attn.kv_b_proj.weight"):
        assert torch.equal(torch.cat([r[name] for r in ranks]), full[name])
    o = "model.layers.2.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([r[o] for r in ranks], dim=1), full[o])
    assert all(r["model.layers.2.self_attn.rotary.inv_freq"].equal(full["model.rotary_emb.inv_freq"]) for r in ranks)


def test_linear_shard_keeps_a_row_parallel_bias_on_rank_zero_only():
    W = {"weight": torch.randn(4, 6), "bias": torch.randn(4)}
    meta = NodeInfo("linear", dims=LinearDims(6, 4, True))
    row = LinearShard("row", even_ranges(6, 2))
    assert torch.equal(row.slice(W, meta, 0)["bias"], W["bias"]) and not row.slice(W, meta, 1)["bias"].any()
    assert torch.equal(row.slice(W, meta, 1)["weight"], W["weight"][:, 3:])
    col = LinearShard("column", ((((0, 1), (3, 4))), (((1, 3),))))  # segments: rank 0 rows 0 and 3
    assert torch.equal(col.slice(W, meta, 0)["weight"], W["weight"][[0, 3]]) and col.local(meta.dims).out_features == 2
