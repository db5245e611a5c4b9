"""Fused projections, split into the linears planc lifts (Phi-3's `qkv_proj` and `gate_up_proj`), and
projections named otherwise, attached under planc's names (RENAMES: Phi's `dense`, `fc1`, `fc2`).

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

from planc.lift.restore import touch

from planc.weights import SPLIT


# Projections named otherwise, attached under the names planc lifts (sharing their weights):
# Phi's attention output `dense`; Phi's `fc1` / `fc2` and StarCoder2's `c_fc` / `c_proj` MLPs (no gate).
RENAMES = (({"q_proj", "k_proj", "v_proj", "dense"}, {"dense": "o_proj"}),
           ({"fc1", "fc2"}, {"fc1": "up_proj", "fc2": "down_proj"}),
           ({"c_fc", "c_proj"}, {"c_fc": "up_proj", "c_proj": "down_proj"}))


def split_fused(model: nn.Module) -> list[str]:
    """Attach the split parts of every fused projection, and the projections named otherwise under
    planc's names (RENAMES), once per module; the fused or renamed FQNs."""
    done = []
    for fqn, m in list(model.named_modules()):
        if not m._modules:  # a leaf (most modules: the linears themselves)
            continue
        children = {name for name, child in m._modules.items() if child is not None}
        for names, renames in RENAMES:
            linears = {n for n in names if isinstance(getattr(m, n), nn.Linear)} if names <= children else set()
            if linears == names and not children & set(renames.values()):
                for old, new in renames.items():
                    _attach(m, old, {new: getattr(m, old).out_features})
                    done.append(f"{fqn}.{old}")
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
    touch(parent), touch(fused)
    start = 0
    if len(widths) == 1:  # a rename: the part is the whole linear, its weights shared
        part = nn.Linear(fused.in_features, fused.out_features, bias=fused.bias is not None, device="meta")
        part.weight, part.bias = fused.weight, fused.bias
        parent.register_module(next(iter(widths)), part)
        setattr(fused, SPLIT, tuple(widths))
        return
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
