"""`mlp: {strategy: tp}` — gated MLP, column-parallel gate/up, row-parallel down.

    before:  m = mlp(x);              h = add(h, m)
    after:   m = mlp(x) [I/n wide];   m' = all_reduce(m);  h = add(h, m')
"""
from __future__ import annotations

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import NodeInfo, block_nodes, copy_graph, divisors, info, insert_after
from planc.passmanager import PassContext


def dense_tp(graph: fx.Graph, ctx: PassContext) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for node in block_nodes(graph, "mlp"):
        meta = info(node)
        if meta.strategy != "tp":
            continue
        width = meta.attrs["intermediate"]
        if width % n:
            raise PlanError(f"{ctx.where(meta)}: tp cannot split {meta.fqn}'s intermediate size {width} over {n} "
                            f"devices; valid degrees: {', '.join(map(str, divisors(width)))}")
        node.meta["planc"] = meta.with_(shard={"intermediate_per_rank": width // n})
        insert_after(graph, node, "all_reduce", NodeInfo(
            kind="all_reduce", fqn=meta.fqn, layer=meta.layer, rule=meta.rule, strategy="tp",
            attrs={"why": "down_proj is row-parallel: sum the per-rank partial outputs"}))
        ctx.applied(node, f"intermediate {width // n} of {width} per rank")
    return graph
