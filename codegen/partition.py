"""Partition: the full model's tensors -> each rank's tensors, following the graph's typed shards.

Every node whose op holds weights (OpSpec.owns_weights) owns the tensors under its module FQN that
no deeper owning node claims (an MLA core owns kv_b_proj and kv_a_layernorm, its projections are
their own `linear` nodes). Its shard, when a strategy gave it one, slices them for the rank
(Shard.slice); names are kept, so a rank's `q_b_proj.weight` is its head slice of it. Meta tensors
slice like real ones, which is how a weightless dry run learns every rank's bytes.
"""
from __future__ import annotations

from collections.abc import Container, Iterable

import torch
import torch.fx as fx

from planc import progress
from planc.ir import OPS, Tensors, info
from planc.weights import ROTARY_TENSORS, named_tensors, unfused_tensors


def owners(graph: fx.Graph) -> dict[str, fx.Node]:
    """FQN -> the node that holds its tensors (the first owning node of that FQN)."""
    found: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if "planc" in node.meta and OPS[info(node).kind].owns_weights:
            found.setdefault(info(node).fqn, node)
    return found


def assign(graph: fx.Graph, full: Tensors) -> dict[str, Tensors]:
    """FQN of the owning node -> its tensors keyed by the rest of their name (deepest owner wins);
    done once per compile, then sliced for every rank."""
    fqns = owners(graph)
    out: dict[str, Tensors] = {fqn: {} for fqn in fqns}
    for name, (owner, rest) in owned_names(full, fqns).items():
        out[owner][rest] = full[name]
    return out


def owned_names(names: Iterable[str], fqns: Container[str]) -> dict[str, tuple[str, str]]:
    """Tensor name -> (the deepest of `fqns` above it, the rest of the name); names under none
    are left out."""
    out = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in fqns:
                out[name] = (prefix, ".".join(parts[cut:]))
                break
    return out


def partition(graph: fx.Graph, full: Tensors, world_size: int) -> list[Tensors]:
    """Every rank's tensors, keyed by full FQN; rope ops also get `<fqn>.rotary.inv_freq` (and a
    long-context rope's `rotary.long_*`)."""
    nodes, owned = owners(graph), assign(graph, full)
    return [_rank_tensors(nodes, owned, full, rank) for rank in progress.track(range(world_size), "partition", "ranks")]


def _rank_tensors(nodes: dict[str, fx.Node], owned: dict[str, Tensors], full: Tensors, rank: int) -> Tensors:
    out: Tensors = {}
    for fqn, W in owned.items():
        meta = info(nodes[fqn])
        if meta.shard is not None:
            W = meta.shard.slice(W, meta, rank)
        if OPS[meta.kind].rotary:  # one copy per block: safetensors refuses aliases
            W = W | {short: full[name].clone() for name, short in ROTARY_TENSORS.items() if name in full}
        out |= {f"{fqn}.{k}": v.contiguous() for k, v in W.items()}
    return out


def model_tensors(model: torch.nn.Module, graph: fx.Graph | None = None) -> Tensors:
    """The model's tensors partition reads: with `graph`, those under its owning nodes' modules and
    the rotary tensors alone (a folded graph's other layers are not listed), else all of them."""
    if graph is None:
        return unfused_tensors(model)
    found: Tensors = {}
    for fqn in owners(graph):
        found |= unfused_tensors(model.get_submodule(fqn), fqn)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if isinstance(rotary, torch.nn.Module):
        found |= {name: t for name, t in named_tensors(rotary, ROTARY).items() if name in ROTARY_TENSORS}
    return found


ROTARY = "model.rotary_emb"  # the module of ROTARY_TENSORS
