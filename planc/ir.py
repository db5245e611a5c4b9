"""The semantic graph: torch.fx nodes annotated under meta["planc"] with a typed NodeInfo.

Node targets are stand-in functions named after their op kind, so `print(graph)` reads like the
model at GEMM level:

    q = linear(x)  [model.layers.0.self_attn.q_b_proj]
    o = mla_attention(q, kv)  [model.layers.0.self_attn]
    a = linear(o)  [model.layers.0.self_attn.o_proj];  a_1 = all_reduce(a)

Every op kind is declared once as an OpSpec (its emitted call, whether it holds weights, which
collective it is); base kinds in planc.semantic, a strategy's own kinds in its module under
passes/. Passes rewrite strategies and shards; codegen, partition and the report read only the
OpSpecs and the typed NodeInfo.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Any, Literal

from planc.dims import CommDims
from planc.lazy import lazy

torch = lazy("torch")
fx = lazy("torch.fx")


Tensors = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class RuleRef:
    """The plan rule that put a node under its strategy, and where that rule is written."""

    index: int
    match: str
    where: str  # "plan.yaml:7:5" (or "plan" without a source)
    required: bool = False
    section: str = ""  # the rule's section key ("attention", "overlap")

    def __str__(self) -> str:
        return f"rules[{self.index}] ({self.match})"

    @property
    def label(self) -> str:
        """rules[i]; a pass configured outside the rules (index -1) goes by its plan field."""
        return f"rules[{self.index}]" if self.index >= 0 else self.match


class Shard:
    """A strategy's typed per-rank layout of one node (subclasses are frozen dataclasses).

    `local` gives the dims one rank's op sees, `slice` one rank's tensors of the node (keyed by
    their name under the node's FQN), `describe` the scalars shown in the report and program."""

    def local(self, dims: Any) -> Any:
        return dims

    def slice(self, W: Tensors, info: "NodeInfo", rank: int) -> Tensors:
        return W

    def describe(self) -> dict[str, Any]:
        return {f.name: v for f in dataclasses.fields(self)
                if isinstance(v := getattr(self, f.name), (int, float, str, bool)) and f.repr}


Segments = tuple[tuple[int, int], ...]  # [lo, hi) pieces, concatenated in order


@dataclass(frozen=True)
class LinearShard(Shard):
    """A GEMM split over ranks. column: rank r holds output rows segments[r] of W (and of the bias);
    row: rank r holds input columns segments[r] of W, its output is a partial sum, and the bias
    stays on rank 0 (the all-reduce would add it n times)."""

    layout: Literal["column", "row"]
    segments: tuple[Segments, ...] = field(repr=False)

    def width(self, rank: int = 0) -> int:
        return sum(hi - lo for lo, hi in self.segments[rank])

    def local(self, dims: Any) -> Any:
        return replace(dims, out_features=self.width()) if self.layout == "column" else replace(dims, in_features=self.width())

    def slice(self, W: Tensors, info: "NodeInfo", rank: int) -> Tensors:
        out = dict(W)
        if self.layout == "column":
            out["weight"] = take(W["weight"], self.segments[rank], 0)
            if "bias" in W:
                out["bias"] = take(W["bias"], self.segments[rank], 0)
        else:
            out["weight"] = take(W["weight"], self.segments[rank], 1)
            if "bias" in W and rank != 0:
                out["bias"] = torch.zeros_like(W["bias"])
        return out

    def describe(self) -> dict[str, Any]:
        return {"layout": self.layout, "width_per_rank": self.width()}


def take(t: torch.Tensor, segments: Segments, dim: int) -> torch.Tensor:
    """The pieces of `t` along `dim`, concatenated (a view when there is one piece)."""
    pieces = [t.narrow(dim, lo, hi - lo) for lo, hi in segments]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def even_ranges(total: int, parts: int, unit: int = 1) -> tuple[Segments, ...]:
    """One [lo, hi) piece per rank: `parts` equal pieces of `total` units of `unit` elements each."""
    per = total // parts
    return tuple((((r * per * unit, (r + 1) * per * unit),)) for r in range(parts))


@dataclass(frozen=True)
class NodeInfo:
    kind: str  # the op kind (an OpSpec)
    fqn: str = ""  # module FQN the node computes (a projection, a block core, a norm)
    block: str = ""  # FQN of the block the node belongs to (attention or feed-forward), "" outside
    cls: str = ""
    layer: int | None = None
    dims: Any = None  # a planc.dims dataclass: the op's whole (unsharded) shape facts
    strategy: str = "replicated"
    rule: RuleRef | None = None  # the rule behind the node's current strategy
    bindings: tuple[RuleRef, ...] = ()  # every rule bind gave the node, at most one per section
    shard: Shard | None = None
    why: str = ""  # collectives: what they sum or move

    def with_(self, **changes: Any) -> "NodeInfo":
        return replace(self, **changes)

    def local_dims(self) -> Any:
        """The dims one rank's op sees."""
        return self.shard.local(self.dims) if self.shard is not None else self.dims


def info(node: fx.Node) -> NodeInfo:
    return node.meta["planc"]


# -- op kinds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Definition:
    """A module-level function an emitted call uses (a run-as-captured block's code): the program
    defines it once, however many nodes call it. `source` is `def <name>(...): ...`."""

    name: str
    source: str
    imports: tuple[str, ...] = ()  # lines the function needs (`import torch`)


@dataclass
class Call:
    """What an OpSpec's emitter sees: the node, its argument names, and constants and functions
    to declare at module level."""

    node: fx.Node
    info: NodeInfo
    args: list[str]
    const: Callable[[str, Any], str]  # (prefix, value) -> name of a module-level constant
    define: Callable[[Definition], str]  # a module-level function -> its name
    # in the body of a loop over a folded run's layers: (the variable holding the layer's prefix,
    # the run's first prefix, which the node's FQN carries)
    loop: tuple[str, str] | None = None

    def name(self, suffix: str = "") -> str:
        """The node's module FQN + `suffix` as a Python expression: an escaped literal, or in a
        folded run's loop, the layer's prefix + the literal rest."""
        full = self.info.fqn + suffix
        if self.loop is not None:
            at, first = self.loop
            if full == first or full.startswith(first + "."):
                return f"{at} + {full[len(first):]!r}"
        return repr(full)

    @property
    def W(self) -> str:
        return f"W.scope({self.name()})"

    def weight(self, name: str) -> str:
        return f"W[{self.name('.' + name)}]"

    def maybe(self, name: str) -> str:
        return f"W.get({self.name('.' + name)})"

    @property
    def dims(self) -> str:
        return self.const(type(self.info.dims).__name__.removesuffix("Dims").upper() or "DIMS", self.info.local_dims())


@dataclass(frozen=True)
class Traffic:
    """What one call of an op moves in one step, as the runtime's Comm wrapper counts it: `calls`
    calls of `op` moving `bytes_per_token` logical bytes per token of the step in all."""

    op: str
    calls: int
    bytes_per_token: int


@dataclass(frozen=True)
class OpSpec:
    kind: str
    emit: Callable[[Call], str]  # the program expression computing the node
    owns_weights: bool = False  # partition gives the node the tensors under its FQN
    rotary: bool = False  # ... plus `rotary.inv_freq` (the model's rope frequencies)
    imports: tuple[str, ...] = ()  # lines the program needs for the emitted call
    collective: Literal["all_reduce", "all_gather", "all_gather_varlen", "all_to_all", "reduce_scatter"] | None = None
    step: bool = False  # the op depends on the position in the sequence (prefill vs decode)
    kernels: tuple[str, ...] = ()  # files of kernels/ its call can run, under some --kernels choice
    # An op whose communication is not one collective call (a GEMM fused with its ring): what it
    # moves in a "decode" or "prefill" step, given (node, step, element bytes, world size).
    traffic: Callable[[NodeInfo, str, int, int], tuple[Traffic, ...]] | None = None


OPS: dict[str, OpSpec] = {}
_TARGETS: dict[str, Callable] = {}


def declare_op(kind: str, emit: Callable[[Call], str], **traits: Any) -> None:
    """Declare an op kind (once per kind; a module reloaded by a test may declare it again)."""
    OPS[kind] = OpSpec(kind, emit, **traits)
    if kind not in _TARGETS:
        def stand_in(*args: Any) -> Any:
            raise RuntimeError(f"semantic graph node {kind} is a description; run the generated program")

        stand_in.__name__ = stand_in.__qualname__ = kind
        _TARGETS[kind] = stand_in


def add_node(graph: fx.Graph, kind: str, args: tuple, meta: NodeInfo, name: str | None = None) -> fx.Node:
    node = graph.call_function(_TARGETS[kind], args)
    node.meta["planc"] = meta
    if name:
        node._rename(name)
    return node


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep enough copy for a pure pass: new nodes; NodeInfo is frozen, so sharing it is safe.
    The copy stands for the same layers (its runs)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    for old, fresh in env.items():
        fresh.meta = copy.copy(old.meta)
    set_runs(new, runs(graph))
    return new


# -- folded runs of identical layers --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Consecutive decoder layers of one structure that a folded graph holds once: its nodes of
    layer `layers[0]` stand for every layer here. prefixes: each layer's module FQN
    ("model.layers.3"), so that a node's FQN in any of them is its own with the prefix swapped."""

    layers: tuple[int, ...]
    prefixes: tuple[str, ...]

    def fqn(self, fqn: str, i: int) -> str:
        """`fqn` (under the first layer) in the run's i-th layer; an FQN outside the layer as it is."""
        first = self.prefixes[0]
        if fqn == first or fqn.startswith(first + "."):
            return self.prefixes[i] + fqn[len(first):]
        return fqn

    def fqns(self, fqn: str) -> list[str]:
        return [self.fqn(fqn, i) for i in range(len(self.layers))]

    def text(self, text: str, i: int) -> str:
        """A message about the first layer as it reads about the i-th (its FQNs moved there)."""
        return text.replace(self.prefixes[0] + ".", self.prefixes[i] + ".") if i else text


def runs(graph: fx.Graph) -> dict[int, Run]:
    """First layer -> its run, for a folded graph (runs of one layer are not listed); {} unfolded."""
    return getattr(graph, "planc_runs", {})


def set_runs(graph: fx.Graph, found: dict[int, Run]) -> None:
    graph.planc_runs = dict(found)


def run_of(graph: fx.Graph, m: NodeInfo) -> Run | None:
    """The run a node's layer heads (None: the node stands for itself alone)."""
    return runs(graph).get(m.layer) if m.layer is not None else None


def repeats(graph: fx.Graph, m: NodeInfo) -> int:
    """How many layers the node stands for (1 outside a folded run)."""
    run = run_of(graph, m)
    return len(run.layers) if run is not None else 1


def unfold_fqn(graph: fx.Graph, fqn: str) -> list[str]:
    """Every module FQN a folded graph's `fqn` stands for: one per layer of the run it lies in."""
    run = run_holding(graph, fqn)
    return run.fqns(fqn) if run is not None else [fqn]


def run_bodies(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    """First layer of each folded run -> its body: the nodes of that layer, which a program runs
    as a loop over the run's layers."""
    found = runs(graph)
    bodies: dict[int, list[fx.Node]] = {}
    for n in graph.nodes:
        if "planc" in n.meta and info(n).layer in found:
            bodies.setdefault(info(n).layer, []).append(n)
    return bodies


def loop_misfit(graph: fx.Graph) -> str | None:
    """Why a folded graph cannot run each run as a loop (None when it can): a body must be one
    stretch of the graph that reads one value of the layers before (the residual stream, carried
    from layer to layer) and gives one value to what follows."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for layer, body in run_bodies(graph).items():
        carried, out = loop_ends(body)
        inside = set(body)
        if order[body[-1]] - order[body[0]] + 1 != len(body):
            return f"layer {layer}'s nodes are not one stretch of the graph"
        if len(carried) != 1 or len(out) != 1 or any(u not in inside for a in carried for u in a.users):
            return (f"layer {layer} reads {sorted(a.name for a in carried)} of the layers before and gives "
                    f"{[n.name for n in out]} to what follows; a loop carries one value")
    return None


def loop_ends(body: list[fx.Node]) -> tuple[set[fx.Node], list[fx.Node]]:
    """What a run's body reads of the graph before it (inputs aside) and which of its nodes the
    graph after it reads."""
    inside = set(body)
    carried = {a for n in body for a in n.all_input_nodes if a not in inside and a.op != "placeholder"}
    return carried, [n for n in body if any(u not in inside for u in n.users)]


def run_holding(graph: fx.Graph, fqn: str) -> Run | None:
    """The folded run whose first layer `fqn` lies in."""
    for run in runs(graph).values():
        first = run.prefixes[0]
        if fqn == first or fqn.startswith(first + "."):
            return run
    return None


def unfold_entries(entries: Iterable[Any], run_of_entry: Callable[[Any], Run | None],
                   move: Callable[[Any, Run, int], Any], apart: Callable[[Any], Any] = lambda e: None) -> list[Any]:
    """Entries about nodes (records, candidates, decode ops), in graph order, as an unfolded graph
    gives them: consecutive entries about one folded run's first layer (and alike under `apart`:
    one pass's walk over the graph) once for each of its layers, layer by layer (`move(entry, run,
    i)`: the entry as it reads in the run's i-th layer)."""
    out: list[Any] = []
    for (run, _), group in groupby(entries, key=lambda e: (run_of_entry(e), apart(e))):
        group = list(group)
        out += group if run is None else [move(e, run, i) for i in range(len(run.layers)) for e in group]
    return out


def nodes_of(graph: fx.Graph, *kinds: str) -> list[fx.Node]:
    return [n for n in graph.nodes if "planc" in n.meta and info(n).kind in kinds]


def block_members(graph: fx.Graph, fqns: Iterable[str]) -> dict[str, dict[str, fx.Node]]:
    """For each of `fqns`: the nodes computing it and its submodules, keyed by FQN relative to it
    ("" for the node of the FQN itself, "o_proj", "shared_experts.down_proj", ...), the first node
    of each FQN. One walk of the graph for all: a pass that rewrites every layer's block asks for
    them all before its first rewrite (each rewrite adds nodes under its own block only)."""
    found: dict[str, dict[str, fx.Node]] = {fqn: {} for fqn in fqns}
    for n in graph.nodes:
        if "planc" not in n.meta:
            continue
        fqn = info(n).fqn
        for cut in [len(fqn)] + [i for i in range(len(fqn) - 1, 0, -1) if fqn[i] == "."]:
            if fqn[:cut] in found:
                found[fqn[:cut]].setdefault(fqn[cut + 1:], n)
    return found


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


def node_json(node: fx.Node) -> dict[str, Any]:
    """One node of an intermediate graph as data (report.json, inspect, the cost model)."""
    if "planc" not in node.meta:
        return {"name": node.name, "kind": node.op, "args": [a.name for a in node.all_input_nodes]}
    m = info(node)
    return {"name": node.name, "kind": m.kind, "fqn": m.fqn, "block": m.block, "layer": m.layer,
            "strategy": m.strategy, "rule": m.rule.index if m.rule else None, "why": m.why,
            "shard": m.shard.describe() if m.shard is not None else {},
            "args": [a.name if isinstance(a, fx.Node) else None for a in node.args]}


def graph_json(graph: fx.Graph) -> list[dict[str, Any]]:
    """The nodes as data; in a folded graph, a node of a run's first layer also gives the run it
    stands for, `run: [first layer, count]` (the same node, its layer index swapped, in each)."""
    nodes = [node_json(n) for n in graph.nodes]
    found = runs(graph)
    if found:
        for n in nodes:
            run = found.get(n.get("layer"))
            if run is not None:
                n["run"] = [run.layers[0], len(run.layers)]
    return nodes


def format_graph(graph: fx.Graph) -> str:
    """One line per node: `name = kind(args)  # fqn  strategy rule  shard`, the form `planc compile
    --graph` prints and report.json keeps."""
    lines, found, layer = [], runs(graph), None
    for n in graph.nodes:
        m = info(n) if "planc" in n.meta else None
        if m is not None and m.layer != layer and m.layer in found:
            run = found[m.layer]
            lines.append(f"# layers {run.layers[0]}-{run.layers[-1]}: one body for {len(run.layers)} layers")
        layer = m.layer if m is not None else layer
        if n.op == "placeholder":
            lines.append(f"{n.name} = input")
        elif n.op == "output":
            lines.append(f"return {n.args[0].name}")
        else:
            m = info(n)
            args = ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in n.args)
            notes = [m.fqn] if m.fqn else []
            if m.rule is not None:
                notes.append(f"{m.strategy} {m.rule.label}")
            notes += [f"{k}={v}" for k, v in (m.shard.describe() if m.shard is not None else {}).items()]
            notes += [m.why] if m.why else []
            lines.append(f"{n.name} = {m.kind}({args})" + (f"  # {'  '.join(notes)}" if notes else ""))
    return "\n".join(lines)


def mark(node: fx.Node, **changes: Any) -> None:
    """Replace a node's NodeInfo with an updated copy (NodeInfo is frozen)."""
    node.meta["planc"] = info(node).with_(**changes)


def sum_partials_after(graph: fx.Graph, node: fx.Node, why: str, width: int | None = None) -> fx.Node:
    """`node`'s output is a per-rank partial sum (a row-parallel GEMM's; `width` wide, by default
    the GEMM's out_features): all-reduce it before its users. Where it is added to another partial
    sum already all-reduced, the partials are summed first and all-reduced once:

    - beside it: all_reduce(r) + s(m) -> all_reduce(r + s(m)) (a MoE block's routed and shared
      experts both split, as vLLM sums them);
    - across a residual (a parallel layer, both branches reading the layer's input):
      h + all_reduce(a) + m -> h + all_reduce(a + m).

    The scales between them are constant factors, so they commute with the sum over ranks, and so
    does a per-token gate every rank computes alike (Qwen2-MoE's sigmoid-gated shared expert): the
    all-reduce goes after it, where it can meet the routed experts'."""
    m = info(node)
    dims = CommDims(width if width is not None else m.dims.out_features)
    while len(node.users) == 1 and is_kind(gated := next(iter(node.users)), "sigmoid_scale") and gated.args[1] is node:
        node = gated
    beside = _summed_beside(node, dims)
    if beside is not None:
        return _sum_beside(graph, m, *beside)
    both = _parallel_partials(node, dims)
    if both is not None:
        return _sum_both(graph, node, m, *both)
    return insert_after(graph, node, "all_reduce", NodeInfo(
        kind="all_reduce", fqn=m.fqn, block=m.block, layer=m.layer, rule=m.rule, strategy=m.strategy,
        dims=dims, why=why))


def _reduced_partial(node: Any, dims: CommDims) -> bool:
    """An all-reduce of `dims` whose output feeds one node only."""
    return is_kind(node, "all_reduce") and len(node.users) == 1 and info(node).dims == dims


def _summed_beside(node: fx.Node, dims: CommDims) -> tuple[fx.Node, fx.Node] | None:
    """(the add, the all_reduce) when `node`'s one user adds it to an all-reduced partial sum."""
    if len(node.users) != 1 or not is_kind(add := next(iter(node.users)), "add"):
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    return (add, other) if other is not node and _reduced_partial(other, dims) else None


def _sum_beside(graph: fx.Graph, m: NodeInfo, add: fx.Node, reduce: fx.Node) -> fx.Node:
    """all_reduce(r) + s(node) -> all_reduce(r + s(node)); `m`: the partial's producer."""
    add.args = tuple(reduce.args[0] if a is reduce else a for a in add.args)
    graph.erase_node(reduce)
    return insert_after(graph, add, "all_reduce", info(reduce).with_(
        fqn=m.fqn, block=m.block, rule=m.rule, strategy=m.strategy,
        why=f"{_short(info(reduce).fqn)} and {_short(m.fqn)} are both partial sums: one all-reduce sums both"))


def _parallel_partials(node: fx.Node, dims: CommDims) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(second add, first add, all_reduce) when `node` is the second branch of a residual pair
    `add(add(h, all_reduce(a)), node)` whose first add and all-reduce feed nothing else: then
    `node` cannot depend on the first add (its only user comes after `node`), so the branches are
    parallel and their partials can be summed before one all-reduce."""
    if len(node.users) != 1:
        return None
    second = next(iter(node.users))
    if not is_kind(second, "add") or second.args[1] is not node or not is_kind(first := second.args[0], "add"):
        return None
    if len(first.users) != 1 or not _reduced_partial(first.args[1], dims):
        return None
    return second, first, first.args[1]


def _short(fqn: str) -> str:
    return fqn.rsplit(".", 1)[-1]


def is_kind(node: Any, kind: str) -> bool:
    """Whether `node` is a semantic-graph node of op `kind` (False for placeholders, output, non-nodes)."""
    return isinstance(node, fx.Node) and "planc" in node.meta and info(node).kind == kind


def _sum_both(graph: fx.Graph, node: fx.Node, m: NodeInfo, second: fx.Node, first: fx.Node, reduce: fx.Node
              ) -> fx.Node:
    """h + s1(all_reduce(a)) + s2(node) -> h + all_reduce(s1(a) + s2(node)); `m`: the partial's producer."""
    a = reduce.args[0]
    with graph.inserting_before(second):
        if info(first).dims is not None:
            a = add_node(graph, "scale", (a,), NodeInfo(kind="scale", layer=m.layer, dims=info(first).dims), "a")
        both = add_node(graph, "add", (a, node), NodeInfo(kind="add", layer=m.layer, dims=info(second).dims), "partials")
        summed = add_node(graph, "all_reduce", (both,), info(reduce).with_(
            fqn=m.fqn, block=m.block, rule=m.rule, strategy=m.strategy,
            why=f"{_short(info(reduce).fqn)} and {_short(m.fqn)} are row-parallel in a parallel layer: one "
                "all-reduce sums both branches' partial outputs"))
    second.args = (first.args[0], summed)
    mark(second, dims=None)
    graph.erase_node(first)
    graph.erase_node(reduce)
    return summed
