"""Partition numerics: the per-rank shards of a block, run and summed, equal the whole block."""
from __future__ import annotations

import pytest
import torch

from planc.bind import bind
from planc.codegen.partition import model_tensors, partition
from planc.driver import PASSES
from planc.ir import block_nodes, info
from planc.lift import lift
from planc.lift.check import block_weights, run_reference
from planc.ops import MlaCache, GqaCache, Ops, Step
from planc.models.registry import load_model
from planc.passmanager import PassContext, run_passes
from planc.plan import parse_plan_text
from planc.passes.ep_route import route
from tests.conftest import PLANS


def _compiled_graph(model, plan_name, devices):
    text = (PLANS / plan_name).read_text().replace("devices: 2", f"devices: {devices}")
    plan = parse_plan_text(text, "plan.yaml")
    graph = lift(model, check=False).graph
    return run_passes(bind(graph, plan), PASSES, PassContext(plan, devices))


def _scope(tensors, fqn):
    return {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}


@pytest.mark.parametrize("devices", [2, 4])
def test_attention_shards_sum_to_the_block(devices):
    for name, plan in (("tiny-deepseek", "deepseek_mla_tp_ep.yaml"), ("tiny-draft", "draft_tp.yaml")):
        model = load_model(name)
        graph = _compiled_graph(model, plan, devices)
        node = block_nodes(graph, "mla_attention", "gqa_attention")[1]
        meta = info(node)
        ranks = [partition(graph, model_tensors(model), r) for r in range(devices)]
        x = torch.randn(2, 5, model.config.hidden_size)
        whole = run_reference(_block(model, meta.fqn), x, block_weights(model, meta.fqn))
        parts = [_run_shard(meta, x, _scope(ranks[r], meta.fqn)) for r in range(devices)]
        torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-5)


def _block(model, fqn):
    from planc.lift.recognize import recognize

    return next(b for b in recognize(model) if b.fqn == fqn)


def _run_shard(meta, x, W):
    from codegen.emit_program import _local_dims

    d = _local_dims(meta)
    B, S, _ = x.shape
    step = Step(0, torch.arange(S).expand(B, S), torch.ones(B, S, dtype=torch.bool))
    if meta.kind == "mla_attention":
        return Ops().mla_attention(x, step, MlaCache(x.new_zeros(B, S, d.kv_lora_rank), x.new_zeros(B, S, d.rope_dim)), W, d)
    cache = GqaCache(x.new_zeros(B, S, d.num_kv_heads, d.head_dim), x.new_zeros(B, S, d.num_kv_heads, d.head_dim))
    return Ops().gqa_attention(x, step, cache, W, d)


def test_ep_route_sends_each_token_once_per_owner():
    idx = torch.tensor([[0, 1], [0, 5], [6, 7], [2, 4], [3, 2]])
    w = torch.ones(5, 2)
    owner = [0, 0, 0, 0, 1, 1, 1, 1]
    r0, r1 = route(idx, w, owner, 0, 2), route(idx, w, owner, 1, 2)
    assert r0.mine == (0, 2) and r1.mine == (2, 5)
    assert r0.send_splits == [2, 1] and r1.send_splits == [2, 2]  # rank 1's tokens 2..4: 3,4 need rank 0
    assert r0.recv_splits == [2, 2] and r1.recv_splits == [1, 2]
    assert r0.send_splits[1] == r1.recv_splits[0] and r1.send_splits[0] == r0.recv_splits[1]
    assert r0.recv_weight_RE.shape == (4, 4) and r0.recv_weight_RE.sum() == 2 + 1 + 1 + 2
