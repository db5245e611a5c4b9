"""Run passes in a fixed order, keep every intermediate graph printable, record what each did.

A pass is `(graph, ctx) -> graph`, pure: it copies before rewriting (planc.ir.copy_graph). A
pass that cannot honour a rule calls `ctx.decline(node, reason)`; in strict mode, or when the
rule says `required: true`, the decline is an error naming the plan field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from planc.errors import CompileError, PlancError
from planc.ir import NodeInfo
from planc.plan import Plan, locate


@dataclass(frozen=True)
class Record:
    pass_name: str
    target: str  # module FQN
    action: str  # "applied" | "declined"
    detail: str


@dataclass
class PassContext:
    plan: Plan
    world_size: int
    strict: bool = True
    records: list[Record] = field(default_factory=list)
    current: str = ""
    graphs: list[tuple[str, str]] = field(default_factory=list)  # (after pass, printed graph)

    def applied(self, node: fx.Node, detail: str) -> None:
        self.records.append(Record(self.current, node.meta["planc"].fqn, "applied", detail))

    def decline(self, node: fx.Node, reason: str) -> None:
        meta: NodeInfo = node.meta["planc"]
        self.records.append(Record(self.current, meta.fqn, "declined", reason))
        required = meta.attrs.get("required", False)
        if self.strict or required:
            raise CompileError(f"{self.where(meta)}: {self.current} declined on {meta.fqn}: {reason}")

    def where(self, meta: NodeInfo) -> str:
        """'plan.yaml:7:5: rules[1]' for the rule that put a node under a pass."""
        index = meta.attrs.get("rule_index")
        if index is None:
            return "plan"
        return f"{locate(self.plan, ('rules', index)) or 'plan'}: rules[{index}]"


Pass = Callable[[fx.Graph, PassContext], fx.Graph]


def run_passes(graph: fx.Graph, passes: list[tuple[str, Pass]], ctx: PassContext) -> fx.Graph:
    ctx.graphs.append(("lift", str(graph)))
    done: list[str] = []
    for name, fn in passes:
        ctx.current = name
        try:
            graph = fn(graph, ctx)
        except PlancError:
            raise
        except Exception as exc:  # a bug in a pass: say where the pipeline was
            raise RuntimeError(f"pass {name!r} failed after {done or 'no passes'}: {exc}") from exc
        graph.lint()
        done.append(name)
        ctx.graphs.append((name, str(graph)))
    return graph
