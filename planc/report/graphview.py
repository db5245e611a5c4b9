"""The final parallel graph as a picture: blocks and collectives, identical layers folded into one
run with a count, laid out by networkx (topological generations as rows), drawn as SVG by the
inspect template.

A picture node is a block (every graph node of one attention or feed-forward block but its
collectives), a collective (an op whose declaration names one, or moves its own ring traffic), or a
module outside the layers (embedding, final norm, head). Residual adds and the norms between
blocks are contracted: their edges pass through them, and the residual stream's skip edges are
dropped as implied (a transitive reduction). Layers whose nodes agree in kind, strategy,
rule and shard form runs; a run is drawn once, from its first layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

import networkx as nx

import planc.passes  # noqa: F401  (declares the strategies' op kinds)
import planc.semantic  # noqa: F401  (declares the base op kinds)
from planc.ir import OPS, OpSpec

ROW = 64  # px between generations
COLUMN = 190  # px between nodes of one generation
BOX_W, BOX_H = 168, 40
MARGIN = 150  # px left of the boxes, for the layer bands' labels
PLAIN = {"linear", "add", "rmsnorm", "sigmoid_scale", "placeholder"}  # kinds that do not name a box


@dataclass
class PictureNode:
    key: str  # "n<index>", the id the page's details map uses
    label: str
    sub: str  # strategy or collective op, second line of the box
    strategy: str
    collective: str | None
    layers: tuple[int, int] | None = None  # (first layer, count) of the run of identical layers it stands for
    members: list[str] = field(default_factory=list)  # graph node names drawn by this box, every layer of its run
    x: float = 0.0
    y: float = 0.0


@dataclass
class Picture:
    nodes: list[PictureNode]
    edges: list[tuple[PictureNode, PictureNode]]
    runs: list[tuple[int, int]]  # (first layer, count) of every run of identical layers
    width: int
    height: int


NO_SPEC = OpSpec("", lambda c: "")


def declared(node: dict) -> OpSpec:
    """The declaration of a report node's op kind (an empty one for placeholders and output)."""
    return OPS.get(node.get("kind", ""), NO_SPEC)


def collective_of(node: dict) -> str | None:
    """The collective a graph node runs, from its op's declaration (None for compute)."""
    spec = declared(node)
    return spec.collective or ("ring" if spec.traffic is not None else None)


def layer_runs(nodes: list[dict]) -> list[list[int]]:
    """Consecutive layers whose nodes agree in kind, strategy, rule and shard, as lists of layer indices."""
    by_layer: dict[int, list[tuple]] = {}
    for n in nodes:
        for layer in _layers_of(n):
            by_layer.setdefault(layer, []).append(
                (n["kind"], n.get("strategy"), n.get("rule"), tuple(sorted(n.get("shard", {}).items()))))
    return [[layer for layer, _ in run] for _, run in groupby(sorted(by_layer.items()), key=lambda item: item[1])]


def _layers_of(n: dict) -> range | list[int]:
    """The layers a node stands for: a folded run's (`run`: first layer, count), else its own."""
    if n.get("run"):
        return range(n["run"][0], sum(n["run"]))
    return [n["layer"]] if n.get("layer") is not None else []


def _layer_suffix(n: dict) -> str:
    """'model.layers.3.self_attn' -> 'self_attn'; what a block is called inside its layer."""
    where = n.get("block") or n.get("fqn") or n["name"]
    marker = f".{n['layer']}." if n.get("layer") is not None else None
    return where.split(marker, 1)[1] if marker and marker in where else where


def build(nodes: list[dict]) -> Picture:
    """The picture of a final graph given as report.json's node list (program order)."""
    runs = layer_runs(nodes)
    head = {layer: run[0] for run in runs for layer in run}
    runs_by_head = {run[0]: run for run in runs}
    in_layer: dict[int, list[str]] = {}
    position: dict[str, int] = {}
    for n in nodes:
        if n.get("layer") is not None:
            position[n["name"]] = len(in_layer.setdefault(n["layer"], []))
            in_layer[n["layer"]].append(n["name"])
    # every node's stand-in: the node at its position in the first layer of its run
    canon = {n["name"]: in_layer[head[n["layer"]]][position[n["name"]]] if n.get("layer") is not None else n["name"]
             for n in nodes}

    boxes: dict[tuple, PictureNode] = {}
    owner: dict[str, PictureNode | None] = {}  # canonical node -> its box; None: contracted
    segment: dict[str, int] = {}  # block -> collectives met in it so far: a block's box ends at each
    for n in nodes:
        if canon[n["name"]] != n["name"]:
            continue
        kind, strategy = n.get("kind"), n.get("strategy") or "replicated"
        collective = collective_of(n)
        if collective:
            key, label, sub = ("c", n["name"]), collective, strategy
            if n.get("block"):
                segment[n["block"]] = segment.get(n["block"], 0) + 1
        elif n.get("block"):
            key, label, sub = ("b", n["block"], segment.get(n["block"], 0)), _layer_suffix(n), ""
        elif n.get("layer") is None and kind != "output" and (n.get("fqn") or kind == "placeholder"):
            key, label, sub = ("m", n["name"]), n.get("fqn") or n["name"], kind
        else:
            owner[n["name"]] = None  # residual adds and the norms between blocks
            continue
        if key not in boxes:
            run = runs_by_head.get(n.get("layer"))
            boxes[key] = PictureNode(f"n{len(boxes)}", label, sub, strategy, collective,
                                     (run[0], len(run)) if run else None)
        found = owner[n["name"]] = boxes[key]
        if n.get("rule") is not None and not collective:
            found.strategy = strategy  # a block takes its rule's strategy, not its replicated pieces'
        if not collective and kind not in PLAIN and kind not in found.sub.split(" + "):
            found.sub = " + ".join(filter(None, (found.sub, kind)))
    for n in nodes:
        if (found := owner.get(canon[n["name"]])) is not None:
            found.members.append(n["name"])

    args = {n["name"]: [a for a in n.get("args", []) if isinstance(a, str)] for n in nodes}

    def sources(name: str, seen: set[str]) -> set[str]:
        """Keys of the boxes feeding `name`, looking through contracted nodes."""
        got: set[str] = set()
        for arg in args.get(name, []):
            arg = canon.get(arg, arg)
            if arg in seen:
                continue
            seen.add(arg)
            target = owner.get(arg)
            got |= {target.key} if target is not None else sources(arg, seen)
        return got

    graph = nx.DiGraph()
    graph.add_nodes_from(b.key for b in boxes.values())
    for name, target in owner.items():
        if target is not None:
            graph.add_edges_from((src, target.key) for src in sources(name, {name}) if src != target.key)
    reduced = nx.transitive_reduction(graph)  # the residual stream's skips are implied by the blocks' chain
    reduced.add_nodes_from(graph.nodes)
    graph = reduced
    generations = list(nx.topological_generations(graph))
    for depth, generation in enumerate(generations):
        for key in generation:
            graph.nodes[key]["depth"] = depth
    layout = nx.multipartite_layout(graph, subset_key="depth", align="horizontal") if len(graph) else {}
    widest = max((len(g) for g in generations), default=1)
    width = max(widest * COLUMN, BOX_W + 20)
    xs = [x for x, _ in layout.values()] or [0.0]
    span = (max(xs) - min(xs)) or 1.0
    by_key = {b.key: b for b in boxes.values()}
    for key, (x, _) in layout.items():
        b = by_key[key]
        b.x = MARGIN + 10 + BOX_W / 2 + ((x - min(xs)) / span * (width - BOX_W - 20) if widest > 1 else 0)
        b.y = 10 + BOX_H / 2 + graph.nodes[key]["depth"] * ROW
    return Picture(list(boxes.values()), [(by_key[a], by_key[b]) for a, b in graph.edges],
                   [(run[0], len(run)) for run in runs], int(MARGIN + width), int(10 + len(generations) * ROW))


def bands(picture: Picture) -> list[dict]:
    """One band per run of layers: its label and the vertical extent of its boxes."""
    found: dict[tuple[int, int], list[float]] = {}
    for b in picture.nodes:
        if b.layers:
            found.setdefault(b.layers, []).append(b.y)
    return [{"label": f"layer {first}" if count == 1 else f"layers {first}–{first + count - 1} (×{count})",
             "top": min(ys) - BOX_H / 2 - 6, "height": max(ys) - min(ys) + BOX_H + 12}
            for (first, count), ys in sorted(found.items())]
