"""Capture a model as an aten FX graph with torch.export (non-strict).

transformers models do not survive torch.fx.symbolic_trace (decorated forwards, mask and MoE
control flow); non-strict export does, and keeps `nn_module_stack` on every compute node, which
is how the lift finds blocks. On the meta device the same export runs with no weights at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from planc.errors import ModelError

EXAMPLE_SHAPE = (2, 8)  # batch, tokens: small, but > 1 so no dimension is specialized to 1


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    args: tuple
    kwargs: dict

    @property
    def module(self) -> torch.fx.GraphModule:
        return self.program.module()


def example_ids(model: nn.Module, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, EXAMPLE_SHAPE, generator=gen).to(device)


def capture(model: nn.Module) -> Captured:
    """A causal LM: forward(input_ids, use_cache=False) on example token ids."""
    if not hasattr(model, "get_input_embeddings"):
        raise ModelError(f"{type(model).__name__}: not a causal LM (no get_input_embeddings); "
                         "use capture_module(module, example_args) for other modules")
    return capture_module(model, (example_ids(model),), {"use_cache": False})


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


def module_fqns(program: torch.export.ExportedProgram) -> set[str]:
    """Every module FQN that owns at least one captured node."""
    fqns: set[str] = set()
    for node in program.graph.nodes:
        for fqn, _cls in (node.meta.get("nn_module_stack") or {}).values():
            fqns.add(fqn.removeprefix("L['self']."))
    return fqns
