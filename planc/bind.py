"""Bind plan rules to semantic-graph nodes by module-FQN glob.

For each block the first rule whose `match` glob fits its FQN *and* whose section fits its kind
wins (an `attention` section fits MLA and GQA blocks, `mlp` dense MLPs, `moe` MoE blocks).
A rule that binds nothing is an error that lists what it could have matched — never skipped.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import block_nodes, copy_graph, info
from planc.plan import Plan, locate

SECTION_KINDS = {"attention": ("mla_attention", "gqa_attention"), "mlp": ("mlp",), "moe": ("moe",)}
STRATEGY_KINDS = {"mla_tp": ("mla_attention",), "tpla": ("mla_attention",), "tp": ("gqa_attention", "mlp"), "ep": ("moe",)}


def bind(graph: fx.Graph, plan: Plan) -> fx.Graph:
    graph = copy_graph(graph)
    nodes = block_nodes(graph, *sorted({k for kinds in SECTION_KINDS.values() for k in kinds}))
    used: set[int] = set()
    for node in nodes:
        index = _first_rule(plan, node)
        if index is None:
            continue
        used.add(index)
        _apply(plan, index, node)
    for index, rule in enumerate(plan.rules):
        if index not in used:
            _unmatched(plan, index, nodes)
    return graph


def _first_rule(plan: Plan, node: fx.Node) -> int | None:
    meta = info(node)
    for index, rule in enumerate(plan.rules):
        if fnmatchcase(meta.fqn, rule.match) and meta.kind in SECTION_KINDS[rule.section_name]:
            return index
    return None


def _apply(plan: Plan, index: int, node: fx.Node) -> None:
    rule, meta = plan.rules[index], info(node)
    strategy = rule.section.strategy
    fits = STRATEGY_KINDS.get(strategy)
    if fits is not None and meta.kind not in fits:
        other = "mla_tp" if meta.kind == "mla_attention" else "tp"
        raise PlanError(f"{locate(plan, ('rules', index, rule.section_name, 'strategy')) or 'plan'}: "
                        f"rules[{index}].{rule.section_name}.strategy: {strategy!r} does not apply to "
                        f"{meta.fqn} ({meta.kind}); use {other!r} or 'replicated'")
    attrs = meta.attrs | {"rule_index": index, "required": rule.section.required}
    node.meta["planc"] = meta.with_(strategy=strategy, rule=f"rules[{index}] ({rule.match})", attrs=attrs)


def _unmatched(plan: Plan, index: int, nodes: list[fx.Node]) -> None:
    rule = plan.rules[index]
    kinds = SECTION_KINDS[rule.section_name]
    candidates = [info(n).fqn for n in nodes if info(n).kind in kinds]
    shown = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    why = "an earlier rule already took every match" if any(fnmatchcase(c, rule.match) for c in candidates) else "no module matches"
    raise PlanError(f"{locate(plan, ('rules', index, 'match')) or 'plan'}: rules[{index}].match {rule.match!r} "
                    f"bound no {rule.section_name} block ({why}). {rule.section_name} blocks in this model: "
                    f"{shown or 'none'}")
