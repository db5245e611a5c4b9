"""Fused projections, split into the linears planc lifts (Phi-3's `qkv_proj` and `gate_up_proj`).

    attention   qkv_proj [(H + 2 KV) hd, D]  ->  q_proj [H hd, D], k_proj [KV hd, D], v_proj [KV hd, D]
    MLP         gate_up_proj [2 I, D]        ->  gate_proj [I, D], up_proj [I, D]     (gate first)

Recognized by children and shapes, like every block: an attention whose only projections are
`qkv_proj` and `o_proj`, with H, KV and hd read from the module and its config; an MLP whose are
`gate_up_proj` and `down_proj`, twice down_proj's input wide. The parts are attached to the module
beside the fused linear, their weights copies of its rows, so the model's own forward (what is
captured and checked against) is untouched, and the lift's numeric check confirms the row order
on real weights: a model that packs its rows otherwise (per head, say) is declined there, not
compiled into another model. The fused weights are left out of the tensors a rank receives
(`model_tensors`): every rank gets the parts, sliced like any q/k/v or gate/up projection.
"""
from __future__ import annotations

import torch
from torch import nn

from planc.weights import SPLIT


def split_fused(model: nn.Module) -> list[str]:
    """Attach the split parts of every fused projection (once per module); the fused FQNs."""
    done = []
    for fqn, m in list(model.named_modules()):
        children = {name for name, child in m.named_children() if child is not None}
        if children >= {"qkv_proj", "o_proj"} and not children & {"q_proj", "k_proj", "v_proj"}:
            widths = _qkv_widths(m)
            if widths is not None:
                _attach(m, "qkv_proj", dict(zip(("q_proj", "k_proj", "v_proj"), widths)))
                done.append(f"{fqn}.qkv_proj")
        elif children >= {"gate_up_proj", "down_proj"} and not children & {"gate_proj", "up_proj"}:
            fused, down = m.gate_up_proj, m.down_proj
            if (isinstance(fused, nn.Linear) and isinstance(down, nn.Linear)
                    and fused.out_features == 2 * down.in_features):
                _attach(m, "gate_up_proj", {"gate_proj": down.in_features, "up_proj": down.in_features})
                done.append(f"{fqn}.gate_up_proj")
    return done


def _qkv_widths(attn: nn.Module) -> tuple[int, int, int] | None:
    fused, config = attn.qkv_proj, getattr(attn, "config", None)
    head_dim = getattr(attn, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(attn, "num_key_value_heads", getattr(config, "num_key_value_heads", heads))
    if not isinstance(fused, nn.Linear) or not all(isinstance(v, int) for v in (head_dim, heads, kv_heads)):
        return None
    widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    return widths if sum(widths) == fused.out_features else None


def _attach(parent: nn.Module, fused_name: str, widths: dict[str, int]) -> None:
    fused: nn.Linear = getattr(parent, fused_name)
    if getattr(fused, SPLIT, None):
        return
    start = 0
    with torch.no_grad():
        for name, width in widths.items():
            part = nn.Linear(fused.in_features, width, bias=fused.bias is not None,
                             device=fused.weight.device, dtype=fused.weight.dtype)
            part.weight = nn.Parameter(fused.weight[start:start + width].clone(), requires_grad=False)
            if fused.bias is not None:
                part.bias = nn.Parameter(fused.bias[start:start + width].clone(), requires_grad=False)
            parent.register_module(name, part)
            start += width
    setattr(fused, SPLIT, tuple(widths))
