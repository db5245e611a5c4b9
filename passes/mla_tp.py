"""`attention: {strategy: mla_tp}` — MLA with heads split, latent cache replicated.

    before:  a = mla_attention(x);              h = add(h, a)
    after:   a = mla_attention(x) [H/n heads];  a' = all_reduce(a);  h = add(h, a')

q_b_proj / kv_b_proj rows and o_proj columns are split by head; q_a_proj, kv_a_proj_with_mqa
and both latent norms are replicated, so every rank writes the full C + R latent cache.
"""
from __future__ import annotations

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import copy_graph, divisors, info, planned, sum_partials_after
from planc.passmanager import PassContext


def mla_tp(graph: fx.Graph, ctx: PassContext) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for node in planned(graph, "mla_attention", "mla_tp"):
        meta = info(node)
        heads = meta.dims.num_heads
        if heads % n:
            raise PlanError(f"{ctx.where(meta)}: mla_tp cannot split {meta.fqn}'s {heads} heads over {n} devices; "
                            f"valid degrees: {', '.join(map(str, divisors(heads)))}")
        node.meta["planc"] = meta.with_(shard={"heads_per_rank": heads // n})
        sum_partials_after(graph, node, "o_proj is row-parallel: sum the per-rank partial outputs")
        ctx.applied(node, f"{heads // n} of {heads} heads per rank; latent cache "
                          f"{meta.dims.kv_lora_rank + meta.dims.rope_dim} wide on every rank")
    return graph
