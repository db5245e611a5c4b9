"""The front end's facts from what Dynamo hands a torch.compile backend, beside capture.py's
torch.export of an nn.Module.

A backend receives a GraphModule and its example inputs. With nn modules inlined (torch's
default), every parameter and buffer is a graph input whose Dynamo source names it from the
traced frame's locals (`L['self']._modules['model']..._parameters['weight']`), and the example
inputs are those very tensors. Module stacks name each node's module (`L['self'].model.layers.0.
self_attn`). What the graph does not hold is the modules' configuration (head counts, latent
widths, router settings), which planc's recognizers read from the modules themselves: the module
is found where the sources say, `self` of the traced frame (or given by the caller), and every
weight the graph takes is checked to be that module's own tensor.

    Dynamo:  forward(s0, L_args_0_, L_self_..._weight_, ...) -> (logits,)
    here:    model (blocks, config), weights by FQN, and the graph with its weights as
             attributes and the token ids as its input: the lift's checks run on it as they run
             on torch.export's graph.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from planc.errors import ModelError

ATTRIBUTE = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")  # Dynamo's own cleanup
INSIDE_MODULE = re.compile(r"\._(?:modules|parameters|buffers)\b")


@dataclass
class DynamoCaptured:
    """The graph as the lift checks read it (as planc.capture.Captured): token ids in, logits out."""

    module: fx.GraphModule
    args: tuple
    kwargs: dict

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph


@dataclass
class DynamoGraph:
    model: nn.Module
    captured: DynamoCaptured
    ids_input: int  # which of the graph's inputs are the token ids
    num_inputs: int


def from_dynamo(gm: fx.GraphModule, example_inputs: list, model: nn.Module | None = None) -> DynamoGraph:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = [_source(n) for n in placeholders]
    names = [s.name if s is not None else n.name for s, n in zip(sources, placeholders)]
    weights = {i: fqn for i, name in enumerate(names) if (fqn := _weight_fqn(name)) is not None}
    if not weights:
        raise ModelError("the graph Dynamo handed planc's backend takes no module weights; planc compiles a "
                         "model's forward: torch.compile(model, backend='planc', ...)")
    root = _root_source(sources[next(iter(weights))])
    model = model if model is not None else _traced_root(root)
    _check_weights(model, weights, example_inputs, names)
    users = [i for i in range(len(placeholders)) if i not in weights]
    ids = _token_ids(users, example_inputs, names)
    _check_output(gm)
    module = _weights_as_attributes(gm, placeholders, weights, example_inputs, root.name)
    args = tuple(example_inputs[i] for i in users)
    return DynamoGraph(model, DynamoCaptured(module, args, {}), ids, len(placeholders))


def _source(node: fx.Node):
    return getattr(node, "_dynamo_source", None) or getattr(node.meta.get("grapharg"), "source", None)


def _weight_fqn(name: str) -> str | None:
    """L['self']._modules['model']._parameters['weight'] -> 'model.weight' (the module may be any
    local of the traced frame, L['args'][0] under a decorator); None for other inputs."""
    found = ATTRIBUTE.search(name)
    return ATTRIBUTE.sub(r".\1", name[found.start():])[1:] if found else None


def _root_source(source):
    """Where a weight's source starts: the module, a local of the traced frame (L['self'])."""
    while INSIDE_MODULE.search(source.name):
        source = source.base
    return source


def _traced_root(source) -> nn.Module:
    """The module `source` names, looked up in the traced frame's locals."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        root = _value(source, InstructionTranslator.current_tx().output.local_scope)
    except (ImportError, AttributeError, LookupError, TypeError, AssertionError, RuntimeError):
        root = None
    if not isinstance(root, nn.Module):
        raise ModelError("the planc backend did not find the module Dynamo traced (where its graph's weight sources "
                         "start); pass it: torch.compile(model, backend=planc.backend(model=model, plan=...))")
    return root


def _value(source, scope: dict) -> object:
    """A Dynamo source's value among the frame's locals: L['x'], its items and attributes (sources
    that only say how Dynamo treats a value name their base's)."""
    if hasattr(source, "local_name"):
        return scope[source.local_name]
    base = _value(source.base, scope)
    if hasattr(source, "index"):
        return base[source.index]
    return getattr(base, source.member) if hasattr(source, "member") else base


def _check_weights(model: nn.Module, weights: dict[int, str], example_inputs: list, sources: list[str]) -> None:
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    for i, fqn in weights.items():
        if named.get(fqn) is not example_inputs[i]:
            raise ModelError(f"graph input {sources[i]} is not {type(model).__name__}.{fqn}: the graph Dynamo "
                             "handed planc's backend was not traced from this model's forward")


def _token_ids(users: list[int], example_inputs: list, sources: list[str]) -> int:
    """The one tensor input that is not a weight: integer token ids [B, S]. SymInts (dynamic sizes)
    may come beside it."""
    tensors = [i for i in users if isinstance(example_inputs[i], torch.Tensor)]
    ids = [i for i in tensors if example_inputs[i].dim() == 2 and not example_inputs[i].is_floating_point()]
    if len(tensors) != 1 or len(ids) != 1:
        given = ", ".join(sources[i] for i in tensors) or "none"
        raise ModelError(f"the planc backend compiles a causal LM called on token ids alone, "
                         f"model(input_ids, use_cache=False); this graph takes the tensors {given}")
    return ids[0]


def _check_output(gm: fx.GraphModule) -> None:
    (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    flat = [o for o in fx.node.map_aggregate(outputs, lambda x: x) if isinstance(o, fx.Node)] if outputs else []
    if len(flat) != 1:
        raise ModelError(f"the planc backend returns the logits alone, but this graph returns {len(flat)} values; "
                         "call the model with use_cache=False (planc keeps its own KV cache)")


def _weights_as_attributes(gm: fx.GraphModule, placeholders: list[fx.Node], weights: dict[int, str],
                           example_inputs: list, root: str) -> fx.GraphModule:
    """A copy of the graph whose weights are attributes (get_attr) and whose inputs are the rest.
    Every node's value (Dynamo's example_value) is also under "val", and module stacks name
    modules by FQN (L['self'].model.norm -> model.norm), where the lift reads them."""
    module = fx.GraphModule(nn.Module(), fx.Graph())
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        index = placeholders.index(node) if node.op == "placeholder" else None
        if index in weights:
            setattr(module, f"w{index}", example_inputs[index])
            env[node] = graph.get_attr(f"w{index}")
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
        env[node].meta = _meta(node.meta, root)
    for name, sub in gm.named_children():
        module.add_submodule(name, sub)
    module.graph = graph
    module.recompile()
    return module


def _meta(meta: dict, root: str) -> dict:
    meta = dict(meta)
    if "val" not in meta and "example_value" in meta:
        meta["val"] = meta["example_value"]
    if "nn_module_stack" in meta:
        meta["nn_module_stack"] = {key: (_fqn(path, root), cls) for key, (path, cls) in meta["nn_module_stack"].items()}
    return meta


def _fqn(path: str, root: str) -> str:
    return "" if path == root else path.removeprefix(f"{root}.")
