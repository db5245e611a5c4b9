"""Lift: a causal LM -> semantic graph (one node per recognized block).

    captured: embedding, aten.mm, aten.rsqrt, ... (~700 nodes for a 4-layer model)
    lifted:   h = embedding(ids); x = rmsnorm(h); a = mla_attention(x); h_1 = add(h, a); ...

Recognition is structural (planc.lift.recognize); a feed-forward block no recognizer knows runs
as captured, its exported graph emitted as code (planc.lift.captured). The model is captured with one decoder layer
per structure (planc.lift.structure), so capture costs the same at any depth; each captured block
is confirmed numerically against the captured subgraph (planc.lift.check) unless the model lives
on the meta device, and every other layer stands on its representative's checks. Layers of one
structure (planc.lift.structure: modules, and the config's entries for the layer) are recognized
once. With `fold`, a run of consecutive layers of one structure is built once, as its first layer,
the graph recording the run (planc.ir.Run): planc.driver folds on meta, where nothing else tells
those layers apart.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from planc.capture import Captured, capture, module_fqns
from planc.errors import CompileError
from planc.lift.captured import with_code
from planc.lift.dynamo import DynamoCaptured
from planc.lift.fused import split_fused
from planc.lift.check import Check, check_blocks, junctions, structural_checks
from planc.lift.glue import read_glue
from planc.lift.graph import build_graph
from planc.lift.recognize import Block, decoder_layers, long_rope, recognize, rope_per_layer_type, router_bias_on_gate
from planc.lift.structure import representatives


@dataclass
class Lifted:
    graph: fx.Graph
    blocks: list[Block]
    checks: list[Check]  # empty when the model is on meta (nothing to run)
    captured: Captured | DynamoCaptured  # the model with one decoder layer per structure, or Dynamo's graph
    unfolded: Callable[[], fx.Graph] | None = None  # `graph` with every layer built, where `graph` is folded


def lift(model: nn.Module, *, check: bool, captured: Captured | DynamoCaptured | None = None,
         fold: bool = False) -> Lifted:
    """Recognize every block, capture one layer per structure, and (with `check`) run the checks.

    `captured`: the model's graph as another front end already has it (a torch.compile backend's
    Dynamo graph, planc.lift.dynamo) instead of capturing it here."""
    split_fused(model)  # Phi-3's qkv_proj / gate_up_proj: their parts, attached beside them
    long_rope(model)  # longrope's second set of frequencies, made a buffer
    rope_per_layer_type(model)  # Mellum's one rope per layer type: each layer's attention gets its own
    router_bias_on_gate(model)  # MiniMax-M2's router correction bias, held by the MoE block: on its gate too
    # layers of one structure (modules, and the config's entries for the layer) recognize alike: the first of each is
    # recognized, the others take its blocks (the cheap structural check per layer is that comparison)
    representative = representatives(decoder_layers(model), config=getattr(model, "config", None))
    blocks = recognize(model, representative)
    blocks = with_code(model, blocks, representative)
    captured = captured or capture(model, layers=sorted(set(representative.values())))
    ran = [b for b in blocks if b.layer is None or representative[b.layer] == b.layer]
    seen = module_fqns(captured)
    missing = [b.fqn for b in ran if b.kind != "lm_head" and b.fqn not in seen]
    if missing:
        raise CompileError(f"recognized blocks never ran in the captured graph: {', '.join(missing[:4])}")
    # the checks run export's module(), which builds a new GraphModule at each call: one, whose graph
    # the junctions are read from too; without checks the exported graph itself is enough (and cheaper)
    gm = captured.module if check else None
    found = junctions(captured.graph if gm is None else gm.graph, ran)
    glue = read_glue(found)  # the constants between blocks (planc.lift.glue)
    checks = []
    if check:
        checks = check_blocks(model, gm, ran, captured.args, captured.kwargs, glue, found)
        checks += structural_checks(blocks, representative)
    failed = [c for c in checks if not c.ok]
    if failed:
        lines = "\n".join(f"  {c.fqn}: {c.reason}" for c in failed)
        raise CompileError(f"lift declined for {len(failed)} block(s); the semantic op does not reproduce "
                           f"the captured graph:\n{lines}")
    graph = build_graph(blocks, model, glue, representative, fold)
    return Lifted(graph, blocks, checks, captured, lambda: build_graph(blocks, model, glue, representative))
