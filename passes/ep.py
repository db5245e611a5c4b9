"""`moe: {strategy: ep, placement: contiguous}` — expert parallelism with all-to-all.

    before:  m = moe(x)
    after:   r = moe_route(x)                 every rank routes every token (replicated gate)
             xs = all_to_all(x, r)            dispatch: rank i sends its token slice's rows,
                                              once per destination rank (de-duplicated)
             ys = moe_experts(xs, r)          the E/n local experts, weighted by the router
             yb = all_to_all(ys, r)           combine: partial sums go back to the sender
             m0 = moe_combine(yb, x, r)       sum the partials + shared experts on the slice
             m = all_gather_varlen(m0, r)     every rank gets every token back (attention is TP)

Contiguous placement: experts e·E/n … (e+1)·E/n − 1 live on rank e. Because the routing is
computed on every rank, split sizes are known locally and need no exchange.
"""
from __future__ import annotations

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import NodeInfo, add_node, copy_graph, divisors, info, planned
from planc.passmanager import PassContext


def contiguous_owner(num_experts: int, world_size: int) -> list[int]:
    per_rank = num_experts // world_size
    return [e // per_rank for e in range(num_experts)]


def ep(graph: fx.Graph, ctx: PassContext) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for node in planned(graph, "moe", "ep"):
        meta = info(node)
        experts = meta.dims.num_experts
        if experts % n:
            raise PlanError(f"{ctx.where(meta)}: ep cannot place {meta.fqn}'s {experts} experts evenly on {n} devices; "
                            f"valid degrees: {', '.join(map(str, divisors(experts)))}")
        shard = {"experts_per_rank": experts // n, "owner": contiguous_owner(experts, n)}
        _expand(graph, node, meta.with_(shard=shard))
        ctx.applied(node, f"{experts // n} of {experts} experts per rank (contiguous)")
    return graph


def _expand(graph: fx.Graph, node: fx.Node, meta: NodeInfo) -> None:
    x = node.args[0]

    def step(kind: str, args: tuple, role: str = "") -> fx.Node:
        attrs = meta.attrs | ({"role": role} if role else {})
        return add_node(graph, kind, args, meta.with_(kind=kind, attrs=attrs))

    with graph.inserting_before(node):
        route = step("moe_route", (x,))
        sent = step("all_to_all", (x, route), "dispatch")
        local = step("moe_experts", (sent, route))
        back = step("all_to_all", (local, route), "combine")
        mine = step("moe_combine", (back, x, route))
        full = step("all_gather_varlen", (mine, route), "restore")
    node.replace_all_uses_with(full)
    graph.erase_node(node)
