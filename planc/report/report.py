"""report.json: what the compile decided and what it will cost, per rank.

Everything here is read from the graph's typed NodeInfo and the OpSpecs: cache layouts from the
dims each rank's ops see (`local_dims().cache()`), collectives from the nodes whose op is one, with
the ring formulas the runtime's Comm wrapper uses, so a real run can be checked call for call.

`decode_ops` is the same facts node by node, in program order, for planc.cost's per-rank timeline
of a decode step (planc.report.timeline): every node that reads weights or cached tokens or
communicates, stored once with one entry per rank in each list:

    {"node": "q_2", "kind": "linear", "fqn": "model.layers.0.self_attn.q_b_proj", "layer": 0,
     "strategy": "mla_tp", "weight_bytes": [24576, 24576], "kv_bytes_per_token": [0, 0],
     "collectives": []}
    {"node": "all_reduce", "kind": "all_reduce", ..., "weight_bytes": [0, 0], "kv_bytes_per_token": [0, 0],
     "collectives": [{"op": "all_reduce", "calls": 1, "bytes_per_token": 512}]}

Summed over the nodes they are `per_rank` and `collectives_per_decode_step` exactly. In a folded
graph (planc.ir.Run) the body of a run of identical layers is listed once, its entries carrying
`run: [first layer, count]`; planc.cost.decode_ops reads them out layer by layer. Everything else
here (cache layouts, collectives, candidates, records) is given for every layer.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from planc.codegen.partition import owned_names, owners
from planc.ir import OPS, Run, info, repeats, run_holding, run_of, runs, unfold_entries
from planc.lift.captured import captured_nodes
from planc.passes import STRATEGIES
from planc.passmanager import PassContext
from planc.ring import ring_all_gather_bytes, ring_all_reduce_bytes, ring_reduce_scatter_bytes


def node_cache(node: fx.Node) -> dict | None:
    """What one rank of an attention op caches per token (None: the op keeps no cache)."""
    if "planc" not in node.meta or not OPS[info(node).kind].step:
        return None
    local = info(node).local_dims()
    return local.cache() if hasattr(local, "cache") else None


def cache_specs(graph: fx.Graph) -> dict[str, dict]:
    """Per attention op (every layer of a folded run): what one rank caches per token."""
    return {fqn: spec for node in graph.nodes if (spec := node_cache(node)) is not None
            for fqn in _fqns(graph, info(node))}


def _fqns(graph: fx.Graph, m) -> list[str]:
    """The node's FQN in every layer it stands for (one, outside a folded run)."""
    run = run_of(graph, m)
    return run.fqns(m.fqn) if run is not None else [m.fqn]


def cache_width(spec: dict) -> int:
    return spec["ckv"] + spec["kpe"] if spec["kind"] == "mla" else 2 * spec["kv_heads"] * spec["head_dim"]


def kv_bytes_per_token(specs: dict[str, dict], elem: int, rank: int = 0) -> int:
    """What `rank` caches per token (a layer placed on one rank counts there alone)."""
    return sum(cache_width(s) for s in specs.values() if s.get("rank", rank) == rank) * elem


def cache_bytes_per_rank(spec: dict | None, elem: int, world: int) -> list[int]:
    """One op's cache bytes per token on each rank (a layer placed on one rank caches there alone)."""
    if spec is None:
        return [0] * world
    return [cache_width(spec) * elem if spec.get("rank", r) == r else 0 for r in range(world)]


RING = {"all_reduce": ring_all_reduce_bytes, "all_gather": ring_all_gather_bytes, "all_gather_varlen": ring_all_gather_bytes,
        "reduce_scatter": ring_reduce_scatter_bytes}


def node_collectives(node: fx.Node, elem: int, world: int, step: str = "decode") -> list[dict]:
    """What one node moves in one forward step ("decode" or "prefill"), one entry per collective op:
    {"op", "calls", "bytes_per_token"} in logical bytes per token of the step. An op that declares
    its `traffic` (a GEMM fused with its ring) says what it moves in that step; any other
    collective op is one call of its ring formula.

    all_to_all volume depends on the routing; its figure is the upper bound (every token's row to
    `fanout` other ranks), labelled `bytes_per_token_max`."""
    spec = OPS[info(node).kind] if "planc" in node.meta else None
    if spec is not None and spec.traffic is not None:
        return [{"op": t.op, "calls": t.calls, "bytes_per_token": t.bytes_per_token}
                for t in spec.traffic(info(node), step, elem, world)]
    op = spec.collective if spec is not None else None
    if op is None:
        return []
    d = info(node).dims
    payload = d.fixed_bytes or d.width * elem
    if op == "all_to_all":
        return [{"op": op, "calls": 1, "bytes_per_token_max": d.fanout * payload}]
    return [{"op": op, "calls": 1, "bytes_per_token": RING[op](payload, world)}]


def collectives_per_step(graph: fx.Graph, elem: int, world: int, step: str = "decode") -> dict[str, dict]:
    """Calls per forward step ("decode" or "prefill") and logical bytes per token of the step, by
    collective: node_collectives summed over the graph."""
    out: dict[str, dict] = {}
    for node in graph.nodes:
        times = repeats(graph, info(node)) if "planc" in node.meta else 1
        for c in node_collectives(node, elem, world, step):
            entry = out.setdefault(c["op"], {"calls": 0})
            entry["calls"] += c["calls"] * times
            for key in ("bytes_per_token", "bytes_per_token_max"):
                if key in c:
                    entry[key] = entry.get(key, 0) + c[key] * times
    return out


def weight_bytes_by_node(graph: fx.Graph, rank_tensors: list[dict[str, torch.Tensor]]) -> dict[str, list[int]]:
    """Node name -> the bytes of the tensors it holds on each rank (partition's owners: the
    deepest owning FQN above a tensor's name holds it)."""
    nodes = owners(graph)
    out = {node.name: [0] * len(rank_tensors) for node in nodes.values()}
    names, named = None, {}
    for rank, tensors in enumerate(rank_tensors):
        if tensors.keys() != names:  # every rank holds the same names (slices keep them): read them once
            names, named = tensors.keys(), owned_names(tensors, nodes)
        for name, (fqn, _) in named.items():
            t = tensors[name]
            out[nodes[fqn].name][rank] += t.numel() * t.element_size()
    return out


def decode_ops(graph: fx.Graph, weights: dict[str, list[int]], elem: int, world: int) -> list[dict]:
    """Every node of a decode step that reads weights or cached tokens or communicates, in program
    order, with its bytes on each rank (the module docstring shows an entry)."""
    ops = []
    for node in graph.nodes:
        if "planc" not in node.meta:
            continue
        m = info(node)
        entry = {"node": node.name, "kind": m.kind, "fqn": m.fqn, "layer": m.layer, "strategy": m.strategy,
                 "weight_bytes": weights.get(node.name, [0] * world),
                 "kv_bytes_per_token": cache_bytes_per_rank(node_cache(node), elem, world),
                 "collectives": node_collectives(node, elem, world, "decode")}
        if any(entry["weight_bytes"]) or any(entry["kv_bytes_per_token"]) or entry["collectives"]:
            ops.append(entry)
    found = runs(graph)  # a folded run's body is listed once, `run: [first layer, count]` (planc.cost.decode_ops)
    return [dict(e, run=[e["layer"], len(found[e["layer"]].layers)]) if e["layer"] in found else e for e in ops]


def run_as_captured(graph: fx.Graph) -> list[dict]:
    """Blocks planc did not lift, run whole on every rank as their exported graph, and why."""
    found = [{"block": m.fqn, "class": m.cls, "function": m.dims.fn.name, "why": m.dims.why}
             for m in map(info, captured_nodes(graph))]
    return unfold_entries(found, lambda e: run_holding(graph, e["block"]),
                          lambda e, run, i: dict(e, block=run.fqn(e["block"], i), why=run.text(e["why"], i)))


def rank_weight_bytes(graph: fx.Graph, by_node: dict[str, list[int]], world: int) -> list[int]:
    """Each rank's weight bytes: every owning node's, once for each layer it stands for (in a
    folded graph partition slices a run's first layer alone)."""
    times = {node.name: repeats(graph, info(node)) for node in owners(graph).values()}
    return [sum(b[r] * times[name] for name, b in by_node.items()) for r in range(world)]


def candidates(graph: fx.Graph, ctx: PassContext) -> dict[str, list[dict]]:
    """Per strategy that surveys its candidates: every place it could rewrite, and what became of it."""
    return {s.name: unfold_entries(s.candidates(graph, ctx), lambda c: run_holding(graph, c["target"]), _moved)
            for s in STRATEGIES if s.candidates}


def _moved(candidate: dict, run: Run, i: int) -> dict:
    """A folded run's candidate as it reads in the run's i-th layer."""
    fqn = run.fqn(candidate["target"], i)
    out = dict(candidate, target=fqn)
    if "layer" in out:
        out["layer"] = run.layers[i]
    if out.get("detail"):
        out["detail"] = run.text(out["detail"], i)
    return out


def approximations(graph: fx.Graph) -> dict[str, dict[str, str]]:
    """FQN -> {strategy, what}: the nodes a strategy rewrote into something other than the model
    computes (Strategy.approximates), the first node of each FQN."""
    judges = {s.name: s.approximates for s in STRATEGIES if s.approximates is not None}
    found: dict[str, dict[str, str]] = {}
    for node in graph.nodes:
        m = info(node) if "planc" in node.meta else None
        if m is not None and m.strategy in judges and m.fqn not in found and (what := judges[m.strategy](m)):
            for fqn in _fqns(graph, m):
                found[fqn] = {"strategy": m.strategy, "what": what}
    return found


def approximation_lines(approximate: dict[str, dict[str, str]]) -> list[str]:
    """`planc compile`'s note on what the plan approximates: one line per strategy and what."""
    groups = _by_key(((a["strategy"], a["what"]), fqn) for fqn, a in approximate.items())
    return [f"note     {name} approximates {fqns[0]}{f' and {len(fqns) - 1} more' if len(fqns) > 1 else ''}: {what} "
            "(planc verify judges tokens, not logits)" for (name, what), fqns in groups.items()]


def decline_lines(declines: list[tuple[str, str, str, str]]) -> list[str]:
    """`declined PASS on TARGET LABEL: DETAIL`, one line per pass, label and detail: the blocks a
    pass declined for the same reason under the same rule follow the first (`same_for`), so a
    61-layer model declined alike reads as one line, not 61."""
    groups = _by_key(((pass_name, label, detail), target) for pass_name, target, label, detail in declines)
    return [f"declined {pass_name} on {first}{label}: {detail}{same_for(more)}"
            for (pass_name, label, detail), (first, *more) in groups.items()]


def _by_key(items) -> dict[tuple, list[str]]:
    """(key, name) pairs as key -> names, keys in the order first seen."""
    groups: dict[tuple, list[str]] = {}
    for key, name in items:
        groups.setdefault(key, []).append(name)
    return groups


def candidate_lines(found: dict[str, list[dict]]) -> list[str]:
    """The candidates (each has `target`, `status` and `detail`) as `planc compile` prints them:
    `t3       model.layers.0.self_attn.o_proj: fused: ...`, a run of candidates in a row with the
    same status and the same detail but for their own names in one line (`same_for`)."""
    lines = []
    for name, entries in found.items():
        runs: list[list[dict]] = []
        for c in entries:
            if runs and _alike(runs[-1][0], c):
                runs[-1].append(c)
            else:
                runs.append([c])
        for first, *more in runs:
            detail = f": {first['detail']}" if first.get("detail") else ""
            lines.append(f"{name:<8} {first['target']}: {first['status']}{detail}{same_for([c['target'] for c in more])}")
    return lines


def _alike(a: dict, b: dict) -> bool:
    return a["status"] == b["status"] and (a.get("detail") or "").replace(a["target"], "{}") == \
        (b.get("detail") or "").replace(b["target"], "{}")


def same_for(more: list[str]) -> str:
    """` (the same for N more: a, b, c and K more)` after a line, or '' when `more` is empty."""
    if not more:
        return ""
    named = ", ".join(more[:3]) + (f" and {len(more) - 3} more" if len(more) > 3 else "")
    return f" (the same for {len(more)} more: {named})"


def build_report(graph: fx.Graph, ctx: PassContext, rank_tensors: list[dict[str, torch.Tensor]], *,
                 elem: int, checks: list, meta: bool) -> dict:
    specs = cache_specs(graph)
    world = ctx.world_size
    by_node = weight_bytes_by_node(graph, rank_tensors)
    return {
        "world_size": world,
        "per_rank": [{"rank": r, "weight_bytes": w, "kv_bytes_per_token": kv_bytes_per_token(specs, elem, r)}
                     for r, w in enumerate(rank_weight_bytes(graph, by_node, len(rank_tensors)))],
        "kv_width_per_rank": {fqn: cache_width(s) for fqn, s in specs.items()},
        "collectives_per_decode_step": collectives_per_step(graph, elem, world, "decode"),
        "decode_ops": decode_ops(graph, by_node, elem, world),
        "collectives_per_prefill": collectives_per_step(graph, elem, world, "prefill"),
        "passes": [r.__dict__ for r in ctx.records],
        "declines": [r.__dict__ for r in ctx.records if r.action == "declined"],
        "candidates": candidates(graph, ctx),
        "approximate": approximations(graph),
        "notes": ctx.notes,
        "profiles": ctx.profiles.stored(),
        "advice": ctx.advice,
        "run_as_captured": run_as_captured(graph),
        "lift_checks": [{"block": c.fqn, "ok": c.ok, "rel_err": c.rel_err, "method": c.method,
                         "against": c.against} for c in checks]
                       or ("not run: meta device has no values" if meta else []),
        "graphs": ctx.graph_texts(),
        "graph_nodes": ctx.graph_nodes(),
    }
