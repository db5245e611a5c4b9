"""Bind plan rules to semantic-graph nodes by module-FQN glob.

A rule's section offers strategies (passes/); each strategy names the node kinds it applies to
(an attention section's: the MLA and GQA cores; the overlap section's: `linear` nodes). For each
such node, the first rule whose `match` glob fits its FQN and whose section offers a strategy for
its kind wins — per section: an `overlap` rule binds a row-parallel `o_proj` whose split an
`attention` rule decides. A rule that binds nothing is an error that lists what it could have
matched — never skipped. Binding records the rule on the node (`NodeInfo.bindings`, and `rule`
when it is the node's first); the strategy is set by its pass.

A block planc runs as captured (planc.lift.captured) cannot be split: a rule whose glob fits it, in
a section that would shard its slot, is an error naming the block — even when the glob also fits
lifted blocks, since the plan asked for a split planc cannot make. A `replicated` rule may take it.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import RuleRef, copy_graph, info, mark, runs
from planc.lift.captured import captured_nodes
from planc.passes import STRATEGIES
from planc.plan import Plan, locate
from planc.strategy import Section


def section_kinds(key: str) -> tuple[str, ...]:
    """Every node kind some strategy of section `key` applies to."""
    return tuple(dict.fromkeys(k for s in STRATEGIES if s.section == key for k in s.kinds))


def strategy_kinds(key: str, value: str) -> tuple[str, ...]:
    return next(s.kinds for s in STRATEGIES if (s.section, s.value) == (key, value))


def matching(graph: fx.Graph, glob: str, kinds: tuple[str, ...]) -> list[fx.Node]:
    """The nodes of `kinds` whose module FQN fits `glob`, in graph order."""
    return [n for n in graph.nodes if "planc" in n.meta and info(n).kind in kinds and fnmatchcase(info(n).fqn, glob)]


def rule_refs(plan: Plan) -> list[tuple[RuleRef, str, Section]]:
    """(where the rule is, its section key, its section) for every rule, in order."""
    return [(RuleRef(i, r.match, locate(plan, ("rules", i)) or "plan", r.section.required, r.section_name),
             r.section_name, r.section) for i, r in enumerate(plan.rules)]


def _bind(node: fx.Node, ref: RuleRef) -> None:
    m = info(node)
    mark(node, rule=m.rule or ref, bindings=(*m.bindings, ref))


def _bound_in(node: fx.Node, key: str) -> bool:
    return any(ref.section == key for ref in info(node).bindings)


def bind(graph: fx.Graph, plan: Plan) -> fx.Graph:
    graph = copy_graph(graph)
    used: set[int] = set()
    for ref, key, section in rule_refs(plan):
        taken = _captured_matching(graph, ref.match, key)
        if taken:
            used.add(ref.index)
            _check_replicated(plan, ref, key, section, taken)
        for node in taken:
            _bind(node, ref)
        nodes = [n for n in matching(graph, ref.match, section_kinds(key)) if not _bound_in(n, key)]
        if nodes:
            used.add(ref.index)
            _check_fits(plan, ref, key, section, nodes)
        for node in nodes:
            _bind(node, ref)
    for ref, key, _ in rule_refs(plan):
        if ref.index not in used:
            _unmatched(plan, ref, key, graph)
    return graph


def layer_blind(graph: fx.Graph, plan: Plan) -> bool:
    """Whether every rule binds every layer of each folded run alike, so that binding a run's first
    layer binds them all. A glob without digits, `?` or `[` cannot tell layers apart (a `*` that
    takes one layer's index takes any other's); one with them is matched in every layer of the run."""
    found = runs(graph)
    telling = [r.match for r in plan.rules if any(ch.isdigit() or ch in "?[" for ch in r.match)]
    if not found or not telling:
        return True
    for node in graph.nodes:
        m = info(node) if "planc" in node.meta else None
        run = found.get(m.layer) if m is not None and m.fqn else None
        if run is not None and any(len({fnmatchcase(fqn, glob) for fqn in run.fqns(m.fqn)}) > 1 for glob in telling):
            return False
    return True


def _captured_matching(graph: fx.Graph, glob: str, key: str) -> list[fx.Node]:
    """Run-as-captured blocks no earlier rule took, in a slot where section `key` lifts something."""
    kinds = set(section_kinds(key))
    return [n for n in captured_nodes(graph) if info(n).rule is None and kinds & set(info(n).dims.lifts)
            and fnmatchcase(info(n).fqn, glob)]


def _check_replicated(plan: Plan, ref: RuleRef, key: str, section: Section, taken: list[fx.Node]) -> None:
    if section.choice == "replicated":
        return
    m = info(taken[0])
    more = f" (and {len(taken) - 1} more such blocks)" if len(taken) > 1 else ""
    field = section.discriminator
    raise PlanError(f"{locate(plan, ('rules', ref.index, key, field)) or 'plan'}: rules[{ref.index}].{key}.{field} "
                    f"{section.choice!r} (match {ref.match!r}) asks to shard {m.fqn} ({m.cls}){more}, which planc "
                    f"runs as captured, whole on every rank: {m.dims.why}. Narrow the match to leave it out, or "
                    f"use strategy 'replicated' for it")


def _check_fits(plan: Plan, ref: RuleRef, key: str, section: Section, nodes: list[fx.Node]) -> None:
    fits = strategy_kinds(key, section.choice)
    wrong = [n for n in nodes if info(n).kind not in fits]
    if wrong:
        kind = info(wrong[0]).kind
        others = [s.value for s in STRATEGIES if s.section == key and kind in s.kinds]
        field = section.discriminator
        raise PlanError(f"{locate(plan, ('rules', ref.index, key, field)) or 'plan'}: "
                        f"rules[{ref.index}].{key}.{field}: {section.choice!r} does not apply to "
                        f"{info(wrong[0]).fqn} ({kind}); use one of {', '.join(map(repr, others))}")


def _unmatched(plan: Plan, ref: RuleRef, key: str, graph: fx.Graph) -> None:
    candidates = [info(n).fqn for n in matching(graph, "*", section_kinds(key))]
    shown = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    why = ("an earlier rule already took every match" if any(fnmatchcase(c, ref.match) for c in candidates)
           else "no module matches")
    raise PlanError(f"{locate(plan, ('rules', ref.index, 'match')) or 'plan'}: rules[{ref.index}].match {ref.match!r} "
                    f"bound no {key} block ({why}). {key} blocks in this model: {shown or 'none'}")
