"""The semantic graph: one torch.fx node per recognized block, annotated under meta["planc"].

Node targets are the stand-in functions below, so `print(graph)` reads like the model:

    h = embedding(ids);  x = rmsnorm(h);  a = mla_attention(x);  h_1 = add(h, a); ...

Passes rewrite strategies and insert explicit collective nodes; codegen turns each node into a
line of the per-rank program.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx

BLOCK_KINDS = ("embedding", "rmsnorm", "mla_attention", "gqa_attention", "mlp", "moe", "lm_head")
COLLECTIVES = ("all_reduce", "all_to_all", "all_gather_varlen", "reduce_scatter")


@dataclass(frozen=True)
class NodeInfo:
    kind: str
    fqn: str = ""
    cls: str = ""
    layer: int | None = None
    dims: Any = None  # MlaDims | GqaDims | RouterDims | None
    attrs: dict = field(default_factory=dict)  # eps, act, vocab, ...
    strategy: str = "replicated"
    rule: str | None = None  # "rules[0] (match 'model.layers.*.self_attn')"
    shard: dict = field(default_factory=dict)  # strategy-specific per-rank layout

    def with_(self, **changes: Any) -> "NodeInfo":
        return replace(self, **changes)


def info(node: fx.Node) -> NodeInfo:
    return node.meta["planc"]


def _stand_in(name: str):
    def op(*args: Any) -> Any:
        raise RuntimeError(f"semantic graph node {name} is a description; run the generated program")

    op.__name__ = op.__qualname__ = name
    return op


OPS = {name: _stand_in(name) for name in BLOCK_KINDS + COLLECTIVES + (
    "add", "moe_route", "moe_dispatch", "moe_experts", "moe_combine", "tpla_latent", "tpla_attention")}


def add_node(graph: fx.Graph, kind: str, args: tuple, meta: NodeInfo, name: str | None = None) -> fx.Node:
    node = graph.call_function(OPS[kind], args)
    node.meta["planc"] = meta
    if name:
        node.name = graph._graph_namespace.create_name(name, node)
    return node


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep enough copy for a pure pass: new nodes; NodeInfo is frozen, so sharing it is safe."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    for old, fresh in env.items():
        fresh.meta = copy.copy(old.meta)
    return new


def block_nodes(graph: fx.Graph, *kinds: str) -> list[fx.Node]:
    return [n for n in graph.nodes if "planc" in n.meta and info(n).kind in kinds]


def insert_after(graph: fx.Graph, node: fx.Node, kind: str, meta: NodeInfo, extra_args: tuple = ()) -> fx.Node:
    """Insert `kind(node, *extra_args)` right after `node` and route node's users through it."""
    users = list(node.users)
    with graph.inserting_after(node):
        new = add_node(graph, kind, (node, *extra_args), meta)
    for user in users:
        user.replace_input_with(node, new)
    return new


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def planned(graph: fx.Graph, kind: str, strategy: str) -> list[fx.Node]:
    """The `kind` blocks that a plan rule put under `strategy`."""
    return [n for n in block_nodes(graph, kind) if info(n).strategy == strategy]


def sum_partials_after(graph: fx.Graph, node: fx.Node, why: str) -> fx.Node:
    """A row-parallel block's output is a per-rank partial sum: all-reduce it before its users."""
    meta = info(node)
    return insert_after(graph, node, "all_reduce", NodeInfo(
        kind="all_reduce", fqn=meta.fqn, layer=meta.layer, rule=meta.rule, strategy=meta.strategy, attrs={"why": why}))
