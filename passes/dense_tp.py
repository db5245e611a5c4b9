"""`mlp: {strategy: tp}` — an MLP, column-parallel gate/up (up alone where it has no gate), row-parallel down.

    before:  g, u = linear[gate_proj](x), linear[up_proj](x);  m = linear[down_proj](mlp(g, u))
    after:   g, u column-parallel (I/n wide);  m = linear[down_proj] (row);  m' = all_reduce(m)

The same rewrite serves a MoE block's shared experts when a rule matches `*.mlp.shared_experts`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pydantic import Field

from planc.dims import MlpDims
from planc.ir import (LinearShard, Shard, block_members, copy_graph, divisors, even_ranges, info, mark,
                      sum_partials_after)
from planc.lazy import lazy
from planc.strategy import Section, Strategy

fx = lazy("torch.fx")


class DenseTpSection(Section):
    """Dense MLP intermediate dim split over all devices."""

    strategy: Literal["tp"] = Field(description="tp: column-parallel gate/up projections, row-parallel down projection.")


@dataclass(frozen=True)
class Intermediate(Shard):
    intermediate_per_rank: int

    def local(self, dims: MlpDims) -> MlpDims:
        return replace(dims, intermediate=self.intermediate_per_rank)


def dense_tp(graph: fx.Graph, section: DenseTpSection, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    acts = ctx.bound(graph, ("mlp",))
    parts = block_members(graph, [info(act).fqn for act in acts])
    for act in acts:
        width = info(act).dims.intermediate
        if width % n:
            ctx.decline(act, f"intermediate size {width} does not split over {n} devices; valid degrees: "
                             f"{', '.join(map(str, divisors(width)))}")
            continue
        fqn, rule = info(act).fqn, info(act).rule
        linears = parts[fqn]
        ranges = even_ranges(width, n)
        for name in ("gate_proj", "up_proj") if info(act).dims.gated else ("up_proj",):
            mark(linears[name], strategy="tp", rule=rule, shard=LinearShard("column", ranges))
        mark(linears["down_proj"], strategy="tp", rule=rule, shard=LinearShard("row", ranges))
        mark(act, strategy="tp", shard=Intermediate(width // n))
        sum_partials_after(graph, linears["down_proj"], "down_proj is row-parallel: sum the per-rank partial outputs")
        ctx.applied(act, f"intermediate {width // n} of {width} per rank")
    return graph


STRATEGY = Strategy("dense_tp", "mlp", "tp", ("mlp",), DenseTpSection, dense_tp, "dense MLP intermediate split")
