"""`attention: {strategy: tpla}` — Tensor-Parallel Latent Attention (arXiv 2508.15881).

    before:  a = mla_attention(x);  h = add(h, a)
    after:   lat = tpla_latent(x)                  this rank's latent slice c'_j (C/g wide) + rope key
             ss = all_reduce(lat)                  only with rmsnorm: exact (per-token sum of squares;
                                                   recompute gets the whole latent's on each rank instead)
             a = tpla_attention(x, lat, ss)        H/(k/g) heads over slice j; per-slice softmax
             a' = all_reduce(a);  h = add(h, a')   the single all-reduce MLA-TP already has

k devices form g groups of k/g; group j holds latent slice j and the full rope key, heads are
split over the ranks of a group. The orthogonal transform U is folded into the weights at
partition time (planc.transforms), so the unsliced model is exactly MLA.
"""
from __future__ import annotations

import torch.fx as fx

from planc.errors import PlanError
from planc.ir import NodeInfo, add_node, copy_graph, divisors, info, planned
from planc.passmanager import PassContext


def valid_groups(devices: int, kv_lora_rank: int) -> list[int]:
    return [g for g in divisors(devices) if kv_lora_rank % g == 0]


def _shard(meta: NodeInfo, section, world: int, where: str) -> dict:
    d, g = meta.dims, section.latent_groups
    if g not in valid_groups(world, d.kv_lora_rank):
        raise PlanError(f"{where}.latent_groups: {g} latent groups do not fit {world} devices and "
                        f"{meta.fqn}'s kv_lora_rank {d.kv_lora_rank}; valid latent_groups: "
                        f"{', '.join(map(str, valid_groups(world, d.kv_lora_rank)))}")
    group_size = world // g
    heads_ok = d.num_heads % group_size == 0 and (section.prefill != "mla" or d.num_heads % world == 0)
    if not heads_ok:
        need = world if section.prefill == "mla" else group_size
        raise PlanError(f"{where}: tpla cannot split {meta.fqn}'s {d.num_heads} heads over {need} ranks "
                        f"(devices / latent_groups{', and all devices for prefill: mla' if section.prefill == 'mla' else ''}); "
                        f"valid device counts: {', '.join(map(str, divisors(d.num_heads)))}")
    if section.scales == "calibrated" and section.rmsnorm != "sliced":
        raise PlanError(f"{where}.scales: 'calibrated' corrects the sliced RMSNorm; with rmsnorm: {section.rmsnorm} "
                        "there is nothing to correct. Use rmsnorm: sliced or scales: none")
    return {"latent_groups": g, "group_size": group_size, "heads_per_rank": d.num_heads // group_size,
            "latent_per_rank": d.kv_lora_rank // g,
            "prefill_heads_per_rank": d.num_heads // world if section.prefill == "mla" else 0,
            "transform": section.transform, "rmsnorm": section.rmsnorm, "scales": section.scales,
            "calibration_tokens": section.calibration_tokens, "seed": section.seed}


def tpla(graph: fx.Graph, ctx: PassContext) -> fx.Graph:
    graph = copy_graph(graph)
    for node in planned(graph, "mla_attention", "tpla"):
        meta = info(node)
        index = meta.attrs["rule_index"]
        section = ctx.plan.rules[index].attention
        shard = _shard(meta, section, ctx.world_size, f"{ctx.where(meta)}.attention")
        _expand(graph, node, meta.with_(shard=shard))
        ctx.applied(node, f"{shard['latent_groups']} latent slices of {shard['latent_per_rank']}, "
                          f"{shard['heads_per_rank']} heads per rank, transform {shard['transform']}, "
                          f"prefill {section.prefill}, rmsnorm {shard['rmsnorm']}")
    return graph


def _expand(graph: fx.Graph, node: fx.Node, meta: NodeInfo) -> None:
    x = node.args[0]

    def step(kind: str, args: tuple, **attrs) -> fx.Node:
        return add_node(graph, kind, args, meta.with_(kind=kind, attrs=meta.attrs | attrs))

    with graph.inserting_before(node):
        lat = step("tpla_latent", (x,))
        sumsq = step("all_reduce", (lat,), role="rmsnorm", why="exact RMSNorm: sum the slices' sums of squares") \
            if meta.shard["rmsnorm"] == "exact" else None
        attn = step("tpla_attention", (x, lat, sumsq) if sumsq is not None else (x, lat))
        out = step("all_reduce", (attn,), why="o_proj is row-parallel and slices are partial: sum over all ranks")
    node.replace_all_uses_with(out)
    graph.erase_node(node)
