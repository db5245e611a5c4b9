"""`mlp: {strategy: tp}` — gated MLP, column-parallel gate/up, row-parallel down.

    before:  m = mlp(x);              h = add(h, m)
    after:   m = mlp(x) [I/n wide];   m' = all_reduce(m);  h = add(h, m')
"""
from __future__ import annotations

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import copy_graph, divisors, info, planned, sum_partials_after
from planc.passmanager import PassContext


def dense_tp(graph: fx.Graph, ctx: PassContext) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for node in planned(graph, "mlp", "tp"):
        meta = info(node)
        width = meta.attrs["intermediate"]
        if width % n:
            raise PlanError(f"{ctx.where(meta)}: tp cannot split {meta.fqn}'s intermediate size {width} over {n} "
                            f"devices; valid degrees: {', '.join(map(str, divisors(width)))}")
        node.meta["planc"] = meta.with_(shard={"intermediate_per_rank": width // n})
        sum_partials_after(graph, node, "down_proj is row-parallel: sum the per-rank partial outputs")
        ctx.applied(node, f"intermediate {width // n} of {width} per rank")
    return graph
