"""`strategy: replicated` — every rank holds the whole block and computes it whole.

    before:  a = mla_attention(q, kv)
    after:   the same (the pass records that the rule applied; nothing is split, nothing summed)

Every section offers it, so a plan can pin a block that a broader rule would otherwise split.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from planc.lazy import lazy
from planc.strategy import Section, Strategy

fx = lazy("torch.fx")


SECTION_KINDS = {"attention": ("mla_attention", "gqa_attention"), "mlp": ("mlp",), "moe": ("moe",)}


class ReplicatedSection(Section):
    """Every rank holds every weight of the matched blocks."""

    strategy: Literal["replicated"] = Field(description="replicated: every rank holds the whole block.")


def replicated(graph: fx.Graph, section: ReplicatedSection, ctx) -> fx.Graph:
    for node in ctx.bound(graph, sum(SECTION_KINDS.values(), ())):
        ctx.applied(node, "whole block on every rank")
    return graph


STRATEGIES = tuple(Strategy("replicated", key, "replicated", kinds, ReplicatedSection, replicated,
                            "every rank holds the whole block") for key, kinds in SECTION_KINDS.items())
