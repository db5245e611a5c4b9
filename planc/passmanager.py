"""Run the strategies' passes in a fixed order, keep every intermediate graph, record what each did.

Each strategy's pass runs once per plan rule that selects it, as `(graph, section, ctx)`, on the
nodes that rule bound (`ctx.bound(graph)`); it is pure: it copies before rewriting. A pass that
cannot honour a rule on a node calls `ctx.decline(node, reason)`: the node keeps its previous
strategy and the decline is recorded; under `strict`, or when the rule says `required: true`,
the decline is an error naming the rule's file:line:column.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch.fx as fx

from planc.calibrate import Profiles
from planc.errors import CompileError, PlancError
from planc.ir import NodeInfo, RuleRef, format_graph, graph_json, info, run_holding, runs, unfold_entries, unfold_fqn
from planc.strategy import Section, Strategy


@dataclass(frozen=True)
class Record:
    pass_name: str
    target: str  # module FQN
    action: str  # "applied" | "declined"
    detail: str
    rule: int | None = None
    kind: str = ""  # the node's op kind: a block core ("mla_attention") or a projection ("linear")


@dataclass
class PassContext:
    world_size: int
    strict: bool = False
    profiles: Profiles = field(default_factory=lambda: Profiles(None))
    records: list[Record] = field(default_factory=list)
    current: str = ""
    rule: RuleRef | None = None
    graphs: list[tuple[str, fx.Graph]] = field(default_factory=list)  # (after pass, graph)
    notes: dict[str, dict] = field(default_factory=dict)  # pass -> FQN -> what it decided from data
    advice: list[str] = field(default_factory=list)  # things a user should know about the plan

    def note(self, node: fx.Node, **facts) -> None:
        self.notes.setdefault(self.current, {}).setdefault(info(node).fqn, {}).update(facts)

    def bound(self, graph: fx.Graph, kinds: Sequence[str]) -> list[fx.Node]:
        """The nodes of `kinds` that the current rule bound."""
        return [n for n in graph.nodes if "planc" in n.meta and info(n).kind in kinds
                and any(ref.index == self.rule.index for ref in info(n).bindings)]

    def applied(self, node: fx.Node, detail: str) -> None:
        self.records.append(Record(self.current, info(node).fqn, "applied", detail, self.rule.index, info(node).kind))

    def decline(self, node: fx.Node, reason: str) -> None:
        meta: NodeInfo = info(node)
        self.records.append(Record(self.current, meta.fqn, "declined", reason, self.rule.index, meta.kind))
        if self.strict or self.rule.required:
            why = "required: true" if self.rule.required else "strict mode"
            raise CompileError(f"{self.rule.where}: {self.rule.label}: {self.current} declined on {meta.fqn} "
                               f"({why}): {reason}")

    def where(self, field_name: str = "") -> str:
        """'plan.yaml:7:5: rules[1].attention.latent_groups' for errors about the current rule."""
        return f"{self.rule.where}: {self.rule.label}{'.' + field_name if field_name else ''}"

    def unfold(self, graph: fx.Graph) -> None:
        """What the passes recorded about a folded run's first layer, for every layer of the run
        (records and notes by module FQN)."""
        if not runs(graph):
            return
        self.records = unfold_entries(self.records, lambda r: run_holding(graph, r.target),
                                      lambda r, run, i: replace(r, target=run.fqn(r.target, i), detail=run.text(r.detail, i)),
                                      apart=lambda r: (r.pass_name, r.rule))
        self.notes = {name: {fqn: facts for key, facts in found.items() for fqn in unfold_fqn(graph, key)}
                      for name, found in self.notes.items()}

    def graph_texts(self) -> dict[str, str]:
        return {name: format_graph(g) for name, g in self.graphs}

    def graph_nodes(self) -> dict[str, list[dict]]:
        return {name: graph_json(g) for name, g in self.graphs}


def run_passes(graph: fx.Graph, strategies: Sequence[Strategy], rules: Sequence[tuple[RuleRef, str, Section]],
               ctx: PassContext) -> fx.Graph:
    """Every strategy in order, once per rule (ref, section key, section) that selects it, in rule order."""
    ctx.graphs.append(("lift", graph))
    done: list[str] = []
    for strategy in strategies:
        ctx.current = strategy.name
        for ref, key, section in rules:
            if (key, section.choice) != (strategy.section, strategy.value):
                continue
            ctx.rule = ref
            try:
                graph = strategy.rewrite(graph, section, ctx)
            except PlancError:
                raise
            except Exception as exc:  # a bug in a pass: say where the pipeline was
                raise RuntimeError(f"pass {strategy.name!r} on {ref} failed after {done or 'no passes'}: {exc}") from exc
            graph.lint()
        if strategy.name not in done:
            done.append(strategy.name)
        if graph is not ctx.graphs[-1][1]:  # a pass with no rule to run leaves the graph as it was
            ctx.graphs.append((strategy.name, graph))
    return graph
