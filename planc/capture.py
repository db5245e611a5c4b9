"""Capture a model as an aten FX graph with torch.export (non-strict).

transformers models do not survive torch.fx.symbolic_trace (decorated forwards, mask and MoE
control flow); non-strict export does, and keeps `nn_module_stack` on every compute node, which
is how the lift finds blocks. On the meta device the same export runs with no weights at all.

Export time grows with depth (about 0.3 s a layer for DeepSeek-V3), so a causal LM can be captured
with only some of its decoder layers: a shallow copy of the model holds those layers, and the
captured module stacks name each layer by its index in the whole model.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from planc import progress
from planc.errors import ModelError

EXAMPLE_SHAPE = (2, 8)  # batch, tokens: small, but > 1 so no dimension is specialized to 1
LAYERS = "model.layers."  # where a Hugging Face causal LM keeps its decoder layers


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    args: tuple
    kwargs: dict

    @property
    def module(self) -> torch.fx.GraphModule:
        return self.program.module()

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph


def example_ids(model: nn.Module, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, EXAMPLE_SHAPE, generator=gen).to(device)


def capture(model: nn.Module, layers: Sequence[int] | None = None) -> Captured:
    """A causal LM: forward(input_ids, use_cache=False) on example token ids.

    With `layers` (increasing indices into model.model.layers) only those decoder layers run; the
    graph then names them `model.layers.<index in the whole model>` all the same."""
    if not hasattr(model, "get_input_embeddings"):
        raise ModelError(f"{type(model).__name__}: not a causal LM (no get_input_embeddings); "
                         "use capture_module(model, example_args) for other modules")
    args, kwargs = (example_ids(model),), {"use_cache": False}
    if layers is None:
        return capture_module(model, args, kwargs)
    kept = _keep_layers(model, layers)
    with progress.calls(kept.model.layers, "capture", "layers traced"):
        captured = capture_module(kept, args, kwargs)
    _rename_layers(captured.program, list(layers))
    return captured


def capture_module(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Any nn.Module on example inputs; every compute node keeps meta["nn_module_stack"]."""
    kwargs = kwargs or {}
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, kwargs=kwargs, strict=False)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"{type(module).__name__}: torch.export (non-strict) failed: {type(exc).__name__}: {first}. "
                         "planc needs a forward that exports; for transformers MoE models pin a static experts "
                         "implementation") from exc
    return Captured(program, args, kwargs)


def _keep_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A shallow copy of a causal LM running only `layers` of its decoder; `model` is untouched.

    The copy shares every module and weight. Its config says how many layers it has, and any
    per-layer config list (e.g. `layer_types`, which some decoders index by position) is cut to
    the layers kept."""
    base = getattr(model, "model", None)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise ModelError(f"{type(model).__name__}: no decoder layers at model.model.layers to capture a subset of")
    config = copy.copy(base.config)
    depth = config.num_hidden_layers
    for name, value in vars(base.config).items():
        if isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(config, name, type(value)(value[i] for i in layers))
    config.num_hidden_layers = len(layers)
    kept = nn.ModuleList(base.layers[i] for i in layers)
    shared = {"config": config} if getattr(model, "config", None) is base.config else {}
    return _replaced(model, model=_replaced(base, layers=kept, config=config), **shared)


def _replaced(module: nn.Module, **changes) -> nn.Module:
    """A shallow copy of `module` with some children or attributes replaced."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # copy.copy shares the child table
    for name, value in changes.items():
        setattr(clone, name, value)
    return clone


def _rename_layers(program: torch.export.ExportedProgram, layers: list[int]) -> None:
    """Module stacks say `model.layers.<j>` for the copy's j-th layer: name the real layer instead."""
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {_real_fqn(key, layers): (_real_fqn(fqn, layers), cls)
                                            for key, (fqn, cls) in stack.items()}


def _real_fqn(fqn: str, layers: list[int]) -> str:
    head, found, rest = fqn.partition(LAYERS)
    index, dot, tail = rest.partition(".")
    return f"{head}{LAYERS}{layers[int(index)]}{dot}{tail}" if found and index.isdigit() else fqn


def module_fqns(captured: torch.export.ExportedProgram | torch.fx.GraphModule | Captured) -> set[str]:
    """Every module FQN that owns at least one node of captured.graph (export's or Dynamo's)."""
    fqns: set[str] = set()
    for node in captured.graph.nodes:
        for fqn, _cls in (node.meta.get("nn_module_stack") or {}).values():
            fqns.add(fqn.removeprefix("L['self']."))
    return fqns
