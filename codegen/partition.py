"""Partition: the full model's tensors -> each rank's tensors, following the graph's shard specs.

Names are kept (a rank's `q_b_proj.weight` is its head slice of it), so the program reads
weights by the model's own FQNs. Biases of row-parallel layers stay on rank 0 only: the
all-reduce would otherwise add them n times. Meta tensors slice like real ones, which is how a
weightless dry run learns every rank's bytes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from planc.ir import NodeInfo, block_nodes, info
from planc.weights import scoped

Tensors = dict[str, torch.Tensor]
ROTARY = "model.rotary_emb.inv_freq"


def _rows(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return w[lo:hi]


def _cols(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return w[:, lo:hi]


def _row_parallel_bias(W: Tensors, name: str, rank: int) -> None:
    if name in W and rank != 0:
        W[name] = torch.zeros_like(W[name])


def _mla_tp(W: Tensors, meta: NodeInfo, rank: int) -> Tensors:
    d, h = meta.dims, meta.shard["heads_per_rank"]
    lo, hi = rank * h, (rank + 1) * h
    qk = d.nope_dim + d.rope_dim
    q_name = "q_b_proj.weight" if d.q_lora_rank else "q_proj.weight"
    W[q_name] = _rows(W[q_name], lo * qk, hi * qk)
    W["kv_b_proj.weight"] = _rows(W["kv_b_proj.weight"], lo * (d.nope_dim + d.v_dim), hi * (d.nope_dim + d.v_dim))
    W["o_proj.weight"] = _cols(W["o_proj.weight"], lo * d.v_dim, hi * d.v_dim)
    _row_parallel_bias(W, "o_proj.bias", rank)
    return W


def kv_head_range(num_heads: int, num_kv_heads: int, heads_per_rank: int, rank: int) -> tuple[int, int]:
    """KV heads that rank's query heads read (replicated when ranks outnumber KV heads)."""
    group = num_heads // num_kv_heads
    first = rank * heads_per_rank // group
    last = ((rank + 1) * heads_per_rank - 1) // group
    return first, last + 1


def _attention_tp(W: Tensors, meta: NodeInfo, rank: int) -> Tensors:
    d, h = meta.dims, meta.shard["heads_per_rank"]
    lo, hi = rank * h, (rank + 1) * h
    kv_lo, kv_hi = kv_head_range(d.num_heads, d.num_kv_heads, h, rank)
    for name, (a, b) in {"q_proj": (lo, hi), "k_proj": (kv_lo, kv_hi), "v_proj": (kv_lo, kv_hi)}.items():
        for suffix in ("weight", "bias"):
            if f"{name}.{suffix}" in W:
                W[f"{name}.{suffix}"] = _rows(W[f"{name}.{suffix}"], a * d.head_dim, b * d.head_dim)
    W["o_proj.weight"] = _cols(W["o_proj.weight"], lo * d.head_dim, hi * d.head_dim)
    _row_parallel_bias(W, "o_proj.bias", rank)
    return W


def _dense_tp(W: Tensors, meta: NodeInfo, rank: int) -> Tensors:
    width = meta.shard["intermediate_per_rank"]
    lo, hi = rank * width, (rank + 1) * width
    W["gate_proj.weight"] = _rows(W["gate_proj.weight"], lo, hi)
    W["up_proj.weight"] = _rows(W["up_proj.weight"], lo, hi)
    W["down_proj.weight"] = _cols(W["down_proj.weight"], lo, hi)
    return W


def _fold(W: Tensors, d, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(U^T-rotated latent rows ++ rope rows of kv_a_proj, its bias, kv_b_proj . diag(gamma) . U), in fp64."""
    C = d.kv_lora_rank
    Wa, ba = W["kv_a_proj_with_mqa.weight"].double(), W.get("kv_a_proj_with_mqa.bias")
    kv_a = torch.cat([U.T @ Wa[:C], Wa[C:]])
    bias = torch.cat([U.T @ ba.double()[:C], ba.double()[C:]]) if ba is not None else None
    kv_b = W["kv_b_proj.weight"].double() * W["kv_a_layernorm.weight"].double()[None, :] @ U
    return kv_a, bias, kv_b


def _tpla(W: Tensors, meta: NodeInfo, rank: int, fold) -> Tensors:
    d, sh = meta.dims, meta.shard
    dtype = W["kv_b_proj.weight"].dtype
    kv_a, kv_a_bias, kv_b = (t.to(dtype) if t is not None else None for t in _fold(W, d, fold.U.to(W["kv_b_proj.weight"].device)))
    group, member = divmod(rank, sh["group_size"])
    lo, hi = group * sh["latent_per_rank"], (group + 1) * sh["latent_per_rank"]
    heads = sh["heads_per_rank"]
    h_lo, h_hi = member * heads, (member + 1) * heads
    qk, kv = d.nope_dim + d.rope_dim, d.nope_dim + d.v_dim
    q_name = "q_b_proj.weight" if d.q_lora_rank else "q_proj.weight"
    full_q, full_o = W[q_name], W["o_proj.weight"]
    out = {k: v for k, v in W.items() if not k.startswith(("kv_a_proj_with_mqa.", "kv_a_layernorm.", "kv_b_proj."))}
    out["tpla.kv_a.weight"] = torch.cat([kv_a[lo:hi], kv_a[d.kv_lora_rank:]])
    if kv_a_bias is not None:
        out["tpla.kv_a.bias"] = torch.cat([kv_a_bias[lo:hi], kv_a_bias[d.kv_lora_rank:]])
    out[q_name] = _rows(full_q, h_lo * qk, h_hi * qk)
    out["kv_b_proj.weight"] = _rows(kv_b, h_lo * kv, h_hi * kv)[:, lo:hi]
    out["o_proj.weight"] = _cols(full_o, h_lo * d.v_dim, h_hi * d.v_dim)
    if fold.scales is not None:  # this slice's calibrated RMS correction, applied to decode tokens
        out["tpla.scale"] = fold.scales[group:group + 1].to(dtype)
    if sh["prefill_heads_per_rank"] or sh["rmsnorm"] == "recompute":  # the whole rotated latent's rows
        out["kv_a_proj_with_mqa.weight"] = kv_a
        if kv_a_bias is not None:
            out["kv_a_proj_with_mqa.bias"] = kv_a_bias
    if sh["prefill_heads_per_rank"]:  # exact MLA prefill: this rank's prefill heads over the full latent
        p_lo, p_hi = rank * sh["prefill_heads_per_rank"], (rank + 1) * sh["prefill_heads_per_rank"]
        out["kv_a_layernorm.weight"] = torch.ones_like(W["kv_a_layernorm.weight"])
        out[f"prefill.{q_name}"] = _rows(full_q, p_lo * qk, p_hi * qk)
        out["prefill.kv_b_proj.weight"] = _rows(kv_b, p_lo * kv, p_hi * kv)
        out["prefill.o_proj.weight"] = _cols(full_o, p_lo * d.v_dim, p_hi * d.v_dim)
    _row_parallel_bias(out, "o_proj.bias", rank)
    return out


def _ep(W: Tensors, meta: NodeInfo, rank: int) -> Tensors:
    local = torch.tensor([e for e, r in enumerate(meta.shard["owner"]) if r == rank])
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        W[name] = W[name][local] if W[name].device.type != "meta" else W[name][: len(local)]
    return W


SHARDERS: dict[tuple[str, str], Callable[[Tensors, NodeInfo, int], Tensors]] = {
    ("mla_attention", "mla_tp"): _mla_tp,
    ("gqa_attention", "tp"): _attention_tp,
    ("mlp", "tp"): _dense_tp,
    ("moe_route", "ep"): _ep,
}


def _owning_nodes(graph: fx.Graph) -> list[fx.Node]:
    """One node per block that owns weights (an EP block is represented by its moe_route)."""
    kinds = ("embedding", "rmsnorm", "mla_attention", "gqa_attention", "mlp", "moe", "moe_route", "tpla_latent", "lm_head")
    return block_nodes(graph, *kinds)


def partition(graph: fx.Graph, full: Tensors, rank: int, transforms: dict | None = None) -> Tensors:
    """This rank's tensors, keyed by full FQN; attention blocks also get `<fqn>.rotary.inv_freq`.

    `transforms` holds each TPLA layer's LatentFold: rotation U and slice scales (planc.transforms)."""
    out: Tensors = {}
    for node in _owning_nodes(graph):
        meta = info(node)
        W = scoped(full, meta.fqn)
        if meta.kind == "tpla_latent":
            W = _tpla(W, meta, rank, transforms[meta.fqn])
        elif (sharder := SHARDERS.get((meta.kind, meta.strategy))) is not None:
            W = sharder(W, meta, rank)
        if (meta.kind.endswith("attention") or meta.kind == "tpla_latent") and ROTARY in full:
            W["rotary.inv_freq"] = full[ROTARY].clone()  # one copy per block: safetensors refuses aliases
        out |= {f"{meta.fqn}.{k}": v.contiguous() for k, v in W.items()}
    return out


def model_tensors(model: torch.nn.Module) -> Tensors:
    return dict(model.named_parameters()) | dict(model.named_buffers())
