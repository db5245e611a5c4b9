"""Lift: captured aten graph -> semantic graph (one node per recognized block).

    captured: embedding, aten.mm, aten.rsqrt, ... (~700 nodes for a 4-layer model)
    lifted:   h = embedding(ids); x = rmsnorm(h); a = mla_attention(x); h_1 = add(h, a); ...

Recognition is structural (planc.lift.recognize) and each block is confirmed numerically against
the captured subgraph (planc.lift.check) unless the model lives on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from planc.capture import Captured, module_fqns
from planc.errors import CompileError
from planc.ir import NodeInfo, add_node
from planc.lift.check import Check, check_blocks
from planc.lift.recognize import Block, recognize


@dataclass
class Lifted:
    graph: fx.Graph
    blocks: list[Block]
    checks: list[Check]  # empty when the model is on meta (nothing to run)


def lift(model: nn.Module, captured: Captured, *, check: bool = True) -> Lifted:
    blocks = recognize(model)
    missing = [b.fqn for b in blocks if b.kind != "lm_head" and b.fqn not in module_fqns(captured.program)]
    if missing:
        raise CompileError(f"recognized blocks never ran in the captured graph: {', '.join(missing[:4])}")
    checks = check_blocks(model, captured.module, blocks, captured.args, captured.kwargs) if check else []
    failed = [c for c in checks if not c.ok]
    if failed:
        lines = "\n".join(f"  {c.fqn}: {c.reason}" for c in failed)
        raise CompileError(f"lift declined for {len(failed)} block(s); the semantic op does not reproduce "
                           f"the captured graph:\n{lines}")
    return Lifted(build_graph(blocks), blocks, checks)


def _meta(b: Block) -> NodeInfo:
    return NodeInfo(kind=b.kind, fqn=b.fqn, cls=b.cls, layer=b.layer, dims=b.dims, attrs=dict(b.attrs))


def build_graph(blocks: list[Block]) -> fx.Graph:
    """Wire the blocks as a pre-norm residual decoder (the skeleton the check confirmed)."""
    g = fx.Graph()
    ids = g.placeholder("ids")
    it = iter(blocks)
    h = add_node(g, "embedding", (ids,), _meta(next(it)), "h")
    for b in it:
        if b.kind == "lm_head":
            g.output(add_node(g, "lm_head", (h,), _meta(b), "logits"))
        elif b.kind == "rmsnorm" and b.layer is None:
            h = add_node(g, "rmsnorm", (h,), _meta(b), "h")
        else:  # a norm, then its block, then the residual add
            x = add_node(g, "rmsnorm", (h,), _meta(b), "x")
            blk = next(it)
            y = add_node(g, blk.kind, (x,), _meta(blk), "a" if "attention" in blk.kind else "m")
            h = add_node(g, "add", (h, y), NodeInfo(kind="add", layer=blk.layer), "h")
    return g
