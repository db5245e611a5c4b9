"""`draft: {easyspec: {layer_parallel: N}}` — EasySpec layer-parallel drafting (arXiv 2502.02493).

The pass places the draft's attention sub-layers on ranks and derives two graphs from the draft's
own (its rules applied): `forward`, exact and layer after layer, which prefill and the calibration
forward run, and `forward_layer_parallel`, which drafting runs. Consecutive layers (all but the
first and last with keep_first_last) form groups of N; inside a group every attention sub-layer
reads the hidden state entering the group and runs on its own rank:

    before:  h1 = h0 + attn1(norm1(h0));  h1' = h1 + mlp1(h1)
             h2 = h1' + attn2(norm2(h1'));  h2' = h2 + mlp2(h2)
    after:   a1 = easyspec_attention[layer 1](norm1(h0))   on rank r1 (empty elsewhere)
             a2 = easyspec_attention[layer 2](norm2(h0))   on rank r2
             g = easyspec_gather(h0, a1, a2)               one all-gather of the group's outputs
             seq_mlp: h1 = h0 + g[0];  h1' = h1 + mlp1(h1);  h2 = h1' + g[1];  h2' = h2 + mlp2(h2)
             sum:     h = h0 + g[0] + g[1];  h1' = h + mlp1(h);  h2' = h1' + mlp2(h1')

`forward` is the same rewrite with groups of one: each attention on its rank, gathered after it,
so a grouped layer's weights and KV cache live on its rank alone in both forwards. MLPs, norms and
the kept layers run on every rank. KV entries a layer-parallel forward writes are fuzzy (computed
from the group's input rather than the layer's own) when a group has more than one member; the
runtime forgets them before the calibration forward rewrites those positions exactly
(planc.runtime.speculative).

Rank placement: the m-th grouped layer (counting from 0 over all groups) runs on rank m mod world,
so group g's member i is on rank (g * N + i) mod world: consecutive groups use other ranks when
N < world, and both forwards place every layer alike.

Legend: B batch, S tokens this step, D hidden, N layers per group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from planc.dims import CommDims, GqaDims, MlaDims
from planc.errors import PlanError
from planc.ir import Call, NodeInfo, Shard, Tensors, add_node, copy_graph, declare_op, info
from planc.lazy import lazy
from planc.semantic import MLA_KERNELS
from planc.strategy import Drafted, Drafting, Frozen

torch = lazy("torch")
fx = lazy("torch.fx")

ATTENTION = ("gqa_attention", "mla_attention")


class EasySpecSection(Frozen):
    """Layer-parallel drafting: groups of the draft's attention sub-layers run at once on different ranks."""

    layer_parallel: int = Field(ge=1, strict=True, description="N: attention sub-layers per group, each on its "
                                "own rank (at most mesh.devices). 1 runs the draft layer by layer.")
    keep_first_last: bool = Field(True, strict=True, description="Keep the first and last layer sequential.")
    combine: Literal["seq_mlp", "sum"] = Field(
        "seq_mlp", description="seq_mlp: h += a_j; h += MLP_j(h) member after member; sum: h += sum of the "
        "group's attention outputs, then its MLPs in order.")
    calibrate: bool = Field(True, strict=True, description="After each verification, forget the fuzzy draft KV "
                            "entries and rewrite them with one exact forward over the accepted and bonus tokens.")


@dataclass(frozen=True)
class LayerAttention:
    """One grouped attention sub-layer: its input norm, its attention block, and the rank it runs on."""

    kind: str  # gqa_attention | mla_attention
    dims: GqaDims | MlaDims
    rank: int

    def cache(self) -> dict:
        """The layer's cache, on its rank alone."""
        return {**self.dims.cache(), "rank": self.rank}


@dataclass(frozen=True)
class OnRank(Shard):
    """A grouped attention's weights: on its rank alone (the rope frequencies go to every rank)."""

    rank: int

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        return W if rank == self.rank else {}


@dataclass(frozen=True)
class GroupRanks(Shard):
    """The ranks of a group's members, in member order."""

    ranks: tuple[int, ...]


IMPORT = ("from planc.passes import easyspec",)


def _attention(c: Call) -> str:
    return (f"easyspec.attention(rt, {c.args[0]}, step, caches.get({c.name()}), {c.W}, "
            f"{c.const('LAYER', c.info.dims)})")


def _gather(c: Call) -> str:
    parts = ", ".join(c.args[1:])
    return f"easyspec.gather(comm, {c.args[0]}, ({parts},), {c.const('RANKS', c.info.shard.ranks)})"


declare_op("easyspec_attention", _attention, imports=IMPORT, owns_weights=True, rotary=True, step=True,
           kernels=(*MLA_KERNELS, "gqa_decode.py"))
declare_op("easyspec_gather", _gather, imports=IMPORT, collective="all_gather_varlen")
declare_op("easyspec_part", lambda c: f"{c.args[0]}[{c.args[1]}]")


# -- the pass -------------------------------------------------------------------------------------


@dataclass
class _Sublayer:
    core: fx.Node
    norm: fx.Node  # input RMSNorm
    block: list[fx.Node]  # projections and core, in graph order
    out: fx.Node  # o_proj
    add: fx.Node  # residual add after the attention
    h_in: fx.Node  # the hidden state the sub-layer reads


def draft(graph: fx.Graph, section: EasySpecSection, ctx) -> Drafted:
    """The pass: the exact `forward` and `forward_layer_parallel`, where each draft attention runs
    and what the runtime needs to draft layer-parallel and calibrate."""
    exact, parallel = place(graph, section, ctx), layer_parallel(graph, section, ctx)
    found = placement(parallel)
    speculate = {"layer_parallel": {
        "degree": section.layer_parallel, "combine": section.combine, "calibrate": section.calibrate,
        "depth": found["depth"], "exact": all(len(g) == 1 for g in found["groups"]),
        "placement": {e["attention"]: e["rank"] for e in found["layers"]}}}
    doc = "EasySpec drafting: groups of attention sub-layers read the same input, each on its own rank; their KV entries are fuzzy."
    log = [f"easyspec {len(found['groups'])} groups of {section.layer_parallel}: sequential attention depth "
           f"{found['depth']} of {found['sequential_depth']}"]
    return Drafted(exact, {"forward_layer_parallel": (parallel, doc)},
                   [("easyspec", exact), ("easyspec layer_parallel", parallel)],
                   candidates(found), {"layer_parallel": found}, speculate, log)


def describe(speculate: dict) -> str | None:
    """`planc run`'s words for an artifact this drafting compiled (manifest["speculate"])."""
    lp = speculate.get("layer_parallel")
    if not lp:
        return None
    return (f"EasySpec layer_parallel {lp['degree']} ({lp['combine']}, "
            f"{'calibrated' if lp['calibrate'] else 'not calibrated'})")


DRAFTING = Drafting("easyspec", EasySpecSection, draft,
                    "EasySpec layer-parallel drafting with KV calibration; absent: the draft runs its layers in "
                    "order (standard speculative decoding).", describe)


def layer_parallel(graph: fx.Graph, section: EasySpecSection, ctx) -> fx.Graph:
    """`forward_layer_parallel`: groups of N attention sub-layers from one input, one gather each."""
    return _grouped(graph, section.layer_parallel, section, ctx, record=False)


def place(graph: fx.Graph, section: EasySpecSection, ctx) -> fx.Graph:
    """`forward`: the exact draft, each grouped attention on its rank and gathered after it."""
    return _grouped(graph, 1, section, ctx, record=True)


def _grouped(graph: fx.Graph, n: int, section: EasySpecSection, ctx, *, record: bool) -> fx.Graph:
    """Rewrite the drafting groups in chunks of n (n = N or 1): a group with a member that cannot
    run alone stays sequential in both graphs, so both place the same layers on the same ranks."""
    graph = copy_graph(graph)
    cores = [node for node in graph.nodes if "planc" in node.meta and info(node).kind in ATTENTION]
    grouped = cores[1:-1] if section.keep_first_last else cores
    check_degree(section, len(grouped), ctx)
    subs = {core: _sublayer(graph, core, ctx if record else None) for core in grouped}
    combine, size = (section.combine if n > 1 else "seq_mlp"), section.layer_parallel
    for start in range(0, len(grouped), size):
        members = grouped[start:start + size]
        if any(subs[core] is None for core in members):
            continue  # declined above
        for first in range(0, len(members), n):
            chunk = members[first:first + n]
            ranks = tuple((start + first + i) % ctx.world_size for i in range(len(chunk)))
            _rewrite_group(graph, [subs[core] for core in chunk], ranks, combine, ctx)
        for i, core in enumerate(members if record else []):
            ctx.applied(core, f"attention on rank {(start + i) % ctx.world_size}; drafting group {start // size} of {size}")
    return graph


def check_degree(section: EasySpecSection, grouped: int, ctx) -> None:
    n, world = section.layer_parallel, ctx.world_size
    most = min(world, max(grouped, 1))
    if n > most:
        raise PlanError(f"{ctx.where('layer_parallel')}: layer_parallel {n} needs {n} ranks and {n} grouped layers, "
                        f"but the mesh has {world} devices and the draft {grouped} layers to group; valid values: "
                        f"1..{most}")


def _sublayer(graph: fx.Graph, core: fx.Node, ctx) -> _Sublayer | None:
    """The nodes of the core's attention sub-layer; None (declined when ctx is given) when it
    cannot run whole on one rank from its own input."""
    fqn = info(core).fqn
    block = [n for n in graph.nodes if "planc" in n.meta and info(n).block == fqn]
    split = [n for n in block if info(n).strategy != "replicated"]
    inputs = {a for n in block for a in n.all_input_nodes if a not in block}
    norm = next(iter(inputs)) if len(inputs) == 1 else None
    out = next((n for n in block if info(n).fqn == f"{fqn}.o_proj"), None)
    adds = [u for u in out.users if "planc" in u.meta and info(u).kind == "add"] if out is not None else []
    if split:
        why = (f"{info(split[0]).fqn} is split by {info(split[0]).rule} ({info(split[0]).strategy}); a grouped "
               "attention runs whole on one rank: leave the draft's attention replicated")
    elif norm is None or info(norm).kind != "rmsnorm" or any(u not in block for u in norm.users):
        why = "its input is not one RMSNorm read by the attention block alone"
    elif len(out.users) != 1 or len(adds) != 1 or adds[0].args[0] is not norm.args[0]:
        why = "its o_proj does not feed the residual add around it"
    else:
        return _Sublayer(core, norm, block, out, adds[0], norm.args[0])
    if ctx is not None:
        ctx.decline(core, f"stays on every rank, its group sequential: {why}")
    return None


def _rewrite_group(graph: fx.Graph, subs: list[_Sublayer], ranks: tuple[int, ...], combine: str, ctx) -> None:
    h0, first = subs[0].h_in, info(subs[0].core)
    hidden = info(subs[0].out).dims.out_features
    with graph.inserting_before(subs[0].norm):
        normed = [add_node(graph, "rmsnorm", (h0,), info(s.norm), s.norm.name) for s in subs]
        outs = [_attention_node(graph, s, x, rank, ctx) for s, x, rank in zip(subs, normed, ranks)]
        gather = add_node(graph, "easyspec_gather", (h0, *outs), NodeInfo(
            kind="easyspec_gather", layer=first.layer, strategy="easyspec", rule=ctx.rule,
            dims=CommDims(len(subs) * hidden), shard=GroupRanks(ranks),
            why=f"one all-gather of the group's {len(subs)} attention outputs"), f"group{first.layer}")
        parts = [add_node(graph, "easyspec_part", (gather, i), NodeInfo(kind="easyspec_part", layer=info(s.core).layer),
                          f"attn{info(s.core).layer}") for i, s in enumerate(subs)]
    for s, part in zip(subs, parts):
        s.add.replace_input_with(s.out, part)
        for node in reversed(s.block):
            graph.erase_node(node)
        graph.erase_node(s.norm)
    if combine == "sum":
        _sum_attention_first(graph, subs, parts)


def _sum_attention_first(graph: fx.Graph, subs: list[_Sublayer], parts: list[fx.Node]) -> None:
    """h0 + a1 + ... + aN before the first MLP; each later member's attention add is gone."""
    total = subs[0].add
    users = list(total.users)
    for s, part in zip(subs[1:], parts[1:]):
        with graph.inserting_before(users[0]):
            total = add_node(graph, "add", (total, part), NodeInfo(kind="add", layer=info(s.core).layer))
    for user in users:
        user.replace_input_with(subs[0].add, total)
    for s in subs[1:]:
        s.add.replace_all_uses_with(s.h_in)
        graph.erase_node(s.add)


def _attention_node(graph: fx.Graph, s: _Sublayer, x: fx.Node, rank: int, ctx) -> fx.Node:
    m = info(s.core)
    return add_node(graph, "easyspec_attention", (x,), m.with_(
        kind="easyspec_attention", dims=LayerAttention(m.kind, m.dims, rank), strategy="easyspec", rule=ctx.rule,
        shard=OnRank(rank),
        why=f"attention of layer {m.layer} on rank {rank}, from the group's input"), f"attn{m.layer}_r{rank}")


# -- what the compile reports ---------------------------------------------------------------------


def placement(graph: fx.Graph) -> dict[str, Any]:
    """Per attention sub-layer of the layer-parallel graph: its rank (None: every rank), group and
    the sequential attention depth of one forward (groups count once)."""
    layers, groups, depth = [], [], 0
    for node in graph.nodes:
        if "planc" not in node.meta:
            continue
        m = info(node)
        if m.kind in ATTENTION:
            layers.append({"layer": m.layer, "attention": m.fqn, "rank": None, "group": None})
            depth += 1
        elif m.kind == "easyspec_gather":
            members = [info(a) for a in node.args[1:]]
            groups.append([a.layer for a in members])
            layers += [{"layer": a.layer, "attention": a.fqn, "rank": a.dims.rank, "group": len(groups) - 1}
                       for a in members]
            depth += 1
    return {"layers": layers, "groups": groups, "depth": depth, "sequential_depth": len(layers)}


def candidates(found: dict[str, Any]) -> list[dict[str, Any]]:
    """report.json's candidates["easyspec"]: which rank runs which draft attention while drafting."""
    out = []
    for entry in found["layers"]:
        if entry["rank"] is None:
            status, detail = "every rank", "kept sequential: runs on every rank"
        else:
            members = found["groups"][entry["group"]]
            status = f"rank {entry['rank']}"
            detail = (f"group {entry['group']} (layers {', '.join(map(str, members))}): its attention runs on rank "
                      f"{entry['rank']} from the group's input; one all-gather per group; MLP on every rank")
        out.append({"target": entry["attention"], "status": status, "rule": None, "detail": detail,
                    "rank": entry["rank"], "group": entry["group"]})
    return out


# -- runtime: called by the draft program's forward_layer_parallel ------------------------------


def attention(rt, x_BSD: torch.Tensor, step, cache, W: Tensors, layer: LayerAttention) -> torch.Tensor:
    """The attention block (projections, core, o_proj) on its rank: [B, S, D]; an empty [0, D] on
    every other rank, which holds neither its weights nor its cache."""
    if rt.comm.rank != layer.rank:
        return x_BSD.new_empty(0, x_BSD.shape[-1])
    rt.work["grouped_attention"] += 1
    block = rt.ops.gqa_attention if layer.kind == "gqa_attention" else rt.ops.mla_attention
    return block(x_BSD, step, cache, W, layer.dims)


def gather(comm, h_BSD: torch.Tensor, parts: tuple[torch.Tensor, ...], ranks: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Every member's output on every rank, in member order: one all-gather (a rank without a
    member sends nothing)."""
    rows = h_BSD.shape[0] * h_BSD.shape[1]
    mine = next((p.reshape(rows, -1) for p, r in zip(parts, ranks) if r == comm.rank),
                h_BSD.new_empty(0, h_BSD.shape[-1]))
    sizes = [rows if r in ranks else 0 for r in range(comm.world_size)]
    every = comm.all_gather_varlen(mine, sizes)
    order = sorted(ranks)
    return tuple(every[order.index(r) * rows:(order.index(r) + 1) * rows].view_as(h_BSD) for r in ranks)
