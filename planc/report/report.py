"""report.json: what the compile decided and what it will cost, per rank.

Everything here is read from the graph's typed NodeInfo and the OpSpecs: cache layouts from the
dims each rank's ops see (`local_dims().cache()`), collectives from the nodes whose op is one, with
the ring formulas the runtime's Comm wrapper uses, so a real run can be checked call for call.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from planc.ir import OPS, info
from planc.lift.captured import captured_nodes
from planc.passes import STRATEGIES
from planc.passmanager import PassContext
from planc.ring import ring_all_gather_bytes, ring_all_reduce_bytes, ring_reduce_scatter_bytes


def cache_specs(graph: fx.Graph) -> dict[str, dict]:
    """Per attention op: what one rank caches per token."""
    specs = {}
    for node in graph.nodes:
        if "planc" in node.meta and OPS[info(node).kind].step:
            local = info(node).local_dims()
            if hasattr(local, "cache"):
                specs[info(node).fqn] = local.cache()
    return specs


def cache_width(spec: dict) -> int:
    return spec["ckv"] + spec["kpe"] if spec["kind"] == "mla" else 2 * spec["kv_heads"] * spec["head_dim"]


def kv_bytes_per_token(specs: dict[str, dict], elem: int, rank: int = 0) -> int:
    """What `rank` caches per token (a layer placed on one rank counts there alone)."""
    return sum(cache_width(s) for s in specs.values() if s.get("rank", rank) == rank) * elem


RING = {"all_reduce": ring_all_reduce_bytes, "all_gather": ring_all_gather_bytes, "all_gather_varlen": ring_all_gather_bytes,
        "reduce_scatter": ring_reduce_scatter_bytes}


def collectives_per_step(graph: fx.Graph, elem: int, world: int, step: str = "decode") -> dict[str, dict]:
    """Calls per forward step ("decode" or "prefill") and logical bytes per token of the step, by
    collective. An op that declares its `traffic` (a GEMM fused with its ring) says what it moves
    in that step; any other collective op is one call of its ring formula.

    all_to_all volume depends on the routing; its figure is the upper bound (every token's
    row to `fanout` other ranks), labelled `bytes_per_token_max`."""
    out: dict[str, dict] = {}
    for node in graph.nodes:
        spec = OPS[info(node).kind] if "planc" in node.meta else None
        if spec is not None and spec.traffic is not None:
            for t in spec.traffic(info(node), step, elem, world):
                entry = out.setdefault(t.op, {"calls": 0})
                entry["calls"] += t.calls
                entry["bytes_per_token"] = entry.get("bytes_per_token", 0) + t.bytes_per_token
            continue
        op = spec.collective if spec is not None else None
        if op is None:
            continue
        d = info(node).dims
        payload = d.fixed_bytes or d.width * elem
        entry = out.setdefault(op, {"calls": 0})
        entry["calls"] += 1
        if op == "all_to_all":
            entry["bytes_per_token_max"] = entry.get("bytes_per_token_max", 0) + d.fanout * payload
        else:
            entry["bytes_per_token"] = entry.get("bytes_per_token", 0) + RING[op](payload, world)
    return out


def run_as_captured(graph: fx.Graph) -> list[dict]:
    """Blocks planc did not lift, run whole on every rank as their exported graph, and why."""
    return [{"block": m.fqn, "class": m.cls, "function": m.dims.fn.name, "why": m.dims.why}
            for m in map(info, captured_nodes(graph))]


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def candidates(graph: fx.Graph, ctx: PassContext) -> dict[str, list[dict]]:
    """Per strategy that surveys its candidates: every place it could rewrite, and what became of it."""
    return {s.name: s.candidates(graph, ctx) for s in STRATEGIES if s.candidates}


def candidate_lines(found: dict[str, list[dict]]) -> list[str]:
    """One line per candidate (each has `target`, `status` and `detail`), as `planc compile` prints
    them: `t3       model.layers.0.self_attn.o_proj: fused: ...`."""
    return [f"{name:<8} {c['target']}: {c['status']}" + (f": {c['detail']}" if c.get("detail") else "")
            for name, entries in found.items() for c in entries]


def build_report(graph: fx.Graph, ctx: PassContext, rank_tensors: list[dict[str, torch.Tensor]], *,
                 elem: int, checks: list, meta: bool) -> dict:
    specs = cache_specs(graph)
    world = ctx.world_size
    return {
        "world_size": world,
        "per_rank": [{"rank": r, "weight_bytes": tensor_bytes(t), "kv_bytes_per_token": kv_bytes_per_token(specs, elem, r)}
                     for r, t in enumerate(rank_tensors)],
        "kv_width_per_rank": {fqn: cache_width(s) for fqn, s in specs.items()},
        "collectives_per_decode_step": collectives_per_step(graph, elem, world, "decode"),
        "collectives_per_prefill": collectives_per_step(graph, elem, world, "prefill"),
        "passes": [r.__dict__ for r in ctx.records],
        "declines": [r.__dict__ for r in ctx.records if r.action == "declined"],
        "candidates": candidates(graph, ctx),
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
