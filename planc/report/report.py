"""report.json: what the compile decided and what it will cost, per rank.

Collective figures come from the graph's explicit collective nodes and the same ring formulas
the runtime's Comm wrapper uses, so a real run can be checked against them call for call.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from planc.ir import COLLECTIVES, block_nodes, info
from planc.passmanager import PassContext
from planc.runtime.comm import ring_all_gather_bytes, ring_all_reduce_bytes


def cache_specs(graph: fx.Graph) -> dict[str, dict]:
    """Per attention block: what one rank caches per token."""
    specs = {}
    for node in block_nodes(graph, "mla_attention", "gqa_attention", "tpla_attention"):
        meta = info(node)
        d = meta.dims
        if meta.kind == "mla_attention":
            specs[meta.fqn] = {"kind": "mla", "ckv": d.kv_lora_rank, "kpe": d.rope_dim}
        elif meta.kind == "tpla_attention":  # only this rank's latent slice, plus the full rope key
            specs[meta.fqn] = {"kind": "mla", "ckv": meta.shard["latent_per_rank"], "kpe": d.rope_dim}
        else:
            specs[meta.fqn] = {"kind": "gqa", "kv_heads": meta.shard.get("kv_heads_per_rank", d.num_kv_heads),
                               "head_dim": d.head_dim}
    return specs


def kv_bytes_per_token(specs: dict[str, dict], elem: int) -> int:
    width = sum(s["ckv"] + s["kpe"] if s["kind"] == "mla" else 2 * s["kv_heads"] * s["head_dim"] for s in specs.values())
    return width * elem


def collectives_per_step(graph: fx.Graph, hidden: int, elem: int, world: int) -> dict[str, dict]:
    """Calls per forward step and logical bytes per token of the step, by op.

    all_to_all volume depends on the routing; its figure is the upper bound (every token's
    experts on min(top_k, n-1) other ranks), labelled `bytes_per_token_max`.
    """
    row = hidden * elem
    out: dict[str, dict] = {}
    for node in block_nodes(graph, *COLLECTIVES):
        meta = info(node)
        entry = out.setdefault(meta.kind, {"calls": 0})
        entry["calls"] += 1
        if meta.kind == "all_reduce":
            payload = 4 if meta.attrs.get("role") == "rmsnorm" else row  # one fp32 sum of squares per token
            entry["bytes_per_token"] = entry.get("bytes_per_token", 0) + ring_all_reduce_bytes(payload, world)
        elif meta.kind == "all_gather_varlen":
            entry["bytes_per_token"] = entry.get("bytes_per_token", 0) + ring_all_gather_bytes(row, world)
        elif meta.kind == "all_to_all":
            fanout = min(meta.dims.top_k, world - 1)
            entry["bytes_per_token_max"] = entry.get("bytes_per_token_max", 0) + fanout * row
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_report(graph: fx.Graph, ctx: PassContext, rank_tensors: list[dict[str, torch.Tensor]], *,
                 hidden: int, elem: int, checks: list, meta: bool) -> dict:
    specs = cache_specs(graph)
    world = ctx.world_size
    per_step = collectives_per_step(graph, hidden, elem, world)  # per token: the same for prefill and decode
    return {
        "world_size": world,
        "per_rank": [{"rank": r, "weight_bytes": tensor_bytes(t), "kv_bytes_per_token": kv_bytes_per_token(specs, elem)}
                     for r, t in enumerate(rank_tensors)],
        "kv_width_per_rank": {fqn: (s["ckv"] + s["kpe"]) if s["kind"] == "mla" else 2 * s["kv_heads"] * s["head_dim"]
                              for fqn, s in specs.items()},
        "collectives_per_decode_step": per_step,
        "collectives_per_prefill": per_step,
        "passes": [r.__dict__ for r in ctx.records],
        "declines": [r.__dict__ for r in ctx.records if r.action == "declined"],
        "lift_checks": [{"block": c.fqn, "ok": c.ok, "rel_err": c.rel_err, "method": c.method,
                         "against": c.against} for c in checks]
                       or ("not run: meta device has no values" if meta else []),
        "graphs": {name: text for name, text in ctx.graphs},
    }
