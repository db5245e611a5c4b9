"""`attention: {strategy: tp}` — grouped-query attention with heads split.

    before:  q, k, v = linear[q_proj], linear[k_proj], linear[v_proj];  o = gqa_attention(q, k, v)
             a = linear[o_proj](o);  h = add(h, a)
    after:   q, k, v column-parallel (Hq/n query heads, their KV heads);  o = gqa_attention [local heads]
             a = linear[o_proj] (row);  a' = all_reduce(a);  h = add(h, a')

When there are more ranks than KV heads (n a multiple of Hkv), each KV head is replicated on
the n/Hkv ranks whose query heads use it, as vLLM does.

q/k norms over the whole projection (OLMoE) see only this rank's columns, so their statistic is
summed over ranks, exactly:

    q = linear[q_proj] (column);  ss = all_reduce(norm_sumsq(q));  q = norm_columns[q_norm](q, ss)

(4 bytes per token and norm, against vLLM's all-gather of the whole q and k.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from planc.dims import CommDims, GqaDims
from planc.ir import (LinearShard, NodeInfo, Segments, Shard, Tensors, add_node, block_members, copy_graph, declare_op,
                      divisors, even_ranges, info, insert_after, mark, sum_partials_after, take)
from planc.lazy import lazy
from planc.strategy import Section, Strategy

fx = lazy("torch.fx")


class AttentionTpSection(Section):
    """Grouped-query attention heads split over all devices."""

    strategy: Literal["tp"] = Field(description="tp: GQA query heads split over devices, KV heads with them.")


@dataclass(frozen=True)
class GqaHeads(Shard):
    heads_per_rank: int
    kv_heads_per_rank: int

    def local(self, dims: GqaDims) -> GqaDims:
        return dims.local(self.heads_per_rank, self.kv_heads_per_rank)

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        """The core's per-head tensors (gpt-oss's sinks [H]): this rank's query heads."""
        if "sinks" not in W:
            return W
        return {**W, "sinks": W["sinks"].narrow(0, rank * self.heads_per_rank, self.heads_per_rank)}


@dataclass(frozen=True)
class NormColumns(Shard):
    """An RMSNorm over a column-parallel projection: this rank's columns of its weight; the mean
    square divides the all-reduced Σ x² by `count` (the width, times the ranks holding each column)."""

    segments: tuple[Segments, ...] = field(repr=False)
    count: int

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        return {**W, "weight": take(W["weight"], self.segments[rank], 0)}


declare_op("norm_sumsq", lambda c: f"ops.sumsq({c.args[0]})")
declare_op("norm_columns", lambda c: f"ops.rmsnorm_sumsq({c.args[0]}, {c.args[1]}, {c.weight('weight')}, "
                                     f"{c.info.dims.eps!r}, {c.info.shard.count})", owns_weights=True)


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
    cores = ctx.bound(graph, ("gqa_attention",))
    blocks = block_members(graph, [info(core).fqn for core in cores])
    for core in cores:
        d: GqaDims = info(core).dims
        if n not in valid_degrees(d.num_heads, d.num_kv_heads):
            ctx.decline(core, f"{d.num_heads} query / {d.num_kv_heads} KV heads do not split over {n} devices; valid "
                              f"degrees: {', '.join(map(str, valid_degrees(d.num_heads, d.num_kv_heads)))}")
            continue
        h = d.num_heads // n
        kv = tuple((tuple(x * d.head_dim for x in kv_head_range(d.num_heads, d.num_kv_heads, h, r)),) for r in range(n))
        parts, rule = blocks[info(core).fqn], info(core).rule
        for name in ("q_proj", "gate_proj") if d.output_gate else ("q_proj",):  # the output gate: as wide as q, head by head
            mark(parts[name], strategy="tp", rule=rule, shard=LinearShard("column", even_ranges(d.num_heads, n, d.head_dim)))
        for name in ("k_proj", "v_proj"):
            mark(parts[name], strategy="tp", rule=rule, shard=LinearShard("column", kv))
        mark(parts["o_proj"], strategy="tp", rule=rule, shard=LinearShard("row", even_ranges(d.num_heads, n, d.head_dim)))
        mark(core, strategy="tp", shard=GqaHeads(h, max(1, d.num_kv_heads // n)))
        if d.qk_norm == "full":
            copies = max(1, n // d.num_kv_heads)  # ranks holding each KV head
            _split_norm(graph, parts["q_norm"], rule, NormColumns(even_ranges(d.num_heads, n, d.head_dim),
                                                                  d.num_heads * d.head_dim))
            _split_norm(graph, parts["k_norm"], rule, NormColumns(kv, d.num_kv_heads * d.head_dim * copies))
        sum_partials_after(graph, parts["o_proj"], "o_proj is row-parallel: sum the per-rank partial outputs")
        ctx.applied(core, f"{h} query / {max(1, d.num_kv_heads // n)} KV heads per rank")
    return graph


def _split_norm(graph: fx.Graph, norm: fx.Node, rule, shard: NormColumns) -> None:
    """norm(x) over a column slice x -> norm_columns(x, all_reduce(norm_sumsq(x)))."""
    m, x = info(norm).with_(rule=rule), norm.args[0]
    short = m.fqn.rsplit(".", 1)[-1]  # q_norm, k_norm
    with graph.inserting_before(norm):
        ss = add_node(graph, "norm_sumsq", (x,), m.with_(kind="norm_sumsq", strategy="tp", dims=None), f"{short}_ss")
        split = add_node(graph, "norm_columns", (x, ss), m.with_(kind="norm_columns", strategy="tp", shard=shard), short)
    insert_after(graph, ss, "all_reduce", m.with_(
        kind="all_reduce", strategy="tp", dims=CommDims(1, fixed_bytes=4),
        why=f"{short} spans every head: sum its Σ x² over the ranks' columns"))
    norm.replace_all_uses_with(split)
    graph.erase_node(norm)


STRATEGY = Strategy("attention_tp", "attention", "tp", ("gqa_attention",), AttentionTpSection, attention_tp,
                    "GQA heads split")
