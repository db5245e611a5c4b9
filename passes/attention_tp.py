"""`attention: {strategy: tp}` — grouped-query attention with heads split.

    before:  q, k, v = linear[q_proj], linear[k_proj], linear[v_proj];  o = gqa_attention(q, k, v)
             a = linear[o_proj](o);  h = add(h, a)
    after:   q, k, v column-parallel (Hq/n query heads, their KV heads);  o = gqa_attention [local heads]
             a = linear[o_proj] (row);  a' = all_reduce(a);  h = add(h, a')

When there are more ranks than KV heads (n a multiple of Hkv), each KV head is replicated on
the n/Hkv ranks whose query heads use it, as vLLM does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.fx as fx
from pydantic import Field

from planc.dims import GqaDims
from planc.ir import (LinearShard, Shard, members, copy_graph, divisors, even_ranges, info, mark,
                      sum_partials_after)
from planc.strategy import Section, Strategy


class AttentionTpSection(Section):
    """Grouped-query attention heads split over all devices."""

    strategy: Literal["tp"] = Field(description="tp: GQA query heads split over devices, KV heads with them.")


@dataclass(frozen=True)
class GqaHeads(Shard):
    heads_per_rank: int
    kv_heads_per_rank: int

    def local(self, dims: GqaDims) -> GqaDims:
        return dims.local(self.heads_per_rank, self.kv_heads_per_rank)


def valid_degrees(num_heads: int, num_kv_heads: int) -> list[int]:
    return [n for n in divisors(num_heads) if num_kv_heads % n == 0 or n % num_kv_heads == 0]


def kv_head_range(num_heads: int, num_kv_heads: int, heads_per_rank: int, rank: int) -> tuple[int, int]:
    """KV heads that rank's query heads read (replicated when ranks outnumber KV heads)."""
    group = num_heads // num_kv_heads
    first = rank * heads_per_rank // group
    last = ((rank + 1) * heads_per_rank - 1) // group
    return first, last + 1


def attention_tp(graph: fx.Graph, section: AttentionTpSection, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for core in ctx.bound(graph, ("gqa_attention",)):
        d: GqaDims = info(core).dims
        if n not in valid_degrees(d.num_heads, d.num_kv_heads):
            ctx.decline(core, f"{d.num_heads} query / {d.num_kv_heads} KV heads do not split over {n} devices; valid "
                              f"degrees: {', '.join(map(str, valid_degrees(d.num_heads, d.num_kv_heads)))}")
            continue
        h = d.num_heads // n
        kv = tuple((tuple(x * d.head_dim for x in kv_head_range(d.num_heads, d.num_kv_heads, h, r)),) for r in range(n))
        parts, rule = members(graph, info(core).fqn), info(core).rule
        mark(parts["q_proj"], strategy="tp", rule=rule, shard=LinearShard("column", even_ranges(d.num_heads, n, d.head_dim)))
        for name in ("k_proj", "v_proj"):
            mark(parts[name], strategy="tp", rule=rule, shard=LinearShard("column", kv))
        mark(parts["o_proj"], strategy="tp", rule=rule, shard=LinearShard("row", even_ranges(d.num_heads, n, d.head_dim)))
        mark(core, strategy="tp", shard=GqaHeads(h, max(1, d.num_kv_heads // n)))
        sum_partials_after(graph, parts["o_proj"], "o_proj is row-parallel: sum the per-rank partial outputs")
        ctx.applied(core, f"{h} query / {max(1, d.num_kv_heads // n)} KV heads per rank")
    return graph


STRATEGY = Strategy("attention_tp", "attention", "tp", ("gqa_attention",), AttentionTpSection, attention_tp,
                    "GQA heads split")
