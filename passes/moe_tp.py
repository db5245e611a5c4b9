"""`moe: {strategy: tp}` — routed experts split by their intermediate dim: every rank holds a slice
of every expert.

    before:  r = moe(x)                      router and experts whole on every rank
    after:   r = moe(x)  (I/n per expert);   r' = all_reduce(r)

Each rank keeps the router whole (every rank routes every token alike), the gate and up columns
and the down rows of its I/n slice of each expert, so its output is a partial sum of the block's:
one all-reduce of the hidden state per layer and no token exchange, where `ep` moves each token's
rows to the ranks holding its experts and back (two all-to-alls). With the shared experts split
too (`mlp: {strategy: tp}` on `*.mlp.shared_experts`), routed and shared partials are summed
before that one all-reduce. This is how vLLM and SGLang run MoE weights under plain tensor
parallelism. Down-projection biases (gpt-oss) stay on rank 0, as a row-parallel bias does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pydantic import Field

from planc.dims import ExpertsLayout, MoeDims
from planc.ir import NodeInfo, Segments, Shard, Tensors, copy_graph, divisors, info, mark, sum_partials_after, take
from planc.lazy import lazy
from planc.strategy import Section, Strategy

torch = lazy("torch")
fx = lazy("torch.fx")


class MoeTpSection(Section):
    """Every routed expert's intermediate dim split over all devices."""

    strategy: Literal["tp"] = Field(description="tp: every expert's gate/up columns and down rows split over "
                                                "devices, the router whole; one all-reduce after the block.")


@dataclass(frozen=True)
class ExpertSlices(Shard):
    """Rank r's columns [r·w, (r+1)·w) of every expert's intermediate dim (w = I / n)."""

    intermediate_per_rank: int

    def local(self, dims: MoeDims) -> MoeDims:
        return replace(dims, intermediate=self.intermediate_per_rank)

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        w, layout = self.intermediate_per_rank, info.dims.layout
        lo, hi, full = rank * w, (rank + 1) * w, info.dims.intermediate
        out = dict(W)
        # gate_up: its intermediate dim is the rows ([E, 2I, D]) or, transposed, the columns ([E, D, 2I])
        gate_up_dim = 2 if layout.transposed else 1
        out["experts.gate_up_proj"] = take(W["experts.gate_up_proj"], _gate_up(lo, hi, full, layout), gate_up_dim)
        out["experts.down_proj"] = W["experts.down_proj"].narrow(1 if layout.transposed else 2, lo, w)
        if layout.bias:
            out["experts.gate_up_proj_bias"] = take(W["experts.gate_up_proj_bias"], _gate_up(lo, hi, full, layout), 1)
            if rank != 0:  # the all-reduce would add it n times
                out["experts.down_proj_bias"] = torch.zeros_like(W["experts.down_proj_bias"])
        return out


def _gate_up(lo: int, hi: int, full: int, layout: ExpertsLayout) -> Segments:
    """The pieces of gate_up holding [lo, hi) of gate and of up: one run of pairs when they
    alternate, else the gate's then the up's (which starts at I = full)."""
    if layout.interleaved:
        return ((2 * lo, 2 * hi),)
    return ((lo, hi), (full + lo, full + hi))


def moe_tp(graph: fx.Graph, section: MoeTpSection, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for core in ctx.bound(graph, ("moe",)):
        d: MoeDims = info(core).dims
        if d.intermediate % n:
            ctx.decline(core, f"expert intermediate size {d.intermediate} does not split over {n} devices; valid "
                              f"degrees: {', '.join(map(str, divisors(d.intermediate)))}")
            continue
        mark(core, strategy="tp", shard=ExpertSlices(d.intermediate // n))
        sum_partials_after(graph, core, "every rank's experts are a slice of each: sum the partial outputs", d.hidden)
        ctx.applied(core, f"intermediate {d.intermediate // n} of {d.intermediate} per expert per rank, "
                          f"all {d.router.num_experts} experts on every rank")
    return graph


STRATEGY = Strategy("moe_tp", "moe", "tp", ("moe",), MoeTpSection, moe_tp, "routed experts split by intermediate dim")
