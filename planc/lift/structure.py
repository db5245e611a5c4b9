"""Decoder layers of one structure: captured and checked once, instantiated for every layer.

Two layers have the same structure when nothing but their weights' values and their index tells
them apart: the same recognized blocks (kind, class, dims, attrs), and the same module tree —
each module's class, plain attributes, parameter and buffer shapes and dtypes, hooks and
per-instance overrides (a patched `forward`). DeepSeek-V3 has two structures (the dense layers,
then the MoE layers); a layer whose forward was patched is a structure of its own.

`layer_idx` is the one attribute allowed to differ: transformers uses it to index the KV cache,
which capture turns off.
"""
from __future__ import annotations

from torch import nn

from planc.lift.recognize import Block

PER_LAYER = frozenset(("layer_idx",))
PLAIN = frozenset((bool, int, float, str, type(None)))


def representatives(layers: nn.ModuleList, blocks: list[Block] | None = None, config=None) -> dict[int, int]:
    """Each layer's index -> the index of the first layer of the same structure (`blocks`: the
    layers' recognized blocks, compared too where given; `config`: the model's, whose per-layer
    entries are part of a layer's structure)."""
    by_layer: dict[int | None, list[Block]] = {}
    for b in blocks or ():
        by_layer.setdefault(b.layer, []).append(b)
    indexed = per_layer_entries(config, len(layers))
    found: dict[tuple, int] = {}
    rep = {}
    for i, layer in enumerate(layers):
        key = (_recognized(by_layer.get(i, [])), module_signature(layer), tuple((k, v[i]) for k, v in indexed))
        rep[i] = found.setdefault(key, i)
    return rep


def per_layer_entries(config, num_layers: int) -> list[tuple[str, list]]:
    """The config's lists with one entry per layer (layer_types, ...): what the lift may read for a
    layer by its index rather than off its modules."""
    if config is None:
        return []
    return [(k, v) for k, v in sorted(vars(config).items()) if isinstance(v, list) and len(v) == num_layers]


def _recognized(blocks: list[Block]) -> tuple:
    prefix = f"{blocks[0].fqn.rsplit('.', 1)[0]}." if blocks else ""
    return tuple((b.fqn.removeprefix(prefix), b.kind, b.cls, b.dims, _value(b.attrs)) for b in blocks)


def module_signature(layer: nn.Module) -> tuple:
    """Each module's name, class, plain attributes, tensor shapes and dtypes, and hooks."""
    return tuple((name, type(m), _attributes(m), _tensors(m), _hooks(m)) for name, m in layer.named_modules())


def _attributes(m: nn.Module) -> tuple:
    return tuple((k, _value(v)) for k, v in vars(m).items() if not k.startswith("_") and k not in PER_LAYER)


def _value(v: object) -> object:
    """Plain values, frozen dataclasses (planc's dims) and containers of them compare by value;
    anything else (a config, a patched forward) by identity."""
    kind = type(v)  # not isinstance: a config answers it through a slow __getattribute__
    if kind in PLAIN or getattr(getattr(kind, "__dataclass_params__", None), "frozen", False):
        return v
    if kind in (list, tuple):
        return tuple(_value(x) for x in v)
    if kind is dict:
        return tuple((k, _value(x)) for k, x in v.items())
    return ("object", id(v))


def _tensors(m: nn.Module) -> tuple:
    named = list(m._parameters.items()) + list(m._buffers.items())
    return tuple((name, None if t is None else (tuple(t.shape), t.dtype)) for name, t in named)


def _hooks(m: nn.Module) -> tuple:
    hooks = (m._forward_pre_hooks, m._forward_hooks)
    return tuple(id(h) for table in hooks for h in table.values())
