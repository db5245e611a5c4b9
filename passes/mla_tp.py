"""`attention: {strategy: mla_tp}` — MLA with heads split, latent cache replicated.

    before:  q = linear[q_b_proj](q_a);  o = mla_attention(q, kv);  a = linear[o_proj](o);  h = add(h, a)
    after:   q = linear[q_b_proj] (column: H/n heads);  o = mla_attention [H/n heads];
             a = linear[o_proj] (row);  a' = all_reduce(a);  h = add(h, a')

q_b_proj (or q_proj) rows, kv_b_proj rows and o_proj columns are split by head; q_a_proj,
kv_a_proj_with_mqa and both latent norms are replicated, so every rank writes the full C + R
latent cache: per-rank KV bytes do not shrink with the degree (the baseline TPLA improves on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from planc.dims import MlaDims
from planc.ir import (LinearShard, NodeInfo, Shard, Tensors, block_members, copy_graph, divisors, even_ranges, info,
                      mark, sum_partials_after)
from planc.lazy import lazy
from planc.strategy import Section, Strategy

fx = lazy("torch.fx")


class MlaTpSection(Section):
    """MLA heads split over all devices; the latent KV cache is replicated."""

    strategy: Literal["mla_tp"] = Field(description="mla_tp: MLA heads split over devices, latent cache replicated.")


@dataclass(frozen=True)
class MlaHeads(Shard):
    """One rank's heads of an MLA core: kv_b_proj rows of heads [rank·h, (rank+1)·h)."""

    heads_per_rank: int

    def local(self, dims: MlaDims) -> MlaDims:
        return dims.local(self.heads_per_rank)

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        d, h = info.dims, self.heads_per_rank
        per_head = d.nope_dim + d.v_dim
        return W | {"kv_b_proj.weight": W["kv_b_proj.weight"][rank * h * per_head:(rank + 1) * h * per_head]}


def _split_heads(graph: fx.Graph, core: fx.Node, parts: dict[str, fx.Node], heads: int, world: int) -> fx.Node:
    """Column-split q by head, mark the core, row-split o_proj and sum its partials; returns the all-reduce."""
    d: MlaDims = info(core).dims
    q = parts.get("q_b_proj", parts.get("q_proj"))
    rule = info(core).rule
    mark(q, strategy="mla_tp", rule=rule, shard=LinearShard("column", even_ranges(d.num_heads, world, d.nope_dim + d.rope_dim)))
    o_proj = parts["o_proj"]
    mark(o_proj, strategy="mla_tp", rule=rule, shard=LinearShard("row", even_ranges(d.num_heads, world, d.v_dim)))
    mark(core, strategy="mla_tp", shard=MlaHeads(heads))
    return sum_partials_after(graph, o_proj, "o_proj is row-parallel: sum the per-rank partial outputs")


def mla_tp(graph: fx.Graph, section: MlaTpSection, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    cores = ctx.bound(graph, ("mla_attention",))
    parts = block_members(graph, [info(core).fqn for core in cores])
    for core in cores:
        d = info(core).dims
        if d.num_heads % n:
            ctx.decline(core, f"{d.num_heads} heads do not split over {n} devices; valid degrees: "
                              f"{', '.join(map(str, divisors(d.num_heads)))}")
            continue
        _split_heads(graph, core, parts[info(core).fqn], d.num_heads // n, n)
        ctx.applied(core, f"{d.num_heads // n} of {d.num_heads} heads per rank; latent cache "
                          f"{d.kv_lora_rank + d.rope_dim} wide on every rank")
    return graph


STRATEGY = Strategy("mla_tp", "attention", "mla_tp", ("mla_attention",), MlaTpSection, mla_tp,
                    "MLA heads split, latent cache replicated")


def cost_split(m, tp: int):
    """This strategy in the cost model's TPLA-paper setting: heads split, the whole latent on every rank."""
    from planc.cost import Split
    return Split("mla_tp", tp, m.H // tp, m.C)
