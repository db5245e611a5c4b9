"""`attention: {strategy: tp}` — grouped-query attention with heads split.

    before:  a = gqa_attention(x);                      h = add(h, a)
    after:   a = gqa_attention(x) [Hq/n, Hkv/n heads];  a' = all_reduce(a);  h = add(h, a')

When there are more ranks than KV heads (n a multiple of Hkv), each KV head is replicated on
the n/Hkv ranks whose query heads use it, as vLLM does.
"""
from __future__ import annotations

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import copy_graph, divisors, info, planned, sum_partials_after
from planc.passmanager import PassContext


def valid_degrees(num_heads: int, num_kv_heads: int) -> list[int]:
    return [n for n in divisors(num_heads) if num_kv_heads % n == 0 or n % num_kv_heads == 0]


def attention_tp(graph: fx.Graph, ctx: PassContext) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for node in planned(graph, "gqa_attention", "tp"):
        meta = info(node)
        hq, hkv = meta.dims.num_heads, meta.dims.num_kv_heads
        if n not in valid_degrees(hq, hkv):
            raise PlanError(f"{ctx.where(meta)}: tp cannot split {meta.fqn}'s {hq} query / {hkv} KV heads over "
                            f"{n} devices; valid degrees: {', '.join(map(str, valid_degrees(hq, hkv)))}")
        kv_per_rank = max(1, hkv // n)
        node.meta["planc"] = meta.with_(shard={"heads_per_rank": hq // n, "kv_heads_per_rank": kv_per_rank})
        sum_partials_after(graph, node, "o_proj is row-parallel: sum the per-rank partial outputs")
        ctx.applied(node, f"{hq // n} query / {kv_per_rank} KV heads per rank")
    return graph
